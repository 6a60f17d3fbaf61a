"""A method class is looked up in one place (harness.stages.method_class, once per process),
and every flag the harness reads off one is declared, with its default, on its base class."""
import re
from pathlib import Path

import pytest

from harness import stages
from harness.data.assemble import defense_flag
from harness.defenses.base import StageModule
from harness.posthoc.base import PosthocMethod

ROOT = Path(__file__).resolve().parents[1] / "harness"
STAGE_FLAGS = {"needs_align_stage": False, "needs_lora": False, "needs_harmful_data": False,
               "needs_refusal_feature": False, "starts_from": "align",
               "single_process_only": False, "mixes_refusal_rows": False}


def test_every_stage_flag_has_its_default_on_the_base():
    for flag, default in STAGE_FLAGS.items():
        assert flag in vars(StageModule), flag
        assert getattr(StageModule, flag) == default, flag


def test_every_flag_read_by_name_is_declared():
    source = "\n".join(f.read_text() for f in ROOT.rglob("*.py"))
    read = set(re.findall(r"defense_flag\([^,]+,\s*\"(\w+)\"\)", source))
    assert read == {"needs_harmful_data", "needs_refusal_feature", "mixes_refusal_rows",
                    "v_from_align_adapter"}
    assert read - {"v_from_align_adapter"} <= set(STAGE_FLAGS)
    # posthoc.module is asked these
    assert {"needs_harmful_data", "v_from_align_adapter"} <= set(vars(PosthocMethod))
    # one lookup, no attribute read with a fallback
    users = [f.relative_to(ROOT).as_posix() for f in ROOT.rglob("*.py")
             if "get_class" in f.read_text()]
    assert users == ["stages.py"]
    assert not re.search(r"getattr\(cls, \"\w+\", ", source)


def test_flags_by_path():
    assert defense_flag("harness.defenses.ref_teacher.RefTeacher", "needs_refusal_feature")
    assert not defense_flag("harness.defenses.sft.SFT", "needs_refusal_feature")
    assert defense_flag("harness.defenses.repnoise.RepNoise", "single_process_only")
    assert defense_flag("harness.posthoc.antidote.Antidote", "needs_harmful_data")
    assert not defense_flag(None, "needs_harmful_data")
    assert stages.method_class("harness.defenses.ref_teacher.RefStudent").starts_from == "base"
    with pytest.raises(AttributeError):  # an undeclared flag is a bug, not a quiet False
        defense_flag("harness.defenses.sft.SFT", "needs_unicorns")


def test_a_class_is_imported_once(monkeypatch):
    import hydra.utils

    calls = []
    real = hydra.utils.get_class
    monkeypatch.setattr(hydra.utils, "get_class", lambda path: calls.append(path) or real(path))
    stages.method_class.cache_clear()
    try:
        first = stages.method_class("harness.defenses.sft.SFT")
        assert stages.method_class("harness.defenses.sft.SFT") is first
        assert calls == ["harness.defenses.sft.SFT"]
    finally:
        stages.method_class.cache_clear()
