"""Artifact keys, atomic builds, reuse and the per-key lock; verification, read-only caches
and file modes."""
import builtins
import errno
import hashlib
import io
import json
import logging
import os
import re
import stat
import tempfile
import threading
from pathlib import Path

import pytest

from harness import artifacts
from harness.artifacts import (MANIFEST, ArtifactStore, ArtifactStoreError, artifact_key,
                               write_json_atomic)
from harness.validation import validate
from harness.keys import stage_keys
from harness.pipeline import Pipeline


def _keys(make_cfg, tmp_path, *overrides):
    return stage_keys(Pipeline(validate(make_cfg(*overrides)), tmp_path).inputs)


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
    ran, follower_trained = [], threading.Event()

    def build(tmp, work):
        ran.append(tmp.name)
        (tmp / "w.bin").write_bytes(b"x")
        if tmp.name.startswith(".rank1-"):
            follower_trained.set()
        return {"format": "full"}

    follower = threading.Thread(target=worker.get_or_build,
                                args=("align", "k5", {}, build, True))
    follower.start()
    assert follower_trained.wait(timeout=120)  # the worker trained before rank 0 commits
    lead.get_or_build("align", "k5", {}, build, True)
    follower.join(timeout=120)  # it polls for rank 0's commit once a second
    assert not follower.is_alive() and len(ran) == 2  # both ranks joined the training
    assert [p.name for p in (tmp_path / "align").iterdir() if not p.name.startswith(".")] == ["k5"]
    assert not list((tmp_path / "align").glob(".rank1-*"))  # the worker's copy is discarded


# ================================================================ permissions
@pytest.fixture
def umask_022():
    """A known umask for the test; the process's own and the cached reading are restored."""
    old = os.umask(0o022)
    artifacts.umask.cache_clear()
    yield
    os.umask(old)
    artifacts.umask.cache_clear()


def test_json_follows_the_umask_not_mkstemps_0600(tmp_path, umask_022):
    write_json_atomic(tmp_path / "r.json", {"a": 1})
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644
    os.umask(0o027)
    artifacts.umask.cache_clear()
    write_json_atomic(tmp_path / "s.json", {"a": 1})
    assert stat.S_IMODE((tmp_path / "s.json").stat().st_mode) == 0o640


def test_a_committed_artifact_is_readable_per_umask(tmp_path, umask_022):
    def build(tmp, work):
        fd, name = tempfile.mkstemp(dir=tmp)  # 0600, as torch or a library might write
        os.write(fd, b"w")
        os.close(fd)
        Path(tempfile.mkdtemp(dir=tmp), "inner.bin").write_bytes(b"x")  # a 0700 folder
        return {}

    path, _ = ArtifactStore(tmp_path).get_or_build("align", "k6", {}, build)
    modes = {p.relative_to(path).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in [path, *path.rglob("*")]}
    assert modes.pop(".") == 0o755 and modes.pop(MANIFEST) == 0o644
    assert sorted(modes.values()) == [0o644, 0o644, 0o755]  # the file, the inner file, the dir


# ================================================================ verification
WEIGHTS = bytes(range(256)) * 64  # 16 KiB


def _weights_build(calls):
    def build(tmp, work):
        calls.append(1)
        (tmp / "model").mkdir()
        (tmp / "model" / "weights.safetensors").write_bytes(WEIGHTS)
        (tmp / "config.json").write_text("{}")
        return {"format": "full"}
    return build


def _new_process():
    """Digests are checked once per process; forgetting them is what a fresh process sees."""
    artifacts._DIGESTED.clear()


def test_the_manifest_lists_every_file_with_size_and_digest(tmp_path):
    path, _ = ArtifactStore(tmp_path).get_or_build("align", "k7", {}, _weights_build([]))
    files = json.loads((path / MANIFEST).read_text())["files"]
    assert files == [{"path": "config.json", "size": 2,
                      "sha256": hashlib.sha256(b"{}").hexdigest()},
                     {"path": "model/weights.safetensors", "size": 16384,
                      "sha256": hashlib.sha256(WEIGHTS).hexdigest()}]


def _truncate_weights(path):
    w = path / "model" / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:5000])


def _overwrite_weights(path):  # same size: only the digest can tell
    w = path / "model" / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[6000:10096] = b"\0" * 4096
    w.write_bytes(bytes(data))


def _truncate_manifest(path):
    m = path / MANIFEST
    m.write_text(m.read_text()[:40])


def _remove_file(path):
    (path / "config.json").unlink()


@pytest.mark.parametrize("damage,said", [
    (_truncate_weights, "model/weights.safetensors has 5000 bytes, its manifest says 16384"),
    (_overwrite_weights, "model/weights.safetensors has sha256 "),
    (_truncate_manifest, "its manifest is unreadable (JSONDecodeError"),
    (_remove_file, "config.json is missing"),
], ids=["truncated-weights", "overwritten-weights", "truncated-manifest", "missing-file"])
def test_a_damaged_artifact_is_set_aside_and_rebuilt_with_a_warning(tmp_path, caplog, damage,
                                                                    said):
    store, calls = ArtifactStore(tmp_path), []
    path, _ = store.get_or_build("align", "k8", {}, _weights_build(calls))
    damage(path)
    _new_process()
    with pytest.raises(ArtifactStoreError, match=f"artifact align/k8 .* cannot be loaded: {re.escape(said)}"):
        store.verified_manifest("align", "k8")  # what a load sees: refused, never loaded
    with caplog.at_level(logging.WARNING, logger="harness.artifacts"):
        path, reused = store.get_or_build("align", "k8", {}, _weights_build(calls))
    assert not reused and len(calls) == 2
    assert f"artifact align/k8 is damaged ({said}" in caplog.text
    aside = list((tmp_path / "align").glob(".corrupt-k8-*"))
    assert len(aside) == 1 and str(aside[0]) in caplog.text
    assert (path / "model" / "weights.safetensors").read_bytes() == WEIGHTS
    _new_process()
    assert store.problem("align", "k8") is None
    assert store.get_or_build("align", "k8", {}, _weights_build(calls)) == (path, True)
    assert len(calls) == 2


