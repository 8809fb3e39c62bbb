"""The Shapley reference: exact enumeration, the Monte-Carlo estimator, the one-step game."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lai import value
from lai.batching import as_batch
from lai.fidelity.shapley import exact_shapley, pearson, permutation_shapley, sgd_step_utility
from tests.estimators.nets import MLP


def random_game(n: int, seed: int):
    """A non-additive game: pairwise synergies plus a concave size term."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=n)
    pair = rng.normal(scale=0.5, size=(n, n))
    pair = (pair + pair.T) / 2

    def u(s: frozenset) -> float:
        idx = sorted(s)
        return float(w[idx].sum() + sum(pair[i, j] for i in idx for j in idx if i < j)
                     + np.sqrt(len(idx)))
    return u


def test_exact_shapley_known_games():
    # additive game: Shapley = each player's own worth
    w = np.array([1.0, -2.0, 0.5])
    assert np.allclose(exact_shapley(lambda s: float(w[list(s)].sum()), 3), w)
    # glove game: player 0 holds a left glove, 1 and 2 right gloves; a pair is worth 1
    glove = lambda s: float(0 in s and (1 in s or 2 in s))  # noqa: E731
    assert np.allclose(exact_shapley(glove, 3), [2 / 3, 1 / 6, 1 / 6])


def test_exact_shapley_efficiency_and_symmetry():
    u = random_game(6, 0)
    phi = exact_shapley(u, 6)
    assert np.isclose(phi.sum(), u(frozenset(range(6))) - u(frozenset()))


def test_permutation_estimator_converges_to_exact():
    n = 6
    u = random_game(n, 1)
    exact = exact_shapley(u, n)
    est, se = permutation_shapley(u, n, permutations=4000, seed=0)
    assert np.all(np.abs(est - exact) <= 5 * se + 1e-9)
    assert np.abs(est - exact).max() < 0.05 * (np.abs(exact).max() + 1)
    # every permutation's marginals sum to U(N) - U(empty): the estimate is exactly efficient
    assert np.isclose(est.sum(), u(frozenset(range(n))) - u(frozenset()))
    again, _ = permutation_shapley(u, n, permutations=50, seed=3)
    assert np.array_equal(again, permutation_shapley(u, n, permutations=50, seed=3)[0])


def test_one_step_game_is_first_order_ghost():
    """For a small step, Shapley / lr -> <grad L_V, grad ell_i>, the Ghost value."""
    torch.manual_seed(0)
    model = MLP().double()
    tr = as_batch((torch.randn(6, 12, dtype=torch.float64), torch.randint(0, 5, (6,))))
    va = as_batch((torch.randn(8, 12, dtype=torch.float64), torch.randint(0, 5, (8,))))
    lr = 1e-5
    u = sgd_step_utility(model, tr, va, lr)
    phi = exact_shapley(u, 6) / lr
    ghost = value(model, tr, va, method="ghost").numpy()
    assert np.abs(phi - ghost).max() < 1e-3 * np.abs(ghost).max()
    assert pearson(phi, ghost) > 0.9999
    # the utility of a coalition is the loss decrease of an explicit SGD step on it
    before = [p.detach().clone() for p in model.parameters()]
    s = frozenset({1, 4})
    loss = torch.nn.functional.cross_entropy(model(tr.inputs[[1, 4]]), tr.labels[[1, 4]],
                                             reduction="sum")
    grads = torch.autograd.grad(loss, list(model.parameters()))
    with torch.no_grad():
        l0 = torch.nn.functional.cross_entropy(model(va.inputs), va.labels, reduction="sum")
        for p, g in zip(model.parameters(), grads):
            p -= lr * g
        l1 = torch.nn.functional.cross_entropy(model(va.inputs), va.labels, reduction="sum")
        for p, b in zip(model.parameters(), before):
            p.copy_(b)
    assert np.isclose(u(s), float(l0 - l1), rtol=1e-10, atol=1e-15)


def test_large_step_is_not_additive():
    """With a real step the game has interactions: Shapley differs from the lone values."""
    torch.manual_seed(1)
    model = MLP().double()
    tr = as_batch((torch.randn(5, 12, dtype=torch.float64), torch.randint(0, 5, (5,))))
    va = as_batch((torch.randn(8, 12, dtype=torch.float64), torch.randint(0, 5, (8,))))
    u = sgd_step_utility(model, tr, va, lr=0.5)
    phi = exact_shapley(u, 5)
    lone = np.array([u(frozenset({i})) for i in range(5)])
    assert not np.allclose(phi, lone, rtol=1e-3)


def test_exact_refuses_large_games():
    with pytest.raises(ValueError, match="2\\^n"):
        exact_shapley(lambda s: 0.0, 25)
