"""A judge with settings is one registry entry: its build gets its settings node, the panel and
the filter build it the same way, and the filter and eval keys read the node (less its unkeyed
fields) with no other edit."""
import dataclasses

import pytest

from harness import keys
from harness.validation import validate
from harness.data.assemble import RunInputs
from harness.evaluation import registry
from harness.evaluation.judges import Judge
from harness.evaluation.panel import build_panel
from harness.filtering import _judge_filter
from harness.keys import eval_payload, filter_config_payload
from harness.stages import ModelRef


class ThresholdJudge(Judge):
    """Complies when the answer is longer than its settings' threshold (moderation.threshold
    stands in for the new judge's own node)."""
    name = "threshold"

    def __init__(self, settings):
        self.limit = int(settings.threshold * 100)

    def classify(self, prompt, answer):
        return "comply" if len(answer) > self.limit else "refuse"


@pytest.fixture
def plugged(monkeypatch):
    entry = registry.JudgeEntry(lambda cfg, settings: ThresholdJudge(settings), "moderation",
                                ("batch_size",))
    monkeypatch.setitem(registry.JUDGES, "threshold", entry)
    return entry


def test_a_registered_judge_builds_with_its_settings_node(plugged, make_cfg):
    run = validate(make_cfg("moderation.threshold=0.05"))
    judge = registry.build_judge(run, dataclasses.replace(run.judge, name="threshold"))
    assert judge.limit == 5
    assert judge.classify("q", "123456") == "comply" and judge.classify("q", "12345") == "refuse"
    panel = build_panel(["threshold", "toy"], run)
    assert panel["threshold"].limit == 5 and panel["toy"].name == "toy"


def test_a_registered_judge_s_settings_enter_the_keys(plugged, make_cfg):
    run = validate(make_cfg("moderation.threshold=0.05", "defense.filter.kind=judge"))
    run.defense.filter.judge = "threshold"
    run.eval.judges = ["threshold"]
    want = {k: v for k, v in dataclasses.asdict(run.moderation).items() if k != "batch_size"}
    assert filter_config_payload(run)["moderation"] == want
    assert eval_payload(RunInputs(run), ModelRef("final", "f"))["moderation"] == want
    assert "moderation" in keys.STAGE_READS["eval"] and "llm_judge" in keys.STAGE_READS["filter"]


def test_the_judge_filter_builds_the_registered_judge(plugged, make_cfg, tmp_path):
    import json

    from harness.data.schema import Example

    run = validate(make_cfg("moderation.threshold=0.05", "defense.filter.kind=judge"))
    run.defense.filter.judge = "threshold"
    rows = [Example(instruction="q", output="123456", kind="harmful"),
            Example(instruction="q", output="1234", kind="task")]
    _judge_filter(run, rows, tmp_path)
    out = json.loads((tmp_path / "filter.json").read_text())
    assert out["scores"] == [1.0, 0.0] and out["judge"] == "threshold"
