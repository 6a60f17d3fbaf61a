"""The upload split's two-group guard (defense.filter.tau_from=upload_split): Otsu's cut is used
only where eta = sigma_B^2 / sigma_T^2 at the cut reaches defense.filter.split_min_eta and the
upper group is at most defense.filter.split_max_share of the upload; a one-group upload (no
harmful rows, or only harmful rows) and a cut through the harmless rows fall back to the held
quantile."""
import numpy as np
import pytest

from harness.artifacts import artifact_key
from harness.config import ConfigError
from harness.validation import validate
from harness import keys as keys_mod
from harness.filtering import split_separation, two_group_split, upload_split_tau
from harness.pipeline import Pipeline
from harness.stages import ModelRef
from tests.test_filter_centre import filtered


def test_eta_on_hand_checkable_scores():
    # two points apart: all variance between the groups
    assert split_separation([0.0, 0.0, 1.0, 1.0], 0.5) == 1.0
    # {0,1} | {2,3}: means 0.5, 2.5; between 1/2*1/2*2^2 = 1; total var 1.25
    assert split_separation([0.0, 1.0, 2.0, 3.0], 1.5) == pytest.approx(0.8)
    # {0} | {1,2}: between 1/3*2/3*1.5^2 = 0.5; total var 2/3
    assert split_separation([0.0, 1.0, 2.0], 0.5) == pytest.approx(0.75)
    assert split_separation([0.0, 1.0, 2.0], 5.0) == 0.0  # nothing above the cut
    assert split_separation([0.4, 0.4, 0.4], 0.4) == 0.0  # no variance


def test_eta_at_otsus_cut_tends_to_the_known_shape_values():
    """A normal sample cut at its mean: eta -> 2/pi = 0.637; a uniform one: 3/4 (quantiles, so
    no sampling noise: 20001 points)."""
    from scipy.stats import norm

    q = (np.arange(20001) + 0.5) / 20001
    for values, eta in ((norm.ppf(q), 2 / np.pi), (q, 0.75)):
        assert split_separation(values, two_group_split(values)) == pytest.approx(eta, abs=2e-3)


def _mixture(n_low, n_high, gap, seed=0):
    rng = np.random.default_rng(seed)
    return np.r_[rng.normal(0.0, 0.05, n_low), rng.normal(gap, 0.05, n_high)].tolist()


def test_one_group_drops_nothing_above_the_held_tau():
    """200 harmless rows (p = 0): eta 0.64, one group, so tau is the held one (above them all);
    Otsu's cut alone would have dropped about half of them."""
    scores = _mixture(200, 0, 0.0)
    tau, split = upload_split_tau(scores, 1.0, 0.8)
    assert split["groups"] == 1 and tau == 1.0
    assert split["eta"] == pytest.approx(0.64, abs=0.03)
    assert 0.4 < np.mean(np.array(scores) > split["split_threshold"]) < 0.6
    assert sum(s > tau for s in scores) == 0


def test_two_groups_drop_the_upper_group():
    """140 task rows around 0 and 60 harmful ones around 0.5 (10 sd apart): eta 0.98, the cut
    falls in the gap and drops exactly the upper group."""
    scores = _mixture(140, 60, 0.5)
    tau, split = upload_split_tau(scores, 1.0, 0.8)
    assert split["groups"] == 2 and tau == split["split_threshold"]
    assert split["eta"] > 0.95
    assert [s > tau for s in scores] == [False] * 140 + [True] * 60


def test_the_boundary_is_inclusive():
    """[0, 1, 2, 3]: Otsu cuts at 1.5 with eta exactly 0.8: two groups at min_eta 0.8,
    one just above it; min_eta 0 always cuts."""
    assert upload_split_tau([0.0, 1.0, 2.0, 3.0], 9.0, 0.8) == (1.5, pytest.approx(
        {"groups": 2, "eta": 0.8, "min_eta": 0.8, "upper_share": 0.5, "max_share": 1.0,
         "split_threshold": 1.5, "held_threshold": 9.0,
         "reason": "eta 0.800 >= 0.8, upper group 50.0%: two groups, tau at Otsu's cut"}))
    tau, split = upload_split_tau([0.0, 1.0, 2.0, 3.0], 9.0, 0.8 + 1e-9)
    assert (tau, split["groups"]) == (9.0, 1)
    assert upload_split_tau(_mixture(200, 0, 0.0), 1.0, 0.0)[1]["groups"] == 2
    assert upload_split_tau([0.5, 0.5], 0.7, 0.8)[0] == 0.7  # equal scores: one group


