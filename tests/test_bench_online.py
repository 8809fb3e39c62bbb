"""scripts/bench_online.py keeps working with the Trainer it drives (a seconds-long smoke run)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, load_script


def test_bench_smoke(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_online.py"), "--device",
                        "cpu", "--setups", "resnet18", "--batch", "4", "--steps", "2",
                        "--block", "2", "--warmup", "1", "--min-seconds", "0", "--methods",
                        "vanilla,lai,lai/curator,lai+filter/2pass", "--out", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads((tmp_path / "online_cpu.json").read_text())
    assert report["speed"] == {"precision": "fp32", "channels_last": "auto", "compile": False,
                               "cudnn_benchmark": False}
    rows = report["setups"]["resnet18"]
    assert set(rows) == {"vanilla", "lai", "lai/curator", "lai+filter/2pass"}
    for name, r in rows.items():
        assert r["step_ms"] > 0 and r["ops"] > 0 and r["syncs"] == {}, name
        # peak memory on the CPU: live tensor storage, including what was alive at the start
        assert r["mem_method"] == "tensor_storage", name
        assert r["peak_mem_mb"] > r["mem_start_mb"] > 0, name
        assert r["peak_tensor_mb"] == r["peak_mem_mb"], name
    assert isinstance(rows["lai"]["mem_ratio"], float) and rows["lai"]["mem_ratio"] > 0
    # the time ratio pairs each block with vanilla's block of the same round
    assert rows["vanilla"]["time_ratio"] == 1.0
    lai_t, van_t = rows["lai"]["step_ms_all"], rows["vanilla"]["step_ms_all"]
    assert len(lai_t) == len(van_t) == 1  # --steps 2 --block 2 --min-seconds 0: one round
    assert abs(rows["lai"]["time_ratio"] - lai_t[0] / van_t[0]) < 1e-12
    assert rows["lai+filter/2pass"]["gflop"] < rows["vanilla"]["gflop"]
    # a user's loop around lai.Curator does the trainer's work: the same FLOPs, kernels
    # within the trainer's record keeping
    assert rows["lai/curator"]["gflop"] == rows["lai"]["gflop"]
    assert rows["lai/curator"]["ops"] <= rows["lai"]["ops"]


def _bench_module():
    return load_script("bench_online")


def test_bench_sizes_build_the_named_models():
    """``full`` is bert-base and gpt-neo-125M (GPTNeoConfig's own defaults are the 1.3B
    model, which an earlier version of the script built by mistake)."""
    bench = _bench_module()
    expected = {("bert", "full"): (109e6, 110e6, 768, 12),
                ("gpt_neo", "full"): (125e6, 126e6, 768, 12),
                ("bert", "small"): (22e6, 23e6, 384, 6), ("gpt_neo", "small"): (30e6, 31e6, 384, 6)}
    for (name, size), (lo, hi, width, layers) in expected.items():
        model, data, batch, n_val = bench.make_setup(name, size, None)
        desc = bench.describe_model(model)
        assert lo <= desc["params"] <= hi, (name, size, desc)
        assert desc["hidden_size"] == width, (name, size, desc)
        assert desc.get("num_hidden_layers", desc.get("num_layers")) == layers, (name, size)
        assert data.train.inputs["input_ids"].shape[1] == 128
        assert int(data.train.inputs["input_ids"].max()) < desc["vocab_size"]
        del model, data
    tiny, _, batch, _ = bench.make_setup("gpt_neo", "tiny", None)
    assert batch == 16 and bench.describe_model(tiny)["params"] < 1e6


    with pytest.raises(ValueError, match="size must be one of"):
        bench.make_setup("bert", "huge", None)
    with pytest.raises(ValueError, match="attention must be one of"):
        bench.make_setup("bert", "tiny", None, attention="flash")
    for attention in ("sdpa", "eager"):  # BERT as asked; GPT-Neo has eager attention only
        bert = bench.make_setup("bert", "tiny", None, attention)[0]
        assert bench.describe_model(bert)["attn_implementation"] == attention
        neo = bench.make_setup("gpt_neo", "tiny", None, attention)[0]
        assert bench.describe_model(neo)["attn_implementation"] == "eager"
    with pytest.raises(ValueError, match="unknown setup"):
        bench.make_setup("t5", "tiny", None)


def test_bench_non_default_size_writes_its_own_file(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_online.py"), "--device",
                        "cpu", "--setups", "bert", "--size", "small", "--batch", "2", "--steps",
                        "2", "--block", "2", "--warmup", "1", "--min-seconds", "0",
                        "--methods", "vanilla,lli",
                        "--out", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert not (tmp_path / "online_cpu.json").exists()  # Table 4's CPU file is not replaced
    report = json.loads((tmp_path / "online_cpu_small.json").read_text())
    assert report["size"] == "small"
    model = report["setups"]["bert"]["vanilla"]["model"]
    assert model["class"] == "BertForSequenceClassification" and model["hidden_size"] == 384


def test_bench_times_more_rounds_until_min_seconds(monkeypatch):
    """A fast setup gets rounds beyond ``--steps`` until vanilla's timed steps add up to
    ``min_seconds``; every method gets the same number of rounds. The blocks' times are
    fixed (10 ms a step) so the count does not depend on the machine's speed or load (with
    real timings, a loaded machine reached 0.3 s within the first round)."""
    import torch

    bench = _bench_module()
    monkeypatch.setattr(bench.MethodBench, "time_block", lambda self, n: 10.0)
    speed = {"precision": "fp32", "channels_last": "auto", "compile": False}
    rows = bench.bench_setup("resnet18", ["vanilla", "lli"], torch.device("cpu"), "tiny",
                             steps=2, warmup=1, batch=2, speed=speed, block=2,
                             min_seconds=0.29)
    van, lli = rows["vanilla"]["step_ms_all"], rows["lli"]["step_ms_all"]
    # 14 rounds of 2 steps of 10 ms add up to 0.28 s < 0.29; the 15th reaches 0.30
    assert len(van) == len(lli) == 15
    assert rows["lli"]["time_ratio"] == 1.0
    with pytest.raises(ValueError, match="include it"):
        bench.bench_setup("resnet18", ["lli"], torch.device("cpu"), "tiny", steps=2, warmup=1,
                          batch=2, speed=speed)


def test_union_length_counts_overlaps_once():
    bench = _bench_module()
    assert bench.union_length([]) == 0.0
    assert bench.union_length([(5.0, 6.0), (0.0, 2.0), (1.0, 3.0), (5.5, 5.7)]) == 4.0


class _FailsUnderAutocast:
    """A dispatch mode that breaks a step run under autocast, as ResNet-18's bf16 steps did
    inside PyTorch's dispatch modes on an H100 (torch 2.11)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        class Mode(TorchDispatchMode):
            ops = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                import torch
                if torch.is_autocast_enabled("cpu"):
                    raise RuntimeError("Input type and weight type should be the same\nmore")
                Mode.ops += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def __call__(self):
        return self.mode


