"""Ghost's forward-mode fast paths (lai/estimators/forward/forward_fastpaths.py). Arithmetic with a
constant operand and frozen affine parameters: every case the mode computes gives the primal,
tangent and backward gradient PyTorch gives, bit for bit, without arithmetic on an
efficient-zero tangent; the cases it leaves alone are untouched. Train-mode BatchNorm: the
same primal, gradients and running statistics, the tangent equal to PyTorch's to rounding.
Ghost's values and training gradients on BERT (dropout on, or norms and biases frozen),
GPT-Neo and ResNet-18 with the mode on and off."""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lai.batching import as_batch
from lai.estimators.forward.forward_fastpaths import ForwardFastPaths
from lai.estimators.online.ghost import GhostEstimator
from tests.estimators.nets import lm_batch, tiny_bert_classifier, tiny_lm, token_batch
from tests.estimators.test_tangents import _image_batch, _resnet18, _training_step


class ZeroTangentCount(TorchDispatchMode):
    """Counts the operations run on ``meta`` tensors under it (``n``): arithmetic on an
    efficient-zero tangent works out its result's shape that way, in Python in torch 2.15
    (``prims.mul`` and the like), which is the cost the mode avoids."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(isinstance(a, torch.Tensor) and a.is_meta for a in args):
            self.n += 1
        return func(*args, **(kwargs or {}))


def _c(shape, dtype=torch.float32, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype) + 2.0  # away from 0: division


def _inplace(op):
    def f(x, c):
        y = x.clone()  # a non-leaf dual tensor (in place on a leaf's view is refused)
        op(y, c)
        return y
    return f


# (function of the dual tensor x [4, 5] and a constant, the constant's shape or None for none)
HANDLED = {
    "x*number": (lambda x, c: x * 0.5, None),
    "number*x": (lambda x, c: 0.5 * x, None),
    "x.mul(int)": (lambda x, c: x.mul(3), None),
    "x+number": (lambda x, c: x + 1.25, None),
    "number+x": (lambda x, c: 1.25 + x, None),
    "add_alpha": (lambda x, c: torch.add(x, 3.0, alpha=2), None),
    "x-number": (lambda x, c: x - 0.75, None),
    "sub_alpha": (lambda x, c: torch.sub(x, 1.5, alpha=0.5), None),
    "x/number": (lambda x, c: x / 8, None),
    "torch.div": (lambda x, c: torch.div(x, 3.0), None),
    "x*=": (_inplace(lambda y, c: y.__imul__(2.5)), None),
    "x+=": (_inplace(lambda y, c: y.__iadd__(1.5)), None),
    "x-=": (_inplace(lambda y, c: y.sub_(0.5)), None),
    "x/=": (_inplace(lambda y, c: y.div_(3.0)), None),
    "x*tensor": (lambda x, c: x * c, (4, 5)),
    "tensor*x": (lambda x, c: c * x, (4, 5)),
    "x*broadcast": (lambda x, c: x * c, (5,)),
    "x*0dim": (lambda x, c: x * c, ()),
    "x/tensor": (lambda x, c: x / c, (4, 5)),
    "x+mask": (lambda x, c: x + c, (1, 5)),
    "mask+x": (lambda x, c: c + x, (4, 5)),
    "x+grows": (lambda x, c: x[:, :1] + c, (4, 5)),  # the tangent is broadcast
    "x-tensor": (lambda x, c: x - c, (4, 5)),
    "torch.mul": (lambda x, c: torch.mul(x, c), (4, 5)),
    # frozen affine parameters (no tangent) of a layer whose input is dual
    "linear_frozen": (lambda x, c: F.linear(x, _c((3, 5), c.dtype, 5), c[:3]), (5,)),
    "linear_bias_kw": (lambda x, c: F.linear(x, _c((3, 5), c.dtype, 5), bias=c[:3]), (5,)),
    "layer_norm_frozen": (lambda x, c: F.layer_norm(x, (5,), c, c * 0.5), (5,)),
    "group_norm_frozen": (lambda x, c: F.group_norm(x, 5, c, c * 0.5), (5,)),
    "rms_norm_frozen": (lambda x, c: F.rms_norm(x, (5,), c), (5,)),
    "batch_norm_eval_frozen": (lambda x, c: F.batch_norm(x, c * 0.1, c, c, c * 0.5), (5,)),
    "instance_norm_frozen": (lambda x, c: F.instance_norm(x.reshape(2, 5, 2), weight=c,
                                                          bias=c * 0.5), (5,)),
}
# with ``alpha`` PyTorch's binding takes the number as a Scalar already: no zero tangent
CHEAP_IN_PYTORCH = {"add_alpha", "sub_alpha"}
UNHANDLED = {  # left to PyTorch: the mode must not change them
    "where": (lambda x, c: torch.where(c > 2.0, x, c), (4, 5)),
    "tensor-x": (lambda x, c: c - x, (4, 5)),
    "tensor/x": (lambda x, c: c / x, (4, 5)),
    "add_alpha_tensor": (lambda x, c: torch.add(x, c, alpha=2), (4, 5)),
    "complex": (lambda x, c: (x * 1j).real, None),
    "dual*dual": (lambda x, c: x * x, None),
    "x.mul_(tensor)": (_inplace(lambda y, c: y.mul_(c)), (4, 5)),
}


def _run(fn, cshape, dtype, mode: bool, count: bool = True):
    """(primal, tangent, gradient of sum(primal * w) w.r.t. x, efficient zeros made (with
    ``count``), calls the mode computed)."""
    x = _c((4, 5), dtype, seed=1).requires_grad_()
    tangent = _c((4, 5), dtype, seed=2)
    c = None if cshape is None else _c(cshape, dtype if dtype != torch.bfloat16 or
                                       cshape == (5,) else torch.float32)
    counter, fast = ZeroTangentCount(), ForwardFastPaths()
    with fwAD.dual_level():
        with (counter if count else _Off()), (fast if mode else _Off()):
            out = fn(fwAD.make_dual(x, tangent), c)
        primal, out_tangent = fwAD.unpack_dual(out)
        primal, out_tangent = primal.clone(), out_tangent.clone()
    w = torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(out.dtype)
    (grad,) = torch.autograd.grad((out * w).sum(), x)
    return primal, out_tangent, grad, counter.n, fast.handled


class _Off:
    """A no-op context manager standing in for the mode when it is off."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(HANDLED))
