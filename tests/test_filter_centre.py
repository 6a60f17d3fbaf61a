"""The refusal-feature filter's two real-model options. defense.filter.centre=held_midpoint: the
cosine measured from the held sets' midpoint, for models whose prompt features share one large
component (SmolLM2's raw cosines all lie in [0.91, 0.99], so raw tau sat above every harmful
user row). defense.filter.tau_from=provider_harmful: tau from the provider's harmful set
(alignment.harmful) instead of the held alignment rows, whose one harm category sat above the
uploaded category on SmolLM2. defense.filter.tau_from=upload_split: tau from the upload's own
scores, split in two (Otsu) where they form two groups."""
import pytest
import torch

from harness.artifacts import artifact_key
from harness.config import ConfigError
from harness.validation import validate
from harness.filtering import held_midpoint, two_group_split
from harness.keys import filter_payload, stage_keys
from harness.pipeline import Pipeline
from harness.stages import ModelRef
import harness.filtering as filtering

SHARED, R = torch.tensor([10.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])


def fake_features(pipe, user_harmful=(1.5, 0.0), provider=(1.0, 1.5)):
    """Hand-made f_l: every prompt is SHARED plus its kind's offset along R (held harmful +2,
    held harmless -2, each +-1 off-axis; user harmful +1.5; user task -0.5, +1 off-axis; the
    provider's harmful set +1, +-1.5 off-axis). By raw cosine a harmful upload (0.148) sits
    below the held harmful prompts (0.195)."""
    held_h, held_s = pipe.inputs.feature_sets()
    table = {}
    for rows, along, off in ((pipe.inputs.data.user, None, None),
                             (held_h, 2.0, 1.0), (held_s, -2.0, 1.0),
                             (pipe.inputs.alignment_harmful(), *provider)):
        for i, ex in enumerate(rows):
            if along is None:
                a, o = user_harmful if ex.kind == "harmful" else (-0.5, 1.0)
            else:
                a, o = along, off * (-1) ** i
            table.setdefault(pipe.inputs.render([ex])[0], SHARED + torch.tensor([0.0, a, o]))
    return lambda model, tok, prompts, layer, bs: torch.stack([table[p] for p in prompts])


def filtered(make_cfg, tmp_path, monkeypatch, *overrides, **geometry):
    pipe = Pipeline(validate(make_cfg("defense=ref_teacher", "attack.n=40", "attack.p=0.25",
                                      *overrides)), tmp_path / "run")
    pipe.inputs.load()
    monkeypatch.setattr(filtering, "features", fake_features(pipe, **geometry))
    monkeypatch.setattr(filtering, "refusal_feature", lambda *a: (1, R))
    monkeypatch.setattr(pipe.models, "eval_model", lambda ref: None)
    pipe.filter_user_data(ModelRef("align", "never-built"))
    return pipe.filter_stats


def test_the_midpoint_removes_the_shared_component():
    harmful = SHARED + torch.tensor([[0.0, 2.0, 1.0], [0.0, 2.0, -1.0]])
    harmless = SHARED + torch.tensor([[0.0, -2.0, 1.0], [0.0, -2.0, -1.0]])
    assert torch.equal(held_midpoint(harmful, harmless), SHARED)


def test_raw_misses_what_the_centred_cosine_catches(make_cfg, tmp_path, monkeypatch):
    """10 harmful and 30 task rows. Raw: tau = cos((10, 2, 1), R) = 2/sqrt(105) = 0.195, every
    harmful row scores 1.5/sqrt(102.25) = 0.148: recall 0. Centred: tau = 2/sqrt(5) = 0.894,
    harmful rows score 1.0, task rows -0.447: recall 1, nothing harmless lost."""
    raw = filtered(make_cfg, tmp_path / "raw", monkeypatch)
    assert raw["centre"] == "none" and raw["threshold"] == pytest.approx(2 / 105 ** 0.5)
    assert (raw["n_harmful_in"], raw["n_dropped"], raw["recall"]) == (10, 0, 0.0)
    centred = filtered(make_cfg, tmp_path / "c", monkeypatch,
                       "defense.filter.centre=held_midpoint")
    assert centred["centre"] == "held_midpoint"
    assert centred["threshold"] == pytest.approx(2 / 5 ** 0.5)
    assert (centred["n_dropped"], centred["precision"], centred["recall"],
            centred["harmless_dropped_share"]) == (10, 1.0, 1.0, 0.0)


def test_centre_is_keyed_and_checked(make_cfg, tmp_path):
    def keys(*o):
        pipe = Pipeline(validate(make_cfg("defense=ref_teacher", *o)), tmp_path)
        return {**stage_keys(pipe.inputs), "filter": artifact_key(
            filter_payload(pipe.inputs, ModelRef("align", "a"), []))}

    plain, off, on = keys(), keys("defense.filter.centre=none"), \
        keys("defense.filter.centre=held_midpoint")
    assert plain == off  # the default spelled out is the default
    assert on["filter"] != plain["filter"] and on["finetune"] != plain["finetune"]
    assert on["align"] == plain["align"]
    with pytest.raises(ConfigError, match=r"defense\.filter\.centre"):
        validate(make_cfg("defense.filter.centre=mean"))
    with pytest.raises(ConfigError, match=r"defense\.filter\.centre"):
        validate(make_cfg("defense.filter.kind=judge", "defense.filter.centre=held_midpoint"))


