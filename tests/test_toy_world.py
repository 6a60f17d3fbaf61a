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
