"""Benchmark (not a test): the cost of online valuation relative to plain training.

    make bench                 # or: python scripts/bench_online.py [--steps 16] [--device auto]

For each setup, the script builds a synthetic data bundle in memory and runs the library's
own training step (``lai.train.loop.Trainer.train_step``: the code path real runs use, with its
preprocessing, scoring, policy and update) for vanilla, LAI, LLI and Ghost, all in one
process. The setups are:

- ``resnet18``: torchvision ResNet-18 (ImageNet stem, as in the paper's code) on CIFAR-shaped
  32x32 images, 10 classes;
- ``bert``: a BERT sequence classifier, 20 classes;
- ``gpt_neo``: a GPT-Neo causal language model;
- ``llama`` (not in the default ``--setups``): a Llama causal language model (RMSNorm, rotary
  positions, gated MLP), whose norms take Ghost's replay probe.

The transformers are built from a config, with no download, at ``--size``: ``full`` (bert-base,
gpt-neo-125M; the GPU default), ``small`` (the all-MiniLM-L6 shape with the real vocabularies:
minutes on a CPU, ratios without the tiny presets' fixed costs) or ``tiny`` (the CPU default).
A non-default size writes its own file, ``online_<device>_<size>.json``.

Measured per method:

- median step time over ``--steps`` timed steps, after warm-up steps (CUDA synchronised);
- GFLOP per step, counted with ``torch.utils.flop_counter.FlopCounterMode``;
- peak memory of a step, ``peak_mem_mb`` (MiB), measured on one step after the timed ones;
  ``mem_method`` says how: ``cuda_allocator`` (``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``) on CUDA, ``tensor_storage`` on the CPU
  (``lai.bench.memory.PeakTensorMemory``: the peak bytes of live tensor storages, counting
  everything alive at the start (model, gradients, optimizer state, batches, caches) once per
  storage, plus every storage the step creates, autograd's saved tensors included, until it is
  freed; no allocator rounding or caching, no kernel workspaces). ``mem_start_mb`` is what was
  already allocated when the step began. On every device the tensor-storage measurement is
  also recorded (``peak_tensor_mb``, ``tensor_start_mb``), a cross-check on CUDA;
- ``gpu_busy_ms`` (CUDA only): per step, the time the GPU ran something (the union of kernel,
  copy and memset intervals in a ``torch.profiler`` trace of 4 steps). Beside ``step_ms`` it
  says whether the step is bound by the device or by the host that dispatches it;
- the ratio of each of these to vanilla, measured in the same process;
- the cost of one validation-cache refresh (|V| samples), reported separately, as a fraction
  of a vanilla step, and added to the step for the per-step cost at ``refresh_every=1``
  (Ghost's exact form needs a fresh validation gradient every step, so its target uses that).

The scoring rows use ``policy=score_only`` (every sample trains with weight 1). Ghost has
three rows: ``ghost`` is the form the trainer picks for that policy (``ghost_mode=auto``: the
probe form, values from the training backward, unless the model has train-mode BatchNorm,
where only forward mode is exact per sample; the row's ``ghost_form`` says which);
``ghost/forward`` and ``ghost/probe`` force one form (``ghost/probe`` on a train-mode
BatchNorm model gives the per-route values, see ``lai/estimators/online/ghost_probe.py``: timed for
comparison only). Two more rows time a LAI step with filtering: ``lai+filter`` (one pass,
keeping the top half of each batch) and ``lai+filter/2pass`` (two pass: no-grad scoring,
then forward and backward on the kept half only). ``ghost/2pass`` is Ghost with its
forward-mode pass under no_grad (nothing of it is kept for the backward: the low-memory
form), then a plain forward and backward of the whole batch. On CUDA, ``lai/offload`` is LAI
with its validation cache in pinned host memory, copied to the GPU layer by layer ahead of use
(``estimator.offload``, ``lai/estimators/online/offload.py``). ``lai/curator`` is LAI's step written
as a user's own loop around the public ``lai.Curator`` (forward inside ``with``, ``step.loss``,
backward, optimizer step): its ratio should match ``lai``'s. Any Ghost method with ``/nofast``
appended (``ghost/forward/nofast``, ``ghost/2pass/nofast``; not a default row) runs with
``estimator.forward_fastpaths=false``, PyTorch's own forward-mode formulas, for an A/B of
the fast paths (``lai/estimators/forward/forward_fastpaths.py``) in the same process.

Speed settings (the Trainer's own options, recorded in the JSON): ``--precision`` (default
``auto``: bf16 autocast on CUDA, fp32 on CPU), ``--channels-last`` (default ``auto``: on for
the CNN on CUDA), ``--compile`` (torch.compile of the hook-free forwards; off by default).
cuDNN autotuning is on for CUDA.

Timing: steps run back to back and the device is synchronised only at the end of each block
of ``--block`` steps (so a host sync *inside* a step shows up as lost overlap, as in real
training); the step time is the median over blocks of block time / block. The methods of a
setup are timed side by side, in rounds of one block each with the order rotating (after one
untimed round; at least ``--steps`` steps, and more rounds until vanilla's timed steps add
up to ``--min-seconds``), so that drift in the machine's speed hits all of them alike;
``time_ratio`` is the median over rounds of a block's time over vanilla's block in the same round
(``time_ratio_of_medians``, the ratio of the two medians, is kept beside it); memory, FLOPs,
kernels and the refresh are measured with each method alone in the process
(``bench_setup``). The pending per-step statistics are flushed at the end of every block,
inside the timed region (real runs flush every ``trainer.log_every`` = 50 steps, so this
overstates that cost). Each row also records ``ops`` (aten kernels dispatched by one step, a
launch-overhead proxy that does not depend on the machine's load) and ``syncs`` (host
synchronisations in one step), both counted by ``lai.bench.syncs.DeviceWork``.

Counts taken under a PyTorch dispatch mode (ops, FLOPs, the tensor-storage peak) that fail on
CUDA under bf16 autocast are taken again with autocast off and say so in ``count_notes``
(see ``MethodBench._counted``). The JSON is rewritten after every setup; a setup that raises
is recorded under ``failed`` and the others still run (the exit status is then non-zero).

Results go to ``results/bench/online_<device>.json`` (``online_<device>_<size>.json`` at a
non-default ``--size``), with the device name, library versions and the models built. The
last lines printed compare the measurements with issue 6's targets.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lai.batching import forward_logits  # noqa: E402
from lai.config import TrainerConfig  # noqa: E402
from lai.data.base import DataBundle, TensorSplit  # noqa: E402
from lai.estimators.registry import build_estimator, estimator_options  # noqa: E402
from lai.models.hf import ATTENTIONS  # noqa: E402
from lai.policies import build_policy  # noqa: E402
from lai.train.loop import EpochStats, Trainer  # noqa: E402
from lai.bench.memory import PeakTensorMemory  # noqa: E402
from lai.bench.syncs import DeviceWork  # noqa: E402

TARGETS = {  # issue 6: (row, metric, bound)
    "LAI score-only step": ("lai", "time_ratio", 1.15),
    "LAI filtering epoch (two-pass, half dropped)": ("lai+filter/2pass", "time_ratio", 1.0),
    # the Ghost step with its validation gradient refreshed separately, as LAI's cache is
    "Ghost score-only step (form the trainer picks)": ("ghost", "time_ratio", 1.5),
    # the in-run form: g_V of the current model, a validation backward every step
    "Ghost step incl. a refresh every step": ("ghost", "total_ratio", 1.5),
    "LAI peak memory": ("lai", "mem_ratio", 1.05),
    # the cache in host memory, prefetched layer by layer (CUDA rows only)
    "LAI peak memory, offloaded cache": ("lai/offload", "mem_ratio", 1.05),
    "LAI score-only step, offloaded cache": ("lai/offload", "time_ratio", 1.15),
    "Ghost peak memory": ("ghost", "mem_ratio", 1.3),
    "Ghost peak memory (two-pass form)": ("ghost/2pass", "mem_ratio", 1.3),
}


class _NullRecorder:
    context: dict = {}

    def log(self, *a, **k) -> None:
        pass


SIZES = ("tiny", "small", "full")
DEFAULT_METHODS = ("vanilla", "lai", "lai/curator", "lli", "ghost", "ghost/forward",
                   "ghost/probe", "ghost/2pass", "lai+filter", "lai+filter/2pass")
SETUPS = ("resnet18", "bert", "gpt_neo", "llama")


def make_setup(name: str, size: str, batch: int | None, attention: str = "sdpa"):
    """(model, bundle, batch size, |V|) for one setup; data is random but correctly shaped.

    ``attention``: BERT's and Llama's ``attn_implementation``, ``sdpa`` (Hugging Face's
    default: fused kernels, the fast plain loop; Ghost's forward form runs it by the math
    backend) or ``eager``. GPT-Neo has eager attention only.

    ``size`` picks the transformers' configs (ResNet-18 is always the real network):
    ``tiny`` (2 layers, width 32, sequence 64, byte-sized vocabulary: the CPU default, seconds),
    ``small`` (all-MiniLM-L6 shape: 6 layers, width 384, sequence 128, the real vocabularies;
    minutes on a CPU, to see the ratios without the tiny presets' fixed costs) and ``full``
    (bert-base, gpt-neo-125M, sequence 128: the GPU default; Llama at the same shape with its
    32,000-word vocabulary). Batches: ResNet-18 512 at ``full``, else 128; BERT 32 at
    ``full``, else 16; the language models 8 at ``full`` and ``small``, else 16.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    g = torch.Generator().manual_seed(0)
    if name == "resnet18":
        from lai.data.vision import CifarPreprocess
        from lai.models.resnet import resnet18

        b = batch or (512 if size == "full" else 128)
        n, nv = b * 4, 1000
        x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
        xv = torch.randint(0, 256, (nv, 3, 32, 32), dtype=torch.uint8, generator=g)
        bundle = DataBundle("bench", "classification", 10,
                            TensorSplit(x, torch.randint(0, 10, (n,), generator=g)),
                            TensorSplit(xv, torch.randint(0, 10, (nv,), generator=g)),
                            TensorSplit(xv[:8], torch.zeros(8, dtype=torch.long)),
                            preprocess=CifarPreprocess((0.4914, 0.4822, 0.4465),
                                                       (0.2470, 0.2435, 0.2616), True))
        return resnet18(10), bundle, b, 100
    if name not in SETUPS:
        raise ValueError(f"unknown setup {name!r}: one of {SETUPS}")
    import transformers

    t = 64 if size == "tiny" else 128
    vocab = 259 if size == "tiny" else {"gpt_neo": 50257, "llama": 32000, "bert": 30522}[name]
    b = batch or {"tiny": 16, "small": 16 if name == "bert" else 8,
                  "full": 32 if name == "bert" else 8}[size]
    n, nv = b * 4, 256
    ids = torch.randint(1, vocab, (n, t), generator=g)
    ids_v = torch.randint(1, vocab, (nv, t), generator=g)
    mask, mask_v = torch.ones_like(ids), torch.ones_like(ids_v)
    lengths, lengths_v = torch.full((n,), t), torch.full((nv,), t)
    # width, layers, heads, FFN width. ``full``: bert-base and gpt-neo-125M (GPTNeoConfig's
    # own defaults are the 1.3B model, so its shape is spelled out)
    shape = {"tiny": (32, 2, 2, 64), "small": (384, 6, 12, 1536),
             "full": (768, 12, 12, 3072)}[size]
    if name == "bert":
        extra = dict(hidden_size=shape[0], num_hidden_layers=shape[1],
                     num_attention_heads=shape[2], intermediate_size=shape[3])
        cfg = transformers.BertConfig(vocab_size=vocab, num_labels=20,
                                      attn_implementation=attention, **extra)
        model = transformers.BertForSequenceClassification(cfg)
        y, yv = (torch.randint(0, 20, (n,), generator=g), torch.randint(0, 20, (nv,), generator=g))
        task, classes = "classification", 20
    elif name == "llama":
        cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=shape[0],
                                       num_hidden_layers=shape[1], num_attention_heads=shape[2],
                                       intermediate_size=shape[3], use_cache=False,
                                       max_position_embeddings=max(t, 128),
                                       attn_implementation=attention)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        extra = dict(hidden_size=shape[0], num_layers=shape[1], num_heads=shape[2],
                     attention_types=[[["global", "local"], shape[1] // 2]],
                     intermediate_size=shape[3], bos_token_id=None, eos_token_id=None)
        cfg = transformers.GPTNeoConfig(vocab_size=vocab, attn_implementation="eager",
                                        use_cache=False, **extra)
        model = transformers.GPTNeoForCausalLM(cfg)
    if name != "bert":  # next-token labels
        y = torch.cat([ids[:, 1:], torch.full((n, 1), -100)], 1)
        yv = torch.cat([ids_v[:, 1:], torch.full((nv, 1), -100)], 1)
        task, classes = "lm", vocab
    split = lambda i, m, lab, ln: TensorSplit({"input_ids": i, "attention_mask": m}, lab,  # noqa
                                              trim_key="input_ids", lengths=ln)
    bundle = DataBundle("bench", task, classes, split(ids, mask, y, lengths),
                        split(ids_v, mask_v, yv, lengths_v),
                        split(ids_v[:4], mask_v[:4], yv[:4], lengths_v[:4]))
    return model, bundle, b, (64 if name == "bert" else b)


def describe_model(model: torch.nn.Module) -> dict:
    """What was measured: class, parameter count and (Hugging Face models) the config's shape,
    recorded in the JSON so a table names the model that ran, not the one intended."""
    out = {"class": type(model).__name__, "params": sum(p.numel() for p in model.parameters())}
    cfg = getattr(model, "config", None)
    if cfg is not None:
        for key in ("hidden_size", "num_hidden_layers", "num_layers", "vocab_size"):
            if getattr(cfg, key, None) is not None:
                out[key] = getattr(cfg, key)
        if getattr(cfg, "_attn_implementation", None) is not None:
            out["attn_implementation"] = cfg._attn_implementation
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_busy_ms(run_steps, n: int) -> float:
    """Milliseconds per step during which the GPU ran something (kernels, copies, memsets):
    the union of their intervals in a ``torch.profiler`` trace of ``run_steps(n)``, over
    ``n``. Beside the step's wall time it says whether a step is bound by the device or by
    the host's dispatch of it (where the GPU sits idle between kernels)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_steps(n)
        torch.cuda.synchronize()
    spans = [(e.time_range.start, e.time_range.end) for e in prof.events()
             if e.device_type == torch.autograd.DeviceType.CUDA
             and not getattr(e, "is_user_annotation", False)]  # annotations span kernels
    return union_length(spans) / 1e3 / n


def union_length(spans: list[tuple[float, float]]) -> float:
    """Total length covered by the intervals ``(start, end)``: overlaps count once."""
    busy, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            busy += b - max(a, end)
            end = b
    return busy


class MethodBench:
    """One method's Trainer on one setup, built as the runner builds it, with its batches
    already on the device (warm-up steps run by :meth:`warm`)."""

    def __init__(self, setup: str, method: str, device: torch.device, size: str,
                 batch: int | None, speed: dict, warmup: int, attention: str = "sdpa"):
        torch.manual_seed(0)
        model, data, b, n_val = make_setup(setup, size, batch, attention)
        self.device, self.b, self.n_val = device, b, n_val
        self.model = model.to(device)
        est_name = method.split("+")[0].split("/")[0]
        parts = method.split("/")[1:]  # e.g. ghost/forward/nofast -> [forward, nofast]
        # /curator: the step written as a user's loop around the public lai.Curator
        self.user_loop = "curator" in parts
        filtering = "+filter" in method
        two_pass = "2pass" in parts
        ghost_mode = parts[0] if est_name == "ghost" and parts[:1] in (["forward"], ["probe"]) \
            else "auto"
        if "nofast" in parts and est_name != "ghost":
            raise ValueError(f"{method}: /nofast applies to ghost only")
        tcfg = TrainerConfig(batch_size=b, optimizer="sgd", lr=1e-3, progress=False,
                             strategy="two_pass" if two_pass else "one_pass", **speed)
        options = ({"ghost_mode": ghost_mode, **({"forward_fastpaths": False}
                                                if "nofast" in parts else {})}
                   if est_name == "ghost" else
                   {"offload": "offload" in parts} if est_name in ("lai", "lli") else {})
        ecfg = estimator_options(est_name, val_fraction=1.0, val_max=n_val, **options)
        self.est = build_estimator(ecfg)
        policy = (build_policy("percentile", keep_fraction=0.5) if filtering
                  else build_policy("score_only"))
        self.tr = Trainer(self.model, data, self.est, policy, tcfg, ecfg, device,
                          _NullRecorder())
        self.tr.setup(10_000)
        self.scoring = est_name != "vanilla"
        self.batches = [self.tr._to_device(data.train.gather(torch.arange(i * b, (i + 1) * b)))
                        for i in range(len(data.train) // b)]
        self.stats = EpochStats()
        self.i = 0
        if self.scoring:
            self.tr._refresh()
        self.run(warmup)

    def run(self, n: int, flush: bool = True) -> None:
        """``n`` steps back to back, then (``flush``) the pending statistics read (one wait)."""
        for _ in range(n):
            raw = self.batches[self.i % len(self.batches)]
            if self.user_loop:
                self._user_step(raw)
            else:
                self.tr.train_step(raw, 0, self.i)
            self.i += 1
        if flush:
            self.tr._flush(0, self.i, self.stats)

    def _user_step(self, raw) -> None:
        """A step as a user's own loop writes it with the public ``lai.Curator`` (the
        trainer's, so the same estimator, policy and cache): forward inside ``with``,
        ``step.loss``, backward, optimizer step; no records."""
        tr = self.tr
        batch = type(raw)(tr._prepare(raw.inputs, True), raw.labels, raw.idx)
        with tr.curator.step(batch, 0, self.i, refresh=False) as step:
            with tr._autocast():
                logits = forward_logits(tr.model, batch.inputs)
        if step.two_pass:
            with tr._autocast():
                logits = forward_logits(tr.model, step.kept_batch.inputs)
        loss = step.loss(logits)
        tr.opt.zero_grad(set_to_none=True)
        loss.backward()
        tr.opt.step()
        if step.late:
            step.values  # noqa: B018 - the probe form's values, read after the backward

    def time_block(self, n: int) -> float:
        """Milliseconds per step over a block of ``n`` steps (device synced at both ends)."""
        _sync(self.device)
        t0 = time.perf_counter()
        self.run(n)
        _sync(self.device)
        return (time.perf_counter() - t0) * 1e3 / n

    def _counted(self, make_mode, flush: bool, fp32_fallback: bool = True):
        """(the mode after one step run under it, a note or None).

        On CUDA under bf16 autocast, torchvision's ResNet-18 has failed inside a dispatch mode
        (torch 2.11, H100: a convolution met an fp32 input); there the step is counted again with
        autocast off (``fp32_fallback``: FLOPs depend on shapes only, and the kernel count then
        lacks autocast's casts) and the note says so; with no fallback the result is None. On the
        CPU any failure is raised: its memory measurement is this one.
        """
        try:
            with make_mode() as mode:
                self.run(1, flush=flush)
            return mode, None
        except RuntimeError as err:
            if self.device.type != "cuda":
                raise
            first = str(err).splitlines()[0][:200]
        if not fp32_fallback:
            return None, f"failed under bf16 autocast: {first}"
        saved = self.tr._autocast, self.est.forward_context
        self.tr._autocast = self.est.forward_context = nullcontext
        try:
            with make_mode() as mode:
                self.run(1, flush=flush)
        finally:
            self.tr._autocast, self.est.forward_context = saved
        return mode, f"counted with autocast off (bf16 failed: {first})"

    def measure(self) -> dict:
        """Everything but the step time: refresh time, peak memory, kernels, syncs, FLOPs."""
        device = self.device
        refresh_ms = None
        if self.scoring:
            times = []
            for _ in range(3):
                _sync(device)
                t0 = time.perf_counter()
                self.tr._refresh()
                _sync(device)
                times.append((time.perf_counter() - t0) * 1e3)
            refresh_ms = statistics.median(times)
        gc.collect()  # garbage of earlier methods is not this step's memory
        if device.type == "cuda":
            _sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            start = torch.cuda.memory_allocated(device) / 2**20
            self.run(1)
            _sync(device)
            peak, mem_method = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_allocator"
        # the three counts below run one step each under a PyTorch dispatch mode; see _counted
        work, work_note = self._counted(DeviceWork, flush=False)  # one step's kernels and syncs
        counter, flop_note = self._counted(lambda: FlopCounterMode(display=False), flush=False)
        self.tr._flush(0, self.i, self.stats)
        # live tensor storage (any device): the CPU's measurement, and a cross-check on CUDA
        gpu_ms = gpu_note = None
        if device.type == "cuda":
            try:
                gpu_ms = device_busy_ms(lambda k: self.run(k, flush=False), 4)
            except Exception as err:  # noqa: BLE001 -- a diagnostic; the step's rows stand
                gpu_note = f"device_busy_ms failed: {str(err).splitlines()[0][:200]}"
            self.tr._flush(0, self.i, self.stats)
        mem, mem_note = self._counted(lambda: PeakTensorMemory(device=device.type), flush=True,
                                      fp32_fallback=False)
        tensor_peak = mem.peak_mib if mem is not None else None
        tensor_start = mem.start_mib if mem is not None else None
        _sync(device)
        if device.type != "cuda":
            peak, start, mem_method = tensor_peak, tensor_start, "tensor_storage"
        gflop = counter.get_total_flops() / 1e9 if counter is not None else None
        return {"gflop": gflop, "peak_mem_mb": peak,
                "mem_method": mem_method, "mem_start_mb": start,
                "peak_tensor_mb": tensor_peak, "tensor_start_mb": tensor_start,
                "gpu_busy_ms": gpu_ms,
                "count_notes": {k: v for k, v in (("ops", work_note), ("gflop", flop_note),
                                                  ("peak_tensor_mb", mem_note),
                                                  ("gpu_busy_ms", gpu_note)) if v},
                "refresh_ms": refresh_ms, "batch": self.b, "n_val": self.n_val,
                "ops": work.ops if work is not None else None,
                "syncs": dict(work.syncs) if work is not None else {},
                "ghost_form": getattr(self.est, "active_mode", None)}


def bench_setup(setup: str, methods: list[str], device: torch.device, size: str, steps: int,
                warmup: int, batch: int | None, speed: dict, block: int = 4,
                min_seconds: float = 0.0, attention: str = "sdpa") -> dict[str, dict]:
    """Measurements of every method on one setup.

    Memory, FLOPs, kernels and refresh time: each method alone in the process (built, measured,
    freed), so one method's tensors are not another's memory. Step time: every method's
    Trainer built side by side, then rounds of one block of ``block`` steps per method, the
    order rotating from round to round; ``step_ms`` is the median over its blocks. Drift in
    the machine's speed (other load, clocks) then hits every method alike instead of whichever
    ran during it.
    """
    if "vanilla" not in methods:
        raise ValueError("every ratio is to vanilla: include it in methods")
    rows = {}
    for m in methods:
        bench = MethodBench(setup, m, device, size, batch, speed, warmup, attention)
        rows[m] = bench.measure()
        rows[m]["model"] = describe_model(bench.model)
        del bench
        if device.type == "cuda":
            torch.cuda.empty_cache()
    benches = {m: MethodBench(setup, m, device, size, batch, speed, warmup, attention)
               for m in methods}
    for m in methods:  # one untimed round: the first block after the others were built is slow
        benches[m].time_block(block)
    times: dict[str, list[float]] = {m: [] for m in methods}
    r = 0
    # at least steps // block rounds, and more until vanilla has run min_seconds: a tiny
    # model's 10 ms steps would otherwise be timed over a fraction of a second, where the
    # scheduler's jitter is as large as the differences measured
    while r < max(1, steps // block) or sum(times["vanilla"]) * block / 1e3 < min_seconds:
        for k in range(len(methods)):
            m = methods[(r + k) % len(methods)]
            times[m].append(benches[m].time_block(block))
        r += 1
    base = times["vanilla"]
    for m in methods:
        rows[m].update(step_ms=statistics.median(times[m]), step_ms_all=times[m],
                       # each round's block against vanilla's block of the same round, then
                       # the median: drift slower than a round cancels out of the ratio
                       time_ratio=statistics.median(t / v for t, v in zip(times[m], base)))
    del benches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--setups", default="resnet18,bert,gpt_neo")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--block", type=int, default=4, help="steps between device syncs")
    ap.add_argument("--min-seconds", type=float, default=5.0,
                    help="time more rounds until vanilla's timed steps add up to this")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--size", default="auto", choices=("auto",) + SIZES,
                    help="transformer sizes (see make_setup): auto = full on CUDA, tiny on CPU")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="auto: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--channels-last", default="auto", choices=["auto", "true", "false"])
    ap.add_argument("--compile", action="store_true", help="torch.compile hook-free forwards")
    ap.add_argument("--attention", default="sdpa", choices=ATTENTIONS,
                    help="BERT's and Llama's attn_implementation (GPT-Neo has eager only)")
    ap.add_argument("--methods", default=None,
                    help=f"default: {','.join(DEFAULT_METHODS)}, and lai/offload on CUDA")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench"))
    ap.add_argument("--name", default=None,
                    help="the JSON's file name without .json (default: online_<device>, plus "
                         "_<size> at a non-default size: the files Table 4 reads; name a run "
                         "of other --methods so that it does not replace them)")
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    speed = {"precision": (args.precision if args.precision != "auto" else
                           ("bf16" if device.type == "cuda" else "fp32")),
             "channels_last": {"auto": "auto", "true": True, "false": False}[args.channels_last],
             "compile": bool(args.compile)}
    setups = args.setups.split(",")
    unknown = [name for name in setups if name not in SETUPS]
    if unknown:  # fail before minutes of benchmarking, not at the typo
        ap.error(f"unknown setup(s) {unknown}: choose from {', '.join(SETUPS)}")
    methods = (args.methods or ",".join(DEFAULT_METHODS + (
        ("lai/offload",) if device.type == "cuda" else ()))).split(",")
    if methods[0] != "vanilla":
        methods.insert(0, "vanilla")  # every ratio is to vanilla, measured in this process
    steps = max(args.block, args.steps - args.steps % args.block)
    size = args.size if args.size != "auto" else ("full" if device.type == "cuda" else "tiny")
    default_size = size == ("full" if device.type == "cuda" else "tiny")
    report = {"device": gpu_name or f"cpu ({platform.processor() or platform.machine()}, "
                                    f"{torch.get_num_threads()} threads)",
              "torch": torch.__version__, "python": platform.python_version(),
              "size": size, "steps": steps, "min_seconds": args.min_seconds,
              "block": args.block, "warmup": args.warmup,
              "speed": {**speed, "cudnn_benchmark": device.type == "cuda"},
              "attention": args.attention, "setups": {}}
    try:
        import transformers
        report["transformers"] = transformers.__version__
    except ImportError:
        pass
    print(f"device: {report['device']}  torch {torch.__version__}  speed: {report['speed']}  "
          f"attention: {args.attention}")
    header = ("| setup | method | step ms | ratio | GFLOP | GFLOP ratio | peak MiB | mem ratio "
              "| refresh ms | refresh/step | step+refresh ratio | ops | syncs | GPU busy ms "
              "| GPU busy ratio |")
    print(header)
    print("|" + "---|" * 15)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the default size keeps the name Table 4 reads; other sizes get their own file
    path = out / ((args.name or f"online_{'cuda' if device.type == 'cuda' else 'cpu'}"
                   f"{'' if default_size else '_' + size}") + ".json")
    failed: list[str] = []
    for setup in setups:
        try:
            rows = bench_setup(setup, methods, device, size, steps, args.warmup, args.batch,
                               speed, args.block, args.min_seconds, args.attention)
        except Exception:  # noqa: BLE001 -- one broken setup must not cost the others' rows
            traceback.print_exc()
            failed.append(setup)
            report.setdefault("failed", {})[setup] = traceback.format_exc(limit=3)
            path.write_text(json.dumps(report, indent=2))
            continue
        base = rows["vanilla"]
        for m, r in rows.items():
            r["time_ratio_of_medians"] = r["step_ms"] / base["step_ms"]
            r["gflop_ratio"] = (r["gflop"] / base["gflop"]
                                if r["gflop"] is not None and base["gflop"] else None)
            r["mem_ratio"] = (r["peak_mem_mb"] / base["peak_mem_mb"]
                              if r["peak_mem_mb"] and base["peak_mem_mb"] else None)
            r["refresh_over_step"] = (r["refresh_ms"] / base["step_ms"]
                                      if r["refresh_ms"] is not None else None)
            r["gpu_busy_ratio"] = (r["gpu_busy_ms"] / base["gpu_busy_ms"]
                                   if r.get("gpu_busy_ms") and base.get("gpu_busy_ms") else None)
            # cost per step with refresh_every=1 (the paper's setting)
            r["total_ratio"] = r["time_ratio"] + (r["refresh_over_step"] or 0.0)
            f = lambda x, fmt: format(x, fmt) if x is not None else "-"  # noqa: E731
            form = r.get("ghost_form") if m.startswith("ghost") else None
            label = f"{m} [{form}]" if form else m
            print(f"| {setup} | {label} | {r['step_ms']:.1f} | {r['time_ratio']:.2f} | "
                  f"{f(r['gflop'], '.2f')} | {f(r['gflop_ratio'], '.2f')} | "
                  f"{f(r['peak_mem_mb'], '.0f')} | {f(r['mem_ratio'], '.2f')} | "
                  f"{f(r['refresh_ms'], '.1f')} | {f(r['refresh_over_step'], '.2f')} | "
                  f"{r['total_ratio']:.2f} | {f(r['ops'], 'd')} | {sum(r['syncs'].values())} | "
                  f"{f(r.get('gpu_busy_ms'), '.1f')} | {f(r['gpu_busy_ratio'], '.2f')} |")
        report["setups"][setup] = rows
        # written after every setup, so a crash or a time limit keeps the setups already done
        path.write_text(json.dumps(report, indent=2))
    print("\ntargets (issue 6):")
    for label, (row, metric, bound) in TARGETS.items():
        for setup, rows in report["setups"].items():
            if row not in rows:
                continue
            got = rows[row][metric]
            state = "n/a (not measured)" if got is None else (
                f"{got:.2f} {'met' if got <= bound else 'MISSED'}")
            print(f"  {label} <= {bound}: {setup}: {state}")
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {path}")
    if failed:
        sys.exit(f"setups that failed (traceback above and in the JSON's 'failed'): {failed}")


if __name__ == "__main__":
    main()
