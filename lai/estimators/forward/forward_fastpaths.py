"""Fast paths for Ghost's forward-mode pass: constants without efficient-zero tangents, and
lean tangents for train-mode BatchNorm and softmax; and fused attention
(``F.scaled_dot_product_attention``), which has no forward-mode formula, run by PyTorch's
math backend (:func:`_attention_math`; done with the fast paths switched off too, since a
model with Hugging Face's default ``sdpa`` attention cannot be scored otherwise).

**Constants.** In forward-mode AD, an operation whose formula reads the tangent of every
operand gives an operand that has none (a Python number, an attention mask, a dropout mask,
a frozen bias) an *efficient-zero* tangent, ``torch._efficientzerotensor``. Arithmetic on
such a tangent computes its result's shape by running the operation on the ``meta`` device,
and in torch 2.15 the meta kernels of ``mul``, ``add``, ``sub`` and ``div`` are Python
reference implementations (``torch._refs``, registered over the C++ ones by
``torch._meta_registrations``): an order of magnitude more host time per operation than
the same operation between two dual tensors. Transformers do it several times
per layer: an attention score's ``* scaling``, the additive attention mask, the tanh GELU's
``0.5 * x`` and ``1.0 + ...``, and dropout on the CPU (``input * noise``; on CUDA dropout is
``native_dropout``, whose formula reads the input's tangent only).

**Train-mode BatchNorm.** PyTorch's tangent formula (``batch_norm_jvp``) materializes about
five activation-sized temporaries, and in a training forward autograd records them (the
tangents require grad) until the module returns: on ResNet-18 the stem BatchNorm's formula
was the memory peak of the whole forward-mode pass (80 MiB above the forward's start at batch
128, against vanilla's 54).

:class:`ForwardFastPaths`, a ``TorchFunctionMode`` active during Ghost's forward-mode
pass, computes these cases (every other call goes to PyTorch unchanged):

* **a Python number** (``x * 0.5``, ``0.5 * x``, ``x + 1``, ``x - 1``, ``x / 8``, and the
  in-place forms): the ``.Scalar`` overload of the same operation (``aten.mul.Scalar``),
  whose forward formula reads the tensor's tangent only. ATen computes the ``.Scalar``
  overload as the ``.Tensor`` one with the number wrapped, so values are the same bits;
* **a tensor without a tangent** ``c`` (``x * c``, ``c * x``, ``x / c``, ``x + c``,
  ``c + x``, ``x - c``): the primal result from the primal ``p`` of ``x`` (the same
  operation, so the same bits and the same backward, through ``p`` to ``x``), the tangent
  from the tangent ``t`` of ``x`` by the operation's linear map (``t * c``, ``t / c``, ``t``),
  joined with ``fwAD.make_dual``. These are the tangents PyTorch's formulas give (``mul``:
  ``other_t * self_p + self_t * other_p`` with ``other_t`` zero);
* **dropout on the CPU** (``F.dropout`` in training, ``0 < p < 1``, not in place): ATen's
  own CPU dropout (``noise = empty_like(x).bernoulli_(1 - p).div_(1 - p)``, ``x * noise``),
  the same random draws and bits, with the multiplication done as above;
* **frozen affine parameters** (a linear layer's bias, a LayerNorm/GroupNorm/RMSNorm/
  BatchNorm/InstanceNorm weight or bias without tangent, as in a model fine-tuned with some
  parameters frozen) of a layer whose input or weight is dual: each is made dual with a zero
  tangent of its own (a vector of the channel count: the zeros cost nothing), so the formula
  adds and multiplies real zeros where it would have used an efficient-zero tensor
  (``a + 0`` is ``a``; ``x * 0`` is zero for finite ``x``). A frozen *weight* of a linear or
  convolution layer is left alone: its zero-tangent product is already cheap;
* **BatchNorm with batch statistics** (``F.batch_norm(..., training=True)`` on a dual
  input): the primal by the same kernel on the primals, the tangent by a closed form under
  ``no_grad`` with two activation-sized buffers
  (:func:`_batch_norm_with_lean_tangent`); ResNet-18's forward then holds 57.5 MiB above its
  start instead of 80;
* **softmax and log_softmax** along an explicit ``dim``: the primal by the same call, the
  tangent ``r * (t - sum(r * t))`` (``t - sum(exp(r) * t)``) from the result under
  ``no_grad`` (:func:`_softmax_with_lean_tangent`): PyTorch's formulas recompute the
  exponentials (several times the host and device time of this form).

* **attention** (``F.scaled_dot_product_attention`` with a dual operand): PyTorch's math
  backend, whose operations then take the paths above (:func:`_attention_math`);
* **``nn.MultiheadAttention`` without weights** (``F.multi_head_attention_forward``, which
  calls fused attention out of the mode's sight): computed with its weights, which are
  dropped (:func:`_attention_with_weights`; also with the fast paths off);
* **an embedding with a padding index** (``F.embedding(..., padding_idx=...)`` of a dual
  weight): the tangent is zero where the index is the padding index, as the gradient is
  (:func:`_embedding_without_padding_tangent`; also with the fast paths switched off, since
  PyTorch's formula differs from its own gradient there).

The first four give the values PyTorch gives, bit for bit (tested per case in fp32 and bf16,
and on BERT with dropout on, GPT-Neo and BERT with frozen norms and biases); the BatchNorm
and softmax tangents are the same arithmetic in another order, equal to rounding (1e-12
relative in float64, tested), with the primal, the gradients and the running statistics bit
for bit. The
mode's own cost is one Python call per torch function in the forward.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

aten = torch.ops.aten
T = torch.Tensor

# functions whose operation is op(first, second) (methods, operators, torch.*), by op
_MUL = {T.__mul__, T.mul, torch.mul, torch.multiply, T.multiply}
_RMUL = {T.__rmul__}
_ADD = {T.__add__, T.add, torch.add}
_RADD = {T.__radd__}
_SUB = {T.__sub__, T.sub, torch.sub, torch.subtract, T.subtract}
_DIV = {T.__truediv__, T.div, torch.div, torch.true_divide, T.true_divide, torch.divide,
        T.divide}
# in place, with a Python number only
_INPLACE = {T.__imul__: aten.mul_.Scalar, T.mul_: aten.mul_.Scalar,
            T.__iadd__: aten.add_.Scalar, T.add_: aten.add_.Scalar,
            T.__isub__: aten.sub_.Scalar, T.sub_: aten.sub_.Scalar,
            T.__itruediv__: aten.div_.Scalar, T.div_: aten.div_.Scalar}
# functions whose affine parameters (by position and name) may be frozen: given a zero
# tangent of their own (they are vectors of the channel count) when another operand is dual
_AFFINE = {F.linear: ((2, "bias"),),
           F.layer_norm: ((2, "weight"), (3, "bias")),
           F.group_norm: ((2, "weight"), (3, "bias")),
           F.rms_norm: ((2, "weight"),),
           F.batch_norm: ((3, "weight"), (4, "bias")),
           F.instance_norm: ((3, "weight"), (4, "bias"))}
_SOFTMAX = {F.softmax, torch.softmax, T.softmax}
_LOG_SOFTMAX = {F.log_softmax, torch.log_softmax, T.log_softmax}
_SDPA = F.scaled_dot_product_attention
_HANDLED = (_MUL | _RMUL | _ADD | _RADD | _SUB | _DIV | set(_INPLACE) | {F.dropout}
            | set(_AFFINE) | _SOFTMAX | _LOG_SOFTMAX | {_SDPA})
_EMBEDDING_ARGS = ("input", "weight", "padding_idx", "max_norm", "norm_type",
                   "scale_grad_by_freq", "sparse")
_MHA = F.multi_head_attention_forward
_MHA_NEED_WEIGHTS = 15  # need_weights' position in F.multi_head_attention_forward

_NUMBER = (int, float, bool)  # exact types: complex changes the dtype, left to PyTorch
_SCALAR_OP = [(_MUL | _RMUL, aten.mul.Scalar), (_DIV, aten.div.Scalar),
              (_ADD | _RADD, aten.add.Scalar), (_SUB, aten.sub.Scalar)]
_WITH_ALPHA = {aten.add.Scalar, aten.sub.Scalar, aten.add_.Scalar, aten.sub_.Scalar}


def _tangent(x: object) -> torch.Tensor | None:
    """The tangent of ``x`` at the current dual level (None: not a dual tensor)."""
    if not isinstance(x, torch.Tensor):
        return None
    return fwAD.unpack_dual(x).tangent


def _number_op(func, args: tuple, kwargs: dict):
    """``func(x, number)`` (``x`` a dual tensor) through the ``.Scalar`` overload of the same
    operation, or NotImplemented. ``number + x`` and ``number * x`` are ``x + number`` and
    ``x * number``, bit for bit."""
    x, s = args
    if type(s) not in _NUMBER or _tangent(x) is None:
        return NotImplemented
    alpha = kwargs.pop("alpha", 1)
    if kwargs:  # out=, rounding_mode=
        return NotImplemented
    op = _INPLACE.get(func)
    if op is None:
        op = next(o for funcs, o in _SCALAR_OP if func in funcs)
    if op in _WITH_ALPHA:
        return op(x, s, alpha)
    return op(x, s) if alpha == 1 else NotImplemented


def _constant_tensor_op(func, args: tuple, kwargs: dict):
    """``func(a, b)`` where exactly one of ``a``, ``b`` is a dual tensor and the other a
    tensor without tangent, primal and tangent computed apart, or NotImplemented."""
    a, b = args
    if func in _RMUL or func in _RADD:  # a.__rmul__(b) is b * a
        a, b = b, a
        func = torch.mul if func in _RMUL else torch.add
    alpha = kwargs.get("alpha", 1)
    if set(kwargs) - {"alpha"} or alpha != 1:
        return NotImplemented
    (pa, ta), (pb, tb) = _primal_and_tangent(a), _primal_and_tangent(b)
    if (ta is None) == (tb is None):
        return NotImplemented
    dual_first = ta is not None
    (p, t), c = ((pa, ta), b) if dual_first else ((pb, tb), a)
    if c.is_complex() or p.is_complex():
        return NotImplemented
    # t has p's shape and dtype, so t op c has (p op c)'s: no cast or broadcast to mend
    if func in _MUL:
        return fwAD.make_dual(p * c if dual_first else c * p, t * c if dual_first else c * t)
    if func in _DIV and dual_first:
        return fwAD.make_dual(p / c, t / c)
    if func in _ADD or (func in _SUB and dual_first):
        out = (p + c if dual_first else c + p) if func in _ADD else p - c
        # a new tensor, as PyTorch's formula gives: a tangent shared with x would be changed
        # by an in-place operation on either (and released with either)
        return fwAD.make_dual(out, torch.empty_like(out).copy_(t))
    return NotImplemented


def _cpu_dropout(args: tuple, kwargs: dict):
    """ATen's CPU dropout (``_dropout_impl``) on a dual tensor with the mask multiplication
    done apart on primal and tangent, or NotImplemented."""
    names = ("input", "p", "training", "inplace")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    x = bound.get("input")
    p, training, inplace = bound.get("p", 0.5), bound.get("training", True), \
        bound.get("inplace", False)
    if (not isinstance(x, torch.Tensor) or x.device.type != "cpu" or not training or inplace
            or not isinstance(p, float) or not 0.0 < p < 1.0 or x.numel() == 0
            or x.is_nested):
        return NotImplemented
    unpacked = fwAD.unpack_dual(x)
    if unpacked.tangent is None:
        return NotImplemented
    # the noise as ATen's CPU dropout draws it: same generator calls, same values
    noise = torch.empty_like(unpacked.primal).bernoulli_(1 - p).div_(1 - p)
    return fwAD.make_dual(unpacked.primal * noise, unpacked.tangent * noise)


def _frozen_affine(func, args: tuple, kwargs: dict, duals: set[int]):
    """``func`` (a linear layer or a norm) with each affine parameter that has no tangent
    (a frozen bias, a frozen norm weight) made dual with a zero tangent of its own, when the
    input or the weight is dual; or NotImplemented. Those vectors have the channel count's
    size, so the zeros cost nothing, and the formula then adds real zeros (``a + 0 == a``)
    where it would have added an efficient-zero tensor. ``duals``: ids of tensors known to
    be dual (the trainable parameters), which need no check."""
    frozen = []
    for pos, name in _AFFINE[func]:
        holder, key = (args, pos) if pos < len(args) else (kwargs, name)
        v = holder[key] if (holder is args or key in kwargs) else None
        if (isinstance(v, torch.Tensor) and id(v) not in duals and not v.is_complex()
                and _tangent(v) is None):
            frozen.append((holder is args, key))
    if not frozen:
        return NotImplemented
    if _tangent(args[0] if args else kwargs.get("input")) is None and (
            func is not F.linear or _tangent(args[1] if len(args) > 1
                                             else kwargs.get("weight")) is None):
        return NotImplemented
    args, kwargs = list(args), dict(kwargs)
    for positional, key in frozen:
        holder = args if positional else kwargs
        holder[key] = fwAD.make_dual(holder[key], torch.zeros_like(holder[key]))
    return func(*args, **kwargs)


_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum",
            "eps")


def _primal_and_tangent(v: torch.Tensor | None) -> tuple[torch.Tensor | None,
                                                         torch.Tensor | None]:
    """``(primal, tangent)`` of ``v`` (``(v, None)`` for a plain tensor, ``(None, None)``
    for None)."""
    if v is None:
        return None, None
    unpacked = fwAD.unpack_dual(v)
    return unpacked.primal, unpacked.tangent


def _batch_norm_with_lean_tangent(args: tuple, kwargs: dict):
    """``F.batch_norm`` with batch statistics on a dual input: the primal by the function
    ``torch.batch_norm`` itself runs (``torch._batch_norm_impl_index``, on the primals: the
    same kernel, running statistics updated once, the same backward), which also returns the
    batch's mean and inverse standard deviation; the tangent by the closed form below under
    ``no_grad``; or NotImplemented.

    PyTorch's formula (``batch_norm_jvp``) materializes about five activation-sized
    temporaries, and in a training forward autograd records them (the tangents require grad)
    until the module returns: on ResNet-18 the stem BatchNorm's formula was the whole
    forward-mode pass's memory peak. Per channel, with ``x_hat = (x - mean) * invstd`` and
    means over every axis but the channel's::

        y_t = gamma * invstd * (x_t - mean(x_t)) + (gamma_t - gamma * invstd * m) * x_hat
              + beta_t,        m = mean(x_hat * x_t)

    i.e. two fused passes (``addcmul``) with per-channel coefficients, beside ``x_hat``: two
    activation-sized buffers and six passes over the activation. The values equal PyTorch's
    to float rounding (another order of the same arithmetic), not bit for bit."""
    a = dict(zip(_BN_ARGS, args))
    a.update(kwargs)
    x = a.get("input")
    if (not a.get("training", False) or not isinstance(x, torch.Tensor) or x.dim() < 2
            or a.get("momentum", 0.1) is None):
        return NotImplemented
    p, t = _primal_and_tangent(x)
    if t is None or p.is_complex():
        return NotImplemented
    w, w_t = _primal_and_tangent(a.get("weight"))
    b, b_t = _primal_and_tangent(a.get("bias"))
    F._verify_batch_size(p.size())  # F.batch_norm's own check, same error
    # what torch.batch_norm computes (its output is element 0), with the batch statistics
    out, mean, invstd, _, _ = torch._batch_norm_impl_index(
        p, w, b, a.get("running_mean"), a.get("running_var"), True, a.get("momentum", 0.1),
        a.get("eps", 1e-5), torch.backends.cudnn.enabled)
    with torch.no_grad():
        p, t = p.detach(), t.detach()
        dims = [0] + list(range(2, p.dim()))
        acc = torch.float64 if p.dtype == torch.float64 else torch.float32
        as_channel = lambda v: v.to(acc).view([1, -1] + [1] * (p.dim() - 2))  # noqa: E731
        mean, invstd = as_channel(mean.detach()), as_channel(invstd.detach())
        gamma = invstd if w is None else invstd * as_channel(w.detach())
        x_hat = torch.addcmul((-mean * invstd).to(p.dtype), p, invstd.to(p.dtype))
        m = (x_hat * t).mean(dims, keepdim=True, dtype=acc)
        shift = -gamma * t.mean(dims, keepdim=True, dtype=acc)
        if b_t is not None:
            shift = shift + as_channel(b_t.detach())
        y_t = torch.addcmul(shift.to(t.dtype), t, gamma.to(t.dtype))
        x_coef = -gamma * m if w_t is None else as_channel(w_t.detach()) - gamma * m
        y_t.addcmul_(x_hat, x_coef.to(t.dtype))
    return fwAD.make_dual(out, y_t if y_t.dtype == out.dtype else y_t.to(out.dtype))


def _softmax_with_lean_tangent(func, args: tuple, kwargs: dict):
    """``softmax`` / ``log_softmax`` (``F.``, ``torch.`` or the method) of a dual input along
    an explicit ``dim``: the primal by the same call on the primal (same kernel, same
    backward), the tangent under ``no_grad`` from the result ``r``:
    ``r * (t - sum(r * t))`` for softmax, ``t - sum(exp(r) * t)`` for log_softmax (sums
    along ``dim``); or NotImplemented. PyTorch's formulas recompute the exponentials inside
    the tangent (several times this form's cost) and, in a training forward, record their
    temporaries.
    Equal to PyTorch's values to rounding."""
    if len(args) > 2 or set(kwargs) - {"input", "dim", "dtype", "_stacklevel"}:
        return NotImplemented
    x = args[0] if args else kwargs.get("input")
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if not isinstance(x, torch.Tensor) or dim is None:
        return NotImplemented
    p, t = _primal_and_tangent(x)
    if t is None or p.is_complex():
        return NotImplemented
    dtype = kwargs.get("dtype")
    r = func(p, dim) if dtype is None else func(p, dim, dtype=dtype)
    with torch.no_grad():
        rd, t = r.detach(), t.detach()
        if t.dtype != rd.dtype:
            t = t.to(rd.dtype)
        if func in _SOFTMAX:
            r_t = rd * t
            r_t.addcmul_(rd, r_t.sum(dim, keepdim=True), value=-1.0)
        else:
            r_t = t - rd.exp().mul_(t).sum(dim, keepdim=True)
    return fwAD.make_dual(r, r_t)


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
              "enable_gqa")


