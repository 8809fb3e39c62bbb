"""Ghost influence (the online form of IP, "Data Shapley in One Training Run"), exact.

Value of training sample j (positive = helps):

    v_j = < g_V , grad_theta ell_j >,    g_V = sum_{z in V} grad_theta ell_z

over **all trainable parameters**. It is computed without any per-sample gradient:
``v_j`` is the directional derivative of ``ell_j`` along ``g_V``, so one forward-mode pass
(every parameter made a dual number with tangent ``g_V``) gives all B values at once. This is
the probe identity of docs/design.md §1 (for a linear layer the tangent of its output is the
"probe" ``W_V a_j``, contracted with ``g_j`` by the rest of the pass) applied by forward-mode
AD to every operation, so convolutions of any stride/dilation/groups, embeddings,
LayerNorm/BatchNorm affine parameters, biases, HF ``Conv1D``, tied weights and free
``nn.Parameter``s are all covered exactly, with no per-layer special case.

Cost: one backward over the validation batch per cache refresh (``g_V``), and a forward pass
carrying tangents for the training batch. The primal outputs of that pass keep their
reverse-mode graph, so in one-pass training the same forward also feeds the backward; the
tangents' own reverse graph is freed module by module, and the tangents of tensors no Python
code references any more are released as each module returns
(:func:`lai.estimators.forward.tangents.tangent_free_graph`; ``release_tangents=False`` keeps them,
as autograd otherwise would, one per saved activation until the pass ends). During the pass
:class:`lai.estimators.forward.forward_fastpaths.ForwardFastPaths` computes arithmetic with
constants, train-mode BatchNorm and softmax without PyTorch's costlier formulas
(``forward_fastpaths=False`` keeps PyTorch's), and each value is read from the closed-form
output gradient (:func:`loss_tangent`). Fused attention (``F.scaled_dot_product_attention``,
Hugging Face's default ``sdpa``) has no forward-mode formula in PyTorch; during the pass it
runs by PyTorch's math backend, the same function to rounding, with either setting. A
custom ``autograd.Function`` without a ``jvp`` gets its tangent from its own backward
(:mod:`lai.estimators.forward.custom_function_jvp`; BLOOM's GeLU).
BatchNorm in train mode uses batch statistics, so ``ell_j`` then depends on the whole batch
and ``v_j`` is the derivative in that context; in eval mode it is the textbook per-sample value.

Two forms (``mode``), equal values wherever both apply (tested against ``torch.func``):

- ``forward``: the forward-mode pass above; values are ready after the forward, so a policy
  can filter in the same step. Costs about 1.67x vanilla's FLOPs (a tangent matmul per layer
  on top of the probe).
- ``probe``: :mod:`lai.estimators.online.ghost_probe`, the per-layer probe contracted with the
  output gradients of the *training backward*: about 1.33x vanilla's FLOPs, but the values
  exist only after the backward, so it serves scoring without filtering (a policy that keeps
  every sample with weight 1), and it needs every trainable parameter in a module with a
  probe (a layer type with a closed form, or any module without submodules, replayed in
  forward mode) and no BatchNorm using batch statistics (else it is the per-route
  decomposition, not ``<g_V, grad ell_j>`` in batch context).
- ``auto`` (default): ``probe`` where both of those hold and the trainer does not need the
  values before the backward (:meth:`GhostEstimator.plan`), else ``forward``.
"""
from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from lai.batching import Batch, forward_logits, logits_of, per_sample_loss
from lai.estimators.base import OnlineEstimator, output_gradient
from lai.estimators.capture import chunks, preserved_buffers
from lai.estimators.online import ghost_probe
from lai.estimators.forward import forward_fastpaths
from lai.estimators.forward.forward_fastpaths import ForwardFastPaths
from lai.estimators.forward.custom_function_jvp import custom_function_jvps
from lai.estimators.registry import OnlineOptions, register_estimator
from lai.estimators.forward.tangents import tangent_free_graph

