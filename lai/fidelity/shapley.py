"""Shapley values of the samples of one batch: the reference the proxies are checked against.

The game (paper §5.1, following "Data Shapley in One Training Run"): the players are the B
samples of a training batch at a checkpoint theta; a coalition S is worth

    U(S) = L_V(theta) - L_V(theta - lr * sum_{i in S} grad ell_i(theta))

the decrease of the summed validation loss after one SGD step on S. To first order in
``lr`` this game is additive, with ``U({i}) = lr * <grad L_V, grad ell_i> = lr * v_i``, the
Ghost/IP value; so ``shapley / lr`` is directly comparable with every value in this package
(positive = helps).

``exact_shapley`` enumerates all 2^n coalitions (small n, for tests); ``permutation_shapley``
is the Monte-Carlo permutation estimator (the paper uses 1,000 permutations).
"""
from __future__ import annotations

from itertools import combinations
from math import factorial
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from lai.batching import Batch, forward_logits, per_sample_loss

Utility = Callable[[frozenset], float]


def exact_shapley(utility: Utility, n: int) -> np.ndarray:
    """``[n]`` exact Shapley values by enumerating every coalition (2^n utility calls)."""
    if n > 20:
        raise ValueError(f"exact Shapley enumerates 2^n coalitions; n={n} is too many")
    values = {frozenset(s): utility(frozenset(s))
              for k in range(n + 1) for s in combinations(range(n), k)}
    phi = np.zeros(n)
    for s, u in values.items():
        k = len(s)
        for i in range(n):
            if i not in s:
                weight = factorial(k) * factorial(n - k - 1) / factorial(n)
                phi[i] += weight * (values[s | {i}] - u)
    return phi


def permutation_shapley(utility: Utility, n: int, permutations: int = 1000,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Monte-Carlo Shapley: the mean marginal contribution over random orderings.

    Returns ``(values [n], standard errors [n])``. Utilities are cached per coalition, so
    repeated prefixes cost nothing.
    """
    if permutations < 1:
        raise ValueError("permutations must be >= 1")
    rng = np.random.default_rng(seed)
    cache: dict[frozenset, float] = {}

    def u(s: frozenset) -> float:
        if s not in cache:
            cache[s] = float(utility(s))
        return cache[s]

    marginals = np.zeros((permutations, n))
    for p in range(permutations):
        coalition: frozenset = frozenset()
        prev = u(coalition)
        for i in rng.permutation(n):
            coalition = coalition | {int(i)}
            cur = u(coalition)
            marginals[p, i] = cur - prev
            prev = cur
    stderr = marginals.std(0, ddof=1) / np.sqrt(permutations) if permutations > 1 \
        else np.full(n, np.nan)
    return marginals.mean(0), stderr


def sgd_step_utility(model: nn.Module, train_batch: Batch, val_batch: Batch,
                     lr: float) -> Utility:
    """The one-step game above for ``model`` at its current parameters.

    Per-sample gradients of the B training samples are taken once (B backward passes; the
    batch of a fidelity study is small); each coalition then costs one validation forward.
    The model is used in its current mode and never modified. Use eval mode for models with
    BatchNorm: a per-sample gradient in train mode would normalise a batch of one.
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    grads = []
    for j in range(len(train_batch)):
        one = train_batch.select(torch.tensor([j]))
        with torch.enable_grad():
            loss = per_sample_loss(forward_logits(model, one.inputs), one.labels).sum()
            g = torch.autograd.grad(loss, [dict(model.named_parameters())[n] for n in names])
        grads.append([x.detach() for x in g])

    def val_loss(p: dict) -> float:
        with torch.no_grad():
            inputs = val_batch.inputs
            out = (functional_call(model, p, args=(), kwargs=inputs) if isinstance(inputs, dict)
                   else functional_call(model, p, (inputs,)))
            logits = out.logits if hasattr(out, "logits") else out
            return float(per_sample_loss(logits, val_batch.labels).sum())

    base = val_loss(params)

    def utility(coalition: frozenset) -> float:
        if not coalition:
            return 0.0
        stepped = dict(params)
        for k, n in enumerate(names):
            step = sum(grads[j][k] for j in coalition)
            stepped[n] = params[n] - lr * step
        return base - val_loss(stepped)

    return utility


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    """Pearson correlation of two score vectors (NaN when either is constant)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])
