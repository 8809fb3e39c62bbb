"""Holding up under interruptions and bad files: Ctrl-C / SIGTERM save a checkpoint and say
how to resume; a bad checkpoint is moved aside; an unwritable results folder, an unreadable
data folder and a malformed data file are one-line errors."""
from __future__ import annotations

import errno
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lai.cli import run_and_report
from lai.data.files import MalformedDataError, read_jsonl_gz
from lai.train.records import config_hash, run_dir_for
from lai.train.runner import run_experiment
from tests.conftest import ROOT, compose_cfg

ARGS = ["dataset=digits_n", "estimator=lai", "trainer.epochs=12", "device=cpu",
        "trainer.progress=false", "trainer.log_every=1"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _comparable(s: dict) -> dict:
    drop = {"wall_time_s", "cache_refresh_s", "peak_memory_mb", "host", "data_build_s",
            "run_dir", "status"}
    out = {k: v for k, v in s.items() if k not in drop}
    out["history"] = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in s["history"]]
    return out


@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_a_checkpoint_and_the_same_command_resumes(tmp_path, sig, status):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = run_experiment(compose_cfg(*ARGS, f"results_dir={tmp_path / 'ref'}"))
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "runs"
    cmd = [sys.executable, str(ROOT / "run.py"), *ARGS, f"results_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not list(out.rglob("checkpoint.pt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)  # the first epoch's checkpoint: the loop is running
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == status, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"interrupted by {signal.Signals(sig).name}: state saved to ")
    assert "run the same command to resume" in last and "Traceback" not in err
    (summary_path,) = out.rglob("summary.json")
    assert json.loads(summary_path.read_text())["status"] == "interrupted"
    again = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming" in again.stdout
    done = json.loads(summary_path.read_text())
    assert done["status"] == "completed"
    assert _comparable(done) == {**_comparable(ref), "method": done["method"]}


def _run_dir(cfg) -> Path:
    return run_dir_for(cfg.results_dir, cfg.dataset.name, cfg.estimator.name, seed=cfg.seed,
                       identity=config_hash(cfg))


@pytest.mark.parametrize("content", ["truncated", "empty dict"])
def test_a_bad_checkpoint_is_moved_aside_and_the_run_starts_clean(tmp_path, content):
    args = [*ARGS[:2], "trainer.epochs=2", *ARGS[3:]]
    ref = run_experiment(compose_cfg(*args, f"results_dir={tmp_path / 'ref'}"))
    cfg = compose_cfg(*args, f"results_dir={tmp_path / 'runs'}")
    run_dir = _run_dir(cfg)
    run_dir.mkdir(parents=True)
    ckpt = run_dir / "checkpoint.pt"
    if content == "truncated":
        torch.save({"model": torch.zeros(1000)}, ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[:200])
    else:
        torch.save({}, ckpt)
    (run_dir / "metrics.jsonl").write_text('{"kind": "start"}\n{"kind": "epoch"}\n')
    with pytest.warns(RuntimeWarning, match="unusable checkpoint .*: moved to checkpoint.bad-"):
        done = run_experiment(cfg)
    assert done["status"] == "completed" and done["run_dir"] == str(run_dir)
    assert done["final_test_acc"] == ref["final_test_acc"]  # a clean start, the same run
    (bad,) = run_dir.glob("checkpoint.bad-*.pt")
    (old_metrics,) = run_dir.glob("metrics.bad-*.jsonl")
    assert old_metrics.read_text().count("\n") == 2  # the old records are kept aside
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["kind"] for x in lines].count("epoch") == 2


def test_an_unwritable_results_folder_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    args = [*ARGS[:2], "trainer.epochs=1", "device=cpu", f"results_dir={blocker / 'runs'}"]
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=tmp_path,
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"error: cannot use a file or folder: Not a directory: {_run_dir(compose_cfg(*args))}"]


@pytest.mark.parametrize("code,name", [(errno.ENOSPC, "No space left on device"),
                                       (errno.EROFS, "Read-only file system"),
                                       (errno.EACCES, "Permission denied")])
def test_a_full_or_read_only_disk_is_a_one_line_error(tmp_path, capsys, monkeypatch, code,
                                                      name):
    import lai.train.records as records

    def refuse(self, run_dir, *a, **k):
        raise OSError(code, os.strerror(code), str(run_dir))

    monkeypatch.setattr(records.RunRecorder, "__init__", refuse)
    cfg = compose_cfg(*ARGS[:2], "trainer.epochs=1", "device=cpu",
                      f"results_dir={tmp_path / 'runs'}")
    summary, status = run_and_report(cfg)
    assert (summary, status) == (None, 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: cannot use a file or folder: {name}: {_run_dir(cfg)}"]


def test_an_unreadable_data_folder_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    import lai.train.runner as runner

    folder = tmp_path / "data"

    def unreadable(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(folder / "emotion"))

    monkeypatch.setattr(runner, "build_data", unreadable)
    cfg = compose_cfg(*ARGS[:2], "trainer.epochs=1", "device=cpu", f"data_dir={folder}",
                      f"results_dir={tmp_path / 'runs'}")
    assert run_and_report(cfg) == (None, 2)
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: cannot use a file or folder: Permission denied: {folder / 'emotion'}"]
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.parametrize("raw,message", [
    (b"not gzip at all", "BadGzipFile"),
    (gzip.compress(b'{"text": "a", "label": 1}\n{"text": "b", "label"\n'), "line 2"),
    (gzip.compress(b'[1, 2]\n'), "not a JSON object"),
])
def test_a_malformed_text_file_names_the_file_and_line(tmp_path, raw, message):
    path = tmp_path / "train.jsonl.gz"
    path.write_bytes(raw)
    with pytest.raises(MalformedDataError, match=message) as e:
        read_jsonl_gz(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def _emotion_folder(root: Path, rows: bytes) -> Path:
    folder = root / "emotion"
    folder.mkdir(parents=True)
    for split in ("train", "validation", "test"):
        (folder / f"{split}.jsonl.gz").write_bytes(gzip.compress(rows))
    (folder / "labels.json").write_text(json.dumps(["a", "b"]))
    return folder


def test_a_replaced_data_file_is_named_by_run_py(tmp_path):
    _emotion_folder(tmp_path / "data", b'{"text": "fine", "label": 0}\n')
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), "dataset=emotion_n",
                          "model=tiny_transformer", "trainer.epochs=1", "device=cpu",
                          f"data_dir={tmp_path / 'data'}", "dataset.download=false",
                          f"results_dir={tmp_path / 'runs'}"], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: data file ") and "emotion" in line and "checksum" in line


def test_a_malformed_text_dataset_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    """A file the checksums do not know (the user's own copy): read, and refused by name."""
    import lai.train.runner as runner

    monkeypatch.setattr(runner, "verify_files", lambda *a, **k: 0)
    folder = _emotion_folder(tmp_path / "data",
                             b'{"text": "fine", "label": 0}\n{"text": "no label"}\n')
    cfg = compose_cfg("dataset=emotion_n", "model=tiny_transformer", "trainer.epochs=1",
                      "device=cpu", f"data_dir={tmp_path / 'data'}", "dataset.download=false",
                      f"results_dir={tmp_path / 'runs'}")
    assert run_and_report(cfg) == (None, 2)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {folder / 'train.jsonl.gz'}") and "label" in line
    assert not (tmp_path / "runs").exists()
