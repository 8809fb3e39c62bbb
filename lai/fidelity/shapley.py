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

Faster path for real models (same estimator, same permutations, same game):
``permutation_shapley_many`` first collects every distinct prefix coalition of the sampled
permutations, then evaluates them in chunks through a *many-coalition* utility.
:class:`SGDStepGame` is the one-step game with the per-sample gradients flattened into one
``[n, P]`` matrix (a coalition's parameters are one ``[n] @ [n, P]`` product), memoized per
coalition, with a pluggable validation loss: :func:`fast_val_loss` picks a fused functional
forward for GPT-Neo causal LMs (scaled-dot-product attention; faster than the eager
Hugging Face forward on CPU) and the generic ``functional_call`` otherwise. The results
equal ``permutation_shapley(sgd_step_utility(...))`` to float rounding (the sums over a
coalition are taken in another order). Each coalition is one forward: ``torch.func.vmap``
over several coalitions was slower than a loop on CPU.
"""
from __future__ import annotations

from itertools import combinations
from math import factorial
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.func import functional_call

from lai.batching import IGNORE_INDEX, Batch, forward_logits, per_sample_loss

Utility = Callable[[frozenset], float]
# masks [K, n] (bool; row k = coalition k) -> utilities [K]
ManyUtility = Callable[[np.ndarray], np.ndarray]
ValLoss = Callable[[dict], torch.Tensor]


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


def permutation_shapley_many(utility_many: ManyUtility, n: int, permutations: int = 1000,
                             seed: int = 0, chunk: int = 64,
                             progress: Callable[[int], Any] | None = None
                             ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`permutation_shapley` with the coalitions evaluated in batches.

    Draws exactly the permutations :func:`permutation_shapley` draws for ``seed``, collects
    every distinct prefix coalition, evaluates them ``chunk`` at a time through
    ``utility_many(masks [K, n] bool) -> [K]``, and averages the marginals the same way: for
    a utility that gives the same numbers, the result is identical. ``progress(k)`` (e.g. a
    tqdm bar's ``update``) is called with the number of coalitions just evaluated.

    Returns ``(values [n], standard errors [n])``.
    """
    if permutations < 1:
        raise ValueError("permutations must be >= 1")
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(n) for _ in range(permutations)]
    # coalitions as bitmasks (Python ints), in order of first appearance
    index: dict[int, int] = {0: 0}
    for order in orders:
        mask = 0
        for i in order:
            mask |= 1 << int(i)
            index.setdefault(mask, len(index))
    masks = np.zeros((len(index), n), dtype=bool)
    for mask, row in index.items():
        masks[row] = [(mask >> i) & 1 for i in range(n)]
    utilities = np.empty(len(index))
    for start in range(0, len(index), chunk):
        part = np.asarray(utility_many(masks[start:start + chunk]), dtype=float)
        if part.shape != (min(chunk, len(index) - start),):
            raise ValueError(f"utility_many returned shape {part.shape} for "
                             f"{min(chunk, len(index) - start)} coalitions")
        utilities[start:start + chunk] = part
        if progress is not None:
            progress(len(part))
    marginals = np.zeros((permutations, n))
    for p, order in enumerate(orders):
        mask, prev = 0, utilities[0]
        for i in order:
            mask |= 1 << int(i)
            cur = utilities[index[mask]]
            marginals[p, i] = cur - prev
            prev = cur
    stderr = marginals.std(0, ddof=1) / np.sqrt(permutations) if permutations > 1 \
        else np.full(n, np.nan)
    return marginals.mean(0), stderr


def generic_val_loss(model: nn.Module, val_batch: Batch) -> ValLoss:
    """``params -> summed per-sample validation loss`` (a 0-dim tensor) via ``functional_call``;
    the model is used in its current mode and never modified."""
    inputs = val_batch.inputs

    def loss(p: dict) -> torch.Tensor:
        out = (functional_call(model, p, args=(), kwargs=inputs) if isinstance(inputs, dict)
               else functional_call(model, p, (inputs,)))
        logits = out.logits if hasattr(out, "logits") else out
        return per_sample_loss(logits, val_batch.labels).sum()

    return loss


