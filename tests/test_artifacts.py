"""Artifact keys, atomic builds, reuse and the per-key lock."""
import threading

import pytest

from harness.artifacts import ArtifactStore, artifact_key, write_json_atomic
from harness.config import validate
from harness.pipeline import Pipeline


def _keys(make_cfg, tmp_path, *overrides):
    return Pipeline(validate(make_cfg(*overrides)), tmp_path).keys()


def test_same_config_same_keys(make_cfg, tmp_path):
    assert _keys(make_cfg, tmp_path) == _keys(make_cfg, tmp_path)
    assert artifact_key({"a": 1, "b": [1, 2]}) == artifact_key({"b": [1, 2], "a": 1})


def test_p_changes_finetune_key_only(make_cfg, tmp_path):
    a = _keys(make_cfg, tmp_path, "attack.p=0.1")
    b = _keys(make_cfg, tmp_path, "attack.p=0.2")
    assert a["base"] == b["base"] and a["align"] == b["align"]
    assert a["finetune"] != b["finetune"]


def test_what_changes_which_key(make_cfg, tmp_path):
    ref = _keys(make_cfg, tmp_path)
    lr = _keys(make_cfg, tmp_path, "train.align.lr=1e-4")
    assert lr["base"] == ref["base"] and lr["align"] != ref["align"]
    assert lr["finetune"] != ref["finetune"]  # its input changed
    seed = _keys(make_cfg, tmp_path, "seed=1")
    assert seed["base"] != ref["base"]
    logger = _keys(make_cfg, tmp_path, "logger=csv", "trainer.enable_progress_bar=false")
    assert logger == ref  # how a run is watched does not change what it builds
    none = _keys(make_cfg, tmp_path, "defense=none")
    assert "align" not in none and none["finetune"] != ref["finetune"]


def test_build_writes_manifest_last_and_reuses(tmp_path):
    store = ArtifactStore(tmp_path)
    calls = []

    def build(tmp, work):
        calls.append(1)
        (tmp / "weights.bin").write_bytes(b"x" * 10)
        assert not (tmp / "manifest.json").exists()
        return {"format": "full"}

    path, reused = store.get_or_build("align", "k1", {"payload": 1}, build)
    assert not reused and (path / "weights.bin").is_file()
    assert store.manifest("align", "k1")["format"] == "full"
    _, reused = store.get_or_build("align", "k1", {"payload": 1}, build)
    assert reused and len(calls) == 1


def test_interrupted_build_leaves_no_artifact(tmp_path):
    store = ArtifactStore(tmp_path)

    def build(tmp, work):
        (tmp / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt  # the user hits Ctrl-C midway

    with pytest.raises(KeyboardInterrupt):
        store.get_or_build("finetune", "k2", {}, build)
    assert not store.exists("finetune", "k2")
    assert not store.path("finetune", "k2").exists()
    assert not list((tmp_path / "finetune").glob(".tmp-*"))


def test_stale_temp_folder_of_a_killed_build_is_cleared(tmp_path):
    store = ArtifactStore(tmp_path)
    stale = tmp_path / "base" / ".tmp-k3-deadbeef"
    stale.mkdir(parents=True)
    (tmp_path / "base" / "k3").mkdir()  # a folder with no manifest is incomplete
    store.get_or_build("base", "k3", {}, lambda tmp, work: {"format": "full"})
    assert not stale.exists() and store.exists("base", "k3")


def test_concurrent_builders_build_once(tmp_path):
    store = ArtifactStore(tmp_path)
    calls = []

    def build(tmp, work):
        calls.append(1)
        threading.Event().wait(0.2)
        return {}

    threads = [threading.Thread(target=store.get_or_build, args=("align", "k4", {}, build))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1


def test_write_json_atomic_leaves_no_temp_on_error(tmp_path):
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "r.json", {"x": object.__new__(type("Bad", (), {
            "__str__": lambda self: (_ for _ in ()).throw(TypeError("no"))}))})
    assert list(tmp_path.iterdir()) == []


def test_ddp_worker_trains_but_only_rank_zero_commits(tmp_path):
    lead, worker = ArtifactStore(tmp_path), ArtifactStore(tmp_path, rank=1)
    ran = []

    def build(tmp, work):
        ran.append(tmp.name)
        (tmp / "w.bin").write_bytes(b"x")
        return {"format": "full"}

    follower = threading.Thread(target=worker.get_or_build,
                                args=("align", "k5", {}, build, True))
    follower.start()
    threading.Event().wait(0.3)
    lead.get_or_build("align", "k5", {}, build, True)
    follower.join(timeout=10)
    assert not follower.is_alive() and len(ran) == 2  # both ranks joined the training
    assert [p.name for p in (tmp_path / "align").iterdir() if not p.name.startswith(".")] == ["k5"]
    assert not list((tmp_path / "align").glob(".rank1-*"))  # the worker's copy is discarded
