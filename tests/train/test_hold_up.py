"""Holding up: checkpoint/resume after SIGKILL, completed runs not redone, bad data files,
class-count mismatches, non-finite losses, all-filtered batches."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lai.config import ConfigError
from lai.data.checksums import CorruptDataError, make_registry, verify_files
from lai.errors import TrainingDivergedError
from lai.train import loop as loop_mod
from lai.train.runner import run_experiment
from tests.conftest import ROOT, compose_cfg, crash_in_epoch

RUN = [sys.executable, str(ROOT / "run.py")]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _summaries(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("summary.json"))]


def _comparable(s: dict) -> dict:
    drop = {"wall_time_s", "cache_refresh_s", "peak_memory_mb", "host", "data_build_s",
            "run_dir", "method"}  # method: the run folder's name (run_name differs)
    out = {k: v for k, v in s.items() if k not in drop}
    out["history"] = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in s["history"]]
    return out


def test_sigkill_then_same_command_resumes_to_identical_metrics(tmp_path):
    args = ["dataset=digits_n", "estimator=lai", "trainer.epochs=12", "device=cpu",
            "trainer.progress=false", "trainer.log_every=5"]
    # uninterrupted reference, in this process with the subprocesses' one thread
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_experiment(compose_cfg(*args, f"results_dir={tmp_path / 'ref'}"))
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "runs"
    cmd = [*RUN, *args, f"results_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list(out.rglob("checkpoint.pt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not _summaries(out)  # killed mid-run: no summary yet
    again = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming" in again.stdout
    (a,), (b,) = _summaries(tmp_path / "ref"), _summaries(out)
    assert _comparable(a) == _comparable(b)
    run_dir = Path(b["run_dir"])
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines if r["kind"] == "epoch"] == list(range(12))
    assert not (run_dir / "checkpoint.pt").exists()  # removed once completed
    # a third time (same config, composed in-process): detected as completed, not redone
    third = run_experiment(compose_cfg(*args, f"results_dir={out}"))
    assert third["run_dir"] == b["run_dir"] and third["wall_time_s"] == b["wall_time_s"]
    assert len(_summaries(out)) == 1


def test_run_folder_is_the_config_identity(tiny_overrides, tmp_path):
    base = ["dataset=digits_n", "estimator=vanilla", "trainer.max_steps=2", *tiny_overrides]
    a = run_experiment(compose_cfg(*base))
    b = run_experiment(compose_cfg(*base, "trainer.log_every=7"))  # volatile key: same run
    c = run_experiment(compose_cfg(*base, "trainer.lr=0.002"))  # another config: own folder
    assert a["run_dir"] == b["run_dir"] != c["run_dir"]
    assert a["config_hash"] != c["config_hash"]
    assert len(_summaries(tmp_path / "runs")) == 2


def test_checkpoint_loads_with_weights_only(tiny_overrides, tmp_path, monkeypatch):
    seen = {}
    orig = loop_mod.Trainer.save_checkpoint

    def keep(self, path):
        orig(self, path)
        seen["state"] = torch.load(path, weights_only=True)

    monkeypatch.setattr(loop_mod.Trainer, "save_checkpoint", keep)
    run_experiment(compose_cfg("dataset=digits_n", "estimator=lai", "trainer.epochs=2",
                               *tiny_overrides))
    assert {"model", "optimizer", "scheduler", "gen", "val_gen", "torch_rng", "numpy_rng",
            "python_rng", "policy", "loop"} <= set(seen["state"])


def test_corrupt_data_file_is_named_before_training(tmp_path):
    folder = tmp_path / "data" / "emotion"
    folder.mkdir(parents=True)
    (folder / "train.jsonl.gz").write_bytes(b"x" * 100)
    (folder / "other.json").write_text("[]")  # not in the registry: allowed
    reg = make_registry(tmp_path / "data")
    reg.pop("emotion/other.json")
    assert verify_files(tmp_path / "data", ("emotion",), reg) == 1
    (folder / "train.jsonl.gz").write_bytes(b"x" * 50)  # truncated
    with pytest.raises(CorruptDataError, match="train.jsonl.gz does not match its recorded "
                                               "checksum") as e:
        verify_files(tmp_path / "data", ("emotion",), reg)
    assert "\n" not in str(e.value)
    (folder / "train.jsonl.gz").write_bytes(b"y" * 100)  # same size, other bytes
    with pytest.raises(CorruptDataError, match="sha256"):
        verify_files(tmp_path / "data", ("emotion",), reg)


def test_shared_data_matches_the_registry(data_dir):
    from lai.data.checksums import load_registry
    reg = load_registry()
    assert reg, "lai/data/checksums.json is empty"
    present = {k: v for k, v in reg.items() if (data_dir / k).is_file()}
    folders = tuple({k.split("/")[0] for k in present})
    assert verify_files(data_dir, folders) == len(present)


def test_truncated_file_fails_the_run_with_its_name(tmp_path, data_dir):
    bad = tmp_path / "data"
    (bad / "emotion").mkdir(parents=True)
    for f in (data_dir / "emotion").iterdir():
        (bad / "emotion" / f.name).symlink_to(f)
    (bad / "emotion" / "train.jsonl.gz").unlink()
    (bad / "emotion" / "train.jsonl.gz").write_bytes(
        (data_dir / "emotion" / "train.jsonl.gz").read_bytes()[:1000])
    with pytest.raises(CorruptDataError,
                       match="emotion/train.jsonl.gz does not match its recorded checksum"):
        run_experiment(compose_cfg("dataset=emotion_n", f"data_dir={bad}", "device=cpu",
                                   f"results_dir={tmp_path / 'runs'}"))
    assert not (tmp_path / "runs").exists()


def test_class_count_mismatch_fails_before_training(tiny_overrides, tmp_path):
    with pytest.raises(ConfigError, match="model.num_classes=3 but dataset digits_n has 10"):
        run_experiment(compose_cfg("dataset=digits_n", "model.num_classes=3", *tiny_overrides))
    from lai.train import runner
    cfg = compose_cfg("dataset=digits_n", *tiny_overrides)
    data = type("D", (), {"task": "classification", "num_classes": 10})()
    with pytest.raises(ConfigError, match="4-way output layer but dataset digits_n has 10"):
        runner.check_classes(cfg, torch.nn.Sequential(torch.nn.Linear(8, 4)), data)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("overrides, message", [
    (["model=resnet18"], "model 'resnet18' does not fit vector data"),
    (["estimator=lai", "estimator.output_layer=nope"], "output_layer 'nope' is not a module"),
    (["dataset.val_size=5000"], "val_size=5000"),
])
def test_parts_that_do_not_fit_the_config_are_one_line_errors_before_any_folder(
        tiny_overrides, tmp_path, overrides, message):
    """A model that does not fit the data, a module name the model lacks, a split larger than
    the data: each a one-line ConfigError raised before the run folder is written."""
    with pytest.raises(ConfigError, match=message) as e:
        run_experiment(compose_cfg("dataset=digits_n", *tiny_overrides, *overrides))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "runs").exists()


def test_nan_loss_stops_with_state_saved_and_failed_summary(tiny_overrides, tmp_path):
    p = subprocess.run([*RUN, "dataset=digits_n", "estimator=vanilla", "trainer.lr=1e30",
                        "trainer.optimizer=sgd", "trainer.epochs=3", "trainer.log_every=1",
                        *tiny_overrides], cwd=tmp_path, env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 4, p.stderr[-2000:]
    assert "non-finite training loss" in p.stderr
    (s,) = _summaries(tmp_path / "runs")
    assert s["status"] == "failed" and "TrainingDivergedError" in s["error"]
    state = torch.load(Path(s["run_dir"]) / "diverged_state.pt", weights_only=True)
    assert "model" in state and "optimizer" in state


@pytest.mark.parametrize("strategy", ["one_pass", "two_pass"])
def test_all_filtered_batches_are_skipped_and_counted(tiny_overrides, strategy):
    s = run_experiment(compose_cfg("dataset=digits_n", "estimator=lai", "policy.threshold=1e30",
                                   "trainer.max_steps=3", f"trainer.strategy={strategy}",
                                   *tiny_overrides))
    assert s["skipped_steps"] == 3 and s["samples_per_epoch"] == [0]
    assert s["history"][0]["skipped_steps"] == 3


def test_crashed_spl_run_resumes_with_its_policy_state(tiny_overrides, tmp_path, monkeypatch):
    """A run that crashed in epoch 2 (summary: failed) resumes from its epoch-1 checkpoint,
    SPL's lambda included, and ends as an uninterrupted run does."""
    args = ["dataset=digits_n", "estimator=spl", "trainer.epochs=3", *tiny_overrides]
    ref = run_experiment(compose_cfg(*args, "run_name=reference"))
    restore = crash_in_epoch(monkeypatch, epoch=1, after=3)
    with pytest.raises(RuntimeError, match="injected crash"):
        run_experiment(compose_cfg(*args))
    (failed,) = [s for s in _summaries(tmp_path / "runs") if s["status"] == "failed"]
    assert (Path(failed["run_dir"]) / "checkpoint.pt").is_file()
    restore()
    resumed = run_experiment(compose_cfg(*args))
    assert resumed["run_dir"] == failed["run_dir"] and resumed["status"] == "completed"
    assert _comparable(resumed) == {**_comparable(ref), "config_hash": resumed["config_hash"]}


