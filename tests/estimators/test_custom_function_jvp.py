"""Custom autograd.Functions without a jvp under Ghost's forward form
(lai/estimators/forward/custom_function_jvp.py): the output tangent is derived from the Function's own
backward (double backward), equal to the tangent of the same operation written in plain torch
to rounding; the primal and the training gradients are the Function's own; a Function with a
jvp, or called without a dual input, runs unchanged; ``Function.apply`` is restored. Ghost on
models using such Functions (a GELU MLP, BLOOM, whose GeLU is one) equals per-sample
gradients by plain reverse mode (torch.func cannot transform old-style Functions)."""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from lai import value
from lai.estimators.forward.custom_function_jvp import custom_function_jvps, has_own_jvp
from tests.estimators import brute
from tests.estimators.brute import rel_err, strip
from tests.estimators.nets import lm_batch


def _tanh_gelu(x):
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3)))


class OldStyleGelu(torch.autograd.Function):
    """``forward(ctx, x)`` with an explicit backward (the style of BLOOM's GeLUFunction)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _tanh_gelu(x)

    @staticmethod
    def backward(ctx, g):
        # written out in torch operations, so it is differentiable in x too (LiSSA's
        # Hessian-vector products differentiate it)
        (x,) = ctx.saved_tensors
        c, a = 0.7978845608028654, 0.044715
        th = torch.tanh(c * (x + a * x ** 3))
        return g * (0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * c * (1.0 + 3.0 * a * x * x))


class NewStyleScaledProduct(torch.autograd.Function):
    """Two tensor inputs and a number, two outputs, ``setup_context`` style: ``(a * b * s,
    a + b)``."""

    @staticmethod
    def forward(a, b, s):
        return a * b * s, a + b

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, b, s = inputs
        ctx.save_for_backward(a, b)
        ctx.s = s

    @staticmethod
    def backward(ctx, g1, g2):
        a, b = ctx.saved_tensors
        return g1 * b * ctx.s + g2, g1 * a * ctx.s + g2, None


class StraightThroughRound(torch.autograd.Function):
    """``round`` forward, identity backward: the derivative it declares is not its
    forward's (zero almost everywhere)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class WithJvp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 3

    @staticmethod
    def backward(ctx, g):
        return g * 3

    @staticmethod
    def jvp(ctx, t):
        return t * 3


def _dual_call(fn, primals, tangents, grad=True):
    """``fn`` on dual numbers under custom_function_jvps(); ``fn`` looks ``apply`` up when
    called, as models do (a bound ``X.apply`` taken before the context is PyTorch's own)."""
    with torch.set_grad_enabled(grad), fwAD.dual_level(), custom_function_jvps():
        duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        out = fn(*duals)
        outs = out if isinstance(out, tuple) else (out,)
        return [fwAD.unpack_dual(o) for o in outs]


@pytest.mark.parametrize("grad", [True, False])
def test_old_style_function_tangent_primal_and_gradient(grad):
    x = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 5)
    (out,) = _dual_call(lambda v: OldStyleGelu.apply(v), [x * 1.0], [t], grad=grad)
    (ref,) = _dual_call(_tanh_gelu, [x.detach()], [t], grad=False)
    assert torch.equal(out.primal, OldStyleGelu.apply(x.detach()))
    assert rel_err(out.tangent, ref.tangent) < 1e-12
    assert out.primal.requires_grad == grad
    if grad:  # the training gradient still runs the Function's backward
        (g,) = torch.autograd.grad(out.primal.sum(), x)
        (g_ref,) = torch.autograd.grad(OldStyleGelu.apply(x).sum(), x)
        assert torch.equal(g, g_ref)


