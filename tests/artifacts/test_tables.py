"""make tables: tables from synthetic run records (values checked by hand), the paper's
numbers beside ours, failed/OOM cells, and the full set of files from the committed
results."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from lai.artifacts import paper_values as P
from lai.artifacts.collect import find_artifact_runs, load_runs, scale_note
from lai.artifacts.render import Table, fmt_mean_std, to_latex, to_markdown, write_table
from lai.artifacts.tables import table1, table2, table3, table3_evidence, table4

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import make_tables  # noqa: E402


def fake_run(root: Path, artifact: str, dataset: str, estimator: str, seed: int,
             scale: str = "reduced", **summary) -> Path:
    """A run folder as the trainer writes it (config.yaml + summary.json)."""
    run = root / scale / artifact / dataset / estimator / f"x-s{seed}"
    run.mkdir(parents=True)
    cfg = {"model": {"name": "small_cnn", "hidden": 16}, "seed": seed,
           "trainer": {"epochs": 4, "max_steps": summary.pop("max_steps", None)},
           "policy": {"start_epoch": summary.pop("start_epoch", 0)},
           "dataset": {"name": dataset}, "estimator": {"name": estimator}}
    OmegaConf.save(OmegaConf.create(cfg), run / "config.yaml")
    base = {"status": "completed", "dataset": dataset, "estimator": estimator, "seed": seed,
            "n_train": 100, "final_test_acc": 0.5, "final_val_loss": 1.0,
            "samples_per_epoch": [100] * 4, "samples_seen": 400, "samples_removed": 0}
    base.update(summary)
    (run / "summary.json").write_text(json.dumps(base))
    return run


def test_fmt_mean_std_is_sample_std():
    assert fmt_mean_std([1.0, 2.0, 3.0]) == "2.00 ± 1.00"
    assert fmt_mean_std([0.5], scale=100) == "50.00 (n=1)"
    assert fmt_mean_std([1.0, 3.0], expected_n=3) == "2.00 ± 1.41 (n=2)"
    assert fmt_mean_std([]) == "-"
    assert fmt_mean_std([float("nan"), 2.0, 4.0], expected_n=2) == "3.00 ± 1.41"


def test_paper_table3_parses_to_the_printed_averages():
    for method, row in P.TABLE3.items():
        means = [v[0] for v in row.values() if v is not None]
        assert np.mean(means) == pytest.approx(P.TABLE3_AVG[method], abs=0.011)
    assert P.TABLE3["trak"]["news20_n"] is None  # OOM in the paper


def test_table3_cells_from_records(tmp_path):
    accs = {"vanilla": [0.30, 0.34, 0.32], "lai": [0.40, 0.42, 0.44]}
    for est, values in accs.items():
        for seed, acc in enumerate(values):
            fake_run(tmp_path, "table3", "cifar10n_worst", est, seed, final_test_acc=acc)
    fake_run(tmp_path, "table3", "cifar10n_worst", "trak", 0, status="failed",
             error="MemoryError: TRAK needs 900 GB")
    table, long = table3(tmp_path)
    rows = {r[0]: r for r in table.rows}
    col = table.header.index("CIFAR-10N-w ours†")
    assert rows["Vanilla"][col] == "32.00 ± 2.00"
    assert rows["LAI"][col] == "42.00 ± 2.00"
    assert rows["TRAK"][col] == "OOM"
    assert rows["Vanilla"][col + 1] == "75.37 ± 1.05"  # the paper's cell sits beside ours
    assert rows["IP"][col] == "-"
    ours = long[(long.source == "ours") & (long.row == "lai") & (long.column == "cifar10n_worst")]
    assert ours["mean"].item() == pytest.approx(42.0) and ours["n"].item() == 3
    # the average over our datasets, and the paper's over the same datasets
    avg = table.header.index("Avg. ours†")
    assert rows["LAI"][avg] == "42.00" and rows["LAI"][avg + 1] == "76.43"
    assert any("reduced scale" in n and "small_cnn(hidden=16)" in n for n in table.notes)
    assert any("CIFAR-100N" in n for n in table.notes if n.startswith("Not run"))


def test_paper_scale_records_win_over_reduced(tmp_path):
    fake_run(tmp_path, "table3", "emotion_n", "lai", 0, scale="reduced", final_test_acc=0.1)
    fake_run(tmp_path, "table3", "emotion_n", "lai", 0, scale="paper", final_test_acc=0.9)
    df, scale = find_artifact_runs(tmp_path, "table3")
    assert scale == "paper" and df["final_test_acc"].tolist() == [0.9]
    assert scale_note(df, scale).startswith("paper scale")


def test_table1_perplexity_at_two_steps_and_removed(tmp_path):
    for seed, (ppl, removed) in enumerate([(9.0, 3), (11.0, 5)]):
        fake_run(tmp_path, "table1", "pile", "lai", seed, max_steps=20,
                 samples_seen=160, samples_removed=removed,
                 step_evals={"10": {"test_ppl": ppl + 1}, "20": {"test_ppl": ppl}})
    table, long = table1(tmp_path)
    lai = table.rows[1]
    assert lai[0] == "LAI"
    assert table.header[1] == "ppl @10 ours†" and table.header[3] == "ppl @20 ours†"
    assert lai[1] == "11.0000 ± 1.4142" and lai[3] == "10.0000 ± 1.4142"
    assert lai[5] == "4.0 ± 1.4" and lai[6] == "135"
    seen_used = long[(long.row == "lai") & (long.column == "sample") & (long.source == "ours")]
    assert seen_used["mean"].item() == pytest.approx(np.mean([160 / 157, 160 / 155]))


def test_table2_counts_only_curated_epochs(tmp_path):
    fake_run(tmp_path, "table2", "glue_rte", "lai", 0, start_epoch=3,
             samples_per_epoch=[100, 100, 100, 40, 60], final_val_loss=0.5, final_test_acc=0.61)
    table, _ = table2(tmp_path)
    row = next(r for r in table.rows if r[0] == "RTE" and r[1] == "LAI")
    assert row[2] == "50 (n=1)" and row[3] == "833"
    assert row[4] == "0.5000 (n=1)" and row[6] == "61.0 (n=1)"


def test_table4_reads_bench_json(tmp_path):
    (tmp_path / "bench").mkdir()
    setup = {m: {"gflop": g, "gflop_ratio": g / 10, "peak_mem_mb": 100.0 * g / 10,
                 "mem_ratio": g / 10, "time_ratio": g / 10, "batch": 4}
             for m, g in (("vanilla", 10.0), ("lai", 11.0), ("lli", 10.0), ("ghost", 17.0))}
    (tmp_path / "bench" / "online_cuda.json").write_text(
        json.dumps({"device": "FakeGPU", "steps": 3, "setups": {"resnet18": setup}}))
    table, long = table4(tmp_path)
    ghost = next(r for r in table.rows if r[0] == "ours: FakeGPU" and r[2] == "Ghost")
    assert ghost[3] == "17.00 (×1.70)" and ghost[4] == "170 (×1.70)"
    paper_ghost = next(r for r in table.rows if r[0] == "paper" and r[1] == "CIFAR-10N"
                       and r[2] == "Ghost")
    assert paper_ghost[3] == "209.13 (×3.65)"
    assert not any("1.3B" in n for n in table.notes)  # no GPT-Neo rows in that run


def test_table4_names_the_model_that_ran(tmp_path):
    """A bench JSON with the model record puts its parameter count in the Setting column; a
    GPU run from before that record, with GPT-Neo rows, gets the note that those rows were the
    1.3B shape."""
    (tmp_path / "bench").mkdir()
    row = {"gflop": 1.0, "gflop_ratio": 1.0, "peak_mem_mb": 10.0, "mem_ratio": 1.0,
           "time_ratio": 1.0, "batch": 8}
    model = {"class": "GPTNeoForCausalLM", "params": 125_198_592, "hidden_size": 768}
    (tmp_path / "bench" / "online_cpu.json").write_text(json.dumps(
        {"device": "cpu (x86_64, 2 threads)", "size": "tiny", "steps": 2,
         "setups": {"gpt_neo": {"vanilla": {**row, "model": model}}}}))
    table, _ = table4(tmp_path)
    ours = next(r for r in table.rows if r[0].startswith("ours: cpu"))
    assert ours[1] == "GPT-Neo causal LM (125.2M params, batch 8)"
    assert not any("1.3B" in n for n in table.notes)
    # another size's file is read too, after the default ones; small counts in thousands
    tiny = {"class": "BertForSequenceClassification", "params": 43_604}
    (tmp_path / "bench" / "online_cpu_small.json").write_text(json.dumps(
        {"device": "cpu (small)", "size": "small", "steps": 2,
         "setups": {"bert": {"vanilla": {**row, "model": tiny}}}}))
    table, _ = table4(tmp_path)
    ours = [r for r in table.rows if r[0].startswith("ours")]
    assert [r[0] for r in ours] == ["ours: cpu (x86_64, 2 threads)", "ours: cpu (small)"]
    assert ours[1][1] == "BERT classifier (43.6k params, batch 8)"
    (tmp_path / "bench" / "online_cuda.json").write_text(json.dumps(
        {"device": "NVIDIA H100", "steps": 2, "setups": {"gpt_neo": {"vanilla": row}}}))
    table, _ = table4(tmp_path)
    old_gpu = next(r for r in table.rows if r[0] == "ours: NVIDIA H100")
    assert old_gpu[1] == "GPT-Neo causal LM (batch 8)"
    note = next(n for n in table.notes if "1.3B" in n)
    assert "NVIDIA H100 run" in note and "0.0 TFLOP per batch of 8" in note  # read from the file


def test_table4_notes_gpu_busy_share_and_counts_taken_without_autocast(tmp_path):
    """A GPU run's JSON with ``gpu_busy_ms`` gets a note of the GPU's busy share of a
    vanilla step; a row whose FLOPs were counted with autocast off (``count_notes``) is named;
    a row with no GFLOP prints n/a; two files of one device give one speed note."""
    (tmp_path / "bench").mkdir()
    base = {"gflop": 10.0, "gflop_ratio": 1.0, "peak_mem_mb": 10.0, "mem_ratio": 1.0,
            "time_ratio": 1.0, "batch": 8, "step_ms": 20.0, "gpu_busy_ms": 5.0}
    rows = {"vanilla": base,
            "ghost": {**base, "count_notes": {"gflop": "counted with autocast off (...)"}},
            "lai": {**base, "gflop": None, "gflop_ratio": None}}
    speed = {"precision": "bf16", "channels_last": "auto", "compile": False}
    for name in ("online_cuda.json", "online_cuda_small.json"):
        (tmp_path / "bench" / name).write_text(json.dumps(
            {"device": "FakeGPU", "steps": 2, "size": "full", "speed": speed,
             "setups": {"resnet18": rows}}))
    table, long = table4(tmp_path)
    busy = [n for n in table.notes if "busy" in n]
    assert len(busy) == 1 and "ResNet-18 / CIFAR shape 25%" in busy[0]
    assert sum("precision bf16" in n for n in table.notes) == 1
    assert any("resnet18/ghost were counted" in n and "autocast off" in n for n in table.notes)
    lai = next(r for r in table.rows if r[0] == "ours: FakeGPU" and r[2] == "LAI")
    assert lai[3] == "n/a"
    assert long[(long.row == "resnet18/lai") & (long.column == "gflop")]["mean"].isna().all()
    # a run without these fields (CPU, or older JSON) gets none of these notes
    (tmp_path / "bench" / "online_cuda_small.json").unlink()
    (tmp_path / "bench" / "online_cuda.json").write_text(json.dumps(
        {"device": "FakeGPU", "steps": 2, "setups": {"resnet18": {"vanilla": {
            k: v for k, v in base.items() if k != "gpu_busy_ms"}}}}))
    table, _ = table4(tmp_path)
    assert not any("busy" in n or "precision" in n for n in table.notes)


def test_renderers_write_three_formats(tmp_path):
    t = Table("T: a_b & 50%", ["m", "x ± y"], [["LAI", "1.00 ± 0.10"]], ["† note"])
    assert "| LAI | 1.00 ± 0.10 |" in to_markdown(t)
    tex = to_latex(t)
    assert r"a\_b \& 50\%" in tex and r"$\pm$" in tex and r"\begin{tabular}{lr}" in tex
    paths = write_table(t, tmp_path / "t")
    assert [p.suffix for p in paths] == [".md", ".tex", ".csv"]
    assert all(p.stat().st_size > 0 for p in paths)


def test_make_tables_without_records_writes_tables_and_says_what_is_missing(tmp_path, capsys):
    assert make_tables.main(["--results", str(tmp_path)]) == 0
    for n in (1, 2, 3, 4):
        for ext in ("md", "tex", "csv"):
            assert (tmp_path / "tables" / f"table{n}.{ext}").is_file()
    err = capsys.readouterr().err
    assert "fig1" in err and "fig2" in err
    assert make_tables.main(["--results", str(tmp_path), "--only", "table9"]) == 2


def test_make_tables_on_the_committed_results_writes_every_table_and_figure(tmp_path):
    committed = ROOT / "results"
    needed = [committed / "reduced" / a
              for a in ("table1", "table2", "table3", "fig1", "fig2", "detection")]
    if not all(p.is_dir() for p in needed):
        pytest.skip("the reduced-scale results are not committed in this checkout")
    shutil.copytree(committed, tmp_path / "results",
                    ignore=shutil.ignore_patterns("tables", "figures"))
    assert make_tables.main(["--results", str(tmp_path / "results")]) == 0
    files = [tmp_path / "results" / "tables" / f"table{n}.{e}"
             for n in ("1", "2", "3", "3_evidence", "3_pooled", "4")
             for e in ("md", "tex", "csv")]
    files += [tmp_path / "results" / "figures" / f"{n}.{e}"
              for n in ("fig1", "fig2", "detection") for e in ("png", "pdf")]
    assert all(f.is_file() and f.stat().st_size > 0 for f in files)
    table3_md = files[6].read_text()
    assert "reduced scale" in table3_md and "85.36 ± 0.18" in table3_md
    assert "Random drop (matched to LAI)" in files[9].read_text()  # the evidence table


def test_load_runs_of_an_empty_folder(tmp_path):
    assert load_runs(tmp_path).empty


def test_a_rerun_replaces_the_older_record_of_the_same_job(tmp_path):
    import os
    import time as _time
    old = fake_run(tmp_path, "table3", "emotion_n", "lai", 0, final_test_acc=0.2)
    new = tmp_path / "reduced" / "table3" / "emotion_n" / "lai" / "y-s0"
    shutil.copytree(old, new)
    summary = json.loads((new / "summary.json").read_text())
    (new / "summary.json").write_text(json.dumps({**summary, "final_test_acc": 0.6}))
    past = _time.time() - 100
    os.utime(old / "summary.json", (past, past))
    failed = fake_run(tmp_path, "table3", "emotion_n", "lai", 1, status="failed", error="x")
    failed.rename(failed.parent / "f-s1")  # a failed try, then a completed run of the job
    fake_run(tmp_path, "table3", "emotion_n", "lai", 1, final_test_acc=0.4)
    df, _ = find_artifact_runs(tmp_path, "table3")
    got = sorted(zip(df["seed"], df["final_test_acc"], df["status"]))
    assert got == [(0, 0.6, "completed"), (1, 0.4, "completed")]


def test_table3_evidence_pairs_by_seed_and_shows_the_control(tmp_path):
    """Paired differences are per seed (not differences of means), controls sit under their
    method, and the detection columns come from the records."""
    accs = {"vanilla": [0.30, 0.40, 0.35], "lai": [0.33, 0.41, 0.34],
            "random-lai": [0.32, 0.42, 0.30], "ip": [0.20, 0.25, 0.22]}
    for method, values in accs.items():
        for seed, acc in enumerate(values):
            extra = {"noisy_auc": 0.6 + seed / 100, "drop_precision": 0.5,
                     "drop_recall": 0.4, "kept_fraction": 0.7} if method == "lai" else {}
            if method == "vanilla":
                extra = {"history": [{"train_loss_noisy": 0.1 * (seed + 1),
                                      "train_loss_clean": 0.01}], "train_noise_rate": 0.4}
            fake_run(tmp_path, "table3", "cifar10n_worst", method, seed, final_test_acc=acc,
                     **extra)
    table, long = table3_evidence(tmp_path)
    rows = {r[1]: r for r in table.rows}
    lai = rows["LAI"]
    h = table.header
    assert lai[h.index("Δ vs Vanilla (seeds won)")] == "+1.00 ± 2.00 (2/3)"  # +3, +1, -1
    assert lai[h.index("Δ vs its random control (seeds won)")] == "+1.33 ± 2.52 (2/3)"  # +1, -1, +4
    assert lai[h.index("noisy AUC")] == "0.610 ± 0.010"
    assert lai[h.index("kept %")] == "70.0 ± 0.0"
    ctl = rows["Random drop (matched to LAI)"]
    assert ctl[h.index("Δ vs its random control (seeds won)")] == "-"
    assert rows["IP"][h.index("Δ vs Vanilla (seeds won)")] == "-12.67 ± 2.52 (0/3)"  # -10, -15, -13
    order = [r[1] for r in table.rows]
    assert order.index("Random drop (matched to LAI)") == order.index("LAI") + 1
    assert any("0.200 on the noisy labels, 0.010 on the clean" in n for n in table.notes)
    diff = long[(long.row == "lai") & (long.column == "cifar10n_worst/vs_control")]
    assert diff["mean"].item() == pytest.approx(4 / 3)
    main, _ = table3(tmp_path)
    names = [r[0] for r in main.rows]
    assert names.index("Random drop (matched to LAI)") == names.index("LAI") + 1
    assert "Random drop (matched to Ghost)" not in names  # no records: no row


def test_table3_evidence_shows_warmup_variants_with_their_controls(tmp_path):
    for method, acc in (("vanilla", 0.30), ("lai", 0.32), ("lai-w3", 0.35),
                        ("random-lai-w3", 0.31)):
        fake_run(tmp_path, "table3", "cifar10n_worst", method, 0, final_test_acc=acc)
    table, _ = table3_evidence(tmp_path)
    names = [r[1] for r in table.rows]
    assert names == ["Vanilla", "LAI", "LAI (after 3 vanilla epochs)",
                     "Random drop (matched to LAI (after 3 vanilla epochs))"]
    h = table.header.index("Δ vs its random control (seeds won)")
    assert table.rows[2][h] == "+4.00 (1/1)"
    main, _ = table3(tmp_path)
    assert not any("vanilla epochs" in r[0] for r in main.rows)  # variants: evidence only


def test_table3_pooled_pairs_over_sets_and_seeds_with_hand_computed_tests(tmp_path):
    """Pairs are (set, seed) with both runs; a text set is left out; the t-test and sign test
    p-values are those of the differences worked out by hand."""
    from scipy import stats

    from lai.artifacts.table3 import table3_pooled
    accs = {("cifar10n_worst", "vanilla"): [0.30, 0.40, 0.35],
            ("cifar10n_worst", "lai"): [0.33, 0.41, 0.34],
            ("cifar10n_worst", "random-lai"): [0.32, 0.42, 0.30],
            ("cifar10n_aggre", "vanilla"): [0.50, 0.52],
            ("cifar10n_aggre", "lai"): [0.55, 0.53],
            ("cifar10n_aggre", "random-lai"): [0.50],  # seed 1 missing: no pair
            ("emotion_n", "vanilla"): [0.3], ("emotion_n", "lai"): [0.9]}  # not pooled
    for (ds, method), values in accs.items():
        for seed, acc in enumerate(values):
            fake_run(tmp_path, "table3", ds, method, seed, final_test_acc=acc)
    table, long = table3_pooled(tmp_path)
    rows = {r[0]: r for r in table.rows}
    vs_vanilla = [5.0, 1.0, 3.0, 1.0, -1.0]  # aggre s0, s1; worst s0, s1, s2 (points)
    p_t = stats.ttest_1samp(vs_vanilla, 0.0).pvalue
    p_sign = stats.binomtest(4, 5).pvalue
    assert rows["LAI"][1] == f"+1.80 ± 2.28 (4/5; p={p_t:.3f}, {p_sign:.3f})"
    vs_control = [5.0, 1.0, -1.0, 4.0]
    got = long[(long.row == "lai") & (long.column == "vs_control")].iloc[0]
    assert got["n"] == 4 and got["mean"] == pytest.approx(sum(vs_control) / 4)
    assert got["p_t"] == pytest.approx(stats.ttest_1samp(vs_control, 0.0).pvalue)
    assert rows["Random drop (matched to LAI)"][2] == "-"
    assert "Vanilla" not in rows
    assert "CIFAR-10N-a, CIFAR-10N-w" in table.notes[1] and "Emotion" not in table.notes[1]
