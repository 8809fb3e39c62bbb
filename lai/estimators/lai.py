"""LAI and LLI: layer-aware influence from layer inputs and the output gradient only.

Value of training sample j against validation set V (positive = helps; the paper's Eq. 4
without its leading minus):

    v_j = sum_{z in V} sum_l <phi_l(z), phi_l(j)> * <G_z, G_j>

``phi_l(x)``: input of layer l for sample x, flattened, padding positions zeroed.
``G_x = d ell_x / d logits_x`` (flattened; closed form, no backward through the network).
LLI keeps only the output layer's term.

Two exact ways to evaluate it (DESIGN.md §1):

- **folded**: ``M_l = sum_z G_z phi_l(z)^T`` (``K x D_l``) is built once per cache refresh,
  then ``v_j = sum_l G_j^T M_l phi_l(j)``: cost ``B*K*D_l`` per layer, independent of |V|;
- **pairwise**: keep ``phi_l(z)`` and ``G_z``; ``v_j = sum_z (sum_l <phi_l(z),phi_l(j)>) <G_z,G_j>``:
  cost ``B*|V|*D_l``. Used when K >= |V| (e.g. language modelling, K = T*V).

Both are computed inside forward hooks, layer by layer, so no layer input outlives its layer.
Token layers whose validation and training batches were padded to different lengths are
aligned by zero-padding / truncating the position axis: padding positions are zero in
``phi`` anyway, so the result is unchanged.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from lai.batching import Batch, forward_logits
from lai.estimators.base import OnlineEstimator, output_gradient
from lai.estimators.capture import (DEFAULT_LAYER_TYPES, LayerKey, LayerTap, preserved_buffers,
                                    select_layers)


def align_rows(x: torch.Tensor, shape: torch.Size, target: torch.Size) -> torch.Tensor:
    """Re-lay ``x [B, prod(shape)]`` as ``[B, prod(target)]`` by padding/truncating axis 0 of
    the per-sample shape (the token axis). Shapes that differ elsewhere are an error."""
    if tuple(shape) == tuple(target):
        return x
    if len(shape) != len(target) or tuple(shape[1:]) != tuple(target[1:]):
        raise ValueError(f"per-sample shapes {tuple(shape)} and {tuple(target)} cannot be "
                         "aligned: only the token axis may differ between batches")
    x = x.view(x.shape[0], *shape)
    t, tt = shape[0], target[0]
    if t > tt:
        x = x[:, :tt]
    else:
        pad = x.new_zeros(x.shape[0], tt - t, *shape[1:])
        x = torch.cat([x, pad], dim=1)
    return x.reshape(x.shape[0], -1)


class _ScoreCapture:
    """What the hooks accumulate during one training forward."""

    def __init__(self, labels: torch.Tensor):
        self.labels = labels
        self.acc: torch.Tensor | None = None  # folded: [B, K]; pairwise: [B, |V|]
        self.tap: LayerTap | None = None

    @property
    def logits(self) -> torch.Tensor | None:
        return self.tap.logits if self.tap is not None else None


class LAIEstimator(OnlineEstimator):
    """Online LAI (``layers="all"``), LLI (``layers="lli"``) or the paper code's layer set
    (``layers="code"``).

    Args:
        layers: ``all`` | ``code`` | ``lli`` | list of module names (see ``select_layers``).
        output_layer: module name of the output layer; default the last ``nn.Linear``.
        cache: ``auto`` (folded when K < |V|) | ``folded`` | ``pairwise``.
        chunk_size: validation rows per forward when building the cache.
        layer_types: module types that count as layers for ``all``.
    """

    def __init__(self, layers: str | Sequence[str] = "all", output_layer: str | None = None,
                 cache: str = "auto", chunk_size: int = 512,
                 layer_types: tuple[type, ...] = DEFAULT_LAYER_TYPES):
        if cache not in ("auto", "folded", "pairwise"):
            raise ValueError(f"cache must be auto | folded | pairwise, got {cache!r}")
        self.layers = layers
        self.output_layer = output_layer
        self.cache_mode = cache
        self.chunk_size = int(chunk_size)
        self.layer_types = layer_types
        self.name = "lli" if layers == "lli" else "lai"
        self._names: list[str] = []
        self.folded = False
        self.M: dict[LayerKey, torch.Tensor] = {}      # folded: [K, D_l]
        self.phi_v: dict[LayerKey, torch.Tensor] = {}  # pairwise: [|V|, D_l]
        self.g_v: torch.Tensor | None = None           # pairwise: [|V|, K]
        self.shapes: dict[LayerKey, torch.Size] = {}   # per-sample input shape of each layer
        self.logit_shape: torch.Size | None = None
        self.n_val = 0

    # ---- validation cache -------------------------------------------------------------
    @torch.no_grad()
    def refresh(self, model: nn.Module, val_batch: Batch) -> None:
        """Rebuild the cache from ``val_batch`` (model in its current mode; buffers restored)."""
        self._names = select_layers(model, self.layers, self.output_layer, self.layer_types)
        n = len(val_batch)
        if n == 0:
            raise ValueError("the validation batch is empty")
        feats: dict[LayerKey, list[torch.Tensor]] = {}
        grads: list[torch.Tensor] = []
        self.shapes = {}

        def keep(key: LayerKey, phi: torch.Tensor, shape: torch.Size) -> None:
            feats.setdefault(key, []).append(phi)
            self.shapes[key] = shape

        with preserved_buffers(model):
            for start in range(0, n, self.chunk_size):
                chunk = val_batch.select(torch.arange(start, min(n, start + self.chunk_size)))
                with LayerTap(model, self._names, keep, chunk.attention_mask) as tap:
                    forward_logits(model, chunk.inputs)
                self.logit_shape = tap.logits.shape[1:]
                grads.append(output_gradient(tap.logits, chunk.labels))
        g_v = torch.cat(grads)
        k = g_v.shape[1]
        self.n_val = n
        self.folded = self.cache_mode == "folded" or (self.cache_mode == "auto" and k < n)
        self.M, self.phi_v, self.g_v = {}, {}, None
        if self.folded:
            for key, parts in feats.items():
                phi = torch.cat(parts)
                self.M[key] = g_v.to(phi.dtype).T @ phi  # [K, D_l]
        else:
            self.phi_v = {key: torch.cat(parts) for key, parts in feats.items()}
            self.g_v = g_v

    def cache_bytes(self) -> int:
        """Bytes held by the validation cache."""
        tensors = list(self.M.values()) + list(self.phi_v.values())
        if self.g_v is not None:
            tensors.append(self.g_v)
        return sum(t.numel() * t.element_size() for t in tensors)

    # ---- scoring ----------------------------------------------------------------------
    def _accumulate(self, cap: _ScoreCapture, key: LayerKey, phi: torch.Tensor,
                    shape: torch.Size) -> None:
        if key not in self.shapes:  # a layer (call) the validation forward never reached
            return
        phi = align_rows(phi, shape, self.shapes[key])
        if self.folded:
            m = self.M[key]
            term = phi.to(m.dtype) @ m.T  # [B, K]
        else:
            pv = self.phi_v[key]
            term = phi.to(pv.dtype) @ pv.T  # [B, |V|]
        cap.acc = term if cap.acc is None else cap.acc + term

    @contextmanager
    def capture(self, model: nn.Module, batch: Batch) -> Iterator[_ScoreCapture]:
        if not self._names:
            raise RuntimeError("call refresh(model, val_batch) before scoring")
        cap = _ScoreCapture(batch.labels)
        with LayerTap(model, self._names, lambda k, p, s: self._accumulate(cap, k, p, s),
                      batch.attention_mask) as tap:
            cap.tap = tap
            yield cap

    @torch.no_grad()
    def pairwise(self, capture: _ScoreCapture) -> torch.Tensor:
        """``[B, |V|]`` per-pair terms (column z); row sums equal :meth:`score`.
        Needs the pairwise cache (``cache="pairwise"``)."""
        if self.folded:
            raise RuntimeError("pairwise terms need cache='pairwise'")
        g = self._train_output_gradient(capture)
        if capture.acc is None:
            return g.new_zeros(g.shape[0], self.n_val)
        return (g.to(capture.acc.dtype) @ self.g_v.to(capture.acc.dtype).T) * capture.acc

    def _train_output_gradient(self, capture: _ScoreCapture) -> torch.Tensor:
        if capture.logits is None:
            raise RuntimeError("no forward ran inside capture()")
        g = output_gradient(capture.logits, capture.labels)
        return align_rows(g, capture.logits.shape[1:], self.logit_shape)

    @torch.no_grad()
    def score(self, capture: _ScoreCapture) -> torch.Tensor:
        """``[B]`` LAI values of the captured batch (float32; positive = helps)."""
        g = self._train_output_gradient(capture)
        b = g.shape[0]
        if capture.acc is None:
            return g.new_zeros(b)
        acc = capture.acc
        if self.folded:
            v = (g.to(acc.dtype) * acc).sum(1)
        else:
            v = ((g.to(acc.dtype) @ self.g_v.to(acc.dtype).T) * acc).sum(1)
        return v if v.dtype == torch.float64 else v.float()