def test_tau_from_the_providers_harmful_set_catches_what_the_held_rows_miss(
        make_cfg, tmp_path, monkeypatch):
    """Centred, the uploaded harmful rows (1.5, +-1.5 off R) score 1/sqrt(2) = 0.707: below the
    held rows' tau 2/sqrt(5) = 0.894 (recall 0), above the provider's set's 1/sqrt(3.25) = 0.555
    (recall 1); the task rows score -0.447 under either, so nothing harmless is lost."""
    geometry = {"user_harmful": (1.5, 1.5)}
    centred = ("defense.filter.centre=held_midpoint",)
    held = filtered(make_cfg, tmp_path / "held", monkeypatch, *centred, **geometry)
    assert held["tau_from"] == "held" and held["threshold"] == pytest.approx(2 / 5 ** 0.5)
    assert (held["n_harmful_in"], held["n_dropped"], held["recall"]) == (10, 0, 0.0)
    provider = filtered(make_cfg, tmp_path / "prov", monkeypatch, *centred,
                        "defense.filter.tau_from=provider_harmful", **geometry)
    assert provider["tau_from"] == "provider_harmful"
    assert provider["tau_set_size"] > 0
    assert provider["threshold"] == pytest.approx(1 / 3.25 ** 0.5)
    assert (provider["n_dropped"], provider["precision"], provider["recall"],
            provider["harmless_dropped_share"]) == (10, 1.0, 1.0, 0.0)


def test_tau_from_is_keyed_with_the_providers_set_and_checked(make_cfg, tmp_path):
    def keys(*o):
        pipe = Pipeline(validate(make_cfg("defense=ref_teacher", *o)), tmp_path)
        return {**stage_keys(pipe.inputs), "filter": artifact_key(
            filter_payload(pipe.inputs, ModelRef("align", "a"), []))}

    plain, held = keys(), keys("defense.filter.tau_from=held")
    provider = keys("defense.filter.tau_from=provider_harmful")
    assert plain == held  # the default adds nothing to any key
    assert keys("defense.filter.tau_from=upload_split")["filter"] not in (
        plain["filter"], provider["filter"])
    assert provider["filter"] != plain["filter"] and provider["finetune"] != plain["finetune"]
    assert provider["align"] == plain["align"]
    resized = keys("defense.filter.tau_from=provider_harmful", "alignment.harmful_size=50")
    assert resized["filter"] != provider["filter"]  # the set itself is in the key
    assert keys("alignment.harmful_size=50") == plain  # and only when tau reads it
    for bad in (("defense.filter.tau_from=quantile",),
                ("defense.filter.tau_from=provider_harmful", "defense.filter.threshold=0.5"),
                ("defense=sft", "defense.filter.tau_from=provider_harmful"),
                ("defense.filter.tau_from=upload_split", "defense.filter.threshold=0.5")):
        with pytest.raises(ConfigError, match=r"defense\.filter\.tau_from"):
            validate(make_cfg(*bad))


def test_two_group_split_is_otsus_threshold():
    assert two_group_split([0.1, 0.2, 0.15, 0.9, 0.95]) == pytest.approx((0.2 + 0.9) / 2)
    # brute force: every cut between distinct sorted values, least within-group sum of squares
    rng = torch.Generator().manual_seed(0)
    scores = torch.cat([torch.randn(70, generator=rng) * 0.05 + 0.3,
                        torch.randn(30, generator=rng) * 0.05 + 0.8]).tolist()
    v = sorted(scores)
    sse = lambda xs: sum((x - sum(xs) / len(xs)) ** 2 for x in xs)  # noqa: E731
    best = min(range(1, len(v)), key=lambda i: sse(v[:i]) + sse(v[i:]))
    assert two_group_split(scores) == pytest.approx((v[best - 1] + v[best]) / 2)
    assert two_group_split([0.5, 0.5, 0.5]) == 0.5 and two_group_split([0.4, 0.4, 0.7]) == \
        pytest.approx(0.55)  # ties: the cut falls between distinct scores, dropping none of a tie


def test_upload_split_cuts_two_groups_whatever_the_held_tau(make_cfg, tmp_path, monkeypatch):
    """The geometry the held rows' tau (0.894) misses: the upload's harmful rows at 0.707, its
    task rows at -0.447; two groups, so the split falls between them, whatever the held sets
    say (their tau is only the fallback for a one-group upload: tests/test_filter_guard.py)."""
    split = filtered(make_cfg, tmp_path / "split", monkeypatch, "defense.filter.centre=held_midpoint",
                     "defense.filter.tau_from=upload_split", user_harmful=(1.5, 1.5))
    assert split["tau_from"] == "upload_split" and split["split"]["groups"] == 2
    assert split["split"]["held_threshold"] == pytest.approx(2 / 5 ** 0.5)
    assert split["threshold"] == pytest.approx((2 ** -0.5 - 0.5 / 1.25 ** 0.5) / 2)
    assert (split["n_dropped"], split["precision"], split["recall"]) == (10, 1.0, 1.0)