def test_resume_inside_an_epoch_with_checkpoint_every(tiny_overrides, tmp_path, monkeypatch):
    args = ["dataset=digits_n", "estimator=lai", "trainer.epochs=2", "trainer.log_every=5",
            "trainer.checkpoint_every=5", "save_scores=true", *tiny_overrides]
    ref = run_experiment(compose_cfg(*args, "run_name=reference"))
    orig = loop_mod.Trainer.train_step

    def crash(self, raw, epoch, step):
        if epoch == 1 and step == 21 + 12:  # inside epoch 2 (21 steps an epoch), after step 30
            raise RuntimeError("injected crash")
        return orig(self, raw, epoch, step)

    monkeypatch.setattr(loop_mod.Trainer, "train_step", crash)
    with pytest.raises(RuntimeError, match="injected crash"):
        run_experiment(compose_cfg(*args))
    (failed,) = [s for s in _summaries(tmp_path / "runs") if s["status"] == "failed"]
    state = torch.load(Path(failed["run_dir"]) / "checkpoint.pt", weights_only=True)
    assert state["in_epoch"]["i"] == 9 and state["loop"]  # checkpoint at step 30: 9 of epoch 2
    monkeypatch.setattr(loop_mod.Trainer, "train_step", orig)
    resumed = run_experiment(compose_cfg(*args))
    assert _comparable(resumed) == {**_comparable(ref), "config_hash": resumed["config_hash"]}
    for name in ("epoch_000.npz", "epoch_001.npz"):
        a, b = (np.load(Path(s["run_dir"]) / "scores" / name) for s in (ref, resumed))
        assert np.array_equal(a["values"], b["values"], equal_nan=True)
        assert np.array_equal(a["kept"], b["kept"])