def test_new_style_function_with_two_outputs_and_a_number():
    a, b = torch.randn(3, 2), torch.randn(3, 2)
    ta, tb = torch.randn(3, 2), torch.randn(3, 2)
    out = _dual_call(lambda x, y: NewStyleScaledProduct.apply(x, y, 1.5), [a, b], [ta, tb])
    ref = _dual_call(lambda x, y: (x * y * 1.5, x + y), [a, b], [ta, tb], grad=False)
    for o, r in zip(out, ref):
        assert torch.allclose(o.primal, r.primal) and rel_err(o.tangent, r.tangent) < 1e-12
    # one dual input, the other a constant: its tangent counts as zero
    with fwAD.dual_level(), custom_function_jvps():
        p, s = NewStyleScaledProduct.apply(fwAD.make_dual(a, ta), b, 2.0)
        assert rel_err(fwAD.unpack_dual(p).tangent, ta * b * 2.0) < 1e-12
        assert rel_err(fwAD.unpack_dual(s).tangent, ta) < 1e-12


def test_tangent_is_the_derivative_the_backward_declares():
    """A straight-through round: the tangent is the input's (identity backward), as reverse
    mode differentiates it, not zero (the forward's own derivative)."""
    x, t = torch.randn(6) * 3, torch.randn(6)
    (out,) = _dual_call(lambda v: StraightThroughRound.apply(v), [x], [t])
    assert torch.equal(out.primal, torch.round(x))
    assert torch.allclose(out.tangent, t)


def test_function_with_a_jvp_or_no_dual_input_runs_unchanged():
    assert has_own_jvp(WithJvp) and not has_own_jvp(OldStyleGelu)
    x, t = torch.randn(3), torch.randn(3)
    (out,) = _dual_call(lambda v: WithJvp.apply(v), [x], [t])
    assert torch.equal(out.tangent, t * 3)
    with fwAD.dual_level(), custom_function_jvps():
        y = OldStyleGelu.apply(x)  # no dual input: PyTorch's own path, no tangent
        assert fwAD.unpack_dual(y).tangent is None


def test_apply_is_restored_even_after_an_error():
    original = torch.autograd.Function.__dict__["apply"]
    with pytest.raises(ZeroDivisionError):
        with custom_function_jvps():
            assert torch.autograd.Function.__dict__["apply"] is not original
            raise ZeroDivisionError
    assert torch.autograd.Function.__dict__["apply"] is original
    with fwAD.dual_level():  # outside the context PyTorch's own error is back
        with pytest.raises(NotImplementedError, match="jvp"):
            OldStyleGelu.apply(fwAD.make_dual(torch.randn(2), torch.randn(2)))


class GeluMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(OldStyleGelu.apply(self.fc1(x)))


def _loop_reference(model, tr, va, kwargs):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if kwargs:
        gt = brute.per_sample_grads_autograd(model, names, strip(tr), tr["labels"], True)
        gv = brute.per_sample_grads_autograd(model, names, strip(va), va["labels"], True)
    else:
        gt = brute.per_sample_grads_autograd(model, names, tr[0], tr[1])
        gv = brute.per_sample_grads_autograd(model, names, va[0], va[1])
    return gt @ gv.sum(0)


@pytest.mark.parametrize("train", [False, True])
def test_ghost_on_a_model_with_a_custom_function(train):
    model = GeluMLP().train(train)
    tr = (torch.randn(5, 6), torch.randint(0, 3, (5,)))
    va = (torch.randn(4, 6), torch.randint(0, 3, (4,)))
    ref = _loop_reference(model, tr, va, kwargs=False)
    assert rel_err(value(model, tr, va, lm_labels="aligned", method="ghost"), ref) < 1e-10