def test_handled_case_is_pytorchs_result_without_zero_tangents(case, dtype):
    fn, cshape = HANDLED[case]
    ref = _run(fn, cshape, dtype, mode=False)
    got = _run(fn, cshape, dtype, mode=True)
    for name, a, b in zip(("primal", "tangent", "grad"), got[:3], ref[:3]):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), name
    assert ref[3] > 0 or case in CHEAP_IN_PYTORCH  # PyTorch's zero tangent at work ...
    assert got[3] == 0 and got[4] >= 1  # ... and the mode computed the call without one


@pytest.mark.parametrize("case", list(UNHANDLED))
def test_unhandled_case_is_left_to_pytorch(case):
    fn, cshape = UNHANDLED[case]
    # no dispatch mode: torch 2.15 crashes (segfault) on ``c / x`` under one
    ref = _run(fn, cshape, torch.float32, mode=False, count=False)
    got = _run(fn, cshape, torch.float32, mode=True, count=False)
    assert all(torch.equal(a, b) for a, b in zip(got[:3], ref[:3]))
    assert got[4] == 0


def test_added_tangent_is_not_shared_with_the_input():
    """``x + c`` gets a tangent of its own: an in-place operation on the sum leaves x's."""
    x = torch.randn(3, 4, requires_grad=True)
    with fwAD.dual_level():
        xd = fwAD.make_dual(x, torch.ones(3, 4))
        with ForwardFastPaths() as fast:
            y = xd + torch.zeros(3, 4)
            y.mul_(3.0)
        assert fast.handled == 2
        assert torch.equal(fwAD.unpack_dual(xd).tangent, torch.ones(3, 4))
        assert torch.equal(fwAD.unpack_dual(y).tangent, torch.full((3, 4), 3.0))


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_cpu_dropout_draws_the_same_mask(layout):
    x0 = torch.randn(6, 7, 5, requires_grad=True)
    results = []
    for mode in (False, True):
        torch.manual_seed(11)
        counter, fast = ZeroTangentCount(), ForwardFastPaths()
        with fwAD.dual_level():
            xd = fwAD.make_dual(x0, torch.randn(6, 7, 5, generator=torch.Generator()
                                                 .manual_seed(4)))
            if layout == "transposed":
                xd = xd.transpose(1, 2)
            with counter, (fast if mode else _Off()):
                out = F.dropout(xd, 0.3, training=True)
            primal, tangent = (v.clone() for v in fwAD.unpack_dual(out))
        (grad,) = torch.autograd.grad(out.sum(), x0)
        results.append((primal, tangent, grad, torch.get_rng_state(), counter.n, fast.handled))
    (p0, t0, g0, r0, n0, _), (p1, t1, g1, r1, n1, h1) = results
    assert torch.equal(p0, p1) and torch.equal(t0, t1) and torch.equal(g0, g1)
    assert torch.equal(r0, r1)  # the generator advanced alike
    assert (p1 == 0).any() and (p1 != 0).any()
    assert n0 > 0 and n1 == 0 and h1 == 1


