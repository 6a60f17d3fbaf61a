"""defense=safety_mix (Qi et al.'s Table 4): refusal rows from the alignment data added to the
user's data before a plain finetune; their count as configured, their kind recognisable, the
key moved by every setting that changes the rows."""
import pytest

from harness.artifacts import artifact_key
from harness.config import ConfigError
from harness.validation import validate
from harness.data.mixing import refusal_pool
from harness.data.schema import SAFETY, Example
from harness.defenses.safety_mix import SafetyMix, safety_count
from harness.keys import stage_keys, stage_payloads
from harness.pipeline import Pipeline


def test_safety_count_is_n_or_the_fraction_of_the_upload_rounded():
    assert safety_count(1000, 50, None) == 50
    assert safety_count(1000, None, 0.1) == 100
    assert safety_count(90, None, 0.25) == 22  # 22.5 rounds to even
    assert safety_count(7, 0, None) == 0


def test_params_take_exactly_one_of_count_and_fraction():
    assert SafetyMix.Params().safety_n == 100
    with pytest.raises(ValueError, match="exactly one"):
        SafetyMix.Params(safety_n=10, safety_fraction=0.1)
    with pytest.raises(ValueError, match="exactly one"):
        SafetyMix.Params(safety_n=None)
    with pytest.raises(ValueError, match="safety_n must be >= 0"):
        SafetyMix.Params(safety_n=-1)


def test_mix_user_data_adds_the_configured_refusal_rows_marked_safety():
    user = [Example(f"task {i}", "pos", kind="task") for i in range(20)]
    pool = [Example(f"harm {i}", "I refuse.", kind="harmful") for i in range(30)]
    out = SafetyMix.mix_user_data(SafetyMix.Params(safety_n=7), user, pool, seed=0)
    added = [ex for ex in out if ex.kind == SAFETY]
    assert len(out) == 27 and len(added) == 7
    assert {ex.instruction for ex in out if ex.kind == "task"} == {ex.instruction for ex in user}
    assert all(ex.output == "I refuse." for ex in added)
    frac = SafetyMix.mix_user_data(SafetyMix.Params(safety_n=None, safety_fraction=0.5), user,
                                   pool, seed=0)
    assert sum(ex.kind == SAFETY for ex in frac) == 10
    with pytest.raises(ValueError, match="defense.finetune.params.safety_n=31"):
        SafetyMix.mix_user_data(SafetyMix.Params(safety_n=31), user, pool, seed=0)


def test_a_bad_param_fails_at_validation_naming_the_key(make_cfg):
    with pytest.raises(ConfigError, match="defense.finetune.params"):
        validate(make_cfg("defense=safety_mix", "defense.finetune.params.safety_fraction=0.1"))


def test_the_pipeline_mixes_alignment_refusals_into_the_finetune_rows(make_cfg, tmp_path,
                                                                      monkeypatch):
    """What reaches the finetune: the upload plus safety_n of the alignment data's refusal
    rows, none of them an evaluation prompt (the training itself is stubbed out)."""
    pipe = Pipeline(validate(make_cfg("defense=safety_mix", "attack.n=200",
                                      "defense.finetune.params.safety_n=30")), tmp_path)
    data = pipe.inputs.load()
    seen = {}

    def fake_train(stage, payload, start, method, train_cfg, rows):
        seen[stage] = rows
        return stage
    monkeypatch.setattr(pipe.trainer, "train", fake_train)
    pipe.build_models()
    rows = seen["finetune"]
    safety = [ex for ex in rows if ex.kind == SAFETY]
    assert len(rows) == 230 and len(safety) == 30
    assert sorted(map(repr, [ex for ex in rows if ex.kind != SAFETY])) == \
        sorted(map(repr, data.user))
    pool = {(ex.instruction, ex.output) for ex in refusal_pool(data.alignment)}
    assert {(ex.instruction, ex.output) for ex in safety} <= pool
    assert not {ex.instruction for ex in safety} & {ex.instruction for ex in data.eval_harmful}
    assert pipe.safety_mixed == 30


def test_safety_mix_settings_and_its_source_are_keyed(make_cfg, tmp_path):
    def keys(*o):
        return stage_keys(Pipeline(validate(make_cfg("defense=safety_mix", *o)), tmp_path).inputs)

    ref = keys()
    assert keys("defense.finetune.params.safety_n=10")["finetune"] != ref["finetune"]
    assert keys("defense.finetune.params.safety_n=10")["align"] == ref["align"]
    assert keys("defense.finetune.params.safety_n=null",
                "defense.finetune.params.safety_fraction=0.1")["finetune"] != ref["finetune"]
    sft = stage_keys(Pipeline(validate(make_cfg("defense=sft")), tmp_path).inputs)
    assert sft["align"] == ref["align"] and sft["finetune"] != ref["finetune"]
    # the refusal rows come from the alignment data: its source is in the finetune payload
    payload = stage_payloads(Pipeline(validate(make_cfg("defense=safety_mix")), tmp_path).inputs)["finetune"]
    assert payload["refusals"]["data"]["source"] == "toy"
    assert "align" in payload["world"]["data"]
    assert "refusals" not in stage_payloads(Pipeline(validate(make_cfg()), tmp_path).inputs)["finetune"]
    assert artifact_key(payload) == ref["finetune"]