GHOST_MODES = ("auto", "forward", "probe")


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Unique trainable parameters (tied weights appear once)."""
    return [p for p in model.parameters() if p.requires_grad]


def validation_gradient(model: nn.Module, val_batch: Batch, chunk_size: int = 512,
                        forward_context: Callable[[], AbstractContextManager] = nullcontext
                        ) -> list[torch.Tensor]:
    """``g_V = sum_z grad ell_z`` for every trainable parameter (same order as
    :func:`trainable_parameters`); the model's mode is used as is, its buffers are restored.
    ``forward_context`` wraps the forwards only (e.g. bf16 autocast); the loss is fp32."""
    params = trainable_parameters(model)
    total: list[torch.Tensor | None] = [None] * len(params)
    with preserved_buffers(model), torch.enable_grad():
        for chunk in chunks(val_batch, chunk_size):
            with forward_context():
                logits = forward_logits(model, chunk.inputs)
            if logits.dtype not in (torch.float32, torch.float64):
                logits = logits.float()
            loss = per_sample_loss(logits, chunk.labels).sum()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for i, g in enumerate(grads):
                if g is not None:  # the first chunk's gradient is the sum so far: no copy
                    total[i] = g if total[i] is None else total[i].add_(g)
    return [torch.zeros_like(p) if t is None else t for p, t in zip(params, total)]


@contextmanager
def dual_parameters(model: nn.Module, tangents: dict[int, torch.Tensor]
                    ) -> Iterator[list[torch.Tensor]]:
    """Inside an active ``fwAD.dual_level``: every parameter ``p`` whose ``id`` is in
    ``tangents`` is replaced, in every module that holds it (tied weights too), by the dual
    number ``(p, tangents[id(p)])``; restored on exit. Gradients still flow back to ``p``.
    Yields the dual numbers made."""
    duals: dict[int, torch.Tensor] = {}
    swapped = []
    try:
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is None or id(p) not in tangents:
                    continue
                if id(p) not in duals:
                    duals[id(p)] = fwAD.make_dual(p, tangents[id(p)].to(p.dtype))
                swapped.append((module, name, p))
                module._parameters[name] = duals[id(p)]
        yield list(duals.values())
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def native_rnn_kernels(model: nn.Module) -> AbstractContextManager:
    """For a model with recurrent layers: oneDNN off (``torch.backends.mkldnn``), whose CPU
    RNN kernel has no forward-mode formula, so that the native kernels (which have one) run;
    the same function, equal to rounding. Other models keep oneDNN (their convolutions'
    fast path on a CPU)."""
    if any(isinstance(m, nn.RNNBase) for m in model.modules()):
        return _onednn_off()
    return nullcontext()


@contextmanager
def _onednn_off() -> Iterator[None]:
    # torch.backends.mkldnn.flags also resets oneDNN's TF32 setting, warning on CPU builds
    # each time; the warning says nothing about this use
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        flags = torch.backends.mkldnn.flags(enabled=False)
        flags.__enter__()
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            flags.__exit__(None, None, None)


def _probe_plan_or_raise(model: nn.Module) -> list:
    """The probe plan of ``model``; ValueError naming the modules that have no probe."""
    plan, missing = ghost_probe.probe_plan(model)
    if missing:
        raise ValueError("ghost mode=probe needs every trainable parameter in a module with a "
                         "probe (a known layer type, or a module without submodules); these "
                         f"have none: {', '.join(missing[:5])}")
    return plan


def loss_tangent(logits: torch.Tensor, logits_t: torch.Tensor | None,
                 labels: torch.Tensor) -> torch.Tensor:
    """``[B]``: the directional derivative of each sample's loss
    (:func:`lai.batching.per_sample_loss`) when its logits move along ``logits_t``, i.e.
    ``<d ell_j / d z_j, z_t,j>`` with the closed-form output gradient
    (:func:`lai.estimators.base.output_gradient`: ``softmax - onehot``, over the labelled
    positions of an LM); float32 (float64 logits: float64). Zeros where ``logits_t`` is None.

    Forward-mode AD through the cross-entropy would give the same numbers (to rounding) but
    recomputes the log-softmax inside its formula and, in a training forward, records its
    ``[B, T, vocab]``-sized temporaries for a backward nobody runs: the loss that trains is
    the trainer's own."""
    with torch.no_grad():
        if logits_t is None:
            dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
            return torch.zeros(logits.shape[0], dtype=dtype, device=logits.device)
        g = output_gradient(logits, labels)  # [B, K], a new tensor
        return g.mul_(logits_t.detach().reshape(g.shape).to(g.dtype)).sum(1)


def _note_if_from_fastpaths(e: BaseException) -> None:
    """On Python >= 3.11, add a note naming the switch to ``e`` when its traceback passes
    through the forward-mode fast paths (the error's type and message are kept)."""
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == forward_fastpaths.__file__:
            if hasattr(e, "add_note"):
                e.add_note("ghost: raised in lai/estimators/forward/forward_fastpaths.py; "
                           "estimator.forward_fastpaths=false leaves every operation to "
                           "PyTorch's own forward-mode formulas")
            return
        tb = tb.tb_next


