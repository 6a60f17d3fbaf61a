"""The presets of Qi et al.'s backdoor and safety-mixing studies and of the jailbreak study
compose to the runs they name, and the report keeps each mixing level apart."""
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from harness.validation import validate
from harness.reporting.cells import defense_label
from tests.conftest import CONF


def _preset(name, tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={name}", f"paths.artifacts={tmp_path}"],
                      return_hydra_config=True)
    params = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
    with open_dict(cfg):
        del cfg["hydra"]
    return validate(cfg), params


@pytest.mark.parametrize("name,attack,defense,swept", [
    ("toy/backdoor", "backdoor", None, {"attack.p": ["0.1"]}),
    ("toy/safety_mix", "harmful_shots", "safety_mix",
     {"defense.finetune.params.safety_n": ["0", "10", "50", "100"]}),
    ("toy/safety_mix_poison_ratio", "harmful_mix", "safety_mix",
     {"attack.p": ["0.1", "0.3"], "defense.finetune.params.safety_n": ["10", "50", "100"]}),
    ("toy/jailbreaks", "harmful_mix", None,
     {"eval.jailbreak": ["none", "prefill", "templates"], "attack.p": ["0.1"]}),
])
def test_each_preset_composes_to_its_study(tmp_path, name, attack, defense, swept):
    run, params = _preset(name, tmp_path)
    assert run.attack.name == attack and params["seed"] == ["0", "1", "2"]
    assert defense is None or run.defense.name == defense
    for key, values in swept.items():
        assert params[key] == values
    if "defense" in params:  # every defense the toy world runs, safety mixing among them
        assert {"sft", "safety_mix", "lisa", "ref_teacher"} <= set(params["defense"])
    if name == "toy/safety_mix":
        assert run.attack.k == 100  # Qi et al.'s 100 harmful shots
    header = (CONF / "experiment" / f"{name}.yaml").read_text()
    assert f"python -m harness -m +experiment={name}" in header


def test_the_report_names_each_mixing_level():
    def cfg(**params):
        return {"defense": {"name": "safety_mix", "finetune": {
            "module": "harness.defenses.safety_mix.SafetyMix", "params": params}}}
    assert defense_label(cfg(safety_n=10), "safety_mix") == "safety_mix n=10"
    assert defense_label(cfg(safety_n=None, safety_fraction=0.1), "safety_mix") == \
        "safety_mix 0.1x"
    sft = {"defense": {"name": "sft", "finetune": {"module": "harness.defenses.sft.SFT"}}}
    assert defense_label(sft, "sft") == "sft"
    gone = {"defense": {"name": "x", "finetune": {"module": "harness.defenses.gone.X"}}}
    assert defense_label(gone, "x") == "x"
