"""Ghost values computed inside the training backward ("probe" form of docs/design.md §1).

For a module whose output ``s`` is *linear in its own parameters* (``nn.Linear``, convolutions,
``nn.Embedding``, the affine part of LayerNorm/GroupNorm/RMSNorm/BatchNorm, Hugging Face
``Conv1D``), the derivative of ``s`` along the validation gradient ``g_V`` restricted to that
module's parameters is the module's own function evaluated with ``g_V`` in place of its
parameters: ``W_V a + b_V`` for a linear layer, ``conv(a, W_V) + b_V`` for a convolution,
``W_V[ids]`` for an embedding, ``gamma_V * x_hat + beta_V`` for a norm. The training backward
hands every such module its output gradient ``g = dL/ds``; with ``L = sum_j c_j ell_j`` the row
of sample ``j`` is ``c_j d ell_j / d s_j`` when samples do not interact in the forward, so

    v_j = (1 / c_j) * sum_modules  sum_t < g_{j,t} , (probe)_{j,t} >

is exactly ``<g_V, grad ell_j>``: one extra "forward" of each layer with ``g_V`` as weights,
contracted with a gradient the training backward computes anyway, and no tangent carried
through the network (forward mode costs a second matmul per layer for that).

Any other module without submodules (Hugging Face's RMSNorm classes, FalconLinear, OPT's
position embedding) gets the *replay* probe (:func:`module_jvp`): its own forward run again
in forward mode with its parameters' tangents, on the arguments it was called with; the
identity needs the chain rule only, not linearity. Checked on the first step: the replay
must reproduce the forward's output and give a sample alone its output in the batch.

Exact per sample when the forward does not mix samples. BatchNorm in train mode mixes them
(batch statistics): then the values are the per-route decomposition ghost-clipping engines
compute (each sample's share through its own activations), whose sum over the batch is
still exact, but which is not the derivative of ``ell_j`` in batch context that the
forward-mode form returns. ``mode="auto"`` therefore picks forward mode for such models.

Values are known only after the backward, so the trainer uses this form when the policy
keeps every sample with weight 1 whatever the values (scoring without filtering).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from lai.batching import Batch, logits_of
from lai.estimators.capture import fp32_math
from lai.estimators.forward.custom_function_jvp import custom_function_jvps
from lai.estimators.forward.forward_fastpaths import ForwardFastPaths

# type -> probe(module, input, tangents by parameter name) -> d s / d eps (same shape as s);
# module_jvp, the replay probe, takes (module, args, kwargs, tangents) instead
Probe = Callable[..., torch.Tensor]


def _affine(x_hat: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
            channel_dim: int | None) -> torch.Tensor:
    """``weight * x_hat + bias`` broadcast along the last dims (``channel_dim=None``) or along
    dim 1 (BatchNorm/GroupNorm); a missing tangent counts as zero."""
    def shape(t: torch.Tensor) -> torch.Tensor:
        if channel_dim is None:
            return t
        return t.view(1, -1, *([1] * (x_hat.dim() - 2)))

    out = x_hat * shape(weight) if weight is not None else torch.zeros_like(x_hat)
    return out + shape(bias) if bias is not None else out


def _linear(m: nn.Linear, a: torch.Tensor, t: dict) -> torch.Tensor:
    w, b = t.get("weight"), t.get("bias")
    if w is None:
        return b.expand(*a.shape[:-1], m.out_features)
    return F.linear(a, w, b)


def _conv(m: nn.modules.conv._ConvNd, a: torch.Tensor, t: dict) -> torch.Tensor:
    w, b = t.get("weight"), t.get("bias")
    if w is None:  # only the bias trains: its probe is the bias broadcast over positions
        w = torch.zeros_like(m.weight)
    return m._conv_forward(a, w, b)


def _embedding(m: nn.Embedding, ids: torch.Tensor, t: dict) -> torch.Tensor:
    out = F.embedding(ids, t["weight"], m.padding_idx)
    if m.padding_idx is not None:  # the lookup gives the padding row no gradient
        out = out.masked_fill((ids == m.padding_idx).unsqueeze(-1), 0)
    return out


def _layer_norm(m: nn.LayerNorm, a: torch.Tensor, t: dict) -> torch.Tensor:
    x_hat = F.layer_norm(a, m.normalized_shape, None, None, m.eps)
    return _affine(x_hat, t.get("weight"), t.get("bias"), None)


def _rms_norm(m: nn.Module, a: torch.Tensor, t: dict) -> torch.Tensor:
    x_hat = F.rms_norm(a, m.normalized_shape, None, m.eps)
    return _affine(x_hat, t.get("weight"), None, None)


def _group_norm(m: nn.GroupNorm, a: torch.Tensor, t: dict) -> torch.Tensor:
    x_hat = F.group_norm(a, m.num_groups, None, None, m.eps)
    return _affine(x_hat, t.get("weight"), t.get("bias"), 1)


def _batch_norm(m: nn.modules.batchnorm._BatchNorm, a: torch.Tensor, t: dict) -> torch.Tensor:
    batch_stats = m.training or m.running_mean is None
    x_hat = F.batch_norm(a, None if batch_stats else m.running_mean,
                         None if batch_stats else m.running_var, None, None,
                         training=batch_stats, momentum=0.0, eps=m.eps)
    return _affine(x_hat, t.get("weight"), t.get("bias"), 1)


def _hf_conv1d(m: nn.Module, a: torch.Tensor, t: dict) -> torch.Tensor:
    w, b = t.get("weight"), t.get("bias")
    out = a @ w if w is not None else a.new_zeros(*a.shape[:-1], m.nf)
    return out + b if b is not None else out


def module_jvp(m: nn.Module, args: tuple, kwargs: dict, t: dict) -> torch.Tensor:
    """The replay probe (see :func:`replay`): the tangent alone."""
    return replay(m, args, kwargs, t)[1]


def replay(m: nn.Module, args: tuple, kwargs: dict, t: dict
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The *replay* probe's computation, for a module without a closed-form probe: the
    derivative of its output along the tangents ``t`` of its own parameters, its inputs held
    fixed, by forward-mode AD through its own ``forward`` (``m.forward``: no hooks run) on
    the inputs it was called with. Linearity in the parameters is not needed:
    ``<g_j, d s_j/d theta . t>`` is sample j's share of ``<g_V, grad ell_j>`` for any module
    whose output rows are per sample (the probe identity needs only the chain rule). Output: the shape of the module's output.
    Runs under the forward form's correctness handlers (fused attention, embeddings' padding
    rows, custom Functions without jvp). Returns ``(output, tangent)``: the replayed output,
    which must equal the one the forward gave (a module drawing random numbers or keeping
    state would not; :func:`probe_capture` checks it when asked), and its tangent."""
    swapped = {}
    with fwAD.dual_level():
        try:
            for name, p in list(m._parameters.items()):
                if p is not None and name in t:  # a frozen parameter keeps no tangent
                    swapped[name] = p
                    m._parameters[name] = fwAD.make_dual(p.detach(), t[name].to(p.dtype))
            # the fast paths too: the inputs carry no tangent, and PyTorch's formulas would
            # give them efficient-zero ones, whose arithmetic costs host time per op
            with custom_function_jvps(), ForwardFastPaths(
                    [m._parameters[n] for n in swapped], fast=True):
                out = m.forward(*args, **kwargs)
        finally:
            for name, p in swapped.items():
                m._parameters[name] = p
        if not isinstance(out, torch.Tensor):
            raise RuntimeError(f"ghost probe mode: {type(m).__name__} returned "
                               f"{type(out).__name__}, not a tensor, when replayed")
        primal, tangent = fwAD.unpack_dual(out)
        return primal, (tangent if tangent is not None else torch.zeros_like(primal))