def _attention_math(mode: "ForwardFastPaths", args: tuple, kwargs: dict):
    """``F.scaled_dot_product_attention`` with a dual operand, by PyTorch's math backend, or
    NotImplemented (no operand dual: PyTorch's kernels as usual).

    The fused kernels PyTorch picks (flash attention on the CPU, flash or memory-efficient on
    CUDA) have no forward-mode formula, so without this every model built with
    ``attn_implementation="sdpa"`` (Hugging Face's default) fails in Ghost's forward form and
    in every static estimator built on it. The math backend is the same function (equal to
    the fused kernels' values to rounding) written with differentiable operations:

    * ``fast=False``: ``aten._scaled_dot_product_attention_math`` itself, through PyTorch's
      own forward-mode formulas;
    * ``fast=True``: the same operations in the same order here, with the mode active, so
      that the scale and the mask are constants of the fast paths and the softmax takes the
      lean tangent (:func:`_softmax_with_lean_tangent`).

    A boolean mask and ``is_causal`` become an additive ``0 / -inf`` mask, as in
    ``F.scaled_dot_product_attention``; rows whose scores are all ``-inf`` give zeros
    (``aten._safe_softmax``). Dropout (``dropout_p > 0``) is ``F.dropout`` of the attention
    weights, as the math backend draws it."""
    a = dict(zip(_SDPA_ARGS, args))
    a.update(kwargs)
    if len(args) > len(_SDPA_ARGS) or set(a) - set(_SDPA_ARGS):
        return NotImplemented
    q, k, v, mask = a.get("query"), a.get("key"), a.get("value"), a.get("attn_mask")
    tensors = [t for t in (q, k, v, mask) if isinstance(t, torch.Tensor)]
    if (len(tensors) < 3 or any(t.is_nested for t in tensors)
            or all(_tangent(t) is None for t in tensors)):
        return NotImplemented
    p, causal = float(a.get("dropout_p", 0.0)), bool(a.get("is_causal", False))
    scale, gqa = a.get("scale"), bool(a.get("enable_gqa", False))
    if causal and mask is not None:
        return NotImplemented  # PyTorch's own error
    if causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(
            mask.logical_not(), float("-inf"))
    if not mode.fast:
        return aten._scaled_dot_product_attention_math(q, k, v, mask, p, False, None,
                                                       scale=scale, enable_gqa=gqa)[0]
    with mode:  # the mode is off inside its own handler: on again for the operations below
        return _attention_decomposed(q, k, v, mask, p, scale, gqa)