def test_a_run_folder_in_use_is_not_touched(tiny_overrides, tmp_path):
    from lai.train.records import RunInUseError, config_hash, lock_run_dir, run_dir_for
    cfg = compose_cfg("dataset=digits_n", "estimator=vanilla", "trainer.max_steps=2",
                      *tiny_overrides)
    run_dir = run_dir_for(cfg.results_dir, "digits_n", "vanilla", seed=0,
                          identity=config_hash(cfg))
    held = lock_run_dir(run_dir)  # as another live process would
    try:
        with pytest.raises(RunInUseError, match="in use by another process"):
            run_experiment(cfg)
        assert sorted(p.name for p in run_dir.iterdir()) == ["run.lock"]
    finally:
        held.close()
    assert run_experiment(cfg)["status"] == "completed"  # released: the run goes ahead


def test_a_job_that_passed_the_completion_check_before_its_twin_finished_does_not_retrain(
        tiny_overrides, monkeypatch):
    """Two identical jobs: the second passed the "already completed?" check while the first
    was still training, and takes the lock after the first has finished. It must find the
    run completed under the lock and leave its records alone."""
    from lai.train import runner
    cfg = compose_cfg("dataset=digits_n", "estimator=vanilla", "trainer.max_steps=3",
                      "trainer.log_every=1", *tiny_overrides)
    first = run_experiment(cfg)
    run_dir = Path(first["run_dir"])
    metrics = (run_dir / "metrics.jsonl").read_text()
    real, calls = runner.completed_summary, []

    def stale_first_check(path):  # the twin's check ran before the first job finished
        calls.append(path)
        return None if len(calls) == 1 else real(path)

    monkeypatch.setattr(runner, "completed_summary", stale_first_check)
    second = run_experiment(cfg)
    assert len(calls) == 2 and second == first
    assert (run_dir / "metrics.jsonl").read_text() == metrics


def test_pretrained_head_of_another_size_is_a_config_error(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from lai.models import hf
    small = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=16, max_position_embeddings=16, num_labels=3)
    BertForSequenceClassification(small).save_pretrained(tmp_path / "ckpt")
    cfg = compose_cfg("model=bert", f"model.name_or_path={tmp_path / 'ckpt'}").model
    assert hf.bert(cfg, "classification", 3).classifier.out_features == 3
    with pytest.raises(ConfigError, match="classification head of another size than the "
                                          "dataset's 6 classes") as e:
        hf.bert(cfg, "classification", 6)
    assert "\n" not in str(e.value)


def test_resume_between_cache_refreshes_rebuilds_the_cache(tiny_overrides, tmp_path,
                                                           monkeypatch):
    """refresh_every=4 with 21 steps an epoch: the epoch-1 checkpoint (step 21) falls between
    two refreshes; the resumed run rebuilds the cache at its first step and completes."""
    args = ["dataset=digits_n", "estimator=lai", "trainer.epochs=2",
            "estimator.refresh_every=4", *tiny_overrides]
    orig = loop_mod.Trainer.train_step

    def crash(self, raw, epoch, step):
        if epoch == 1:
            raise RuntimeError("injected crash")
        return orig(self, raw, epoch, step)

    monkeypatch.setattr(loop_mod.Trainer, "train_step", crash)
    with pytest.raises(RuntimeError, match="injected crash"):
        run_experiment(compose_cfg(*args))
    monkeypatch.setattr(loop_mod.Trainer, "train_step", orig)
    s = run_experiment(compose_cfg(*args))
    assert s["status"] == "completed" and s["epochs"] == 2 and s["steps"] == 42