_BASE_FORWARDS = {nn.Linear.forward, nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward,
                  nn.Embedding.forward, nn.LayerNorm.forward, nn.GroupNorm.forward,
                  nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward}
if hasattr(nn, "RMSNorm"):
    _BASE_FORWARDS.add(nn.RMSNorm.forward)


def probe_for(module: nn.Module) -> Probe | None:
    """The probe of ``module``: a closed form for the layer types whose output is linear in
    their own parameters (input ``a`` -> ``d s / d eps``), else :func:`module_jvp` (a replay
    of its forward in forward mode) for a module without submodules (Hugging Face's RMSNorm
    classes, a subclass with a ``forward`` of its own such as OPT's learned position
    embedding, which takes the attention mask and adds an offset), else None: a module with
    submodules has none, since replaying it would run them (and their hooks) again."""
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return None  # max_norm rescales the weight in place: neither probe nor replay
    if (isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding,
                            nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm))
            or (hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm))) \
            and type(module).forward not in _BASE_FORWARDS:
        return _replay_probe(module)
    if isinstance(module, nn.Linear):
        return _linear
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return _conv
    if isinstance(module, nn.Embedding):
        return _embedding
    if isinstance(module, nn.LayerNorm):
        return _layer_norm
    if hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm):
        return _rms_norm
    if isinstance(module, nn.GroupNorm):
        return _group_norm
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return _batch_norm
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 layer
        return _hf_conv1d
    return _replay_probe(module)