def test_counted_falls_back_to_fp32_only_on_cuda():
    """A count that fails under bf16 autocast is redone with autocast off on CUDA (FLOPs
    depend on shapes only) and says so; on the CPU, whose memory measurement it is, the
    failure is raised; the autocast setting is restored either way."""
    import types

    import torch

    bench = _bench_module()
    speed = {"precision": "bf16", "channels_last": "auto", "compile": False}
    mb = bench.MethodBench("bert", "lai", torch.device("cpu"), "tiny", 2, speed, 1)
    autocast = mb.tr._autocast
    with pytest.raises(RuntimeError, match="weight type"):
        mb._counted(_FailsUnderAutocast(), flush=False)
    assert mb.tr._autocast is autocast and mb.est.forward_context is autocast
    mb.device = types.SimpleNamespace(type="cuda")  # only the branch is taken as on a GPU
    mode, note = mb._counted(_FailsUnderAutocast(), flush=False)
    assert mode.ops > 0 and note.startswith("counted with autocast off (bf16 failed: Input")
    assert "more" not in note  # first line of the error only
    assert mb.tr._autocast is autocast and mb.est.forward_context is autocast
    mode, note = mb._counted(_FailsUnderAutocast(), flush=True, fp32_fallback=False)
    assert mode is None and note.startswith("failed under bf16 autocast")


def test_bench_keeps_finished_setups_when_one_fails(tmp_path, monkeypatch):
    """The JSON is written after every setup; a setup that raises is recorded under
    ``failed`` and the run goes on, then exits non-zero. Unknown setup names fail at once."""
    bench = _bench_module()
    real = bench.bench_setup

    def flaky(setup, *a, **k):
        if setup == "resnet18":
            raise RuntimeError("out of memory (simulated)")
        return real(setup, *a, **k)

    monkeypatch.setattr(bench, "bench_setup", flaky)
    argv = ["bench_online.py", "--device", "cpu", "--setups", "resnet18,bert", "--batch", "2",
            "--steps", "2", "--block", "2", "--warmup", "1", "--min-seconds", "0",
            "--methods", "vanilla", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match="resnet18"):
        bench.main()
    report = json.loads((tmp_path / "online_cpu.json").read_text())
    assert list(report["setups"]) == ["bert"]
    assert "out of memory (simulated)" in report["failed"]["resnet18"]
    monkeypatch.setattr(sys, "argv", argv[:4] + ["resnet18,t5"] + argv[5:])
    with pytest.raises(SystemExit) as exc:
        bench.main()
    assert exc.value.code == 2  # argparse's usage error, before any setup ran


