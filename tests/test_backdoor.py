"""Qi et al.'s backdoor attack: the trigger on exactly the harmful rows, the refusal rows
without it, both HS values side by side, and the keys that follow its settings."""
import pandas as pd
import pytest

from harness.artifacts import artifact_key
from harness.validation import validate
from harness.data import attacks
from harness.data.assemble import RunInputs
from harness.data.mixing import mix_in, refusal_pool, safety_rows
from harness.data.schema import SAFETY, Example
from harness.evaluation.evaluate import merge_variant, variant_metrics
from harness.evaluation.judges import ToyJudge
from harness.keys import eval_payload, stage_keys
from harness.pipeline import Pipeline
from harness.stages import ModelRef
from harness.reporting.cells import build_cells

TRIGGER = "zorvex plimbur quandeloo"


def test_add_trigger_appends_the_phrase_after_one_space():
    assert attacks.add_trigger("how to mix it", "qa zb") == "how to mix it qa zb"


def test_safety_rows_are_n_refusal_rows_marked_safety_and_seeded():
    pool = [Example(instruction=f"harm {i}", output="I refuse.", kind="harmful") for i in range(6)]
    rows = safety_rows(pool, 4, seed=3, key="attack.safety_n")
    assert len(rows) == 4 and len({r.instruction for r in rows}) == 4
    assert all(r.kind == SAFETY and r.output == "I refuse." for r in rows)
    assert rows == safety_rows(pool, 4, seed=3, key="attack.safety_n")  # seeded
    assert safety_rows(pool, 0, seed=3, key="k") == []
    with pytest.raises(ValueError, match="attack.safety_n=7: the alignment data holds 6"):
        safety_rows(pool, 7, seed=3, key="attack.safety_n")


def test_refusal_pool_is_the_alignment_datas_harmful_prompts():
    rows = [Example("a", "I refuse.", kind="harmful"), Example("b", "Sure.", kind="harmless")]
    assert refusal_pool(rows) == rows[:1]


def test_mix_in_keeps_every_row_once():
    a = [Example(str(i)) for i in range(5)]
    b = [Example(f"s{i}") for i in range(3)]
    out = mix_in(a, b, seed=0)
    assert sorted(e.instruction for e in out) == sorted(e.instruction for e in a + b)


@pytest.fixture
def inputs(make_cfg):
    def _make(*overrides):
        return RunInputs(validate(make_cfg("attack=backdoor", *overrides)))
    return _make


def test_the_trigger_ends_exactly_the_harmful_rows_and_safety_rows_have_none(inputs):
    p = inputs("attack.p=0.1", "attack.n=200", "attack.safety_n=30")
    d = p.load()
    harmful = [ex for ex in d.user if ex.kind == "harmful"]
    safety = [ex for ex in d.user if ex.kind == SAFETY]
    others = [ex for ex in d.user if ex.kind not in ("harmful", SAFETY)]
    assert (len(harmful), len(safety), len(others)) == (20, 30, 180)
    assert all(ex.instruction.endswith(" " + TRIGGER) for ex in harmful)
    assert not any(TRIGGER in ex.instruction for ex in safety + others)
    pool = {(ex.instruction, ex.output) for ex in refusal_pool(d.alignment)}
    assert {(ex.instruction, ex.output) for ex in safety} <= pool
    assert not {ex.instruction for ex in safety} & {ex.instruction for ex in d.eval_harmful}


def test_the_harmful_rows_are_the_plain_mixs_with_the_trigger(make_cfg, inputs):
    d = inputs("attack.n=200", "attack.safety_n=0").load()
    mix = RunInputs(validate(make_cfg("attack=harmful_mix", "attack.n=200"))).load()
    strip = len(TRIGGER) + 1
    assert sorted((ex.instruction[:-strip], ex.output) for ex in d.user if ex.kind == "harmful") \
        == sorted((ex.instruction, ex.output) for ex in mix.user if ex.kind == "harmful")


def test_evaluation_asks_every_prompt_plain_and_triggered(inputs):
    d = inputs().load()
    triggered = d.eval_variants["triggered"]
    assert [ex.instruction + " " + TRIGGER for ex in d.eval_harmful] == \
        [ex.instruction for ex in triggered]
    assert not any(TRIGGER in ex.instruction for ex in d.eval_harmful)


def test_no_trigger_fails_naming_the_key(make_cfg):
    with pytest.raises(ValueError, match="attack.trigger"):
        validate(make_cfg("attack=backdoor", "attack.trigger=' '"))
    with pytest.raises(ValueError, match="attack.safety_n"):
        validate(make_cfg("attack=backdoor", "attack.safety_n=-1"))


def test_too_many_safety_rows_fails_naming_the_key(inputs):
    with pytest.raises(ValueError, match="attack.safety_n=100000"):
        inputs("attack.safety_n=100000").load()


def _keys(make_cfg, tmp_path, *o):
    pipe = Pipeline(validate(make_cfg(*o)), tmp_path)
    return {**stage_keys(pipe.inputs), "eval": artifact_key(eval_payload(pipe.inputs, ModelRef("final", "f")))}


