"""DataInf influence (Kwon et al. 2023), static, block-diagonal closed form.

Blocks ``b`` are the modules that own trainable parameters directly (``module._parameters``:
a layer's weight and bias form one block; a tied parameter belongs to the first module that
owns it). With ``g_{i,b}`` the gradient of ``ell_i`` restricted to block ``b`` for the ``n``
Hessian samples, DataInf replaces the block's damped inverse Hessian by the average of
Sherman-Morrison inverses of rank-one terms:

    (H_b + lambda_b I)^{-1}  ~  M_b = 1/(n lambda_b) sum_i ( I - g_{i,b} g_{i,b}^T
                                                              / (lambda_b + ||g_{i,b}||^2) ),

and the value of training sample j (positive = helps) is

    v_j = sum_b g_{V,b}^T M_b g_{j,b},        g_V = sum_{z in V} grad ell_z.

Default damping (per block): ``lambda_b = 0.1 * mean_i ||g_{i,b}||^2 / dim_b``; a float
``damping`` is used for every block instead. A block whose Hessian-sample gradients are all
zero (lambda_b = 0) contributes nothing.

Computation: ``u_b = M_b g_{V,b} = 1/lambda_b (g_{V,b} - 1/n sum_i g_{i,b}
<g_{i,b}, g_{V,b}> / (lambda_b + ||g_{i,b}||^2))`` (the ``n`` identity terms sum to ``n I``)
is accumulated over chunks of per-sample
gradients of the Hessian samples (``torch.func``: ``vmap(grad(...))``, or a per-sample loop
where vmap fails, e.g. data-dependent control flow); pass 1 gives the norms (default damping),
pass 2 accumulates ``u``. Then ``v_j = <u, grad ell_j>`` for every training sample by one
forward-mode pass per batch (:func:`lai.estimators.online.ghost.directional_derivatives`). At most
``chunk_size`` per-sample gradients exist at a time.

The model's current mode is used. For BatchNorm models prefer eval mode: in train mode each
Hessian sample's gradient is taken on the sample alone (its own batch statistics), while the
training samples' derivatives are taken in the context of their batch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from lai.batching import Batch, logits_of, per_sample_loss
from lai.estimators.capture import preserved_buffers
from lai.estimators.static import directional_values
from lai.estimators.static.lissa import total_validation_gradient
from lai.estimators.registry import StaticOptions, register_estimator


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of the unique trainable parameters, in
    :func:`~lai.estimators.online.ghost.trainable_parameters` order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return per_sample_loss(logits, labels)[0]


# once per call: vmap on the first _TRIAL_ROWS rows, timed against a loop over _TIMED_ROWS
_TRIAL_ROWS, _TIMED_ROWS = 8, 2


def _now(like: torch.Tensor) -> float:
    """Wall time after the device has finished its queued work."""
    if like.device.type == "cuda":
        torch.cuda.synchronize(like.device)
    return time.perf_counter()


def per_sample_gradient_chunks(
    model: nn.Module, batches: Sequence[Batch], chunk_size: int = 64,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = _sample_loss,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield ``{name: [c, *param.shape]}`` per-sample gradients of ``loss_fn`` over the
    trainable parameters, ``c <= chunk_size`` samples at a time, in batch order.

    ``loss_fn(logits [1, ...], labels [1, ...]) -> scalar`` is evaluated on one sample (batch
    dimension of one). Uses ``torch.func`` (``functional_call`` + ``vmap(grad(...))``); if vmap
    raises (data-dependent control flow, e.g. Hugging Face masks) it falls back to a loop of
    ``torch.func.grad`` over the samples, for this and all later chunks, and where
    ``torch.func`` cannot transform the model at all (an old-style custom
    ``autograd.Function``, e.g. BLOOM's GeLU) to plain reverse mode, one sample at a time.
    Once per call, vmap on the first rows is timed against a loop over the next few; when the
    loop is faster per row (e.g. convolutions on a CPU) the rest uses it. The model's mode is
    used: BatchNorm layers in train mode normalise each sample by its own statistics (as a
    batch of one, running statistics neither used nor updated; in eval mode they use their
    running statistics, the textbook per-sample gradient). Buffers are restored when the
    generator finishes.
    """
    # kept whole (~60+ lines): the vmap and loop paths are closures over the same functional
    # parameters and the vmap-fallback state
    named = trainable_named_parameters(model)
    params = {n: p.detach() for n, p in named}
    state = {"vmap": True, "func": True}
    # train-mode BatchNorm: hide the running statistics (None), so that the per-sample forward
    # neither mutates them (torch.func forbids it) nor uses them
    stats = {}
    for mn, mod in model.named_modules():
        if (isinstance(mod, nn.modules.batchnorm._NormBase) and mod.training
                and mod.track_running_stats):
            for bn in ("running_mean", "running_var", "num_batches_tracked"):
                if getattr(mod, bn, None) is not None:
                    stats[f"{mn}.{bn}" if mn else bn] = None

    def chunks() -> Iterator[Batch]:
        for batch in batches:
            for start in range(0, len(batch), chunk_size):
                yield batch.select(torch.arange(start, min(len(batch), start + chunk_size)))

    def split(chunk: Batch) -> tuple[Any, dict]:
        inputs = chunk.inputs
        if isinstance(inputs, Mapping):
            return ({k: v for k, v in inputs.items() if torch.is_tensor(v)},
                    {k: v for k, v in inputs.items() if not torch.is_tensor(v)})
        return inputs, {}

    def loss(p: dict, x: Any, y: torch.Tensor, const: dict) -> torch.Tensor:
        state_dicts = (p, stats) if stats else p
        if isinstance(x, Mapping):
            kw = {k: v.unsqueeze(0) for k, v in x.items()}
            kw.update(const)
            out = functional_call(model, state_dicts, args=(), kwargs=kw)
        else:
            out = functional_call(model, state_dicts, (x.unsqueeze(0),))
        return loss_fn(logits_of(out), y.unsqueeze(0))

    def by_vmap(chunk: Batch) -> dict[str, torch.Tensor] | None:
        """The chunk's gradients by vmap; None (and vmap off from now on) where it fails."""
        batched, const = split(chunk)
        try:
            return vmap(lambda p, x, y: grad(loss)(p, x, y, const), in_dims=(None, 0, 0),
                        randomness="different")(params, batched, chunk.labels)
        except torch.cuda.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError, ValueError, TypeError):
            state["vmap"] = False
            return None

    def by_loop(chunk: Batch) -> dict[str, torch.Tensor]:
        batched, const = split(chunk)
        rows = []
        for i in range(len(chunk)):
            x = ({k: v[i] for k, v in batched.items()} if isinstance(batched, Mapping)
                 else batched[i])
            if state["func"]:
                try:
                    rows.append(grad(loss)(params, x, chunk.labels[i], const))
                    continue
                except RuntimeError as e:
                    # an old-style custom autograd.Function (no setup_context, e.g.
                    # BLOOM's GeLU) refuses every torch.func transform
                    if "setup_context" not in str(e):
                        raise
                    state["func"] = False
            rows.append(_reverse_mode_gradient(
                lambda p, x_, y_: loss(p, x_, y_, const), named, x, chunk.labels[i]))
        return {n: torch.stack([r[n] for r in rows]) for n in params}

    def timed_trial(chunk: Batch) -> dict[str, torch.Tensor] | None:
        """vmap's batched rules can be far slower than a loop (convolutions on a CPU, many
        rows at once). Once: time vmap on the first rows and the loop on the next few, then
        finish the chunk (and later ones) the faster way; same gradients to rounding."""
        state["timed"] = True
        n = len(chunk)
        head, mid, rest = (torch.arange(0, _TRIAL_ROWS), torch.arange(_TRIAL_ROWS, _TRIAL_ROWS
                           + _TIMED_ROWS), torch.arange(_TRIAL_ROWS + _TIMED_ROWS, n))
        t0 = _now(chunk.labels)
        g_head = by_vmap(chunk.select(head))
        if g_head is None:
            return None
        per_row_vmap = (_now(chunk.labels) - t0) / len(head)
        t1 = _now(chunk.labels)
        g_mid = by_loop(chunk.select(mid))
        state["vmap"] = per_row_vmap <= (_now(chunk.labels) - t1) / len(mid)
        parts = [g_head, g_mid]
        if len(rest):
            sub = chunk.select(rest)
            parts.append((by_vmap(sub) if state["vmap"] else None) or by_loop(sub))
        return {k: torch.cat([p[k] for p in parts]) for k in params}

    with preserved_buffers(model), torch.enable_grad():
        for chunk in chunks():
            g = None
            if state["vmap"] and "timed" not in state and \
                    len(chunk) > _TRIAL_ROWS + _TIMED_ROWS:
                g = timed_trial(chunk)
            if g is None and state["vmap"]:
                g = by_vmap(chunk)
            if g is None:
                g = by_loop(chunk)
            yield {n: g[n].detach() for n in params}


