"""Each stage in results.json is credited to the process that built it (its manifest's
provenance), stages built from uncommitted code are flagged there and in the report, a reused
artifact built under other library versions is named in a warning, and an artifact folder that
lost its manifest is set aside as damaged."""
import json
import logging

import pytest

from harness import stages
from harness.artifacts import MANIFEST, ArtifactStore, library_mismatch, provenance
from harness.report import main as report
from harness.stages import StageRecorder
from harness.tracking.results import make_results
from tests.test_report import _write


def test_provenance_names_the_libraries_python_and_the_trees_state():
    import numpy
    import peft

    prov = provenance()
    assert prov["peft"] == peft.__version__ and prov["numpy"] == numpy.__version__
    assert prov["python"].count(".") == 2
    assert prov["dirty"] == prov["git"].endswith("-dirty")


def _build(tmp, work):
    (tmp / "weights.bin").write_bytes(b"w")


def _recorder(tmp_path, monkeypatch, **changes):
    """A recorder in a process whose provenance differs from the real one by ``changes``."""
    prov = {**provenance(), **changes}
    monkeypatch.setattr(stages, "provenance", lambda: prov)
    return StageRecorder(ArtifactStore(tmp_path / "artifacts"))


def test_a_reused_stage_is_credited_to_its_builder_not_to_the_reusing_process(
        tmp_path, monkeypatch, caplog):
    first = _recorder(tmp_path, monkeypatch, git="aaaaaaa-dirty", dirty=True)
    first("finetune", "k1", {"p": 1}, _build)
    built = first.artifacts["finetune"]
    assert not built["reused"] and built["built_by"]["git"] == "aaaaaaa-dirty" and built["dirty"]

    later = _recorder(tmp_path, monkeypatch, git="bbbbbbb", dirty=False)  # another commit
    with caplog.at_level(logging.WARNING, logger="harness"):
        later("finetune", "k1", {"p": 1}, _build)
    reused = later.artifacts["finetune"]
    assert reused["reused"] and reused["built_by"]["git"] == "aaaaaaa-dirty" and reused["dirty"]
    assert "library_mismatch" not in reused and not caplog.records  # a commit is not a library

    results = make_results({"protocol": {"name": "toy", "hash_keys": []}}, "ok", {}, {},
                           later.artifacts)
    assert results["dirty_stages"] == ["finetune"] and results["git"] != "aaaaaaa-dirty"


def test_reuse_under_another_library_version_is_named_in_a_warning(tmp_path, monkeypatch, caplog):
    _recorder(tmp_path, monkeypatch, torch="2.0.0", peft="0.1.0")("base", "k", {}, _build)
    now = _recorder(tmp_path, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="harness"):
        now("base", "k", {}, _build)
    mismatch = now.artifacts["base"]["library_mismatch"]
    assert set(mismatch) == {"torch", "peft"}
    assert mismatch["torch"] == ["2.0.0", provenance()["torch"]]
    assert "built with torch 2.0.0, peft 0.1.0" in caplog.text
    # a library the builder did not record is not compared; numpy is recorded, not compared
    assert library_mismatch({"torch": provenance()["torch"], "numpy": "0.0"}, provenance()) == {}


def test_the_report_names_runs_with_stages_built_from_uncommitted_code(tmp_path):
    sweep = tmp_path / "sweep"
    _write(sweep, "clean", "sft", 0.1, 0, hs=40.0, fa=90.0)
    _write(sweep, "dirty", "sft", 0.2, 0, hs=50.0, fa=90.0)
    for name, git in (("clean", "1111111"), ("dirty", "2222222-dirty")):
        path = sweep / name / "results.json"
        res = json.loads(path.read_text())
        res["artifacts"] = {"base": {"key": "b", "built_by": {"git": "1111111"}},
                            "finetune": {"key": name, "built_by": {"git": git}}}
        res["dirty_stages"] = ["finetune"] if git.endswith("-dirty") else []
        path.write_text(json.dumps(res))
    report([str(sweep), "--out", str(tmp_path / "report")])
    md = (tmp_path / "report" / "report.md").read_text()
    assert "- **stages built at**: 1111111, 2222222-dirty" in md
    line = next(x for x in md.splitlines() if "uncommitted code" in x)
    assert "1 run(s)" in line and f"{sweep / 'dirty'} (finetune)" in line
    assert str(sweep / "clean") not in line


# ------------------------------------------------------------------ a lost manifest
def test_a_folder_that_lost_its_manifest_is_set_aside_with_a_warning(tmp_path, caplog):
    store = ArtifactStore(tmp_path)
    store.get_or_build("align", "k", {}, _build)
    (store.path("align", "k") / MANIFEST).unlink()
    assert store._intact("align", "k") == (False, "its manifest is missing")
    with pytest.raises(Exception, match="its manifest is missing. Rerun the same command"):
        store.verified_manifest("align", "k")
    builds = []
    with caplog.at_level(logging.WARNING):
        _, reused = store.get_or_build("align", "k", {},
                                       lambda tmp, work: builds.append(1) or _build(tmp, work))
    assert not reused and builds == [1] and store.exists("align", "k")
    aside = list((tmp_path / "align").glob(".corrupt-k-*"))
    assert len(aside) == 1 and (aside[0] / "weights.bin").read_bytes() == b"w"
    assert "damaged (its manifest is missing)" in caplog.text and str(aside[0]) in caplog.text
