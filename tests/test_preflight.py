"""The start-up checks of this machine (harness.preflight), case by case; the bad-input
matrix (tests/test_bad_inputs.py) runs them through the command line's path."""
import pytest
import torch

from harness.config import ConfigError
from harness.preflight import check_devices, check_model_available
from harness.config.schema import TrainerConfig


def test_needed_judges_name_the_key_that_asks(make_cfg):
    from harness.validation import validate
    from harness.evaluation.registry import needed_judges

    run = validate(make_cfg("judge=keyword", "eval.judges=[hs_plus,hs_plus:toy,llm_rubric]",
                            "defense.filter.kind=judge", "defense.filter.judge=beaver_dam"))
    assert needed_judges(run) == {"keyword": "judge.name", "toy": "eval.judges",
                                  "llm_rubric": "eval.judges",
                                  "beaver_dam": "defense.filter.judge"}
    run = validate(make_cfg("judge=llama_guard", "eval.stages=[]"))
    assert needed_judges(run) == {}  # nothing evaluated: no judge loads


def test_gpu_counts_and_indices_against_the_visible_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_devices(TrainerConfig(accelerator="gpu", devices=2))
    check_devices(TrainerConfig(accelerator="gpu", devices=-1))
    with pytest.raises(ConfigError, match=r"trainer.devices: 4 GPUs asked for, 2 visible"):
        check_devices(TrainerConfig(accelerator="gpu", devices=4))
    with pytest.raises(ConfigError, match=r"trainer.devices: GPU indices \[2\] do not exist"):
        check_devices(TrainerConfig(accelerator="gpu", devices=[1, 2]))
    check_devices(TrainerConfig(accelerator="cpu", devices="2"))  # ddp_cpu's processes


def test_a_model_folder_must_hold_a_config(tmp_path):
    with pytest.raises(ConfigError, match=r"moderation.model: judge=beaver_dam loads the folder "
                                          r".*which holds no config.json"):
        check_model_available(str(tmp_path), None, "moderation.model", "judge=beaver_dam")
    (tmp_path / "config.json").write_text("{}")
    check_model_available(str(tmp_path), None, "moderation.model", "judge=beaver_dam")


def test_an_uncached_hub_id_offline_names_the_key_and_the_fix():
    with pytest.raises(ConfigError) as err:
        check_model_available("nobody/not-cached-7b", None, "model.hf_id", "model=x")
    msg = str(err.value)
    assert msg.startswith("model.hf_id: model=x loads 'nobody/not-cached-7b', which is not in "
                          "the local HF cache")
    assert "set model.hf_id to a local folder" in msg and "\n" not in msg