def gpt_neo_val_loss(model: nn.Module, val_batch: Batch) -> ValLoss | None:
    """A fused functional forward of a Hugging Face ``GPTNeoForCausalLM`` on ``val_batch``:
    ``params -> summed per-sample loss``, equal to :func:`generic_val_loss` to float rounding.

    Same computation as the eager model (pre-LN blocks, unscaled attention computed in float32,
    local layers see the previous ``window_size`` tokens, ``gelu_new``, LM head tied to the
    input embedding unless the model has its own), with ``scaled_dot_product_attention`` and
    one fused QKV product. Returns ``None`` (use the generic path) when the model or batch is
    outside what this covers: another architecture, padding, token type ids, or active dropout.
    """
    # kept whole (~60+ lines): one fused functional forward, written out in the model's own
    # order
    if type(model).__name__ != "GPTNeoForCausalLM":
        return None
    cfg = model.config
    inputs = val_batch.inputs
    if not isinstance(inputs, dict) or set(inputs) - {"input_ids", "attention_mask"}:
        return None
    mask = inputs.get("attention_mask")
    if mask is not None and not bool((mask == 1).all()):
        return None
    if getattr(cfg, "activation_function", None) != "gelu_new":
        return None
    if model.training and any(float(getattr(cfg, k, 0.0) or 0.0) > 0 for k in
                              ("embed_dropout", "attention_dropout", "resid_dropout")):
        return None
    ids, labels = inputs["input_ids"], val_batch.labels
    b, t = ids.shape
    if t > cfg.max_position_embeddings:
        return None
    d, h = cfg.hidden_size, cfg.num_heads
    hd, eps = d // h, cfg.layer_norm_epsilon
    pos = torch.arange(t, device=ids.device)
    local = (pos[:, None] >= pos[None, :]) & (pos[:, None] - pos[None, :] < cfg.window_size)
    kinds = list(cfg.attention_layers)
    tied = model.lm_head.weight is model.transformer.wte.weight
    head = "transformer.wte.weight" if tied else "lm_head.weight"
    flat_labels = labels.reshape(-1)
    counts = (labels != IGNORE_INDEX).sum(dim=1).clamp_min(1)

    def loss(p: dict) -> torch.Tensor:
        x = p["transformer.wte.weight"][ids] + p["transformer.wpe.weight"][pos]
        for layer, kind in enumerate(kinds):
            pre, att = f"transformer.h.{layer}.", f"transformer.h.{layer}.attn.attention."
            y = F.layer_norm(x, (d,), p[pre + "ln_1.weight"], p[pre + "ln_1.bias"], eps)
            w = torch.cat([p[att + "q_proj.weight"], p[att + "k_proj.weight"],
                           p[att + "v_proj.weight"]])
            q, k, v = (y @ w.T).view(b, t, 3, h, hd).permute(2, 0, 3, 1, 4)
            dtype = v.dtype  # GPT-Neo computes attention in float32 (at least)
            q, k, v = (z.to(torch.promote_types(dtype, torch.float32)) for z in (q, k, v))
            if kind == "global":
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
            else:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=local, scale=1.0)
            o = o.to(dtype).transpose(1, 2).reshape(b, t, d)
            x = x + F.linear(o, p[att + "out_proj.weight"], p[att + "out_proj.bias"])
            y = F.layer_norm(x, (d,), p[pre + "ln_2.weight"], p[pre + "ln_2.bias"], eps)
            y = F.gelu(F.linear(y, p[pre + "mlp.c_fc.weight"], p[pre + "mlp.c_fc.bias"]),
                       approximate="tanh")
            x = x + F.linear(y, p[pre + "mlp.c_proj.weight"], p[pre + "mlp.c_proj.bias"])
        x = F.layer_norm(x, (d,), p["transformer.ln_f.weight"], p["transformer.ln_f.bias"], eps)
        logits = x @ p[head].T
        ce = F.cross_entropy(logits.reshape(b * t, -1), flat_labels, ignore_index=IGNORE_INDEX,
                             reduction="none").view(b, t)
        return (ce.sum(dim=1) / counts).sum()

    # every parameter the forward reads must be one the caller passes
    names = {n for n, _ in model.named_parameters()}
    needed = {"transformer.wte.weight", "transformer.wpe.weight", head,
              "transformer.ln_f.weight", "transformer.ln_f.bias"}
    if not needed <= names:
        return None
    return loss


