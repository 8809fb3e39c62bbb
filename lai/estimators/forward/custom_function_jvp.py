"""Forward-mode tangents for custom ``torch.autograd.Function``s that define no ``jvp``.

Ghost's forward form (and everything built on it: ``lai.pairwise(..., "ghost")``, the static
IP/LiSSA/DataInf) pushes a tangent through every operation of the model. A custom
``autograd.Function`` without a ``jvp`` staticmethod stops it with PyTorch's
``NotImplementedError`` ("You must implement the jvp function ..."): BLOOM's GeLU
(``GeLUFunction``, used at every layer of every BLOOM model) is one, and so is any
memory-saving or fused operation written that way.

:func:`custom_function_jvps` fills in the tangent from the Function's own ``backward``, by
the double-backward identity: the backward computes ``J^T u`` for an output gradient ``u``
and is linear in ``u``, so ``d/du <J^T u, t> = J t``, the tangent of the output for an input
tangent ``t``. It needs the Function's backward to be differentiable (built from torch
operations, not ``@once_differentiable``), and it is the derivative the Function declares:
the one reverse mode, and so training and the per-sample-gradient reference, use. (Pushing
the tangent through the ``forward``'s own operations instead would disagree with reverse
mode for Functions whose backward is not the derivative of their forward, such as
straight-through estimators.)

The primal output is computed once, by the Function as usual, so the training backward runs
its custom ``backward`` as before; the tangent costs one call of the backward with a graph
and one backward through that (for an elementwise Function, a few elementwise operations).
Where the inputs carry no reverse-mode graph (a forward under ``no_grad``) the Function is
run a second time on detached copies to build one.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.autograd.forward_ad as fwAD
from torch.autograd.function import Function, _SingleLevelFunction

# PyTorch's own default jvp (raises NotImplementedError), inherited by Functions without one
_DEFAULT_JVP = _SingleLevelFunction.jvp
# the C implementation of Function.apply, restored on exit
_ORIGINAL_APPLY = Function.__dict__["apply"]


def has_own_jvp(cls: type) -> bool:
    """Whether the ``autograd.Function`` subclass ``cls`` defines a ``jvp`` of its own."""
    return getattr(cls, "jvp", _DEFAULT_JVP) is not _DEFAULT_JVP


def _tangent_of(x: object) -> torch.Tensor | None:
    return fwAD.unpack_dual(x).tangent if isinstance(x, torch.Tensor) else None


def _apply_with_backward_jvp(cls: type, *args, **kwargs):
    """``cls.apply(*args, **kwargs)``, with a tangent for its outputs from its backward when
    ``cls`` has no jvp and a positional tensor argument is dual; otherwise unchanged."""
    original = _ORIGINAL_APPLY.__get__(None, cls)
    if has_own_jvp(cls) or torch._C._are_functorch_transforms_active():
        return original(*args, **kwargs)
    tangents = [_tangent_of(a) for a in args]
    if all(t is None for t in tangents):
        return original(*args, **kwargs)  # a dual keyword tensor still fails in PyTorch
    primals = [fwAD.unpack_dual(a).primal if t is not None else a
               for a, t in zip(args, tangents)]
    output = original(*primals, **kwargs)

    dual_at = [i for i, t in enumerate(tangents) if t is not None]
    reuse = torch.is_grad_enabled() and all(primals[i].requires_grad for i in dual_at)
    with torch.enable_grad():
        if reuse:  # the output's own graph reaches the dual inputs
            inputs, traced = [primals[i] for i in dual_at], output
        else:  # build a graph on detached copies of the dual inputs only
            rerun = [a.detach() if isinstance(a, torch.Tensor) else a for a in primals]
            for i in dual_at:
                rerun[i].requires_grad_(True)
            inputs, traced = [rerun[i] for i in dual_at], original(*rerun, **kwargs)
        output_tangents = _output_tangents(cls, traced, inputs, [tangents[i] for i in dual_at])

    outputs = output if isinstance(output, tuple) else (output,)
    joined = tuple(fwAD.make_dual(o, t) if t is not None else o
                   for o, t in zip(outputs, output_tangents))
    return joined if isinstance(output, tuple) else joined[0]


def _output_tangents(cls: type, traced, inputs: list[torch.Tensor],
                     tangents: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """``J t`` for each output of ``traced`` (None where it is not a differentiable tensor),
    from ``J^T u`` with a graph in ``u`` (see the module docstring)."""
    outs = traced if isinstance(traced, tuple) else (traced,)
    diff = [i for i, o in enumerate(outs)
            if isinstance(o, torch.Tensor) and o.requires_grad and o.is_floating_point()]
    result: list[torch.Tensor | None] = [None] * len(outs)
    if not diff:
        return result
    us = [torch.zeros_like(outs[i], requires_grad=True) for i in diff]
    vjps = torch.autograd.grad([outs[i] for i in diff], inputs, us, create_graph=True,
                               retain_graph=True, allow_unused=True)
    pairs = [(g, t) for g, t in zip(vjps, tangents) if g is not None]
    if not pairs:  # no input reaches an output: zero tangents
        for i in diff:
            result[i] = torch.zeros_like(outs[i]).detach()
        return result
    # a backward under @once_differentiable returns results behind an error node (raising
    # when differentiated) or none that require grad: no route from u to them
    if not any(g.requires_grad for g, _ in pairs) or any(
            type(g.grad_fn).__name__ == "Error" for g, _ in pairs):
        raise _not_differentiable(cls)
    pairs = [(g, t.to(g.dtype)) for g, t in pairs if g.requires_grad]
    jts = torch.autograd.grad([g for g, _ in pairs], us, [t for _, t in pairs],
                              allow_unused=True)
    if all(jt is None for jt in jts):  # results that require grad, yet not through u
        raise _not_differentiable(cls)
    for i, u, jt in zip(diff, us, jts):
        result[i] = (jt if jt is not None else torch.zeros_like(u)).detach()
    return result


def _not_differentiable(cls: type) -> NotImplementedError:
    return NotImplementedError(
        f"custom autograd.Function {cls.__qualname__} has no jvp, and its backward is not "
        "differentiable in its output gradient (e.g. @once_differentiable), so forward-mode "
        "AD cannot derive one from it: give the Function a jvp staticmethod, or use a form "
        "of the estimator without forward mode (ghost_mode=probe)")


@contextmanager
def custom_function_jvps() -> Iterator[None]:
    """Inside an active ``fwAD.dual_level``: custom ``autograd.Function``s without a ``jvp``
    get their outputs' tangents from their own backward (module docstring) instead of
    failing. Functions with a jvp, and calls without a dual positional tensor, run as
    before. Patches ``torch.autograd.Function.apply`` for the duration (one Python call per
    Function call); restored on exit."""
    Function.apply = classmethod(_apply_with_backward_jvp)
    try:
        yield
    finally:
        Function.apply = _ORIGINAL_APPLY