def _tiny_bloom() -> nn.Module:
    """A random tiny BLOOM (every MLP runs its GeLUFunction, which has no jvp); skips the test
    where transformers or BLOOM is missing."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "BloomForCausalLM"):
        pytest.skip("this transformers has no BLOOM")
    torch.manual_seed(0)
    return transformers.BloomForCausalLM(transformers.BloomConfig(
        vocab_size=40, hidden_size=16, n_layer=2, n_head=2))


def test_ghost_on_bloom():
    """BLOOM's own forward and reverse modes differ by about 2e-12 relative in float64 with or
    without its GeLUFunction (measured), hence the tolerance."""
    model = _tiny_bloom().eval()
    tr, va = lm_batch(4, 6, 40, seed=1), lm_batch(3, 6, 40, seed=2)
    ref = _loop_reference(model, tr, va, kwargs=True)
    assert rel_err(value(model, tr, va, lm_labels="aligned", method="ghost"), ref) < 1e-9


@pytest.mark.parametrize("arch", ["mlp", "bloom"])
def test_training_forward_scores_and_keeps_its_backward(arch):
    """In the trainer's one-pass step (grad enabled, tangents released as modules return),
    the forward form gives the reference values and the training gradients of a plain
    step."""
    from lai.batching import as_batch, forward_logits, per_sample_loss
    from lai.estimators.online.ghost import GhostEstimator

    if arch == "bloom":
        model = _tiny_bloom().train()
        tr_raw, va_raw = lm_batch(4, 6, 40, seed=1), lm_batch(3, 6, 40, seed=2)
        ref_values = _loop_reference(model, tr_raw, va_raw, kwargs=True)
    else:
        model = GeluMLP().train()
        tr_raw = (torch.randn(5, 6), torch.randint(0, 3, (5,)))
        va_raw = (torch.randn(4, 6), torch.randint(0, 3, (4,)))
        ref_values = _loop_reference(model, tr_raw, va_raw, kwargs=False)
    tr, va = as_batch(tr_raw), as_batch(va_raw)
    est = GhostEstimator(mode="forward")
    est.refresh(model, va)
    with est.capture(model, tr) as cap:
        logits = forward_logits(model, tr.inputs)
    per_sample_loss(logits, tr.labels).sum().backward()
    assert rel_err(est.score(cap), ref_values) < 1e-9
    params = list(model.parameters())
    ref_grads = torch.autograd.grad(
        per_sample_loss(forward_logits(model, tr.inputs), tr.labels).sum(), params)
    for p, g in zip(params, ref_grads):
        assert torch.allclose(p.grad, g, rtol=1e-10, atol=1e-12)


class PlainGeluMLP(GeluMLP):
    """GeluMLP with the same GELU written in plain torch operations (torch.func can run it)."""

    def forward(self, x):
        return self.fc2(_tanh_gelu(self.fc1(x)))


def test_per_sample_gradients_fall_back_to_reverse_mode():
    """torch.func refuses old-style Functions; DataInf's and TRAK's per-sample gradients then
    come from plain reverse mode, equal to the loop reference."""
    from lai.batching import as_batch, per_sample_loss
    from lai.estimators.static.datainf import per_sample_gradient_chunks

    model = GeluMLP()
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    chunks = list(per_sample_gradient_chunks(model, [as_batch((x, y))], 3, per_sample_loss))
    got = torch.cat([torch.cat([c[n].reshape(c[n].shape[0], -1) for n, _ in
                                model.named_parameters()], 1) for c in chunks])
    names = [n for n, _ in model.named_parameters()]
    assert rel_err(got, brute.per_sample_grads_autograd(model, names, x, y)) < 1e-12


@pytest.mark.parametrize("method", ["ip", "lissa", "datainf", "trak"])
def test_static_estimators_on_a_model_with_a_custom_function(method):
    """The same values as on the same network written in plain torch, where torch.func and
    forward AD need no help."""
    custom, plain = GeluMLP(), PlainGeluMLP()
    plain.load_state_dict(custom.state_dict())
    tr = (torch.randn(6, 6), torch.randint(0, 3, (6,)))
    va = (torch.randn(4, 6), torch.randint(0, 3, (4,)))
    values = []
    for model in (custom, plain):
        torch.manual_seed(5)  # TRAK's projection, LiSSA's sampling
        # an explicit LiSSA scale: this random-init net's negative curvature exceeds the
        # default damping, and the data-driven scale would (rightly) report divergence
        options = {"scale": 10.0} if method == "lissa" else {}
        values.append(value(model, tr, va, method=method, **options))
    assert rel_err(values[0], values[1]) < 1e-10
