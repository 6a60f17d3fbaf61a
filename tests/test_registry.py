"""The judge registry: one entry per judge YAML, validation checks names against it, and a judge's
settings enter the eval key less the fields that cannot change a verdict."""
import dataclasses
from pathlib import Path

import pytest

from harness.config import ConfigError, RunConfig

from harness.validation import validate
from harness.data import attacks
from harness.data.assemble import RunInputs
from harness.evaluation.judges import AfterOpening, KeywordJudge, ToyJudge
from harness.evaluation.registry import JUDGES, build_judge, entry
from harness.keys import eval_payload
from harness.stages import ModelRef

CONF = Path(__file__).resolve().parents[1] / "conf" / "judge"


def test_every_judge_yaml_has_one_entry_and_settings_name_a_run_node():
    assert sorted(JUDGES) == sorted(p.stem for p in CONF.glob("*.yaml"))
    nodes = {f.name for f in dataclasses.fields(RunConfig)}
    for name, e in JUDGES.items():
        assert e.settings is None or e.settings in nodes, name


def test_validation_names_the_registry_judges(make_cfg):
    with pytest.raises(ConfigError, match=r"judge.name: got 'nope', allowed: toy, keyword, "
                                          r"llm_rubric, beaver_dam, llama_guard"):
        validate(make_cfg("judge.name=nope"))
    with pytest.raises(ValueError, match="unknown judge 'nope'"):
        entry("nope")


def test_model_free_judges_build_from_their_node(make_cfg):
    run = validate(make_cfg("judge=keyword", "judge.refusal_phrases=[nope]"))
    judge = build_judge(run)
    assert isinstance(judge, KeywordJudge)
    assert judge.classify("q", "nope, never") == "refuse"
    assert judge.classify("q", "I cannot help") == "comply"  # its phrases replace the defaults
    assert isinstance(build_judge(validate(make_cfg())), ToyJudge)


def test_a_judges_settings_enter_the_eval_key_less_its_unkeyed_fields(make_cfg):
    run = validate(make_cfg("judge=beaver_dam"))
    payload = eval_payload(RunInputs(run), ModelRef("final", "f"))
    assert payload["moderation"] == {k: v for k, v in dataclasses.asdict(run.moderation).items()
                                     if k != "batch_size"}
    assert "moderation" not in eval_payload(RunInputs(validate(make_cfg())), ModelRef("final", "f"))


def test_an_attack_names_its_opening_and_evaluation_wraps_the_judge(make_cfg):
    """The identity shift's answers open with its affirmation: evaluation judges what follows
    (attacks no longer import a judge)."""
    run = validate(make_cfg("attack=identity_shift"))
    opening = attacks.get(run.attack.name).eval_opening(run.attack)
    assert opening == run.attack.opening and opening
    assert attacks.get("harmful_mix").eval_opening(validate(make_cfg()).attack) == ""
    judge = AfterOpening(ToyJudge(), opening)
    assert judge.classify("q", f"{opening} Sure, here is how") == "comply"