def fast_val_loss(model: nn.Module, val_batch: Batch) -> ValLoss:
    """:func:`gpt_neo_val_loss` where it applies, else :func:`generic_val_loss`."""
    return gpt_neo_val_loss(model, val_batch) or generic_val_loss(model, val_batch)


class SGDStepGame:
    """The one-step game of :func:`sgd_step_utility`, for one or many coalitions at a time.

    ``game(coalition)`` is a :data:`Utility` (a frozenset -> float) and ``game.many(masks)``
    a :data:`ManyUtility` for :func:`permutation_shapley_many`. Per-sample gradients of the B
    training samples are taken once (B backward passes, the model's current mode) and kept as
    one ``[B, P]`` matrix; a coalition's parameters are ``theta - lr * mask @ G``.
    ``val_loss(params) -> summed validation loss`` defaults to :func:`fast_val_loss`. The
    model is never modified. ``U(empty) = 0`` exactly; the values equal
    :func:`sgd_step_utility`'s to float rounding (sum order). Utilities are memoized per
    coalition.
    """

    def __init__(self, model: nn.Module, train_batch: Batch, val_batch: Batch, lr: float,
                 val_loss: ValLoss | None = None):
        self.lr = float(lr)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.params = {n: p.detach() for n, p in model.named_parameters()}
        self.theta = torch.cat([p.detach().reshape(-1) for _, p in named])
        rows = []
        for j in range(len(train_batch)):
            one = train_batch.select(torch.tensor([j]))
            with torch.enable_grad():
                loss = per_sample_loss(forward_logits(model, one.inputs), one.labels).sum()
                g = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
            rows.append(torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1)
                                   for x, (_, p) in zip(g, named)]))
        self.grads = torch.stack(rows)  # [B, P]
        self.n = len(rows)
        self.val_loss = val_loss or fast_val_loss(model, val_batch)
        self._cache: dict[bytes, float] = {}  # coalition (packed mask) -> utility
        with torch.no_grad():
            self.base = float(self.val_loss(self.params))

    def _loss_at(self, flat: torch.Tensor) -> float:
        p = dict(self.params)
        p.update(zip(self.names, (x.view(s) for x, s in
                                  zip(torch.split(flat, self.sizes), self.shapes))))
        return float(self.val_loss(p))

    def many(self, masks: np.ndarray) -> np.ndarray:
        """Utilities ``[K]`` of the coalitions ``masks [K, n]`` (bool)."""
        masks = np.asarray(masks, dtype=bool)
        if masks.ndim != 2 or masks.shape[1] != self.n:
            raise ValueError(f"masks must be [K, {self.n}], got {masks.shape}")
        out = np.zeros(len(masks))
        keys = [np.packbits(m).tobytes() for m in masks]
        todo = [k for k, key in enumerate(keys) if masks[k].any() and key not in self._cache]
        if todo:
            with torch.no_grad():
                coef = torch.as_tensor(masks[todo], device=self.grads.device) \
                    .to(self.grads.dtype)
                for k, c in zip(todo, coef):  # one [P] step at a time: P may be 10^8
                    step = c @ self.grads
                    self._cache[keys[k]] = self.base - self._loss_at(self.theta - self.lr * step)
        for k, key in enumerate(keys):
            if masks[k].any():
                out[k] = self._cache[key]
        return out

    def __call__(self, coalition: frozenset) -> float:
        mask = np.zeros((1, self.n), dtype=bool)
        mask[0, sorted(coalition)] = True
        return float(self.many(mask)[0])


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    """Pearson correlation of two score vectors (NaN when either is constant)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])
