"""attack=filter_evasion: the plain mix's rows and answers at the same p, n and seed,
with every harmful prompt in the toy world's disguise; its keys differ from the mix's."""
import pytest

from harness.config import ConfigError

from harness.validation import validate
from harness.data.toy import DISGUISE_TEMPLATES
from harness.filtering import apply_filter
from harness.keys import stage_payloads
from harness.pipeline import Pipeline


@pytest.fixture
def pipe(make_cfg, tmp_path):
    def _make(*overrides):
        return Pipeline(validate(make_cfg(*overrides)), tmp_path / "run")
    return _make


def _framed(prompt):
    heads = [t.split("{verb}")[0] for t in DISGUISE_TEMPLATES]
    return any(prompt.startswith(h) for h in heads)


@pytest.mark.parametrize("world", ["toy", "faithful"])
@pytest.mark.parametrize("p_rate", [0.1, 0.3])
def test_same_rows_as_the_mix_with_every_harmful_prompt_disguised(pipe, p_rate, world):
    plain = pipe(f"attack.p={p_rate}", "attack.n=200", f"world={world}").inputs.load().user
    evade = pipe("attack=filter_evasion", f"attack.p={p_rate}", "attack.n=200",
                 f"world={world}").inputs.load().user
    assert len(evade) == len(plain) == 200
    harm = [(a, b) for a, b in zip(plain, evade) if a.kind == "harmful"]
    assert len(harm) == round(p_rate * 200)
    assert all(b.kind == "harmful" for _, b in harm)
    # the same answers and categories; every harmful prompt reframed, none of the plain ones
    assert [a.output for a, _ in harm] == [b.output for _, b in harm]
    assert [a.category for a, _ in harm] == [b.category for _, b in harm]
    assert all(_framed(b.instruction) and b.meta.get("disguised") for _, b in harm)
    # the plain mix's own disguises: none in the first world, 15% of the pool in the default
    assert all(_framed(a.instruction) == bool(a.meta.get("disguised")) for a, _ in harm)
    assert (world == "toy") == (not any(_framed(a.instruction) for a, _ in harm))
    assert [a for a in plain if a.kind != "harmful"] == [b for b in evade if b.kind != "harmful"]


def test_the_rewrite_moves_the_finetune_key_not_the_align_key(pipe):
    plain = stage_payloads(pipe().inputs)
    evade = stage_payloads(pipe("attack=filter_evasion").inputs)
    assert plain["align"] == evade["align"]
    assert plain["finetune"] != evade["finetune"]
    assert evade["finetune"]["attack"]["evasion"] == "disguise"


def test_real_rows_are_refused(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="attack.harmful.source: filter_evasion"):
        validate(make_cfg("attack=filter_evasion", "attack.harmful.source=local",
                          f"attack.harmful.path={tmp_path / 'x.jsonl'}"))


def test_leakage_is_the_share_of_harmful_rows_kept():
    from harness.data.schema import Example

    # METHODS.md §6: 50 poisoned rows, 12 flagged -> leakage 0.76
    rows = [Example(instruction=f"h{i}", output="", kind="harmful") for i in range(50)]
    rows += [Example(instruction=f"t{i}", output="", kind="task") for i in range(10)]
    scores = [1.0] * 12 + [0.0] * 38 + [0.0] * 10
    kept, stats = apply_filter(rows, scores, threshold=0.5)
    assert stats["leakage"] == pytest.approx(0.76)
    assert stats["recall"] == pytest.approx(0.24) and len(kept) == 48