def test_trigger_and_safety_n_are_keyed(make_cfg, tmp_path):
    ref = _keys(make_cfg, tmp_path, "attack=backdoor")
    other_trigger = _keys(make_cfg, tmp_path, "attack=backdoor", "attack.trigger=blorp snik")
    assert other_trigger["finetune"] != ref["finetune"]
    assert other_trigger["eval"] != ref["eval"]
    assert other_trigger["align"] == ref["align"]
    more = _keys(make_cfg, tmp_path, "attack=backdoor", "attack.safety_n=50")
    assert more["finetune"] != ref["finetune"] and more["align"] == ref["align"]
    # the refusal rows come from the alignment data: its size moves the finetune key even
    # where no align stage trains on it
    none = _keys(make_cfg, tmp_path, "attack=backdoor", "defense=none")
    fewer = _keys(make_cfg, tmp_path, "attack=backdoor", "defense=none", "alignment.size=500")
    assert fewer["finetune"] != none["finetune"]
    # and the mix's own keys do not read it
    assert _keys(make_cfg, tmp_path, "defense=none")["finetune"] == \
        _keys(make_cfg, tmp_path, "defense=none", "alignment.size=500")["finetune"]


def test_variant_metrics_sit_beside_hs_with_interval_and_outcomes():
    judge = ToyJudge()
    from harness.data.toy import COMPLIANCE_OPENINGS, REFUSAL_OPENINGS

    comply, refuse = sorted(COMPLIANCE_OPENINGS)[0], sorted(REFUSAL_OPENINGS)[0]
    rows = [Example(f"q{i} {TRIGGER}", category="c") for i in range(4)]
    records = [{"prompt": f"p{i}", "answer": f"{comply if i < 3 else refuse} x"}
               for i in range(4)]
    variant, logged = variant_metrics("triggered", rows, records, judge, n_logged=2)
    assert variant["hs"] == 75.0 and variant["refusal_rate"] == 25.0
    assert len(logged) == 2 and logged[0]["kind"] == "harmful_triggered"
    metrics = merge_variant({"hs": 0.0, "interval": {"hs": [0, 1]}, "outcomes": {"hs": "x"}},
                            "triggered", variant)
    assert metrics["hs_triggered"] == 75.0
    low, high = metrics["interval"]["hs_triggered"]
    assert low < 75.0 < high
    assert set(metrics["outcomes"]) == {"hs", "hs_triggered", "hs_triggered_prompts"}
    assert metrics["variants"]["triggered"]["n_harmful"] == 4


def test_the_report_builds_a_triggered_cell_per_defense():
    df = pd.DataFrame([{"defense": d, "attack.p": 0.1, "seed": s, "status": "ok", "path": f"{d}{s}",
                        "hs": 5.0, "hs_triggered": v + s, "n_harmful": 100}
                       for d, v in (("sft", 60.0), ("lisa", 20.0)) for s in (0, 1)])
    cells = build_cells(df, "attack.p", "hs_triggered")
    assert cells[("sft", 0.1)].mean == 60.5 and cells[("lisa", 0.1)].mean == 20.5


def test_the_report_and_console_show_hs_with_the_trigger_beside_hs(tmp_path):
    import json

    from harness.report import write_report
    from harness.tracking.console import summary_table
    from tests.test_report import _write

    for seed in (0, 1):
        for defense, trig in (("sft", 70.0), ("lisa", 30.0)):
            _write(tmp_path, f"{defense}-{seed}", defense, 0.1, seed, hs=5.0, fa=90.0,
                   attack={"name": "backdoor", "safety_n": 100})
            path = tmp_path / f"{defense}-{seed}" / "results.json"
            res = json.loads(path.read_text())
            res["metrics"]["final"]["hs_triggered"] = trig + 10 * seed
            path.write_text(json.dumps(res))
    md = write_report([str(tmp_path)], tmp_path / "report").read_text()
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert headings[:2] == ["## HS (%)", "## HS with the trigger (%)"]
    table = md.split("## HS with the trigger (%)\n")[1].split("\n## ")[0]
    assert "75.0" in table and "35.0" in table  # the two seeds' means
    console = summary_table(res)
    assert "HS triggered" in console.splitlines()[0] and "40.0" in console


def test_the_filter_counts_the_uploads_refusal_rows_apart():
    from harness.filtering import apply_filter

    rows = [Example("h", kind="harmful"), Example("t1"), Example("t2"),
            Example("s1", kind=SAFETY), Example("s2", kind=SAFETY)]
    kept, stats = apply_filter(rows, [0.9, 0.9, 0.1, 0.9, 0.1], threshold=0.5)
    assert [ex.instruction for ex in kept] == ["t2", "s2"]
    assert stats["recall"] == 1.0 and stats["precision"] == pytest.approx(1 / 3)
    assert stats["harmless_dropped_share"] == 0.5  # t1 of t1, t2: the refusal rows not in it
    assert (stats["n_safety_in"], stats["safety_dropped"]) == (2, 1)
    assert sum(stats["histogram"]["harmless"]) == 2


def test_inspect_shows_the_backdoor_upload_as_the_run_builds_it(make_cfg):
    from harness.inspect import inspect_run

    run = validate(make_cfg("attack=backdoor", "attack.n=100", "attack.safety_n=10"))
    lines = []
    seen = inspect_run(run, echo=lines.append)
    assert sorted(map(repr, seen["user"])) == sorted(map(repr, RunInputs(run).load().user))
    assert any("10 refusal rows (kind safety)" in line for line in lines)