def test_digests_are_read_once_per_process_sizes_every_time(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path)
    store.get_or_build("align", "k9", {}, _weights_build([]))
    read = []
    real = artifacts.file_digest
    monkeypatch.setattr(artifacts, "file_digest", lambda p: read.append(p.name) or real(p))
    _new_process()
    for _ in range(3):
        assert store.get_or_build("align", "k9", {}, _weights_build([]))[1]
    assert sorted(read) == ["config.json", "weights.safetensors"]  # the first reuse only
    read.clear()
    always = ArtifactStore(tmp_path, digest="always")
    for _ in range(2):
        assert always.get_or_build("align", "k9", {}, _weights_build([]))[1]
    assert len(read) == 4
    _truncate_weights(store.path("align", "k9"))  # a size change is seen without any digest
    read.clear()
    assert "has 5000 bytes" in store.problem("align", "k9") and read == []


def test_an_artifact_from_before_digests_loads_unverified(tmp_path):
    folder = tmp_path / "base" / "old1"
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"anything")
    (folder / MANIFEST).write_text(json.dumps({"format": "full", "key": "old1"}))
    store = ArtifactStore(tmp_path)
    assert store.get_or_build("base", "old1", {}, lambda t, w: pytest.fail("rebuilt")) == (
        folder, True)
    assert store.verified_manifest("base", "old1")["format"] == "full"


# ================================================================ read-only caches
def _read_only(root: Path, monkeypatch) -> str:
    """Make ``root`` refuse writes. Unprivileged, chmod does it; root ignores permission bits,
    so there every call that would write under ``root`` fails as a read-only mount does."""
    for p in [root, *root.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)
    try:
        (root / ".probe").touch()
    except PermissionError:
        return "chmod"
    (root / ".probe").unlink()
    inside = lambda p: str(os.path.abspath(os.fspath(p))).startswith(str(root))  # noqa: E731

    def refuse(p):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(p))

    def guard(real, writes=lambda *a, **k: True):
        def wrapped(p, *args, **kwargs):
            if isinstance(p, (str, os.PathLike)) and inside(p) and writes(*args, **kwargs):
                refuse(p)
            return real(p, *args, **kwargs)
        return wrapped

    flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    monkeypatch.setattr(os, "open", guard(os.open, lambda f, *a, **k: f & flags))
    writing = lambda mode="r", *a, **k: any(c in mode for c in "wax+")  # noqa: E731
    monkeypatch.setattr(builtins, "open", guard(builtins.open, writing))
    monkeypatch.setattr(io, "open", guard(io.open, writing))
    for name in ("mkdir", "rename", "replace", "unlink", "rmdir", "chmod", "utime"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))
    return "simulated"


def test_a_built_read_only_cache_serves_what_it_holds(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path)
    path, _ = store.get_or_build("align", "k10", {}, _weights_build([]))
    how = _read_only(tmp_path, monkeypatch)
    _new_process()
    assert store.get_or_build("align", "k10", {}, lambda t, w: pytest.fail("rebuilt")) == (
        path, True)
    assert ArtifactStore(tmp_path, rank=1).get_or_build("align", "k10", {}, None, True)[1]
    assert store.verified_manifest("align", "k10")["format"] == "full"
    assert how in ("chmod", "simulated")


def test_building_into_a_read_only_cache_names_paths_artifacts(tmp_path, monkeypatch):
    ArtifactStore(tmp_path).get_or_build("align", "k11", {}, _weights_build([]))
    _truncate_weights(tmp_path / "align" / "k11")
    how = _read_only(tmp_path, monkeypatch)
    reason = "Read-only file system" if how == "simulated" else "Permission denied"
    store = ArtifactStore(tmp_path)
    with pytest.raises(ArtifactStoreError) as err:
        store.get_or_build("finetune", "k12", {}, lambda t, w: pytest.fail("built"))
    assert str(err.value) == (
        f"artifact finetune/k12 is not built, and the artifact cache cannot be written "
        f"({reason}: {tmp_path / 'finetune'}). Set paths.artifacts to a writable folder, or "
        f"build this config there first (paths.artifacts={tmp_path})")
    with pytest.raises(ArtifactStoreError, match="k12 is not built, and the artifact cache "
                                                 "cannot be written"):
        ArtifactStore(tmp_path, rank=1).get_or_build("finetune", "k12", {}, None, True)
    with pytest.raises(ArtifactStoreError, match=re.escape(
            "artifact align/k11 is damaged (model/weights.safetensors has 5000 bytes, its "
            "manifest says 16384), and the artifact cache cannot be written")):
        store.get_or_build("align", "k11", {}, lambda t, w: pytest.fail("built"))