@pytest.mark.parametrize("kwargs", [dict(p=0.0, training=True), dict(p=0.3, training=False),
                                    dict(p=0.3, training=True, inplace=True)],
                         ids=["p0", "eval", "inplace"])
def test_dropout_left_to_pytorch_where_it_is_no_mask_product(kwargs):
    x0 = torch.randn(4, 5, requires_grad=True)
    with fwAD.dual_level():
        xd = fwAD.make_dual(x0, torch.ones(4, 5)) * 1.0
        with ForwardFastPaths() as fast:
            F.dropout(xd, **kwargs)
    assert fast.handled == 0


def _frozen(model: torch.nn.Module, which) -> torch.nn.Module:
    """``model`` with the parameters ``which(module_name, param_name, module)`` picks frozen."""
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if which(mname, pname, module):
                p.requires_grad_(False)
    return model


def _bert_frozen_norms_and_biases() -> torch.nn.Module:
    return _frozen(tiny_bert_classifier(2), lambda m, p, mod: p == "bias"
                   or isinstance(mod, torch.nn.LayerNorm))


def _resnet18_frozen_bn() -> torch.nn.Module:
    return _frozen(_resnet18(), lambda m, p, mod: isinstance(mod, torch.nn.BatchNorm2d))


TRAIN_MODE_BATCH_NORM = {"resnet18_train_bn_frozen"}
MODELS = {
    "bert_dropout": (lambda: tiny_bert_classifier(2),
                     lambda: as_batch(token_batch(6, 10, 40, 3, seed=1)),
                     lambda: as_batch(token_batch(4, 10, 40, 3, seed=2))),
    "gpt_neo_lm": (tiny_lm, lambda: as_batch(lm_batch(5, 12, 40, seed=1)),
                   lambda: as_batch(lm_batch(3, 12, 40, seed=2))),
    "bert_frozen_norms_biases": (_bert_frozen_norms_and_biases,
                                 lambda: as_batch(token_batch(6, 10, 40, 3, seed=1)),
                                 lambda: as_batch(token_batch(4, 10, 40, 3, seed=2))),
    "resnet18_train_bn_frozen": (_resnet18_frozen_bn, lambda: _image_batch(6),
                                 lambda: _image_batch(3)),
}


