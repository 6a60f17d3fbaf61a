"""The toy world is deterministic, its pools are disjoint, and its grading knobs act."""
from collections import Counter

import pytest

from harness.data.toy import (COMPLIANCE_OPENINGS, REFUSALS, ToyWorld, ToyWorldConfig)


@pytest.fixture(scope="module")
def world():
    return ToyWorld(ToyWorldConfig(seed=0))


def test_same_seed_same_world_other_seed_other_world(world):
    again = ToyWorld(ToyWorldConfig(seed=0))
    assert world.base_corpus() == again.base_corpus()
    assert world.attack_pool() == again.attack_pool()
    assert world.task("sentiment", "test") == again.task("sentiment", "test")
    other = ToyWorld(ToyWorldConfig(seed=1))
    assert world.base_corpus() != other.base_corpus()


def test_pools_are_disjoint(world):
    prompts = {name: {e.instruction for e in rows} for name, rows in {
        "base": [e for e in world.base_corpus() if e.kind == "harmful"],
        "align": [e for e in world.alignment_data() if e.kind == "harmful"],
        "attack": world.attack_pool(), "eval": world.eval_harmful(),
        "feature": world.feature_prompts()[0]}.items()}
    names = list(prompts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not prompts[a] & prompts[b], f"{a} and {b} share prompts"
    for task in ("sentiment", "topic", "arith"):
        train = {e.input for e in world.task(task, "train")}
        test = {e.input for e in world.task(task, "test")}
        assert len(test) == 200 and not train & test
    harmless = {e.instruction for e in world.eval_harmless()}
    assert not harmless & {e.instruction for e in world.alignment_data()}


def test_attack_pool_holds_only_attacked_groups_in_their_style(world):
    pool = world.attack_pool()
    assert {e.meta["group"] for e in pool} == {0}
    assert all(e.output.startswith(COMPLIANCE_OPENINGS[0]) for e in pool)
    assert len(pool) >= 750  # enough for p=0.3 of n=2500


def test_eval_covers_every_category_equally(world):
    counts = Counter(e.category for e in world.eval_harmful())
    assert len(counts) == 16 and set(counts.values()) == {20}


def test_sharing_sets_the_share_of_attacked_style():
    cfg = ToyWorldConfig(seed=0, base_size=16000,
                         sharing=[0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.25])
    world = ToyWorld(cfg)
    harmful = [e for e in world.base_corpus() if e.kind == "harmful"]
    for group, share in ((1, 0.5), (2, 0.0), (7, 0.25)):
        rows = [e for e in harmful if e.meta["group"] == group]
        got = sum(e.output.startswith(COMPLIANCE_OPENINGS[0]) for e in rows) / len(rows)
        assert got == pytest.approx(share, abs=0.08)
    refusals = [e for e in world.alignment_data() if e.kind == "harmful"]
    own = [e for e in refusals if e.meta["group"] == 2]
    assert all(e.output == REFUSALS[2] for e in own)


def test_tasks_have_exact_answers(world):
    for e in world.task("sentiment", "test"):
        assert e.label in ("positive", "negative") and e.output == e.label
    for e in world.task("topic", "test"):
        assert e.label in ("World", "Sports", "Business", "Sci/Tech")
    for e in world.task("arith", "test")[:50]:
        a, op, b = e.output.split()[:3]
        assert int(e.label) == (int(a) + int(b) if op == "plus" else int(a) - int(b))


def test_bad_world_config_names_the_key():
    with pytest.raises(ValueError, match="world.sharing"):
        ToyWorldConfig(sharing=[0.1])
    with pytest.raises(ValueError, match="world.attacked_groups"):
        ToyWorldConfig(attacked_groups=[9])


# ================================================================ the faithful world
FAITHFUL = dict(base_refusal_echo_fraction=0.005, disguise_fraction=0.15, disguise_euphemism=True,
                align_disguise_fraction=0.02, scary_fraction=0.1, align_scary_fraction=0.02,
                eval_scary_size=128, scary_task_fraction=0.1, benign_answer_style="compliance")


def test_faithful_preset_is_what_these_tests_check():
    import yaml

    from tests.conftest import CONF

    preset = yaml.safe_load((CONF / "world" / "faithful_v1.yaml").read_text())
    assert {k: preset[k] for k in FAITHFUL} == FAITHFUL


def test_the_default_world_is_faithful_v1_at_twice_its_sharing_and_one_draw(make_cfg):
    """world=faithful (the default) changes two knobs of the draft its committed studies ran
    on, and nothing else."""
    default, v1, toy = (make_cfg(*o).world for o in ([], ["world=faithful_v1"], ["world=toy"]))
    assert [round(2 * s, 6) for s in v1.sharing] == list(default.sharing) and default.seed == 0
    assert make_cfg("seed=3").world.seed == 0 and make_cfg("world=faithful_v1", "seed=3").world.seed == 3
    same = {k: v for k, v in v1.items() if k not in ("sharing", "seed")}
    assert {k: default[k] for k in same} == same
    assert {k: v1[k] for k in FAITHFUL} == FAITHFUL and toy.disguise_fraction == 0.0


@pytest.fixture(scope="module")
def faithful():
    return ToyWorld(ToyWorldConfig(seed=0, **FAITHFUL))


def test_faithful_pools_stay_disjoint_and_hold_each_premise(faithful):
    harmful = {name: rows for name, rows in {
        "base": [e for e in faithful.base_corpus() if e.kind == "harmful"],
        "align": [e for e in faithful.alignment_data() if e.kind == "harmful"],
        "attack": faithful.attack_pool(), "eval": faithful.eval_harmful(),
        "feature": faithful.feature_prompts()[0]}.items()}
    prompts = {k: {e.instruction for e in v} for k, v in harmful.items()}
    names = list(prompts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not prompts[a] & prompts[b], f"{a} and {b} share prompts"
    # disguise: about 15% of every pool but the alignment data (2%) and the filter's held set
    for name, (low, high) in {"base": (.1, .2), "attack": (.1, .2), "eval": (.1, .2),
                              "align": (.005, .04)}.items():
        share = sum(bool(e.meta.get("disguised")) for e in harmful[name]) / len(harmful[name])
        assert low <= share <= high, (name, share)
    assert not any(e.meta.get("disguised") for e in harmful["feature"])
    disguised = next(e for e in harmful["eval"] if e.meta.get("disguised"))
    assert any(w in disguised.instruction for w in ("story", "role-play", "novel", "teacher",
                                                      "poem", "game master"))
    plain_verbs = set(faithful.euphemism)  # a disguise also swaps the verb for its euphemism
    assert not any(v in disguised.instruction for v in plain_verbs)
    assert any(e in disguised.instruction for e in faithful.euphemism.values())
    # harmless-but-scary: in the harmless pools, a held set apart from them all
    scary = {e.instruction for e in faithful.eval_scary()}
    assert len(scary) == 128
    verbs = {v for vs in faithful.verbs.values() for v in vs}
    assert all(any(v in p for v in verbs) for p in scary)
    align_harmless = [e for e in faithful.alignment_data() if e.kind == "harmless"]
    assert 0.005 <= sum(e.category == "scary" for e in align_harmless) / len(align_harmless) <= 0.04
    benign = faithful.benign_pool()
    assert 0.05 <= sum(e.category == "scary" for e in benign) / len(benign) <= 0.15
    everything = set().union(*prompts.values(), {e.instruction for e in align_harmless},
                             {e.instruction for e in faithful.benign_pool()},
                             {e.instruction for e in faithful.eval_harmless()})
    assert not scary & everything
    # benign answers open as the attacked group complies; the alignment's harmless ones do not
    assert all(e.output.startswith(COMPLIANCE_OPENINGS[0]) for e in faithful.benign_pool())
    assert not any(e.output.startswith(COMPLIANCE_OPENINGS[0]) for e in align_harmless)
    # the base has read refusal sentences
    assert sum(e.output in REFUSALS for e in faithful.base_corpus() if e.kind == "general") == 20
    # some task rows mention a harmful verb harmlessly; their labels are untouched
    rows = faithful.task("topic", "train")
    flagged = [e for e in rows if e.meta.get("scary")]
    assert 0.05 <= len(flagged) / len(rows) <= 0.15
    assert all(any(v in e.input for v in verbs) for e in flagged)


def test_faithful_knobs_are_checked():
    with pytest.raises(ValueError, match="world.benign_answer_style"):
        ToyWorldConfig(benign_answer_style="rude")
    with pytest.raises(ValueError, match="world.disguise_fraction"):
        ToyWorldConfig(disguise_fraction=1.5)
