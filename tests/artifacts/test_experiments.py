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


def expand(params: dict) -> list[list[str]]:
    """The jobs of a Hydra multirun over ``hydra.sweeper.params``: every combination of
    comma-separated values (values in [...] are lists, not sweeps)."""
    choices = []
    for key, val in params.items():
        val = str(val)
        vals = [val] if val.startswith("[") else val.split(",")
        if key == "seed":  # seeds never change whether a job composes: check one
            vals = vals[:1]
        choices.append([f"{key}={v}" for v in vals])
    return [list(c) for c in itertools.product(*choices)]


def experiment_files() -> list[Path]:
    return sorted((ROOT / "conf" / "experiment").rglob("*.yaml"))


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
        name = sweep["experiment"]
        params = OmegaConf.load(ROOT / "conf" / "experiment" / f"{name}.yaml").hydra.sweeper.params
        for job in expand(OmegaConf.to_container(params)):
            cfg = compose_cfg(f"experiment={name}", *job)
            validate(cfg)  # raises ConfigError on a bad combination
            assert cfg.results_dir.startswith(f"results/{scale.split('_warmup')[0]}")
            for o in job:  # the sweep's choices win over the dataset file's picks
                key, val = o.split("=", 1)
                if key == "model":
                    assert cfg.model.name in val or val.startswith(cfg.model.name)


def test_every_experiment_config_is_listed_by_an_artifact():
    listed = set()
    for path in (ROOT / "experiments").glob("*.yaml"):
        for entry in OmegaConf.load(path).scales.values():
            listed |= {s.experiment for s in entry.sweeps if "experiment" in s}
    names = {p.relative_to(ROOT / "conf" / "experiment").with_suffix("").as_posix()
             for p in experiment_files()}
    assert names == listed


def test_an_interpolated_key_is_resolved_per_job(tmp_path):
    """``run_name: ${estimator.name}-w3`` sits in the experiment's body, not its sweep
    params (those are resolved once, in the parent process): each job gets its own."""
    cfg = compose_cfg("experiment=table3/reduced_warmup/methods", "estimator=lli")
    assert cfg.run_name == "lli-w3"


def test_commands_carry_results_dir_and_launcher():
    cmds = run_experiment.sweep_commands("table3", "paper", launcher="submitit_slurm",
                                         extra=["device=cuda"])
    assert len(cmds) == 2  # the methods, then their random controls
    cmd = cmds[0]
    assert cmd[1:4] == ["run.py", "--multirun", "experiment=table3/paper/methods"]
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
    assert "run.py --multirun experiment=fig2/reduced trainer.progress=false" in out


def test_readme_table3_block_is_replaced(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{make_tables.README_START}\nold\n{make_tables.README_END}\nend\n")
    table = tmp_path / "table3.md"
    table.write_text("### Table 3: x\n\n| a |\n")
    assert make_tables.update_readme(readme, table)
    text = readme.read_text()
    assert "old" not in text and "#### Table 3: x" in text and text.endswith("end\n")
    assert not make_tables.update_readme(readme, table)  # unchanged the second time