def test_a_cut_through_a_harmless_majority_falls_back_to_the_held_tau():
    """The toy world's shape (experiments/toy_filter_guard): 70 harmless rows around -0.96, 930
    around 0.98 and, at p = 0.1, harmful ones at 0.998 above the held tau 0.995. eta reads two
    groups (0.99), but Otsu's upper group is 93% of the upload: not a harmful minority, so tau
    is the held one, which drops the harmful rows and no harmless one."""
    rng = np.random.default_rng(0)
    harmless = np.r_[rng.normal(-0.96, 0.01, 70), rng.normal(0.98, 0.003, 930)]
    for harmful in (np.empty(0), np.full(100, 0.998)):
        scores = np.r_[harmless[:len(harmless) - len(harmful)], harmful].tolist()
        tau, split = upload_split_tau(scores, 0.995, 0.8, 0.5)
        assert split["eta"] > 0.95 and split["upper_share"] > 0.9
        assert split["groups"] == 1 and tau == 0.995 and "not a harmful minority" in split["reason"]
        assert sum(s > tau for s in scores) == len(harmful)


def test_max_share_is_inclusive():
    """[0, 1, 2, 3] cut at 1.5: the upper group is half the upload, allowed at max_share 0.5."""
    assert upload_split_tau([0.0, 1.0, 2.0, 3.0], 9.0, 0.8, 0.5)[1]["groups"] == 2
    assert upload_split_tau([0.0, 1.0, 2.0, 3.0], 9.0, 0.8, 0.5 - 1e-9)[1]["groups"] == 1


def test_the_pipeline_records_the_guard(make_cfg, tmp_path, monkeypatch):
    """test_filter_centre's geometry (10 harmful rows at 0.707, 30 task rows at -0.447, centred):
    two groups (eta 1), every harmful row caught; with no harmful row (p = 0) one group, tau the
    held one (0.894) above every task row: nothing dropped, and the record says why."""
    both = ("defense.filter.centre=held_midpoint", "defense.filter.tau_from=upload_split")
    two = filtered(make_cfg, tmp_path / "two", monkeypatch, *both, user_harmful=(1.5, 1.5))
    assert two["split"]["groups"] == 2 and two["split"]["eta"] == pytest.approx(1.0)
    assert (two["n_dropped"], two["recall"], two["precision"]) == (10, 1.0, 1.0)
    one = filtered(make_cfg, tmp_path / "one", monkeypatch, *both, "attack.p=0",
                   user_harmful=(1.5, 1.5))
    assert one["split"]["groups"] == 1 and one["split"]["eta"] == 0.0  # all task rows equal
    assert one["threshold"] == pytest.approx(2 / 5 ** 0.5) == one["split"]["held_threshold"]
    assert one["n_dropped"] == 0 and "one group" in one["split"]["reason"]


def test_the_guards_are_keyed_only_for_the_upload_split_and_checked(make_cfg, tmp_path):
    def keys(*o):
        pipe = Pipeline(validate(make_cfg("defense=ref_teacher", *o)), tmp_path)
        payload = keys_mod.filter_payload(pipe.inputs, ModelRef("align", "a"), [])
        return {**keys_mod.stage_keys(pipe.inputs), "filter": artifact_key(payload)}

    split = ("defense.filter.tau_from=upload_split",)
    assert keys("defense.filter.split_min_eta=0.5") == keys()  # tau_from=held reads none of it
    moved, plain = keys(*split, "defense.filter.split_min_eta=0.5"), keys(*split)
    assert moved["filter"] != plain["filter"] and moved["finetune"] != plain["finetune"]
    with pytest.raises(ConfigError, match=r"defense\.filter\.split_min_eta"):
        validate(make_cfg("defense=ref_teacher", *split, "defense.filter.split_min_eta=1.5"))
    assert keys("defense.filter.split_max_share=0.3") == keys()
    moved = keys(*split, "defense.filter.split_max_share=0.3")
    assert moved["filter"] != plain["filter"] and moved["finetune"] != plain["finetune"]
    with pytest.raises(ConfigError, match=r"defense\.filter\.split_max_share"):
        validate(make_cfg("defense=ref_teacher", *split, "defense.filter.split_max_share=0"))