def _attention_decomposed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          mask: torch.Tensor | None, p: float, scale: float | None,
                          gqa: bool) -> torch.Tensor:
    """``aten._scaled_dot_product_attention_math``'s operations (``mask`` additive or None):
    ``q`` and ``k^T`` each scaled by ``sqrt(scale)`` before their product (PyTorch's order,
    for stability), ``mask`` added, a softmax whose fully masked rows are zero, dropout, the
    product with ``v``. Grouped-query heads (``gqa``) are repeated as PyTorch repeats them."""
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    factor = math.sqrt(abs(s))
    if gqa and not (q.shape[-3] == k.shape[-3] == v.shape[-3]):
        if q.shape[-3] % k.shape[-3] or q.shape[-3] % v.shape[-3]:
            raise RuntimeError("scaled_dot_product_attention: with enable_gqa the query's "
                               "heads must be a multiple of the key's and the value's")
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], -3)
    attn = torch.matmul(q * (factor if s >= 0 else -factor), k.transpose(-2, -1) * factor)
    dead = None
    if mask is not None:
        attn = attn + mask
        with torch.no_grad():
            dead = (attn == float("-inf")).all(-1, keepdim=True)
        # a row of -inf scores would make a NaN softmax, and NaN gradients behind the zeros
        # put in its place: such rows take the softmax of zeros, then become zeros
        attn = attn.masked_fill(dead, 0.0)
    weights = torch.softmax(attn, -1)
    if dead is not None:
        weights = weights.masked_fill(dead, 0.0)
    if p > 0.0:
        weights = F.dropout(weights, p, training=True)
    return torch.matmul(weights, v)


