"""scripts/check_architectures.py's checks, one test per architecture (tiny random configs,
float64, eval): Ghost's forward form equals brute-force per-sample gradients; the probe form,
where it runs, equals the forward form; LAI's folded and pairwise caches agree, or LAI
refuses with its clear error for layers whose rows are not per sample."""
from __future__ import annotations

import pytest

from tests.conftest import load_script

arch = load_script("check_architectures")

# the probe form must apply to these (closed-form probes, the replay probe for Hugging Face
# RMSNorm classes and OPT's position embedding, a custom Function in BLOOM)
PROBE_APPLIES = {"gpt2_lm", "gpt_neo_lm", "llama_lm", "mistral_lm", "qwen2_cls", "opt_lm",
                 "bloom_lm", "falcon_lm", "bert_cls", "bart_cls", "resnet18_tv"}


@pytest.mark.parametrize("name", sorted(arch.ARCHITECTURES))
def test_architecture(name):
    row = arch.check(name)
    if not row["available"]:
        pytest.skip(f"{name} is not in the installed transformers")
    assert row["ghost_error"] is None, row["ghost_error"]
    assert row["ghost"] < arch.EXACT
    if row["probe"] is not None:
        assert row["probe"] < arch.EXACT
    else:
        assert name not in PROBE_APPLIES, row["probe_note"]
        assert "auto uses forward" in row["probe_note"]
    if row["lai"] is not None:
        assert row["lai"] < 1e-10
    else:
        assert "cannot be attributed to samples" in row["lai_error"], row["lai_error"]


def test_report_names_every_architecture(tmp_path):
    assert arch.main(["--only", "gpt2_lm,resnet18_tv", "--out", str(tmp_path)]) == 0
    import json

    report = json.loads((tmp_path / "architectures_subset.json").read_text())
    assert [r["arch"] for r in report["rows"]] == ["gpt2_lm", "resnet18_tv"]
    assert report["torch"] and report["exact_below"] == arch.EXACT
    with pytest.raises(SystemExit):
        arch.main(["--only", "no_such_model"])
