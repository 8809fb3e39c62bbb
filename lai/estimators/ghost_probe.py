"""Ghost values computed inside the training backward ("probe" form of DESIGN.md §1).

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
import torch.nn.functional as F
from torch import nn

from lai.batching import Batch, logits_of
from lai.estimators.capture import fp32_math

# type -> probe(module, input, tangents by parameter name) -> d s / d eps (same shape as s)
Probe = Callable[[nn.Module, torch.Tensor, dict], torch.Tensor]


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


_BASE_FORWARDS = {nn.Linear.forward, nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward,
                  nn.Embedding.forward, nn.LayerNorm.forward, nn.GroupNorm.forward,
                  nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward}
if hasattr(nn, "RMSNorm"):
    _BASE_FORWARDS.add(nn.RMSNorm.forward)


def probe_for(module: nn.Module) -> Probe | None:
    """The probe of ``module``'s type, or None when its output is not (known to be) linear in
    its own parameters. A subclass that overrides ``forward`` has none: the probes rebuild
    the base class's forward from the module's input, and such a forward may compute
    something else from it (OPT's learned position embedding takes the attention mask and
    adds an offset)."""
    if (isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding,
                            nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm))
            or (hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm))) \
            and type(module).forward not in _BASE_FORWARDS:
        return None
    if isinstance(module, nn.Linear):
        return _linear
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return _conv
    if isinstance(module, nn.Embedding):
        return _embedding if module.max_norm is None else None  # max_norm rescales in place
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
    return None


def probe_plan(model: nn.Module) -> tuple[list[tuple[nn.Module, Probe]], list[str]]:
    """(modules holding trainable parameters with their probe, names of those that have none).

    Probe form needs the second list empty: every trainable parameter must sit in a module
    whose forward is linear in it. A parameter used outside its module's forward (e.g. a
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


@contextmanager
def probe_capture(model: nn.Module, batch: Batch, plan: list[tuple[nn.Module, Probe]],
                  tangents: dict[int, torch.Tensor]) -> Iterator[ProbeCapture]:
    """Forward hooks on the planned modules; each registers a gradient hook on its output
    that adds ``<g, probe>`` per sample into ``capture.acc`` during the backward."""
    cap = ProbeCapture(batch.labels)
    cap.batch_size = len(batch)
    mask = batch.attention_mask
    seq = mask.shape[1] if mask is not None and mask.dim() == 2 else None
    handles = []

    def make_hook(module: nn.Module, probe: Probe):
        names = {n: tangents[id(p)] for n, p in module._parameters.items()
                 if p is not None and id(p) in tangents}

        def forward_hook(mod, args, kwargs, out) -> None:
            if not (torch.is_grad_enabled() and isinstance(out, torch.Tensor)
                    and out.requires_grad):
                return  # no backward will reach this output
            a = args[0] if args else next(iter(kwargs.values()))
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

            held = [a]  # released once used: the layer's input need not outlive its backward

            def on_grad(g: torch.Tensor) -> None:
                if not held:
                    return  # a second backward through a retained graph: counted once
                a = held.pop()
                with torch.no_grad():
                    # the probe runs in the precision the forward ran in: bf16 autocast when
                    # the gradient arrives in bf16 (as fast as the layer), else full precision
                    low = g.dtype in (torch.bfloat16, torch.float16)
                    if not (low or not a.is_floating_point() or a.dtype == g.dtype):
                        a = a.to(g.dtype)
                    with (torch.autocast(g.device.type, dtype=g.dtype) if low
                          else fp32_math(g)):
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