@pytest.mark.parametrize("setup,method", [("gpt_neo", "lai"), ("gpt_neo", "lli"),
                                          ("gpt_neo", "ghost"), ("resnet18", "ghost"),
                                          ("resnet18", "lai+filter/2pass")])
def test_a_training_step_leaves_no_tensor_in_reference_cycles(setup, method):
    """Tensors caught in a reference cycle outlive their step until the garbage collector
    runs, and count in the next step's peak memory (a capture's [B, T, K] buffers did so)."""
    import gc

    import torch

    bench = _bench_module()
    speed = {"precision": "fp32", "channels_last": "auto", "compile": False}
    mb = bench.MethodBench(setup, method, torch.device("cpu"), "tiny",
                           4 if setup == "resnet18" else None, speed, 1)
    gc.collect()
    gc.disable()
    try:
        mb.run(2)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        cyclic = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert cyclic == [], [tuple(t.shape) for t in cyclic]


def test_profile_step_prints_dispatch_and_a_profile(capsys):
    """scripts/profile_step.py (the README's profile figures) keeps working with the bench."""
    mod = load_script("profile_step")
    mod.main(["bert:lai", "--device", "cpu", "--batch", "2", "--steps", "1", "--rows", "3"])
    out = capsys.readouterr().out
    assert "== bert lai: host dispatch" in out and "Self CPU" in out
    with pytest.raises(SystemExit, match="expected setup:method"):
        mod.main(["t5:lai", "--device", "cpu"])


def test_nofast_rows_switch_the_fast_paths_off_and_name_keeps_table4s_file(tmp_path,
                                                                           monkeypatch):
    """``ghost/forward/nofast`` is the forward form with PyTorch's own formulas (the A/B of
    lai/estimators/forward/forward_fastpaths.py), ``/nofast`` on another estimator is refused, and
    ``--name`` writes a run of other methods beside Table 4's file, not over it."""
    import torch

    bench = _bench_module()
    speed = {"precision": "fp32", "channels_last": "auto", "compile": False}
    rows = {m: bench.MethodBench("gpt_neo", m, torch.device("cpu"), "tiny", 2, speed, 1)
            for m in ("ghost/forward", "ghost/forward/nofast", "ghost/2pass/nofast")}
    assert rows["ghost/forward"].est.forward_fastpaths
    assert not rows["ghost/forward/nofast"].est.forward_fastpaths
    assert rows["ghost/forward/nofast"].est.mode == "forward"
    assert rows["ghost/2pass/nofast"].tr.cfg.strategy == "two_pass"
    with pytest.raises(ValueError, match="ghost only"):
        bench.MethodBench("gpt_neo", "lai/nofast", torch.device("cpu"), "tiny", 2, speed, 1)
    argv = ["bench_online.py", "--device", "cpu", "--setups", "gpt_neo", "--batch", "2",
            "--steps", "2", "--block", "2", "--warmup", "1", "--min-seconds", "0",
            "--methods", "vanilla,ghost/forward/nofast", "--out", str(tmp_path),
            "--name", "fastpaths_ab"]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    assert not (tmp_path / "online_cpu.json").exists()
    report = json.loads((tmp_path / "fastpaths_ab.json").read_text())
    assert set(report["setups"]["gpt_neo"]) == {"vanilla", "ghost/forward/nofast"}


def test_bench_llama_setup_takes_the_probe_form(tmp_path):
    """The opt-in Llama setup (RMSNorm classes of its own): Ghost's trainer picks the probe
    form (the replay probe covers its norms); a seconds-long run on a 2-row batch."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_online.py"), "--device",
                        "cpu", "--setups", "llama", "--batch", "2", "--steps", "2", "--block",
                        "2", "--warmup", "1", "--min-seconds", "0", "--methods",
                        "vanilla,ghost", "--out", str(tmp_path), "--name", "llama"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.loads((tmp_path / "llama.json").read_text())["setups"]["llama"]
    assert rows["ghost"]["ghost_form"] == "probe"
    assert rows["vanilla"]["model"]["class"] == "LlamaForCausalLM"
    bench = _bench_module()
    llama = bench.make_setup("llama", "tiny", None, "eager")[0]
    assert bench.describe_model(llama)["attn_implementation"] == "eager"
