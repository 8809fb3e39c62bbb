"""LAI and LLI: layer-aware influence from layer inputs and the output gradient only.

Value of training sample j against validation set V (positive = helps; the paper's Eq. 4
without its leading minus):

    v_j = sum_{z in V} sum_l <phi_l(z), phi_l(j)> * <G_z, G_j>

- ``phi_l(x)``: the input of layer l (by default every linear map of its input:
  ``nn.Linear``, ``nn.Conv1d/2d/3d``, Hugging Face's ``Conv1D``) for
  sample x, with token positions where ``attention_mask`` is 0 zeroed;
- ``G_x = d ell_x / d s^(L)_x``: the gradient of the per-sample cross-entropy at the output
  of the output layer L (the last ``nn.Linear`` unless named). When L produces the logits,
  as in every standard head, this is ``d ell / d logits`` in closed form (a softmax, no
  backward through the network). When the model pools after its head (GPT-Neo sequence
  classification reads the last real token's logits), autograd takes the short step from the
  logits back to ``s^(L)``.

LLI keeps only the output layer's term.

**Token pairing.** When ``s^(L)`` has a token axis (``[T, K]``: causal language modelling, or
a head applied at every position), ``G_x`` is per token and every token layer whose positions
match the output's is paired position by position:

    <phi_l(z), phi_l(j)> <G_z, G_j>  :=  sum_{s, t} <phi_l(z, s), phi_l(j, t)> <G_{z,s}, G_{j,t}>

i.e. the Frobenius product of the "pseudo-gradients" ``sum_t G_{x,t} phi_l(x,t)^T``. For the
output layer this is exactly the inner product of the per-sample gradients of its weight, so
LLI is the exact output-layer gradient similarity, for language models too. Layers without
matching positions (and every layer when ``s^(L)`` is ``[K]``) use the flattened vectors.

Two exact ways to evaluate it (docs/design.md §1), chosen by size (``cache="auto"``):

- **folded**: ``M_l = sum_z G_z phi_l(z)^T`` (``K x D_l``, or ``T K x D_l`` flattened) built
  once per refresh; then ``v_j = sum_l <G_j, M_l phi_l(j)>``: independent of |V|;
- **pairwise**: keep ``phi_l(z)`` and ``G_z`` and contract per pair: cheaper when ``K`` (or
  ``T K``) exceeds |V|, e.g. language models with a large vocabulary.

Both run inside forward hooks, layer by layer, so no layer input outlives its layer, with
one exception: folded token terms whose output width ``K`` exceeds the summed widths of the
paired inputs (a language model's vocabulary, e.g. LLI's output layer) keep their inputs
until :meth:`LAIEstimator.score` and are contracted from the gradient side,
``sum_t <M_l^T G_{j,t}, phi_l(j,t)>``: the same products without a ``[B, T, K]``
accumulator. Token layers whose validation and training batches were padded to different
lengths are aligned by zero-padding/truncating the position axis; padded positions are zero,
so nothing changes.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from lai.batching import Batch, forward_logits, per_sample_loss
from lai.estimators.base import (OnlineEstimator, cross_entropy_gradient, label_terms,
                                 output_gradient)
from lai.estimators.capture import (DEFAULT_LAYER_TYPES, LayerKey, LayerTap, chunks,
                                    output_layer_name, preserved_buffers, select_layers)
from lai.estimators.online.offload import HostCache
from lai.estimators.registry import OnlineOptions, register_estimator


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
        x = torch.cat([x, x.new_zeros(x.shape[0], tt - t, *shape[1:])], dim=1)
    return x.reshape(x.shape[0], -1)


row_dot_small = 1 << 16  # elements below which a whole [B, ...] temporary is not worth avoiding


def row_dot(a: torch.Tensor, b: torch.Tensor, parts: int = 8,
            small: int = row_dot_small) -> torch.Tensor:
    """``[B]``: the inner product of row ``a[j]`` with row ``b[j]`` (``a``, ``b`` of one shape
    ``[B, ...]``), without a temporary the size of ``a``: ``(a * b).sum(...)`` in ``parts``
    blocks of columns, so the product held at any time is ``1 / parts`` of ``a`` (for a
    language model ``a`` is ``[B, T, vocab]``, and the whole product was the peak of a LAI
    step). Tensors of at most ``small`` elements take one block. A batched matrix product
    would hold nothing, but on the CPU it is slower for such rows and sums a row in one
    long float32 chain (a larger rounding error on a language model's row)."""
    n = a.shape[0]
    a, b = a.reshape(n, -1), b.reshape(n, -1)
    if a.numel() <= small:
        return (a * b).sum(1)
    width = -(-a.shape[1] // parts)
    out = None
    for start in range(0, a.shape[1], width):
        part = (a[:, start:start + width] * b[:, start:start + width]).sum(1)
        out = part if out is None else out.add_(part)
    return out


def output_layer_gradient(tap: LayerTap, labels: torch.Tensor) -> torch.Tensor:
    """``G = d ell / d s^(L)`` per sample as ``[B, T_out, K]`` (``T_out = 1`` for ``[B, K]``)."""
    logits, s = tap.logits, tap.output
    if closed_form_gradient(tap):
        g = output_gradient(logits, labels).view(logits.shape)
    else:
        with torch.enable_grad():
            loss = per_sample_loss(logits if logits.dtype == torch.float64 else logits.float(),
                                   labels).sum()
            (g,) = torch.autograd.grad(loss, s, retain_graph=True, allow_unused=True)
        g = torch.zeros_like(s) if g is None else g
        g = g.detach()
        if g.dtype not in (torch.float32, torch.float64):
            g = g.float()
    return per_token(g)


def per_token(g: torch.Tensor) -> torch.Tensor:
    """An output gradient shaped like ``s^(L)`` as ``[B, T_out, K]``."""
    if g.dim() == 2:
        return g.unsqueeze(1)
    return g.reshape(g.shape[0], g.shape[1], -1) if g.dim() >= 3 else g.view(-1, 1, 1)


def closed_form_gradient(tap: LayerTap) -> bool:
    """``G`` comes from the logits in closed form (``s^(L)`` is the logits): no autograd."""
    return tap.output is None or tap.output is tap.logits


class _ScoreCapture:
    """What the hooks accumulate during one training forward."""

    def __init__(self, labels: torch.Tensor):
        self.labels = labels
        self.acc_tok: torch.Tensor | None = None   # folded [B,T,K] | pairwise [B,|V|,T,T']
        self.acc_flat: torch.Tensor | None = None  # folded [B,T'K] | pairwise [B,|V|]
        self.tap: LayerTap | None = None
        # the last layer's term when its cache entry is shared (phi, src, term): q/k/v
        self.last_term: tuple | None = None
        # folded token terms left for score(), gradient side first:
        # [phi [B, T, D], M [K, D], how many layers read them, the hook's phi]
        self.deferred: list[list] = []

    @property
    def logits(self) -> torch.Tensor | None:
        return self.tap.logits if self.tap is not None else None


def _add(acc: torch.Tensor | None, term: torch.Tensor) -> torch.Tensor:
    """``acc + term``, in place where ``acc`` is the capture's own accumulator (never
    ``term`` itself, which may be added again)."""
    if acc is None:
        return term
    if acc is term:
        return acc + term
    return acc.add_(term)


def _repeated_term(cap: _ScoreCapture, phi_in: torch.Tensor,
                   src: torch.Tensor) -> torch.Tensor | None:
    """The previous layer's term when this layer reads the same rows ``phi_in`` (the same
    object: :class:`LayerTap` hands consecutive layers fed one tensor, q/k/v, one ``phi``)
    against the same cache entry ``src``: the same term, to be added again instead of
    recomputed; else None. The slot is emptied either way unless it matched, so no term or
    layer input is held beyond the next layer."""
    last, cap.last_term = cap.last_term, None
    if last is not None and last[0] is phi_in and last[1] is src:
        cap.last_term = last
        return last[2]
    return None


def _add_mm(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc + a @ b`` for ``a [..., D]``, ``b [D, K]``: in place, one fused kernel (the
    accumulators belong to the capture alone and carry no autograd graph).

    ``addmm(out=acc)`` rather than ``acc.addmm_``: the same kernel, but PyTorch's
    ``FlopCounterMode`` counts it (it does not count ``addmm_``, which hid these products
    from the benchmark's GFLOP column)."""
    if acc is None:
        return a @ b
    flat = acc.view(-1, acc.shape[-1])
    torch.addmm(flat, a.reshape(-1, a.shape[-1]), b, out=flat)
    return acc


class LAIEstimator(OnlineEstimator):
    """Online LAI (``layers="all"``), LLI (``layers="lli"``) or the paper code's layer set
    (``layers="code"``).

    Args:
        layers: ``all`` | ``code`` | ``lli`` | list of module names (see ``select_layers``).
        output_layer: module name of the output layer; default the last ``nn.Linear``.
        cache: ``auto`` (the smaller of the two exact forms) | ``folded`` | ``pairwise``.
        chunk_size: validation rows per forward when building the cache.
        layer_types: module types that count as layers for ``all``.
        offload: keep the cache in (pinned) host memory and copy each entry to the device
            just before its layer reads it, ``lookahead`` entries ahead on a side stream
            (``lai.estimators.online.offload``): LAI's device memory excess falls to a few entries,
            the values are unchanged. Meant for CUDA; on the CPU it only adds copies.
        lookahead: entries in flight ahead of the one being read (with ``offload``).
    """

    def __init__(self, layers: str | Sequence[str] = "all", output_layer: str | None = None,
                 cache: str = "auto", chunk_size: int = 512,
                 layer_types: tuple[type, ...] = DEFAULT_LAYER_TYPES, offload: bool = False,
                 lookahead: int = 2):
        if cache not in ("auto", "folded", "pairwise"):
            raise ValueError(f"cache must be auto | folded | pairwise, got {cache!r}")
        self.layers = layers
        self.output_layer = output_layer
        self.cache_mode = cache
        self.chunk_size = int(chunk_size)
        self.layer_types = layer_types
        self.name = "lli" if layers == "lli" else "lai"
        self._precondition = None  # callable -> [K] Adam scale of the train-side gradient
        self._names: list[str] = []
        self._out_name: str | None = None
        self.folded = False
        self.token: dict[LayerKey, bool] = {}          # layer paired per token?
        self.shapes: dict[LayerKey, torch.Size] = {}   # per-sample input shape (validation)
        self.M: dict[LayerKey, torch.Tensor] = {}      # folded
        self.phi_v: dict[LayerKey, torch.Tensor] = {}  # pairwise
        self.g_v: torch.Tensor | None = None           # [|V|, T_out, K], pairwise only
        self.g_shape: torch.Size | None = None         # (T_out, K) of the validation side
        self._nhwc: dict[int, torch.Tensor] = {}
        self._shared: dict[LayerKey, bool] = {}        # cache entry read by several layers
        self._defer_tokens = False  # folded token terms contracted from the gradient side
        self.n_val = 0
        self.offload, self.lookahead = bool(offload), int(lookahead)
        # blocks of batch rows whose output gradients score() takes at a time, when the
        # logits are large (an LM's [B, T, vocab])
        self.score_blocks = 4
        self._host: HostCache | None = None  # with offload: serves device copies

    supports_data_parallel = True  # the folded cache is a sum over validation rows

    def check_model(self, model: nn.Module) -> None:
        """The layer set and output layer exist in ``model`` (ValueError otherwise)."""
        select_layers(model, self.layers, self.output_layer, self.layer_types)

    def prepare_data_parallel(self) -> None:
        """Ranks sum their folded caches: ``cache="auto"`` becomes ``folded``."""
        if self.cache_mode == "pairwise":
            raise ValueError("estimator.cache=pairwise cannot be summed over ranks: use folded")
        self.cache_mode = "folded"

    def reduce_cache(self, sum_: Callable[[torch.Tensor], Any]) -> None:
        """Sum the folded cache over ranks (entries shared by several layers once)."""
        if not self.folded:
            raise RuntimeError("data-parallel LAI needs the folded cache (estimator.cache=folded)")
        for t in {id(t): t for t in self.M.values()}.values():
            sum_(t)
        self._nhwc = {}  # channels-last copies of the old sums

    # ---- validation cache -------------------------------------------------------------
    def bind_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                       precondition: str = "none") -> None:
        """``precondition="adam"``: scale the training side's output gradient by Adam's
        ``D^{-1/2}`` of the output layer (per output unit), read fresh at every score."""
        if precondition == "none":
            self._precondition = None
            return
        from lai.estimators.online.precondition import AdamPreconditioner

        pre = AdamPreconditioner(optimizer)
        layer = dict(model.named_modules())[self.output_layer or output_layer_name(model)]
        self._precondition = lambda: pre.output_rows(layer)

    @torch.no_grad()
    def refresh(self, model: nn.Module, val_batch: Batch) -> None:
        """Rebuild the cache from ``val_batch`` (model in its current mode; buffers restored)."""
        # kept whole (~60+ lines): the per-layer hook that fills the cache is a closure over
        # this refresh's state
        self._names = select_layers(model, self.layers, self.output_layer, self.layer_types)
        self._out_name = self.output_layer or output_layer_name(model)
        n = len(val_batch)
        if n == 0:
            raise ValueError("the validation batch is empty")
        feats: dict[LayerKey, list[torch.Tensor]] = {}
        tokenish: dict[LayerKey, bool] = {}
        grads: list[torch.Tensor] = []
        self.shapes = {}

        def keep(key: LayerKey, phi: torch.Tensor, shape: torch.Size, token: bool) -> None:
            feats.setdefault(key, []).append(phi)
            self.shapes[key] = shape
            tokenish[key] = token

        with preserved_buffers(model):
            for chunk in chunks(val_batch, self.chunk_size):
                with LayerTap(model, self._names, keep, chunk.attention_mask,
                              self._out_name, batch_size=len(chunk)) as tap, \
                        self.forward_context():
                    forward_logits(model, chunk.inputs)
                grads.append(output_layer_gradient(tap, chunk.labels))
        g_v = torch.cat(grads)  # [n, T_out, K]
        t_out, k = g_v.shape[1], g_v.shape[2]
        self.token = {key: tokenish[key] and t_out > 1 and self.shapes[key][0] == t_out
                      for key in feats}
        # Layers that saw the very same inputs in every chunk (LayerTap hands them the same
        # phi objects: q/k/v projections) have the same phi_v and M: one tensor for all.
        first: dict[tuple, LayerKey] = {}
        same_as = {key: first.setdefault((tuple(map(id, parts)), self.token[key]), key)
                   for key, parts in feats.items()}
        phis = {key: torch.cat(parts) for key, parts in feats.items() if same_as[key] == key}
        dims = {key: p.shape[1] // (t_out if self.token[key] else 1) for key, p in phis.items()}
        folded_size = sum(k * d if self.token[key] else t_out * k * d for key, d in dims.items())
        pairwise_size = n * (sum(p.shape[1] for p in phis.values()) + t_out * k)
        self.folded = self.cache_mode == "folded" or (
            self.cache_mode == "auto" and folded_size <= pairwise_size)
        # the folded form has g_v inside M: keeping it too would hold |V| T_out K numbers
        # for nothing (200 MiB for an LM with GPT-2's vocabulary at |V| = 8, T = 128)
        self.n_val, self.g_v, self.M, self.phi_v = n, (None if self.folded else g_v), {}, {}
        self.g_shape = g_v.shape[1:]
        self._nhwc = {}  # id(cache entry) -> the entry in (H, W, C) row order
        for key, phi in phis.items():
            if self.token[key]:
                phi = phi.view(n, t_out, -1)
            if not self.folded:
                self.phi_v[key] = phi
            elif self.token[key]:
                self.M[key] = torch.einsum("nsk,nsd->kd", g_v.to(phi.dtype), phi)
            else:
                self.M[key] = g_v.reshape(n, -1).to(phi.dtype).T @ phi
        counts: dict[LayerKey, int] = {}
        for src in same_as.values():
            counts[src] = counts.get(src, 0) + 1
        self._shared = {key: counts[src] > 1 for key, src in same_as.items()}
        for key, src in same_as.items():
            if key != src:
                (self.M if self.folded else self.phi_v)[key] = (
                    self.M if self.folded else self.phi_v)[src]
        # Folded token terms sum_t <G_{j,t}, M_l phi_l(j,t)> need a [B, T, K] accumulator when
        # added layer by layer during the forward; read from the gradient side after it,
        # sum_t <M_l^T G_{j,t}, phi_l(j,t)>, they need the layers' inputs kept instead
        # ([B, T, D_l] each, once per distinct input). Same products, same values; the smaller
        # of the two is kept: the gradient side for a language model's output layer alone
        # (LLI: K = vocabulary >> d), the accumulator when many layers are paired.
        token_dims = {src: dims[src] for src in set(same_as.values()) if self.token[src]}
        self._defer_tokens = (self.folded and bool(token_dims)
                              and k > sum(token_dims.values()))
        if self.offload:
            self._move_to_host(g_v.device)

    def _move_to_host(self, device: torch.device) -> None:
        """Every cache tensor to host memory (a tensor shared by several layers stays one)."""
        if self._host is None or self._host.device != device:
            self._host = HostCache(device, self.lookahead)
        self._host.reset()
        moved: dict[int, torch.Tensor] = {}

        def host(t: torch.Tensor, slot: object) -> torch.Tensor:
            if id(t) not in moved:  # the first layer reading an entry names its buffer
                moved[id(t)] = self._host.host(t, slot)
            return moved[id(t)]

        self.M = {key: host(t, ("M", key)) for key, t in self.M.items()}
        self.phi_v = {key: host(t, ("phi_v", key)) for key, t in self.phi_v.items()}
        if self.g_v is not None:
            self.g_v = host(self.g_v, "g_v")

    def _dev(self, t: torch.Tensor) -> torch.Tensor:
        """A cache tensor where the step computes: itself, or with ``offload`` its device copy
        (prefetched in the order of the previous step's reads)."""
        return t if self._host is None else self._host.fetch(t)

    def cache_bytes(self) -> int:
        """Bytes held by the validation cache (a tensor shared by several layers once); with
        ``offload`` they are held in host memory."""
        tensors = {id(t): t for t in list(self.M.values()) + list(self.phi_v.values())}
        if self.g_v is not None:
            tensors[id(self.g_v)] = self.g_v
        return sum(t.numel() * t.element_size() for t in tensors.values())

    # ---- scoring ----------------------------------------------------------------------
    def _nhwc_source(self, src: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """``src [R, C*H*W]`` (a cache entry, rows in (C, H, W) order) re-laid in (H, W, C)
        order, once per refresh: matches the rows of a channels-last input without copying
        them at every step."""
        out = self._nhwc.get(id(src))
        if out is None:
            c, h, w = shape
            out = src.view(src.shape[0], c, h, w).permute(0, 2, 3, 1).reshape(src.shape[0], -1)
            if self._host is not None:  # offloaded: the re-laid copy stays on the host too
                out = self._host.host(out, ("nhwc", id(src)))
            self._nhwc[id(src)] = out
        return out

    def _accumulate(self, cap: _ScoreCapture, key: LayerKey, phi: torch.Tensor,
                    shape: torch.Size, token: bool, nhwc: bool = False) -> None:
        if key not in self.shapes:  # a layer (call) the validation forward never reached
            return
        if nhwc:
            src = self.M[key] if self.folded else self.phi_v[key]
            if tuple(shape) == tuple(self.shapes[key]):
                self._add_flat(cap, phi, phi, self._nhwc_source(src, shape),
                               self._shared.get(key, False))
                return
            c, h, w = shape  # cannot be aligned in that order: back to (C, H, W) rows
            phi = phi.view(-1, h, w, c).permute(0, 3, 1, 2).reshape(phi.shape[0], -1)
        phi_in, b = phi, phi.shape[0]
        if self.token[key]:
            phi = phi.view(b, shape[0], -1)
            src = self.M[key] if self.folded else self.phi_v[key]
            again = _repeated_term(cap, phi_in, src)
            if again is not None:  # the product is B T K D_l
                cap.acc_tok = _add(cap.acc_tok, again)
                return
            if self._defer_tokens:  # folded, contracted in score(): see refresh()
                last = cap.deferred[-1] if cap.deferred else None
                if last is not None and last[3] is phi_in and last[1] is src:
                    last[2] += 1  # q/k/v: the same rows and cache entry, the same term again
                else:
                    cap.deferred.append([phi, src, 1, phi_in])
                return
            dev = self._dev(src)
            if self.folded:  # [B, T, K]
                if not self._shared.get(key, False):  # no other layer reads this entry
                    cap.acc_tok = _add_mm(cap.acc_tok, phi.to(dev.dtype), dev.T)
                    return
                term = phi.to(dev.dtype) @ dev.T
            else:  # [B, |V|, T, T']
                term = torch.einsum("btd,zsd->bzts", phi.to(dev.dtype), dev)
            cap.last_term = (phi_in, src, term)  # the host entry: the identity q/k/v share
            cap.acc_tok = _add(cap.acc_tok, term)
            return
        src = self.M[key] if self.folded else self.phi_v[key]
        self._add_flat(cap, phi_in, align_rows(phi, shape, self.shapes[key]), src,
                       self._shared.get(key, False))

    def _add_flat(self, cap: _ScoreCapture, phi_in: torch.Tensor, phi: torch.Tensor,
                  src: torch.Tensor, shared: bool) -> None:
        """``acc_flat += phi @ src^T`` (``src`` the cache entry, on the host with offload).
        An entry that several layers read (``shared``: q/k/v of a sequence classifier, which
        :class:`LayerTap` hands one ``phi`` object) fed the same rows ``phi_in`` as the
        previous such layer gives the same term: added again, not recomputed (the product
        is ``B x D_l x K`` multiply-adds, and with offload a copy of the entry)."""
        again = _repeated_term(cap, phi_in, src)
        if again is not None:
            cap.acc_flat = _add(cap.acc_flat, again)
            return
        dev = self._dev(src)
        if not shared:
            cap.acc_flat = _add_mm(cap.acc_flat, phi.to(dev.dtype), dev.T)
            return
        term = phi.to(dev.dtype) @ dev.T
        cap.last_term = (phi_in, src, term)
        cap.acc_flat = _add(cap.acc_flat, term)

    @contextmanager
    def capture(self, model: nn.Module, batch: Batch) -> Iterator[_ScoreCapture]:
        if not self._names:
            raise RuntimeError("call refresh(model, val_batch) before scoring")
        cap = _ScoreCapture(batch.labels)
        if self._host is not None:
            self._host.begin_step()
        with LayerTap(model, self._names, lambda *a: self._accumulate(cap, *a),
                      batch.attention_mask, self._out_name, native_layout=True,
                      batch_size=len(batch)) as tap:
            cap.tap = tap
            yield cap

    def _train_gradient(self, capture: _ScoreCapture) -> torch.Tensor:
        """``[B, T_out, K]``: the training batch's output gradients, preconditioned."""
        return self._gradient(capture, self._precondition()
                              if self._precondition is not None else None)

    @staticmethod
    def _gradient(capture: _ScoreCapture, scale: torch.Tensor | None, rows: slice | None = None,
                  terms: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``[B, T_out, K]``: the batch's output gradients times ``scale`` (if any); with
        ``terms`` (the whole batch's :func:`label_terms`), those of the rows ``rows`` only,
        in closed form from their own logits."""
        if capture.logits is None:
            raise RuntimeError("no forward ran inside capture()")
        if terms is None:
            g = output_layer_gradient(capture.tap, capture.labels)  # [B, T, K]
        else:
            z = capture.logits[rows].detach()
            z = z if z.dtype in (torch.float32, torch.float64) else z.float()
            g = per_token(cross_entropy_gradient(z, terms[0][rows], terms[1][rows]))
        if scale is not None:
            g = g * scale.to(g.dtype)
        return g

    def _flat_gradient(self, g: torch.Tensor) -> torch.Tensor:
        """Train gradients re-laid in the validation cache's ``[T_out, K]`` layout."""
        return align_rows(g.reshape(g.shape[0], -1), g.shape[1:], self.g_shape)

    @torch.no_grad()
    def pairwise(self, capture: _ScoreCapture) -> torch.Tensor:
        """``[B, |V|]`` per-pair terms (column z); row sums equal :meth:`score`.
        Needs the pairwise cache (``cache="pairwise"``)."""
        if self.folded:
            raise RuntimeError("pairwise terms need cache='pairwise'")
        g = self._train_gradient(capture)
        out = g.new_zeros(g.shape[0], self.n_val)
        gv = self._dev(self.g_v)
        if capture.acc_tok is not None:
            acc = capture.acc_tok  # [B, |V|, T, S]
            b, z, t, s = acc.shape
            # <G_{j,t}, G_{z,s}> for every (t, s) first: [B, T, |V|, S], the size of acc.
            # (A three-operand einsum contracts acc with g first and materialises
            # [B, |V|, S, K] twice: 3.3 GB for GPT-Neo's vocabulary at B = |V| = 8.)
            gg = (g.to(acc.dtype).reshape(b * t, -1) @ gv.to(acc.dtype).reshape(z * s, -1).T)
            out = out + torch.einsum("bzts,btzs->bz", acc, gg.view(b, t, z, s))
        if capture.acc_flat is not None:
            acc = capture.acc_flat
            out = out + acc * (self._flat_gradient(g).to(acc.dtype)
                               @ gv.reshape(self.n_val, -1).to(acc.dtype).T)
        return out

    @torch.no_grad()
    def score(self, capture: _ScoreCapture) -> torch.Tensor:
        """``[B]`` LAI values of the captured batch (float32, or float64 for a float64
        model; positive = helps)."""
        if not self.folded:
            v = self.pairwise(capture).sum(1)
            return v if v.dtype == torch.float64 else v.float()
        # G is as large as the logits ([B, T, vocab] for an LM): where it comes in closed form
        # it is taken for a block of rows at a time, so the step never holds all of it beside
        # the [B, T, K] accumulator (the same values: each sample's G depends on its own
        # logits alone; the label terms are computed once for all blocks)
        b = capture.logits.shape[0]
        block, terms = b, None
        if (closed_form_gradient(capture.tap) and b > 1
                and capture.logits.numel() > row_dot_small):
            terms = label_terms(capture.logits, capture.labels)
            if terms is not None:
                block = -(-b // self.score_blocks)
        scale = self._precondition() if self._precondition is not None else None
        values = [self._score_rows(capture, slice(start, min(b, start + block)), scale, terms)
                  for start in range(0, b, block)]
        v = values[0] if len(values) == 1 else torch.cat(values)
        return v if v.dtype == torch.float64 else v.float()

    def _score_rows(self, capture: _ScoreCapture, rows: slice, scale: torch.Tensor | None,
                    terms: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """``[len(rows)]``: the folded form's values of the batch rows ``rows`` (see
        :meth:`score`); ``scale``: the preconditioner's, read once per score; ``terms``: the
        whole batch's :func:`label_terms` (the rows' G is then taken from their logits alone)
        or None (G of the whole batch, ``rows`` being all of it)."""
        g = self._gradient(capture, scale, rows, terms)
        # a block of rows is already a fraction of the batch: one product per block
        parts = 8 if terms is None else 1
        v = None
        if capture.acc_tok is not None:
            v = row_dot(g.to(capture.acc_tok.dtype), capture.acc_tok[rows], parts)
        for phi, m, count, _ in capture.deferred:  # sum_t <M^T G_{j,t}, phi(j,t)>
            m = self._dev(m)
            phi = phi[rows]
            b, t = phi.shape[0], phi.shape[1]
            h = g.to(m.dtype).reshape(b * t, -1) @ m
            term = row_dot(h.view(b, t, -1), phi.to(m.dtype), parts)
            v = _add(v, term if count == 1 else term * count)
        if capture.acc_flat is not None:
            v = _add(v, row_dot(self._flat_gradient(g).to(capture.acc_flat.dtype),
                                capture.acc_flat[rows], parts))
        return g.new_zeros(g.shape[0]) if v is None else v


_LAYER_SETS = ("all", "code", "lli")
_CACHE_MODES = ("auto", "folded", "pairwise")


@dataclass
class LLIOptions(OnlineOptions):
    """``estimator=lli``: the output layer's term of LAI only."""

    name: str = "lli"
    cache: str = "auto"  # auto | folded | pairwise (auto: folded when classes < |V|)
    output_layer: Any = None  # module name of the output layer; None = the last nn.Linear
    offload: bool = False  # cache in host memory, prefetched per layer (for CUDA)
    chunk_size: int = 512  # validation rows per forward when the cache is built

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cache not in _CACHE_MODES:
            raise ValueError(f"estimator.cache={self.cache!r} is not one of: "
                             f"{', '.join(_CACHE_MODES)}")
        if self.chunk_size < 1:
            raise ValueError("estimator.chunk_size must be >= 1")


@dataclass
class LAIOptions(LLIOptions):
    """``estimator=lai`` (paper Eq. 4): every linear-in-its-input layer."""

    name: str = "lai"
    layers: Any = "all"  # all | code | lli, or a list of module names

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.layers, str) and self.layers not in _LAYER_SETS:
            raise ValueError(f"estimator.layers={self.layers!r} is not one of: "
                             f"{', '.join(_LAYER_SETS)} (or a list of module names)")


@register_estimator("lai", LAIOptions)
def _build_lai(o: LAIOptions) -> LAIEstimator:
    layers = o.layers if isinstance(o.layers, str) else list(o.layers)
    return LAIEstimator(layers, o.output_layer, o.cache, o.chunk_size, offload=o.offload)


@register_estimator("lli", LLIOptions)
def _build_lli(o: LLIOptions) -> LAIEstimator:
    return LAIEstimator("lli", o.output_layer, o.cache, o.chunk_size, offload=o.offload)
