"""Content-addressed stage outputs: keyed by a hash of everything that determines them.

A stage output is a folder ``<root>/<stage>/<key>/`` holding its files and ``manifest.json``.
Builds happen in a temp folder that is renamed into place, and the manifest is written last, so
a folder with a manifest is complete by construction. A file lock per key makes concurrent sweep
jobs wait for one builder instead of building twice. Lightning checkpoints live in a work folder
beside it until the build succeeds, so an interrupted stage resumes mid-way.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from functools import lru_cache

from filelock import FileLock

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def artifact_key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]


@lru_cache(maxsize=1)
def git_hash() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance() -> dict[str, Any]:
    """Code and library versions, recorded in every manifest and results file. The CPU thread
    count, model and vector-instruction level are among them: on CPU they change float
    reductions, and a seed reproduces its numbers only where all three agree."""
    import lightning
    import torch
    import transformers

    from harness.reproducibility import cpu_info

    return {"git": git_hash(), "torch": torch.__version__,
            "transformers": transformers.__version__, "lightning": lightning.__version__,
            "torch_threads": torch.get_num_threads(), **cpu_info()}


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write to a temp file in the same folder, fsync, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ArtifactStore:
    """``rank`` > 0 (a DDP worker) never commits: it joins a collective build (training) in a
    private temp folder and then waits for rank 0's artifact; other builds it just waits for."""

    def __init__(self, root: str | Path, rank: int = 0, wait_seconds: float = 24 * 3600):
        self.root = Path(root)
        self.rank = rank
        self.wait_seconds = wait_seconds

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def work_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / ".work" / key

    def exists(self, stage: str, key: str) -> bool:
        return (self.path(stage, key) / MANIFEST).is_file()

    def manifest(self, stage: str, key: str) -> dict[str, Any]:
        path = self.path(stage, key) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"artifact {stage}/{key} has no manifest at {path}")
        return json.loads(path.read_text())

    def _follow(self, stage: str, key: str, build, collective: bool) -> tuple[Path, bool]:
        if self.exists(stage, key):
            return self.path(stage, key), True
        if collective:
            tmp = self.path(stage, key).parent / f".rank{self.rank}-{key}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                work = self.work_dir(stage, key)
                work.mkdir(parents=True, exist_ok=True)
                build(tmp, work)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        deadline = time.monotonic() + self.wait_seconds
        while not self.exists(stage, key):
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {self.rank}: rank 0 never wrote {stage}/{key}")
            time.sleep(1.0)
        return self.path(stage, key), False

    def get_or_build(self, stage: str, key: str, manifest: dict[str, Any],
                     build: Callable[[Path, Path], dict[str, Any] | None],
                     collective: bool = False) -> tuple[Path, bool]:
        """Return (folder, reused). ``build(tmp_dir, work_dir)`` fills tmp_dir and may return
        extra manifest fields. Nothing half-written survives an exception. ``collective`` builds
        (distributed training) run on every rank; rank 0 alone commits."""
        final = self.path(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        if self.rank != 0:
            return self._follow(stage, key, build, collective)
        with FileLock(str(final.parent / f".{key}.lock")):
            if self.exists(stage, key):
                return final, True
            for stale in final.parent.glob(f".tmp-{key}-*"):  # left by a killed process
                shutil.rmtree(stale, ignore_errors=True)
            if final.exists():  # a folder without a manifest is incomplete by definition
                shutil.rmtree(final)
            tmp = final.parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            work = self.work_dir(stage, key)
            work.mkdir(parents=True, exist_ok=True)
            try:
                extra = build(tmp, work) or {}
                write_json_atomic(tmp / MANIFEST, {**manifest, **extra, "key": key,
                                                   "stage": stage})
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            shutil.rmtree(work, ignore_errors=True)
            return final, False