def _check_released_tangents_unread(values: torch.Tensor, losses: torch.Tensor) -> None:
    """RuntimeError if the forward form's ``values`` are not finite while the ``losses`` are:
    the sign that the model read a tangent that :func:`tangent_free_graph` had released."""
    if not bool(torch.isfinite(values).all()) and bool(torch.isfinite(losses.detach()).all()):
        raise RuntimeError(
            "ghost's forward-mode values are not finite while the training losses are: the "
            "model read a tensor after dropping every Python reference to it (e.g. through a "
            "view's ._base or autograd's saved tensors), whose tangent had been released, or "
            "the validation gradient g_V overflowed. Set estimator.release_tangents=false "
            "(GhostEstimator(release_tangents=False)) to keep every tangent.")


class _GhostCapture:
    def __init__(self, labels: torch.Tensor):
        self.labels = labels
        self.logits: torch.Tensor | None = None
        self.values: torch.Tensor | None = None


class GhostEstimator(OnlineEstimator):
    """Online exact Ghost/IP values (see module docstring).

    ``direction``: optional callable mapping the list of validation gradients to the tangent
    direction actually used (Adam preconditioning scales them by ``1/(sqrt(v_hat)+eps)``).
    ``release_tangents`` (forward form, grad enabled): release the tangents of tensors the
    model no longer references (:mod:`lai.estimators.forward.tangents`); the first capture checks that
    none was read again (RuntimeError naming the switch if one was).

    ``forward_fastpaths`` (forward form, :mod:`lai.estimators.forward.forward_fastpaths`): compute
    arithmetic between a dual tensor and a constant (a Python number, a mask, a frozen bias)
    and CPU dropout without the efficient-zero tangents PyTorch would make (the same values,
    bit for bit, with less host time per operation), and the tangents of train-mode
    BatchNorm and softmax in closed forms without their temporaries (equal to rounding; less
    memory and time). The values are read as each sample's loss tangent from the
    closed-form output gradient (:func:`loss_tangent`), not by forward AD through the loss.
    """

    name = "ghost"

    def __init__(self, chunk_size: int = 512,
                 direction: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
                 mode: str = "auto", release_tangents: bool = True,
                 forward_fastpaths: bool = True):
        if mode not in GHOST_MODES:
            raise ValueError(f"ghost mode must be one of {', '.join(GHOST_MODES)}, got {mode!r}")
        self.chunk_size = int(chunk_size)
        self.direction = direction
        self.mode = mode
        # forward form: release the tangents of tensors nothing can read any more (tangents.py)
        self.release_tangents = bool(release_tangents)
        # forward form: constants without efficient-zero tangents (the same bits, less host
        # time), train-mode BatchNorm and softmax tangents without temporaries
        # (forward_fastpaths.py)
        self.forward_fastpaths = bool(forward_fastpaths)
        self._tangents: dict[int, torch.Tensor] | None = None
        self._params: list[nn.Parameter] = []
        # the form :meth:`capture` uses; `plan` settles "auto" ("forward" until it is called)
        self.active_mode = "probe" if mode == "probe" else "forward"
        self._probe_plan: list | None = None
        self._coverage_checked = False
        self._probe_tried = False  # the probe form was tried on validation rows (refresh)
        self._release_checked = False

    supports_data_parallel = True  # the cache is g_V, a sum over validation rows

    @property
    def scores_after_backward(self) -> bool:
        """True when :meth:`score` must wait for the training backward (probe form); the
        trainer then sets ``capture.row_scale`` to the loss coefficient of each sample."""
        return self.active_mode == "probe"

    def prepare_data_parallel(self) -> None:
        """Nothing to change: ranks sum their validation gradients."""

    def reduce_cache(self, sum_: Callable[[torch.Tensor], Any]) -> None:
        """Sum the validation gradient (the tangents) over ranks."""
        for t in self._tangents.values():
            sum_(t)

    def plan(self, model: nn.Module, values_before_backward: bool) -> str:
        """Settle the form for training ``model`` (in the mode it will train in) and return it.

        ``values_before_backward``: the policy needs the values to weight the loss (any
        filtering or reweighting), which only the forward form can give. ``mode="probe"``
        with such a policy, or on a model it cannot probe, is a ValueError."""
        self._probe_plan = None
        self._probe_tried = False
        if self.mode == "forward":
            self.active_mode = "forward"
        elif self.mode == "probe":
            if values_before_backward:
                raise ValueError("estimator.ghost_mode=probe gives values only after the "
                                 "backward: it needs trainer.strategy=one_pass and a policy "
                                 "that keeps every sample (policy=score_only); use "
                                 "ghost_mode=auto or forward to filter")
            self._probe_plan = _probe_plan_or_raise(model)
            self.active_mode = "probe"
        else:
            plan, missing = ghost_probe.probe_plan(model)
            usable = not (values_before_backward or missing or ghost_probe.batch_coupled(model))
            self.active_mode = "probe" if usable else "forward"
            self._probe_plan = plan if usable else None
        return self.active_mode

    def bind_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                       precondition: str = "none") -> None:
        """``precondition="adam"``: use ``D^{-1/2} g_V`` (elementwise, exact for Adam's
        diagonal preconditioner) as the direction, read at every cache refresh."""
        if precondition == "none":
            self.direction = None
            return
        from lai.estimators.online.precondition import AdamPreconditioner

        pre = AdamPreconditioner(optimizer)
        params = trainable_parameters(model)

        def direction(grads: list[torch.Tensor]) -> list[torch.Tensor]:
            out = []
            for p, g in zip(params, grads):
                inv = pre.inv_sqrt(p)
                out.append(g if inv is None else g * inv)
            return out

        self.direction = direction

    @torch.no_grad()
    def refresh(self, model: nn.Module, val_batch: Batch) -> None:
        params = trainable_parameters(model)
        g_v = validation_gradient(model, val_batch, self.chunk_size, self.forward_context)
        if self.direction is not None:
            g_v = self.direction(g_v)
        self._params = params
        self._tangents = {id(p): g for p, g in zip(params, g_v)}
        if self.active_mode == "probe" and not self._probe_tried:
            self._probe_tried = True
            self._try_probe(model, val_batch)

    def _try_probe(self, model: nn.Module, val_batch: Batch) -> None:
        """Run the probe form once on a few validation rows (a forward, a backward and the
        sum-rule check) before training relies on it. The plan sees module types only; a
        model can still defeat the probe at run time (a probed module whose output is not
        per sample, as MPNet's relative-position embedding ``[T, T, H]``; a shared output
        the model reshapes, as DeBERTa's relative embeddings). ``auto`` then falls back to
        the forward form with a warning; ``mode="probe"`` raises a ValueError."""
        rows = val_batch.select(torch.arange(min(len(val_batch), 8)))
        try:
            self.probe_values(model, rows)
        except Exception as e:  # noqa: BLE001 -- any failure means: not this form
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            if self.mode == "probe":
                raise ValueError(f"ghost mode=probe does not fit this model ({first}); use "
                                 "ghost_mode=forward or auto") from e
            warnings.warn(f"ghost: the probe form does not fit this model ({first}); using "
                          "the forward form", stacklevel=2)
            self.active_mode, self._probe_plan = "forward", None

    def capture(self, model: nn.Module, batch: Batch):
        """Hooks for the training forward of ``batch``: the forward-mode pass, or (probe form)
        the per-layer probes that fire during the training backward."""
        if self._tangents is None:
            raise RuntimeError("call refresh(model, val_batch) before scoring")
        if self.active_mode == "probe":
            if self._probe_plan is None:
                self._probe_plan = _probe_plan_or_raise(model)
            return ghost_probe.probe_capture(model, batch, self._probe_plan, self._tangents,
                                             check_replays=not self._coverage_checked)
        return self._forward_capture(model, batch)

    @contextmanager
    def _forward_capture(self, model: nn.Module, batch: Batch) -> Iterator[_GhostCapture]:
        cap = _GhostCapture(batch.labels)

        def keep_logits(mod, args, output) -> None:
            cap.logits = logits_of(output)

        handle = model.register_forward_hook(keep_logits)
        # with grad enabled the same forward feeds the training backward: free the graph
        # autograd records for the tangents themselves (values unchanged)
        lean = (tangent_free_graph(model, release=self.release_tangents)
                if torch.is_grad_enabled() else nullcontext())
        try:
            with (fwAD.dual_level(), dual_parameters(model, self._tangents) as duals,
                  lean as release, custom_function_jvps(), native_rnn_kernels(model),
                  ForwardFastPaths(duals, fast=self.forward_fastpaths)):
                try:
                    yield cap
                except (NotImplementedError, RuntimeError) as e:
                    # a released tangent read again fails inside forward AD (a new view of
                    # it) or reads NaN (checked below)
                    reason = ("the model read a tensor after dropping every Python reference "
                              "to it, whose tangent had been released: set "
                              "estimator.release_tangents=false")
                    hint = ("" if release is None or not release.released else f"; or {reason}")
                    if "forward" in str(e).lower() and ("ad" in str(e) or "grad" in str(e)):
                        raise NotImplementedError(
                            "ghost needs forward-mode AD through every operation of the model, "
                            f"and one of them has none: {str(e).splitlines()[0]}{hint}") from e
                    if hint and hasattr(e, "add_note"):  # Python >= 3.11; type kept (OOM)
                        e.add_note(f"ghost: possibly {reason}")
                    if self.forward_fastpaths:
                        _note_if_from_fastpaths(e)
                    raise
                except Exception as e:  # a TypeError or ValueError from a fast path, too
                    if self.forward_fastpaths:
                        _note_if_from_fastpaths(e)
                    raise
                if cap.logits is None:
                    raise RuntimeError("no forward ran inside capture()")
                # the tangents vanish when the dual level closes: read them now
                logits, logits_t = fwAD.unpack_dual(cap.logits)
                cap.values = loss_tangent(logits, logits_t, batch.labels)
                # a released tangent reads NaN (tangents.py). Checked at the first capture
                # only: the check waits for the device, and reading a tensor back is the
                # model's code, the same at every step
                if release is not None and release.released and not self._release_checked:
                    self._release_checked = True
                    with torch.no_grad():
                        losses = per_sample_loss(logits.detach().float(), batch.labels)
                    _check_released_tangents_unread(cap.values, losses)
        finally:
            handle.remove()

    def probe_values(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """``[B]`` values by the probe form, running its own forward and backward of the
        summed loss (``torch.autograd.grad``: the parameters' ``.grad`` is left alone, buffers
        restored). For users and tests outside the trainer; checks the sum rule."""
        if self._tangents is None:
            raise RuntimeError("call refresh(model, val_batch) before scoring")
        plan = _probe_plan_or_raise(model)
        with preserved_buffers(model), torch.enable_grad():
            with ghost_probe.probe_capture(model, batch, plan, self._tangents,
                                           check_replays=True) as cap:
                with self.forward_context():
                    logits = forward_logits(model, batch.inputs)
            if logits.dtype not in (torch.float32, torch.float64):
                logits = logits.float()
            loss = per_sample_loss(logits, batch.labels).sum()
            grads = torch.autograd.grad(loss, self._params, allow_unused=True)
        self._check_sum_rule(cap, list(grads))
        return ghost_probe.probe_values(cap)

    def _check_sum_rule(self, capture: "ghost_probe.ProbeCapture",
                        grads: list[torch.Tensor | None]) -> None:
        """:func:`ghost_probe.check_coverage` against ``grads`` (one per trainable parameter);
        looser for bf16 output gradients."""
        ghost_probe.check_coverage(capture, [self._tangents[id(p)] for p in self._params], grads,
                                   5e-2 if capture.low_precision else 1e-3)

    def score(self, capture) -> torch.Tensor:
        """``[B]`` Ghost values of the captured batch (positive = helps). Probe form: call it
        after the training backward, with ``capture.row_scale`` set; the first call checks
        the sum rule against the parameters' ``.grad`` (:func:`ghost_probe.check_coverage`)."""
        if isinstance(capture, ghost_probe.ProbeCapture):
            if not self._coverage_checked and capture.acc is not None:
                self._check_sum_rule(capture, [p.grad for p in self._params])
                self._coverage_checked = True
            return ghost_probe.probe_values(capture)
        if capture.values is None:
            raise RuntimeError("no forward ran inside capture()")
        v = capture.values
        return v if v.dtype == torch.float64 else v.float()


@torch.no_grad()
def per_sample_validation_gradients(model: nn.Module, val_batch: Batch,
                                    chunk_size: int = 512) -> list[list[torch.Tensor]]:
    """``[grad ell_z for z in V]`` (each over :func:`trainable_parameters`), every one taken
    in the forward of its chunk of the validation batch, as :func:`validation_gradient` runs
    it: train-mode BatchNorm normalises with that chunk's statistics and dropout draws one
    mask for the chunk, so the gradients sum to ``validation_gradient``. Holds ``|V|``
    parameter-sized gradients: meant for small validation batches. Buffers are restored."""
    params = trainable_parameters(model)
    out = []
    with preserved_buffers(model), torch.enable_grad():
        for chunk in chunks(val_batch, chunk_size):
            logits = forward_logits(model, chunk.inputs)
            if logits.dtype not in (torch.float32, torch.float64):
                logits = logits.float()
            losses = per_sample_loss(logits, chunk.labels)
            for z in range(len(chunk)):
                grads = torch.autograd.grad(losses[z], params, allow_unused=True,
                                            retain_graph=z + 1 < len(chunk))
                out.append([torch.zeros_like(p) if g is None else g
                            for p, g in zip(params, grads)])
    return out


def _rng_state() -> tuple:
    return (torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def ghost_pairwise(model: nn.Module, train_batch: Batch, val_batch: Batch) -> torch.Tensor:
    """``[B_train, |V|]`` matrix of ``<grad ell_z, grad ell_j>`` (column z), all parameters.

    Every entry is taken in the contexts :func:`lai.value` uses: ``grad ell_z`` in the
    forward of the whole validation batch (:func:`per_sample_validation_gradients`), and the
    training side in one training-batch forward, repeated per column from the same random
    state (the same dropout masks; train-mode BatchNorm sees the whole batch each time). So
    each row sums to ``value(..., "ghost")`` of that sample, called from the same random
    state. One forward-mode pass per validation sample: meant for small batches (fidelity
    studies). Buffers are restored; the random state ends as ``value`` leaves it.
    """
    est = GhostEstimator()
    params = trainable_parameters(model)
    cols = []
    with preserved_buffers(model):
        per_z = per_sample_validation_gradients(model, val_batch, est.chunk_size)
        start = _rng_state()
        for g in per_z:
            _set_rng_state(start)
            est._params = params
            est._tangents = {id(p): gz for p, gz in zip(params, g)}
            with est.capture(model, train_batch) as cap:
                forward_logits(model, train_batch.inputs)
            cols.append(est.score(cap))
    if not cols:
        raise ValueError("pairwise needs at least one validation sample")
    return torch.stack(cols, dim=1)


@torch.no_grad()
def directional_derivatives(model: nn.Module, batch: Batch,
                            direction: list[torch.Tensor]) -> torch.Tensor:
    """``[B]``: ``<direction, grad_theta ell_j>`` for every sample j of ``batch``, exact, over
    the trainable parameters in :func:`trainable_parameters` order, by one forward-mode pass.

    Every static estimator here that is linear in the training gradient reduces to this:
    IP (``direction = g_V``), LiSSA (``(H + lambda I)^{-1} g_V``), DataInf (its block-wise
    inverse applied to ``g_V``). Buffers are restored; the model's mode is used as is.
    """
    params = trainable_parameters(model)
    if len(direction) != len(params):
        raise ValueError(f"direction has {len(direction)} tensors, the model "
                         f"{len(params)} trainable parameters")
    est = GhostEstimator()
    est._tangents = {id(p): d for p, d in zip(params, direction)}
    with preserved_buffers(model):
        with est.capture(model, batch) as cap:
            forward_logits(model, batch.inputs)
    return est.score(cap)


@dataclass
class GhostOptions(OnlineOptions):
    """``estimator=ghost``: exact Ghost influence over every trainable parameter."""

    name: str = "ghost"
    # auto: the probe form when the policy keeps every sample and the model has no
    # train-mode BatchNorm, else the forward form | forward | probe
    ghost_mode: str = "auto"
    release_tangents: bool = True  # forward form: free unreachable tangents (tangents.py)
    forward_fastpaths: bool = True  # forward form: lean constant/BN/softmax tangents
    chunk_size: int = 512  # validation rows per forward when g_V is built

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ghost_mode not in GHOST_MODES:
            raise ValueError(f"estimator.ghost_mode={self.ghost_mode!r} is not one of: "
                             f"{', '.join(GHOST_MODES)}")
        if self.chunk_size < 1:
            raise ValueError("estimator.chunk_size must be >= 1")


@register_estimator("ghost", GhostOptions)
def _build_ghost(o: GhostOptions) -> GhostEstimator:
    return GhostEstimator(o.chunk_size, mode=o.ghost_mode, release_tangents=o.release_tangents,
                          forward_fastpaths=o.forward_fastpaths)
