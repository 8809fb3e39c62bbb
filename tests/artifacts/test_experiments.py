"""experiments/*.yaml: every sweep's every job composes into a valid config, and the runner
builds the commands it says it runs."""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lai.config import validate
from tests.conftest import compose_cfg

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import make_tables  # noqa: E402
import run_experiment  # noqa: E402

ARTIFACTS = ["detection", "fig1", "fig2", "table1", "table2", "table3", "table3_text", "table4"]


def expand(overrides: list[str]) -> list[list[str]]:
    """The jobs of a Hydra multirun: every combination of comma-separated values (values in
    [...] are lists, not sweeps)."""
    choices = []
    for o in overrides:
        key, val = o.split("=", 1)
        vals = [val] if val.startswith("[") else val.split(",")
        if key == "seed":  # seeds never change whether a job composes: check one
            vals = vals[:1]
        choices.append([f"{key}={v}" for v in vals])
    return [list(c) for c in itertools.product(*choices)]


def test_every_artifact_has_both_scales():
    assert run_experiment.available() == ARTIFACTS
    for name in ARTIFACTS:
        spec = OmegaConf.load(ROOT / "experiments" / f"{name}.yaml")
        assert {"paper", "reduced"} <= set(spec.scales), name


@pytest.mark.parametrize("artifact", ARTIFACTS)
@pytest.mark.parametrize("scale", ["paper", "reduced", "paper_code", "reduced_warmup"])
def test_every_job_composes_and_validates(artifact, scale):
    spec = OmegaConf.to_container(OmegaConf.load(ROOT / "experiments" / f"{artifact}.yaml"))
    if scale not in spec["scales"]:
        pytest.skip(f"{artifact} has no {scale} scale")
    assert set(spec["scales"]) <= {"paper", "reduced", "paper_code", "reduced_warmup"}
    for sweep in spec["scales"][scale]["sweeps"]:
        if "command" in sweep:
            assert (ROOT / sweep["command"][1]).is_file()
            continue
        for job in expand(sweep["overrides"]):
            cfg = compose_cfg(*job, f"results_dir={spec['scales'][scale]['results_dir']}")
            validate(cfg)  # raises ConfigError on a bad combination
            for o in job:  # the command line wins over the dataset file's picks
                key, val = o.split("=", 1)
                if key == "model":
                    assert cfg.model.name in val or val.startswith(cfg.model.name)


def test_commands_carry_results_dir_and_launcher():
    cmds = run_experiment.sweep_commands("table3", "paper", launcher="submitit_slurm",
                                         extra=["device=cuda"])
    assert len(cmds) == 2  # the methods, then their random controls
    cmd = cmds[0]
    assert cmd[1:3] == ["run.py", "--multirun"]
    assert "results_dir=results/paper/table3" in cmd
    assert "hydra/launcher=submitit_slurm" in cmd and cmd[-1] == "device=cuda"
    fig1 = run_experiment.sweep_commands("fig1", "reduced")[0]
    assert fig1[1] == "scripts/fidelity.py"


def test_unknown_artifact_and_scale_are_clear_errors(capsys):
    assert run_experiment.main(["table9"]) == 2
    assert "unknown artifact 'table9'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no scale 'huge'"):
        run_experiment.sweep_commands("table3", "huge")


def test_dry_run_prints_without_running(capsys):
    assert run_experiment.main(["fig2", "--scale", "reduced", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "run.py --multirun dataset=cifar10n_worst estimator=lai save_scores=true" in out


def test_readme_table3_block_is_replaced(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{make_tables.README_START}\nold\n{make_tables.README_END}\nend\n")
    table = tmp_path / "table3.md"
    table.write_text("### Table 3: x\n\n| a |\n")
    assert make_tables.update_readme(readme, table)
    text = readme.read_text()
    assert "old" not in text and "#### Table 3: x" in text and text.endswith("end\n")
    assert not make_tables.update_readme(readme, table)  # unchanged the second time