def _replay_probe(module: nn.Module) -> Probe | None:
    return module_jvp if next(module.children(), None) is None else None


def probe_plan(model: nn.Module) -> tuple[list[tuple[nn.Module, Probe]], list[str]]:
    """(modules holding trainable parameters with their probe, names of those that have none).

    Probe form needs the second list empty: every trainable parameter must sit in a module
    with a probe (:func:`probe_for`). A parameter used outside its module's forward (e.g. a
    weight read directly by a parent) is caught by :func:`check_coverage` at run time.
    """
    plan, missing = [], []
    for name, module in model.named_modules():
        own = [p for p in module._parameters.values() if p is not None and p.requires_grad]
        if not own:
            continue
        probe = probe_for(module)
        if probe is None:
            missing.append(f"{name or '<root>'} ({type(module).__name__})")
        else:
            plan.append((module, probe))
    return plan, missing


def batch_coupled(model: nn.Module) -> list[str]:
    """Modules that mix the samples of a batch in the forward: BatchNorm using batch
    statistics (train mode, or no running statistics)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and (m.training or m.running_mean is None)]


class ProbeCapture:
    """What one probe-mode training forward leaves: the logits, and after the backward the
    per-sample sums ``acc [B] = sum_modules <g_j, probe_j>`` (``c_j`` times the values).

    ``row_scale``: ``c_j``, the coefficient of ``ell_j`` in the loss that was back-propagated
    (a scalar or ``[B]``); ``None`` means 1 (the loss was the plain sum).
    """

    def __init__(self, labels: torch.Tensor):
        self.labels = labels
        self.logits: torch.Tensor | None = None
        self.acc: torch.Tensor | None = None
        self.row_scale: torch.Tensor | float | None = None
        self.batch_size: int | None = None
        self.hooks_registered = 0  # gradient hooks put on layer outputs by the forward
        self.hooks_fired = 0
        self.low_precision = False  # some output gradient arrived in bf16/fp16


def _versions(args: tuple, kwargs: dict) -> list[tuple[torch.Tensor, int]]:
    return [(x, x._version) for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor)]


def _check_unchanged(module: nn.Module, args: tuple, kwargs: dict,
                     versions: list[tuple[torch.Tensor, int]]) -> None:
    """A replay needs the inputs the module saw: RuntimeError if one was changed in place."""
    if any(x._version != v for x, v in versions):
        raise RuntimeError(
            f"ghost probe mode: an input of {type(module).__name__} was changed in place after "
            "its forward, so its replay probe cannot see what it saw; use "
            "estimator.ghost_mode=forward")


def _differ(a: torch.Tensor, b: torch.Tensor, low: bool) -> bool:
    # not bit for bit: with dual parameters PyTorch may take another kernel for the primal
    # (FalconLinear's ``x @ W.T``); random numbers or state differ by far more than rounding
    if a.shape != b.shape:
        return True
    if not b.is_floating_point():
        return not torch.equal(a, b)
    tol = 2e-2 if low else (1e-10 if b.dtype == torch.float64 else 1e-5)
    return float((a.double() - b.double()).norm()) > tol * float(b.double().norm())


def _check_same_output(module: nn.Module, again: torch.Tensor, seen: torch.Tensor,
                       low: bool) -> None:
    if _differ(again, seen, low):
        raise RuntimeError(
            f"ghost probe mode: replaying {type(module).__name__}'s forward gave another output "
            "than the forward did (random numbers or state inside it), so its replay probe "
            "does not apply; use estimator.ghost_mode=forward")


def _check_rows_independent(module: nn.Module, args: tuple, kwargs: dict, t: dict,
                            full: torch.Tensor, b: int, low: bool) -> None:
    """Replay the first sample alone (every argument with ``b`` leading rows cut to one):
    a module that mixes the samples of a batch (batch statistics in a hand-written norm)
    gives it another output, and its probe would be a per-route split, not the per-sample
    derivative: RuntimeError then. Skipped where the rows are not one per sample, or the
    module cannot run on one row."""
    if b < 2 or full.dim() == 0 or full.shape[0] != b:
        return

    def first(x):
        return x[:1] if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == b else x

    try:
        alone, _ = replay(module, tuple(first(x) for x in args),
                          {k: first(x) for k, x in kwargs.items()}, t)
    except Exception:  # noqa: BLE001 -- cannot tell, so no verdict
        return
    if _differ(alone, full[:1], low):
        raise RuntimeError(
            f"ghost probe mode: {type(module).__name__} gives a sample another output alone "
            "than in its batch (it mixes the samples, e.g. batch statistics), so its probe "
            "would not be the per-sample derivative; use estimator.ghost_mode=forward")


@contextmanager
def probe_capture(model: nn.Module, batch: Batch, plan: list[tuple[nn.Module, Probe]],
                  tangents: dict[int, torch.Tensor], check_replays: bool = False
                  ) -> Iterator[ProbeCapture]:
    """Forward hooks on the planned modules; each registers a gradient hook on its output
    that adds ``<g, probe>`` per sample into ``capture.acc`` during the backward.

    ``check_replays``: each replay probe (:func:`module_jvp`) also compares its replayed
    output with the one the forward gave, and the backward raises a RuntimeError naming the
    module if they differ (randomness or state inside it). It holds copies of those outputs
    until the backward and waits for the device once per module: meant for a first step."""
    # kept whole (~60+ lines): the forward and gradient hooks are closures over this capture and
    # its plan
    cap = ProbeCapture(batch.labels)
    cap.batch_size = len(batch)
    mask = batch.attention_mask
    seq = mask.shape[1] if mask is not None and mask.dim() == 2 else None
    handles = []

    def make_hook(module: nn.Module, probe: Probe):
        names = {n: tangents[id(p)] for n, p in module._parameters.items()
                 if p is not None and id(p) in tangents}
        is_replay = probe is module_jvp

        def forward_hook(mod, args, kwargs, out) -> None:
            if not (torch.is_grad_enabled() and isinstance(out, torch.Tensor)
                    and out.requires_grad):
                return  # no backward will reach this output
            a = args[0] if args else next(iter(kwargs.values()))
            # a copy: the model may change its output in place later (Falcon's residual add)
            seen = out.detach().clone() if is_replay and check_replays else None
            b = cap.batch_size
            replaced = None
            per_sample = None  # rows per sample when the layer runs on [B * T, ...] rows
            if (seq is not None and out.dim() > 0 and out.shape[0] == b * seq != b
                    and isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == b * seq):
                # hidden states flattened batch-major (OPT's fc1/fc2 and their norm): each
                # sample's T rows are summed into its value
                per_sample = seq
            elif out.dim() > 0 and out.shape[0] == 1 and b > 1:
                # shared by every sample and broadcast later (position embeddings of
                # ``position_ids [1, T]``): hand on a batch-sized view so that the gradient
                # arrives per sample; same values, and ``expand`` back-propagates as the sum
                out = replaced = out.expand(b, *out.shape[1:])
                a = a.expand(b, *a.shape[1:])
            elif out.dim() == 0 or out.shape[0] != b:
                raise RuntimeError(
                    f"ghost probe mode: {type(mod).__name__} output has leading size "
                    f"{out.shape[0] if out.dim() else 0}, not the batch size {b}; "
                    "use estimator.ghost_mode=forward")

            # released once used: the layer's input need not outlive its backward. A replay
            # keeps every argument, with the version counters of its tensors
            held = [(args, kwargs, _versions(args, kwargs)) if is_replay else a]

            def on_grad(g: torch.Tensor) -> None:
                if not held:
                    return  # a second backward through a retained graph: counted once
                a = held.pop()
                with torch.no_grad():
                    # the probe runs in the precision the forward ran in: bf16 autocast when
                    # the gradient arrives in bf16 (as fast as the layer), else full precision
                    low = g.dtype in (torch.bfloat16, torch.float16)
                    if is_replay:
                        _check_unchanged(mod, *a)
                    elif not (low or not a.is_floating_point() or a.dtype == g.dtype):
                        a = a.to(g.dtype)
                    with (torch.autocast(g.device.type, dtype=g.dtype) if low
                          else fp32_math(g)):
                        if seen is not None:
                            again, p = replay(mod, *a[:2], names)
                            _check_same_output(mod, again, seen, low)
                            _check_rows_independent(mod, *a[:2], names, again, b, low)
                        elif is_replay:
                            p = probe(mod, *a[:2], names)
                        else:
                            p = probe(mod, a, names)
                    acc_dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
                    term = (g.to(acc_dtype) * p.to(acc_dtype)).sum(dim=tuple(range(1, g.dim())))
                    if per_sample is not None:
                        term = term.view(b, per_sample).sum(1)
                    cap.acc = term if cap.acc is None else cap.acc.add_(term)
                    cap.hooks_fired += 1
                    cap.low_precision |= low

            out.register_hook(on_grad)
            cap.hooks_registered += 1
            return replaced

        return forward_hook

    def keep_logits(mod, args, output) -> None:
        # detached: the graph holds the gradient hooks, and they hold `cap`; a graph-holding
        # tensor in `cap` would close a cycle through C++ that the garbage collector cannot
        # see, keeping every step's graph (and its layer inputs) alive
        cap.logits = logits_of(output).detach()

    try:
        for module, probe in plan:
            handles.append(module.register_forward_hook(make_hook(module, probe),
                                                        with_kwargs=True))
        handles.append(model.register_forward_hook(keep_logits))
        yield cap
    finally:
        for h in handles:
            h.remove()



def probe_values(cap: ProbeCapture) -> torch.Tensor:
    """``[B]`` values ``acc_j / c_j`` (positive = helps); zeros if no gradient reached any
    probed module. Raises if called before the backward."""
    if cap.logits is None:
        raise RuntimeError("no forward ran inside capture()")
    if cap.acc is None:
        if cap.hooks_registered:
            raise RuntimeError("ghost probe mode: score() needs the training backward first")
        return torch.zeros(cap.batch_size, device=cap.logits.device)
    v = cap.acc if cap.row_scale is None else cap.acc / cap.row_scale
    return v if v.dtype == torch.float64 else v.float()


@torch.no_grad()
def check_coverage(cap: ProbeCapture, directions: list[torch.Tensor],
                   grads: list[torch.Tensor | None], rtol: float) -> None:
    """Sum rule: ``sum_j acc_j`` must equal ``sum_p <direction_p, grad_p>`` with ``grads`` the
    parameter gradients of the backward the capture saw (``sum_j c_j grad ell_j``). A
    mismatch means a parameter is used outside the forward of the module that holds it (the
    probe hooks cannot see that use): RuntimeError then. One host sync."""
    total = sum(float((d.double() * g.double()).sum())
                for d, g in zip(directions, grads) if g is not None)
    acc = cap.acc.double() if cap.acc is not None else torch.zeros(1, dtype=torch.float64)
    got = float(acc.sum())
    if abs(got - total) > rtol * (abs(total) + float(acc.abs().sum())) + 1e-30:
        raise RuntimeError(
            "ghost probe mode does not see every use of the parameters (sum of the probe "
            f"terms {got:.6g} != <g_V, grad> {total:.6g}): a parameter is used outside the "
            "forward of the module that holds it; use estimator.ghost_mode=forward")
