"""Brute-force references, written independently of lai.estimators."""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap


def layer_inputs(model: nn.Module, call, names: list[str]) -> dict[str, torch.Tensor]:
    """Raw inputs of the named modules for one forward (first call of each)."""
    out: dict[str, torch.Tensor] = {}
    mods = dict(model.named_modules())

    def keeper(n: str):
        def hook(m, a, o) -> None:  # a hook that returns a value would replace the output
            out.setdefault(n, a[0].detach())
        return hook

    hs = [mods[n].register_forward_hook(keeper(n)) for n in names]
    try:
        logits = call()
    finally:
        for h in hs:
            h.remove()
    return out, logits


def masked_flat(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is not None and x.dim() == 3:
        x = x * mask[:, :, None].to(x.dtype)
    return x.reshape(x.shape[0], -1)


def softmax_minus_onehot(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return logits.softmax(-1) - nn.functional.one_hot(y, logits.shape[-1]).to(logits.dtype)


def lai_pairwise(model, tr_call, va_call, tr_y, va_y, names, tr_mask=None, va_mask=None):
    """v_j = sum_z sum_l <phi_l(z), phi_l(j)> <G_z, G_j>, each pair written out."""
    with torch.no_grad():
        ft, lt = layer_inputs(model, tr_call, names)
        fv, lv = layer_inputs(model, va_call, names)
        gt, gv = softmax_minus_onehot(lt, tr_y), softmax_minus_onehot(lv, va_y)
        v = torch.zeros(len(tr_y), dtype=lt.dtype)
        for j in range(len(tr_y)):
            for z in range(len(va_y)):
                alpha = 0.0
                for n in names:
                    a = masked_flat(ft[n], tr_mask)[j]
                    b = masked_flat(fv[n], va_mask)[z]
                    if a.numel() != b.numel():  # token layers padded to different lengths
                        size = max(a.numel(), b.numel())
                        a = torch.nn.functional.pad(a, (0, size - a.numel()))
                        b = torch.nn.functional.pad(b, (0, size - b.numel()))
                    alpha = alpha + a @ b
                v[j] += alpha * (gt[j] @ gv[z])
    return v


def token_mean_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for one sample: logits [1, C] / labels [1], or a language-model sample
    logits [1, T, V] / labels [1, T] averaged over positions whose label is not -100."""
    if logits.dim() == 2:
        return nn.functional.cross_entropy(logits, labels)
    keep = labels[0] != -100
    return nn.functional.cross_entropy(logits[0][keep], labels[0][keep])


def per_sample_grads(model: nn.Module, param_names: list[str], inputs, labels,
                     kwargs: bool = False, loss_fn=token_mean_ce) -> torch.Tensor:
    """torch.func per-sample gradients of the cross-entropy w.r.t. the named params: [N, P]."""
    params = {k: v.detach() for k, v in model.named_parameters() if k in param_names}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(p, x, y):
        if kwargs:
            x = {k: v.unsqueeze(0) for k, v in x.items()}
            out = functional_call(model, (p, buffers), args=(), kwargs=x)
        else:
            out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        if hasattr(out, "logits"):
            out = out.logits
        return loss_fn(out, y.unsqueeze(0))

    try:
        g = vmap(grad(loss), in_dims=(None, 0, 0))(params, inputs, labels)
    except RuntimeError:  # data-dependent control flow in the model (HF masks): one by one
        rows = []
        for i in range(labels.shape[0]):
            x = {k: v[i] for k, v in inputs.items()} if kwargs else inputs[i]
            rows.append(grad(loss)(params, x, labels[i]))
        g = {k: torch.stack([r[k] for r in rows]) for k in param_names}
    return torch.cat([g[k].reshape(labels.shape[0], -1) for k in param_names], dim=1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||``."""
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def strip(batch: dict) -> dict:
    """A dict batch without its labels: the model's keyword arguments."""
    return {k: v for k, v in batch.items() if k != "labels"}


def per_sample_grads_autograd(model: nn.Module, param_names: list[str], inputs, labels,
                              kwargs: bool = False, loss_fn=token_mean_ce) -> torch.Tensor:
    """Per-sample gradients by plain reverse mode, one sample per forward: [N, P]. For models
    torch.func cannot transform (a custom ``autograd.Function`` in the old style, e.g. BLOOM's
    GeLU); the same values as :func:`per_sample_grads` where both run."""
    params = [p for k, p in model.named_parameters() if k in param_names]
    rows = []
    for i in range(labels.shape[0]):
        if kwargs:
            out = model(**{k: v[i:i + 1] for k, v in inputs.items()})
        else:
            out = model(inputs[i:i + 1])
        if hasattr(out, "logits"):
            out = out.logits
        g = torch.autograd.grad(loss_fn(out, labels[i:i + 1]), params, allow_unused=True)
        rows.append(torch.cat([(gk if gk is not None else torch.zeros_like(p)).reshape(-1)
                               for gk, p in zip(g, params)]))
    return torch.stack(rows)