def _reverse_mode_gradient(loss: Any, named: list[tuple[str, nn.Parameter]], x: Any,
                           y: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{name: gradient}`` of ``loss(params, x, y)`` for one sample by ``torch.autograd``
    through the model's own parameters (zeros for a parameter the loss does not use)."""
    live = dict(named)
    g = torch.autograd.grad(loss(live, x, y), list(live.values()), allow_unused=True)
    return {n: (gn if gn is not None else torch.zeros_like(p)).detach()
            for (n, p), gn in zip(named, g)}


def parameter_blocks(model: nn.Module) -> list[list[str]]:
    """Names of the trainable parameters grouped by owning module (weight and bias together),
    in module order; a tied parameter goes to the first module that owns it."""
    name_of = {id(p): n for n, p in trainable_named_parameters(model)}
    seen: set[int] = set()
    blocks = []
    for module in model.modules():
        block = []
        for p in module._parameters.values():
            if p is None or id(p) not in name_of or id(p) in seen:
                continue
            seen.add(id(p))
            block.append(name_of[id(p)])
        if block:
            blocks.append(block)
    return blocks


def _flat_block(g: dict[str, torch.Tensor], names: list[str], dtype: torch.dtype) -> torch.Tensor:
    c = g[names[0]].shape[0]
    return torch.cat([g[n].reshape(c, -1).to(dtype) for n in names], dim=1)


def datainf_direction(model: nn.Module, val_batches: Sequence[Batch],
                      hessian_batches: Sequence[Batch], *, damping: float | None = None,
                      chunk_size: int = 64) -> list[torch.Tensor]:
    """``u = (block-diag M) g_V`` in trainable-parameter order (see module docstring)."""
    named = trainable_named_parameters(model)
    shapes = {n: p.shape for n, p in named}
    dtype = torch.float64 if any(p.dtype == torch.float64 for _, p in named) else torch.float32
    blocks = parameter_blocks(model)
    g_v_list = total_validation_gradient(model, val_batches)
    g_v = {n: g for (n, _), g in zip(named, g_v_list)}
    g_vb = [torch.cat([g_v[n].reshape(-1).to(dtype) for n in names]) for names in blocks]
    n_samples = sum(len(b) for b in hessian_batches)
    if n_samples == 0:
        raise ValueError("datainf needs at least one Hessian sample")

    # pass 1: default per-block damping from the mean squared gradient norm
    if damping is None:
        sq = [torch.zeros((), dtype=dtype, device=g.device) for g in g_vb]
        for g in per_sample_gradient_chunks(model, hessian_batches, chunk_size):
            for b, names in enumerate(blocks):
                sq[b] += _flat_block(g, names, dtype).pow(2).sum()
        lambdas = [0.1 * s / (n_samples * g.numel()) for s, g in zip(sq, g_vb)]
    else:
        if damping <= 0:
            raise ValueError(f"datainf damping must be positive; got {damping}")
        lambdas = [torch.tensor(float(damping), dtype=dtype, device=g.device) for g in g_vb]

    # pass 2: sum_i g_i <g_i, g_V> / (lambda + ||g_i||^2), per block
    acc = [torch.zeros_like(g) for g in g_vb]
    for g in per_sample_gradient_chunks(model, hessian_batches, chunk_size):
        for b, names in enumerate(blocks):
            gb = _flat_block(g, names, dtype)
            coef = (gb @ g_vb[b]) / (lambdas[b] + gb.pow(2).sum(1))
            acc[b] += coef @ gb

    u: dict[str, torch.Tensor] = {}
    for b, names in enumerate(blocks):
        lam = lambdas[b]
        ub = ((g_vb[b] - acc[b] / n_samples) / lam if float(lam) > 0
              else torch.zeros_like(g_vb[b]))
        offset = 0
        for n in names:
            size = shapes[n].numel()
            u[n] = ub[offset:offset + size].view(shapes[n])
            offset += size
    return [u[n] for n, _ in named]


def datainf_values(model: nn.Module, train_batches: Sequence[Batch],
                   val_batches: Sequence[Batch], hessian_batches: Sequence[Batch], *,
                   damping: float | None = None, chunk_size: int = 64) -> torch.Tensor:
    """``[N_train]`` DataInf values (positive = helps), in the order of ``train_batches``:

        v_j = sum_b g_{V,b}^T [1/(n lambda_b) sum_i (I - g_{i,b} g_{i,b}^T
                                                   / (lambda_b + ||g_{i,b}||^2))] g_{j,b}

    over the parameter blocks ``b`` (one per module owning trainable parameters) and the ``n``
    samples of ``hessian_batches``; ``lambda_b = 0.1 mean_i ||g_{i,b}||^2 / dim_b`` unless a
    float ``damping`` is given. See the module docstring. The model's current mode is used;
    parameters and buffers are left unchanged.
    """
    u = datainf_direction(model, val_batches, hessian_batches, damping=damping,
                          chunk_size=chunk_size)
    return directional_values(model, train_batches, u)


@dataclass
class DataInfOptions(StaticOptions):
    """``estimator=datainf`` (runner=two_round)."""

    name: str = "datainf"
    damping: Optional[float] = None  # None: DataInf's rule per block
    hessian_samples: int = 1000  # training samples the curvature is taken from

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.damping is not None and self.damping < 0:
            raise ValueError("estimator.damping must be >= 0")
        if self.hessian_samples < 1:
            raise ValueError("estimator.hessian_samples must be >= 1")

    def curvature_samples(self) -> int:
        return self.hessian_samples

    def keywords(self, seed: int, progress: bool, checkpoints: Any, info: dict) -> dict:
        """The keywords of :func:`datainf_values` for a run."""
        return {"damping": self.damping}


register_estimator("datainf", DataInfOptions, kind="static")(datainf_values)