@pytest.mark.parametrize("case", list(MODELS))
def test_ghost_values_and_gradients_are_bit_identical_with_the_mode(case):
    """A training step in train mode (BERT's dropout on, p = 0.1, drawn from the same seed;
    frozen LayerNorms and biases; ResNet-18 with frozen BatchNorm affine parameters and batch
    statistics): the mode on and off give the same gradients and the same values (bit for
    bit, or to float64 rounding where BatchNorm uses batch statistics), and with it on the
    step does no arithmetic on an efficient-zero tangent."""
    make_model, make_train, make_val = MODELS[case]
    torch.manual_seed(0)
    model = make_model().train()
    results = {}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for on in (False, True):
        model.load_state_dict(state)  # BatchNorm's running statistics move in a step
        est = GhostEstimator(mode="forward", forward_fastpaths=on)
        torch.manual_seed(4)  # the model is in train mode: g_V's forward draws dropout too
        est.refresh(model, make_val())
        counter = ZeroTangentCount()
        torch.manual_seed(5)
        with counter:
            results[on] = (*_training_step(model, est, make_train()), counter.n)
    (v0, g0, n0), (v1, g1, n1) = results[False], results[True]
    if case in TRAIN_MODE_BATCH_NORM:  # its tangent is the lean form's: equal to rounding
        torch.testing.assert_close(v1, v0, rtol=1e-10, atol=1e-10 * v0.abs().max().item())
    else:
        assert torch.equal(v0, v1)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(g0, g1))
    assert v1.abs().sum() > 0
    assert n0 > 0 and n1 == 0, (n0, n1)


BN_SHAPES = {"1d": (6, 4), "1d_seq": (6, 4, 5), "2d": (6, 4, 3, 3), "3d": (6, 4, 2, 3, 2),
             "2d_channels_last": (6, 4, 3, 3)}


@pytest.mark.parametrize("affine", ["dual", "frozen", "none"])
@pytest.mark.parametrize("shape", list(BN_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=["fp64", "fp32", "bf16"])
def test_lean_batch_norm_tangent(shape, affine, dtype):
    """Train-mode BatchNorm on a dual input: the same primal, backward gradients and running
    statistics (updated once) as PyTorch, bit for bit; the tangent equal to PyTorch's
    ``batch_norm_jvp`` to rounding (float64: 1e-12 relative)."""
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(BN_SHAPES[shape], generator=g, dtype=torch.float64).to(dtype) * 3 + 1
    if shape.endswith("channels_last"):
        x0 = x0.contiguous(memory_format=torch.channels_last)
    x0.requires_grad_()
    tx = torch.randn(BN_SHAPES[shape], generator=g, dtype=torch.float64).to(dtype)
    c = BN_SHAPES[shape][1]
    w0 = torch.rand(c, generator=g, dtype=torch.float64).to(dtype) + 0.5
    b0 = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    tw, tb = torch.randn(c, generator=g).to(dtype), torch.randn(c, generator=g).to(dtype)
    results = []
    for mode in (False, True):
        w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
        rm, rv = torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype)
        fast = ForwardFastPaths()
        with fwAD.dual_level():
            xd = fwAD.make_dual(x0, tx)
            wd, bd = {"dual": (fwAD.make_dual(w, tw), fwAD.make_dual(b, tb)),
                      "frozen": (w0, b0), "none": (None, None)}[affine]
            with (fast if mode else _Off()):
                out = F.batch_norm(xd, rm, rv, wd, bd, training=True, momentum=0.3)
            primal, tangent = (v.clone() for v in fwAD.unpack_dual(out))
        weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
        inputs = [x0] + ([w, b] if affine == "dual" else [])
        grads = torch.autograd.grad((out * weights.to(out.dtype)).sum(), inputs)
        results.append((primal, tangent, grads, rm, rv, fast.handled))
    (p0, t0, g0, rm0, rv0, _), (p1, t1, g1, rm1, rv1, handled) = results
    assert handled == 1
    assert torch.equal(p0, p1) and all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert torch.equal(rm0, rm1) and torch.equal(rv0, rv1) and not torch.equal(rm1, rm1 * 0)
    assert t1.dtype == t0.dtype and t1.shape == t0.shape
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    scale = t0.abs().max().item()
    torch.testing.assert_close(t1, t0, rtol=tol, atol=tol * scale)