def _embedding_without_padding_tangent(args: tuple, kwargs: dict):
    """``F.embedding`` of a dual weight with a ``padding_idx``: the primal as PyTorch computes
    it, the tangent zero wherever the index is ``padding_idx``; or NotImplemented.

    PyTorch's backward gives the padding row no gradient from the lookup, but its forward-mode
    formula (``auto_linear``) looks the tangent up like any row. When that row has a nonzero
    tangent (a weight tied to an output layer, whose gradient reaches every row) and a
    padding id feeds a position that matters, forward mode would differentiate a use of the
    row that the gradient, and so ``<g_V, grad ell_j>``, leaves out."""
    a = dict(zip(_EMBEDDING_ARGS, args))
    a.update(kwargs)
    ids, w, pad = a.get("input"), a.get("weight"), a.get("padding_idx")
    if (pad is None or a.get("max_norm") is not None or len(args) > len(_EMBEDDING_ARGS)
            or set(a) - set(_EMBEDDING_ARGS) or not isinstance(w, torch.Tensor)
            or not isinstance(ids, torch.Tensor)):
        return NotImplemented
    p, t = _primal_and_tangent(w)
    if t is None or _tangent(ids) is not None:
        return NotImplemented
    pad = pad + w.shape[0] if pad < 0 else pad
    rest = {k: v for k, v in a.items() if k not in ("input", "weight")}
    out = F.embedding(ids, p, **rest)
    tangent = F.embedding(ids, t, **rest).masked_fill_((ids == pad).unsqueeze(-1), 0)
    return fwAD.make_dual(out, tangent)


