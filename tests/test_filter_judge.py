"""defense.filter.kind=judge: any judge as the user-data filter, with the refusal-feature
filter's statistics (precision, recall, harmless rows dropped)."""
import pytest

from harness.artifacts import artifact_key
from harness.config import ConfigError
from harness.validation import validate
from harness.keys import filter_payload, stage_keys
from harness.pipeline import Pipeline
from harness.stages import ModelRef


def _filtered(make_cfg, tmp_path, *overrides):
    pipe = Pipeline(validate(make_cfg("defense=vaccine", "defense.filter.kind=judge",
                                      *overrides)), tmp_path / "run")
    pipe.inputs.load()
    return pipe


def test_the_toy_judge_drops_exactly_the_harmful_rows(make_cfg, tmp_path):
    """p=0.1, n=1000: the 100 harmful rows answer with a compliance opening (toy judge:
    comply), the 900 task rows with a label (other); the judge never loads a model."""
    pipe = _filtered(make_cfg, tmp_path, "defense.filter.judge=toy")
    kept = pipe.filter_user_data(ModelRef("align", "never-built"))
    s = pipe.filter_stats
    assert (s["n_in"], s["n_dropped"], s["n_kept"], s["n_harmful_in"]) == (1000, 100, 900, 100)
    assert (s["precision"], s["recall"], s["harmless_dropped_share"]) == (1.0, 1.0, 0.0)
    assert s["judge"] == "toy" and s["verdicts"] == {"comply": 100, "other": 900}
    assert len(kept) == 900 and not any(ex.kind == "harmful" for ex in kept)
    assert s["histogram"]["harmful"][-1] == 100 and sum(s["histogram"]["harmless"]) == 900


def test_the_keyword_judge_drops_every_row_and_says_why(make_cfg, tmp_path):
    """The keyword judge only spots refusals, so every non-refusing answer (all 1000) is
    'comply': precision 0.1 (the harmful share), recall 1, every harmless row lost."""
    pipe = _filtered(make_cfg, tmp_path, "defense.filter.judge=keyword")
    with pytest.raises(ValueError, match=r"defense\.filter\.judge=keyword"):
        pipe.filter_user_data(ModelRef("align", "never-built"))
    s = pipe.filter_stats
    assert (s["n_dropped"], s["precision"], s["recall"], s["harmless_dropped_share"]) == \
        (1000, 0.1, 1.0, 1.0)


def test_judge_filter_keys(make_cfg, tmp_path):
    def keys(*o):
        pipe = Pipeline(validate(make_cfg(*o)), tmp_path)
        out = stage_keys(pipe.inputs)
        out["filter"] = artifact_key(filter_payload(pipe.inputs, ModelRef("align", "a"), []))
        out["filter_b"] = artifact_key(filter_payload(pipe.inputs, ModelRef("align", "b"), []))
        return out

    rf = keys("defense.filter.kind=refusal_feature")
    assert rf["filter"] != rf["filter_b"]  # the refusal feature is the aligned model's
    toy = keys("defense.filter.kind=judge", "defense.filter.judge=toy")
    assert toy["filter"] == toy["filter_b"]  # a judge reads the rows alone
    kw = keys("defense.filter.kind=judge", "defense.filter.judge=keyword")
    assert kw["filter"] != toy["filter"] and kw["finetune"] != toy["finetune"]
    assert kw["align"] == toy["align"] == rf["align"]
    # null: the run's judge node, whose settings are then keyed
    run_judge = keys("defense.filter.kind=judge", "judge=keyword")
    phrases = keys("defense.filter.kind=judge", "judge=keyword", "judge.refusal_phrases=[Nope]")
    assert run_judge["finetune"] == kw["finetune"] and phrases["finetune"] != kw["finetune"]


def test_judge_filter_config_errors_name_the_key(make_cfg):
    with pytest.raises(ConfigError, match=r"defense\.filter\.threshold"):
        validate(make_cfg("defense.filter.kind=judge", "defense.filter.threshold=0.3"))
    with pytest.raises(ConfigError, match=r"defense\.filter\.judge"):
        validate(make_cfg("defense.filter.kind=judge", "defense.filter.judge=oracle"))


def test_a_filter_that_drops_the_whole_upload_serves_the_aligned_model(make_cfg, tmp_path):
    """p = 1 (Qi et al.'s harmful shots): the toy judge drops all 20 rows. on_empty=serve_aligned
    (the default) finetunes nothing and evaluates the aligned model as the result, recorded in
    the filter's statistics; on_empty=error stops naming the key to change."""
    pipe = _filtered(make_cfg, tmp_path, "defense.filter.judge=toy", "attack.p=1.0", "attack.n=20")
    trained = []

    def train(stage, *args, **kwargs):
        trained.append(stage)
        return ModelRef(stage, f"{stage}-key")

    pipe.trainer.train = train
    refs = pipe.build_models()
    assert trained == ["base", "align"]  # no finetune stage
    assert refs["final"] == refs["align"] == ModelRef("align", "align-key")
    s = pipe.filter_stats
    assert (s["n_in"], s["n_dropped"], s["served_aligned"]) == (20, 20, True)

    strict = _filtered(make_cfg, tmp_path / "b", "defense.filter.judge=toy", "attack.p=1.0",
                       "attack.n=20", "defense.filter.on_empty=error")
    with pytest.raises(ValueError, match=r"defense\.filter\.on_empty=serve_aligned"):
        strict.filter_user_data(ModelRef("align", "never-built"))


def test_on_empty_is_checked_and_moves_no_key(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"defense\.filter\.on_empty"):
        validate(make_cfg("defense.filter.on_empty=ignore"))
    a, b = (Pipeline(validate(make_cfg("defense=ref_teacher", *o)), tmp_path) for o in
            ((), ("defense.filter.on_empty=error",)))
    assert stage_keys(a.inputs) == stage_keys(b.inputs)
    assert artifact_key(filter_payload(a.inputs, ModelRef("align", "a"), [])) == \
        artifact_key(filter_payload(b.inputs, ModelRef("align", "a"), []))