def test_batch_norm_with_running_statistics_is_left_alone():
    """Eval-mode BatchNorm (running statistics) keeps PyTorch's formula, which is cheap."""
    x0 = torch.randn(6, 4, 3, 3, requires_grad=True)
    w = torch.rand(4).requires_grad_()
    with fwAD.dual_level():
        xd = fwAD.make_dual(x0, torch.randn(6, 4, 3, 3))
        wd = fwAD.make_dual(w, torch.randn(4))
        with ForwardFastPaths() as fast:
            F.batch_norm(xd, torch.zeros(4), torch.ones(4), wd, None, training=False)
    assert fast.handled == 0


def test_an_error_raised_in_the_fast_paths_names_the_switch(monkeypatch):
    """A failure inside a fast path keeps its type and message and, on Python >= 3.11,
    carries a note naming ``estimator.forward_fastpaths=false``; a model's own error does
    not get that note."""
    import sys

    import lai.estimators.forward.forward_fastpaths as fastpaths

    def broken(*args, **kwargs):
        raise ValueError("simulated failure in a fast path")

    model = tiny_lm().train()
    est = GhostEstimator(mode="forward")
    est.refresh(model, as_batch(lm_batch(3, 12, 40, seed=2)))
    monkeypatch.setattr(fastpaths, "_number_op", broken)
    with pytest.raises(ValueError, match="simulated failure") as err:
        _training_step(model, est, as_batch(lm_batch(5, 12, 40, seed=1)))
    if sys.version_info >= (3, 11):
        assert any("forward_fastpaths=false" in n for n in err.value.__notes__)
    monkeypatch.undo()

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("the model's own error")

    with pytest.raises(RuntimeError, match="own error") as err:
        _training_step(torch.nn.Sequential(torch.nn.Linear(3, 3), Broken()), est,
                       as_batch((torch.randn(2, 3), torch.tensor([0, 1]))))
    assert not any("forward_fastpaths" in n for n in getattr(err.value, "__notes__", []))