def _attention_with_weights(args: tuple, kwargs: dict):
    """``F.multi_head_attention_forward`` (``nn.MultiheadAttention``, torchvision's ViT,
    ``nn.TransformerEncoderLayer``) asked for no weights, with a dual operand: asked for them
    instead, and the weights dropped; or NotImplemented.

    Without weights it calls the fused ``scaled_dot_product_attention`` from inside itself,
    out of this mode's sight (a mode is off while it handles a call), and the fused kernels
    have no forward-mode formula; with weights it computes the same attention explicitly
    (``bmm``, softmax, dropout, ``bmm``): the same output to rounding, and its averaged
    weights cost one reduction more."""
    need = (args[_MHA_NEED_WEIGHTS] if len(args) > _MHA_NEED_WEIGHTS
            else kwargs.get("need_weights", True))
    tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
    if need or all(_tangent(t) is None for t in tensors):
        return NotImplemented
    if len(args) > _MHA_NEED_WEIGHTS:
        args = args[:_MHA_NEED_WEIGHTS] + (True,) + args[_MHA_NEED_WEIGHTS + 1:]
    else:
        kwargs = {**kwargs, "need_weights": True}
    out, _ = _MHA(*args, **kwargs)
    return out, None


class ForwardFastPaths(TorchFunctionMode):
    """Active inside an ``fwAD.dual_level``: arithmetic between a dual tensor and a constant
    (a Python number, a tensor without tangent, a frozen affine parameter) and CPU dropout
    computed without efficient-zero tangents, and the tangents of train-mode BatchNorm and
    softmax computed lean, as the module docstring says; attention with a dual operand by
    PyTorch's math backend (``nn.MultiheadAttention``'s by its explicit path), and embeddings'
    padding rows without tangent. ``fast=False``: those alone (attention by PyTorch's own
    composite), everything else left to PyTorch. ``handled``: how many calls it computed so far (the rest
    went to PyTorch unchanged). ``duals``: tensors known to be dual (Ghost's dual
    parameters), so that checking a layer's trainable bias costs no tangent lookup."""

    def __init__(self, duals: Iterable[torch.Tensor] = (), fast: bool = True) -> None:
        super().__init__()
        self.handled = 0
        self.fast = bool(fast)
        self._duals = {id(t) for t in duals}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA or func is F.embedding or func is _MHA:
            out = (_attention_math(self, args, kwargs) if func is _SDPA
                   else _attention_with_weights(args, kwargs) if func is _MHA
                   else _embedding_without_padding_tangent(args, kwargs))
            if out is not NotImplemented:
                self.handled += 1
                return out
        elif func in _HANDLED and self.fast:
            if func is F.dropout:
                out = _cpu_dropout(args, kwargs)
            elif func is F.batch_norm:
                out = _batch_norm_with_lean_tangent(args, kwargs)
                if out is NotImplemented:
                    out = _frozen_affine(func, args, kwargs, self._duals)
            elif func in _AFFINE:
                out = _frozen_affine(func, args, kwargs, self._duals)
            elif func in _SOFTMAX or func in _LOG_SOFTMAX:
                out = _softmax_with_lean_tangent(func, args, kwargs)
            elif len(args) != 2:
                out = NotImplemented
            elif isinstance(args[1], torch.Tensor) and isinstance(args[0], torch.Tensor):
                out = (NotImplemented if func in _INPLACE
                       else _constant_tensor_op(func, args, dict(kwargs)))
            elif isinstance(args[0], torch.Tensor):
                out = _number_op(func, args, dict(kwargs))
            else:
                out = NotImplemented
            if out is not NotImplemented:
                self.handled += 1
                return out
        return func(*args, **kwargs)