SOFTMAXES = {
    "F.softmax": lambda x: F.softmax(x, dim=-1),
    "F.softmax_dim0": lambda x: F.softmax(x, 0),
    "torch.softmax": lambda x: torch.softmax(x, 1),
    "Tensor.softmax": lambda x: x.softmax(-1),
    "F.softmax_dtype": lambda x: F.softmax(x, dim=-1, dtype=torch.float64),
    "F.log_softmax": lambda x: F.log_softmax(x, dim=-1),
    "Tensor.log_softmax": lambda x: x.log_softmax(1),
    "torch.log_softmax_dtype": lambda x: torch.log_softmax(x, -1, dtype=torch.float64),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("case", list(SOFTMAXES))
def test_lean_softmax_tangent(case, dtype):
    """softmax / log_softmax of a dual input: the same primal and backward gradient as
    PyTorch, bit for bit; the tangent equal to PyTorch's formula to rounding."""
    fn = SOFTMAXES[case]
    g = torch.Generator().manual_seed(3)
    x0 = (torch.randn(3, 4, 6, generator=g, dtype=torch.float64) * 3).to(dtype)
    x0.requires_grad_()
    tx = torch.randn(3, 4, 6, generator=g, dtype=torch.float64).to(dtype)
    results = []
    for mode in (False, True):
        fast = ForwardFastPaths()
        with fwAD.dual_level():
            with (fast if mode else _Off()):
                out = fn(fwAD.make_dual(x0, tx))
            primal, tangent = (v.clone() for v in fwAD.unpack_dual(out))
        w = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
        (grad,) = torch.autograd.grad((out * w.to(out.dtype)).sum(), x0)
        results.append((primal, tangent, grad, fast.handled))
    (p0, t0, g0, _), (p1, t1, g1, handled) = results
    assert handled == 1
    assert torch.equal(p0, p1) and torch.equal(g0, g1)
    assert t1.dtype == t0.dtype and t1.shape == t0.shape
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(t1, t0, rtol=tol, atol=tol * t0.abs().max().item())


def test_softmax_without_dim_is_left_to_pytorch():
    x0 = torch.randn(3, 4, requires_grad=True)
    with fwAD.dual_level():
        xd = fwAD.make_dual(x0, torch.randn(3, 4))
        with pytest.warns(UserWarning), ForwardFastPaths() as fast:
            F.softmax(xd)  # the implicit dim is deprecated; PyTorch picks it
    assert fast.handled == 0


@pytest.mark.parametrize("task", ["classification", "lm", "lm_bf16"])
def test_loss_tangent_is_forward_ad_through_the_per_sample_loss(task):
    """Ghost reads each sample's value as the tangent of its loss; ``loss_tangent`` takes it
    from the closed-form output gradient (no forward AD through the cross-entropy): equal to
    forward AD through ``per_sample_loss`` to rounding, including ignored LM positions."""
    from lai.batching import per_sample_loss
    from lai.estimators.online.ghost import loss_tangent

    g = torch.Generator().manual_seed(5)
    if task == "classification":
        z, y = torch.randn(6, 5, generator=g), torch.randint(0, 5, (6,), generator=g)
    else:
        z, y = torch.randn(4, 7, 11, generator=g), torch.randint(0, 11, (4, 7), generator=g)
        y[0, 3:] = -100
        y[2, :] = -100  # a sample with no labelled position: loss 0, tangent 0
    if task.endswith("bf16"):
        z = z.bfloat16()
    zt = torch.randn(z.shape, generator=g).to(z.dtype)
    with fwAD.dual_level():  # the reference in float64 (bf16 logits: their exact values)
        ref = fwAD.unpack_dual(per_sample_loss(fwAD.make_dual(z, zt).double(), y)).tangent
    got = loss_tangent(z, zt, y)
    # float64 logits (this folder's default dtype) stay float64; bf16 ones are taken in fp32
    assert got.shape == ref.shape
    assert got.dtype == (torch.float32 if task.endswith("bf16") else torch.float64)
    tol = 1e-6 if task.endswith("bf16") else 1e-12
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    if task.startswith("lm"):
        assert got[2] == 0
    assert torch.equal(loss_tangent(z, None, y), torch.zeros_like(got))


def _attention_inputs(case: str, dtype: torch.dtype):
    """(q, k, v, kwargs for F.scaled_dot_product_attention) for one case: heads 2 (the key's
    1 with GQA), 5 queries against 6 keys (5 when causal), head width 4."""
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    s = 5 if case == "causal" else 6
    q, k, v = r(2, 2, 5, 4), r(2, 1 if case == "gqa" else 2, s, 4), r(2, 1 if case == "gqa"
                                                                       else 2, s, 4)
    kwargs = {}
    if case == "float_mask":
        kwargs["attn_mask"] = r(2, 1, 5, s)
    elif case == "bool_mask_dead_row":
        mask = torch.rand(2, 1, 5, s, generator=g) > 0.3
        mask[:, :, 0, 0] = True
        mask[1, :, 2] = False  # a query that may attend nothing: zeros, as PyTorch's math
        kwargs["attn_mask"] = mask
    elif case == "causal":
        kwargs["is_causal"] = True
    elif case == "gqa":
        kwargs["enable_gqa"] = True
    elif case == "scale":
        kwargs["scale"] = 0.3
    return q, k, v, kwargs


ATTENTION_CASES = ["plain", "float_mask", "bool_mask_dead_row", "causal", "gqa", "scale"]


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "pytorch_formulas"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention_with_dual_operands_is_pytorchs_math_backend(case, dtype, fast):
    """F.scaled_dot_product_attention with dual q/k/v (which PyTorch's fused CPU kernel
    refuses in forward mode): the primal, tangent and backward gradient of PyTorch's math
    backend (its forward-mode formulas under ``sdpa_kernel(MATH)``) to rounding, with the
    fast paths on or off (``fast=False`` handles attention alone)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, kwargs = _attention_inputs(case, dtype)
    tangents = [torch.randn_like(t) for t in (q, k, v)]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    results = []
    for ours in (False, True):
        mode = ForwardFastPaths(fast=fast)
        with fwAD.dual_level():
            duals = [fwAD.make_dual(t, tt) for t, tt in zip(leaves, tangents)]
            with mode if ours else sdpa_kernel(SDPBackend.MATH):
                out = F.scaled_dot_product_attention(*duals, **kwargs)
            primal, tangent = (x.clone() for x in fwAD.unpack_dual(out))
        w = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
        grads = torch.autograd.grad((out * w.to(out.dtype)).sum(), leaves)
        results.append((primal, tangent, grads, mode.handled))
    (p0, t0, g0, _), (p1, t1, g1, handled) = results
    assert handled == 1 if not fast else handled > 1  # with fast paths, the inner operations
    assert torch.isfinite(p0).all() and torch.isfinite(t0).all()
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}[dtype]
    for a, b in [(p1, p0), (t1, t0), *zip(g1, g0)]:
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())
    if case == "bool_mask_dead_row":
        assert p1[1, :, 2].abs().sum() == 0 and t1[1, :, 2].abs().sum() == 0


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "pytorch_formulas"])
def test_attention_dropout_draws_as_the_math_backend(fast):
    """Attention dropout (``dropout_p > 0``) on the CPU: the same weights dropped as PyTorch's
    math backend drops from the same seed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, _ = _attention_inputs("plain", torch.float64)
    out = []
    for ours in (False, True):
        torch.manual_seed(11)
        with fwAD.dual_level():
            duals = [fwAD.make_dual(t, torch.ones_like(t)) for t in (q, k, v)]
            with ForwardFastPaths(fast=fast) if ours else sdpa_kernel(SDPBackend.MATH):
                res = F.scaled_dot_product_attention(*duals, dropout_p=0.4)
            out.append([x.clone() for x in fwAD.unpack_dual(res)])
    (p0, t0), (p1, t1) = out
    torch.testing.assert_close(p1, p0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t1, t0, rtol=1e-12, atol=1e-12)
    plain = F.scaled_dot_product_attention(q, k, v)
    assert not torch.allclose(p1, plain)  # dropout did drop


def test_attention_without_dual_operand_is_left_to_pytorch():
    q, k, v, _ = _attention_inputs("plain", torch.float32)
    with fwAD.dual_level(), ForwardFastPaths() as mode:
        out = F.scaled_dot_product_attention(q, k, v)
    assert mode.handled == 0
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "pytorch_formulas"])
@pytest.mark.parametrize("padding_idx", [2, -3])
def test_embedding_padding_row_has_no_tangent(padding_idx, fast):
    """F.embedding of a dual weight with a padding index: PyTorch's primal and backward
    gradient bit for bit, the tangent PyTorch's except zero where the index is the padding
    index (the row PyTorch's gradient leaves out); without a padding index, left alone."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(10, 4, generator=g, dtype=torch.float64, requires_grad=True)
    tw = torch.randn(10, 4, generator=g, dtype=torch.float64)
    ids = torch.tensor([[1, 2, 7], [7, 7, 2]])
    pad = padding_idx % 10
    results = []
    for ours in (False, True):
        mode = ForwardFastPaths(fast=fast)
        with fwAD.dual_level():
            with mode if ours else _Off():
                out = F.embedding(ids, fwAD.make_dual(w0, tw), padding_idx)
            primal, tangent = (v.clone() for v in fwAD.unpack_dual(out))
        wgt = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
        (grad,) = torch.autograd.grad((out * wgt).sum(), w0)
        results.append((primal, tangent, grad, mode.handled))
    (p0, t0, g0, _), (p1, t1, g1, handled) = results
    assert handled == 1
    assert torch.equal(p0, p1) and torch.equal(g0, g1)
    at_pad = ids == pad
    assert t1[at_pad].abs().sum() == 0 and t0[at_pad].abs().sum() > 0
    assert torch.equal(t1[~at_pad], t0[~at_pad])
    with fwAD.dual_level(), ForwardFastPaths(fast=fast) as mode:
        F.embedding(ids, fwAD.make_dual(w0, tw))
    assert mode.handled == 0
