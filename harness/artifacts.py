"""Content-addressed stage outputs: keyed by a hash of everything that determines them.

A stage output is a folder ``<root>/<stage>/<key>/`` holding its files and ``manifest.json``.
Builds happen in a temp folder that is renamed into place, and the manifest is written last, so
a folder with a manifest is complete by construction. A file lock per key makes concurrent sweep
jobs wait for one builder instead of building twice. Lightning checkpoints live in a work folder
beside it until the build succeeds, so an interrupted stage resumes mid-way.

The manifest lists every file with its size and sha256. Reuse checks the sizes every time and
the digests once per process (``digest="always"``: every time), before any lock is taken, so a
read-only cache serves what it holds. An artifact that fails the check is moved aside
(``.corrupt-<key>-<id>``, kept for inspection) and rebuilt, with a warning naming it: a key
promises the content an uninterrupted build would have written, and a damaged file breaks that
promise as surely as a missing one. A folder whose manifest is gone is damaged the same way
(builds are renamed into place with their manifest). An artifact whose manifest lists no files
loads unverified.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional

from filelock import FileLock

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
ARTIFACTS_KEY = "paths.artifacts"  # the config key named when the cache cannot be written


class ArtifactStoreError(ValueError):
    """The cache cannot serve or build an artifact; the message names the artifact and the fix."""


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def artifact_key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]


@lru_cache(maxsize=1)
def git_hash() -> str:
    """The commit, with ``-dirty`` when tracked files differ from it: a result made from
    uncommitted code must not claim a commit's name."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7",
                              "--exclude=*"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance() -> dict[str, Any]:
    """Code and library versions, recorded in every manifest and results file. The CPU thread
    count, model and vector-instruction level are among them: on CPU they change float
    reductions, and a seed reproduces its numbers only where all three agree."""
    import platform

    import lightning
    import numpy
    import peft
    import torch
    import transformers

    from harness.reproducibility import cpu_info

    return {"git": git_hash(), "dirty": git_hash().endswith("-dirty"),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "lightning": lightning.__version__, "numpy": numpy.__version__,
            "torch_threads": torch.get_num_threads(), **cpu_info()}


# The libraries whose version can change what a stage computes (kernels, model code, LoRA, the
# training loop). A reused artifact built under another version of one of them is named in a
# warning; numpy and python are recorded but not compared (neither computes a stage's tensors).
COMPARED_LIBRARIES = ("torch", "transformers", "peft", "lightning")


def library_mismatch(built_by: dict[str, Any], now: dict[str, Any]) -> dict[str, list[str]]:
    """{library: [the builder's version, this process's]} for each compared library whose
    version differs; a library the builder did not record is not compared."""
    return {lib: [str(built_by[lib]), str(now.get(lib))] for lib in COMPARED_LIBRARIES
            if built_by.get(lib) is not None and str(built_by[lib]) != str(now.get(lib))}


@lru_cache(maxsize=1)
def umask() -> int:
    """The process umask, read once. Linux reports it in /proc; elsewhere it can only be read by
    setting it, which a thread creating a file at that instant would see, hence only once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open()`` would give a new file: mkstemp's 0600 would hide shared results."""
    return 0o666 & ~umask()


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write to a temp file in the same folder, fsync, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fchmod(f.fileno(), file_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def inventory(folder: Path) -> list[dict[str, Any]]:
    """Every file under ``folder`` but the manifest: relative path, size and sha256."""
    folder = Path(folder)
    return [{"path": p.relative_to(folder).as_posix(), "size": p.stat().st_size,
             "sha256": file_digest(p)}
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST]


def share_per_umask(folder: Path) -> None:
    """Add the read (and, for folders, search) bits the umask allows: a build may write through
    mkstemp (0600) or mkdtemp (0700), which would hide a shared cache from its other users."""
    mask = umask()
    for p in [Path(folder), *Path(folder).rglob("*")]:
        if p.is_symlink():
            continue
        mode = p.stat().st_mode
        want = (0o555 if p.is_dir() else 0o444) & ~mask
        if mode & want != want:
            os.chmod(p, (mode | want) & 0o7777)


# Artifacts whose digests matched in this process: (folder, manifest inode, manifest mtime), so a
# folder rebuilt under the same key is checked again.
_DIGESTED: set[tuple[str, int, int]] = set()
_DIGESTED_LOCK = threading.Lock()


class ArtifactStore:
    """``rank`` > 0 (a DDP worker) never commits: it joins a collective build (training) in a
    private temp folder and then waits for rank 0's artifact; other builds it just waits for.

    ``digest``: "once" checks an artifact's sha256 digests the first time this process reuses it
    (sizes every time); "always" on every reuse."""

    def __init__(self, root: str | Path, rank: int = 0, wait_seconds: float = 24 * 3600,
                 digest: str = "once"):
        if digest not in ("once", "always"):
            raise ValueError(f"digest must be 'once' or 'always', got {digest!r}")
        self.root = Path(root)
        self.rank = rank
        self.wait_seconds = wait_seconds
        self.digest = digest

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def work_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / ".work" / key

    def exists(self, stage: str, key: str) -> bool:
        return (self.path(stage, key) / MANIFEST).is_file()

    def _read_manifest(self, stage: str, key: str) -> dict[str, Any]:
        path = self.path(stage, key) / MANIFEST
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict):
            raise ValueError(f"a {type(manifest).__name__}, not an object")
        return manifest

    def problem(self, stage: str, key: str) -> Optional[str]:
        """What is wrong with the artifact under this key (None: intact, or built before
        manifests listed their files). Call it on an artifact that has a manifest."""
        folder = self.path(stage, key)
        try:
            stat = (folder / MANIFEST).stat()
            manifest = self._read_manifest(stage, key)
        except FileNotFoundError:
            return "its manifest is missing"
        except (OSError, ValueError) as err:  # a truncated manifest is a JSONDecodeError
            return f"its manifest is unreadable ({type(err).__name__}: {err})"
        files = manifest.get("files")
        if files is None:
            log.debug("artifact %s/%s predates file digests; reused unverified", stage, key)
            return None
        try:
            for entry in files:
                try:
                    size = (folder / entry["path"]).stat().st_size
                except FileNotFoundError:
                    return f"{entry['path']} is missing"
                if size != entry["size"]:
                    return f"{entry['path']} has {size} bytes, its manifest says {entry['size']}"
            memo = (str(folder.resolve()), stat.st_ino, stat.st_mtime_ns)
            if self.digest == "once" and memo in _DIGESTED:
                return None
            for entry in files:
                digest = file_digest(folder / entry["path"])
                if digest != entry["sha256"]:
                    return (f"{entry['path']} has sha256 {digest[:12]}..., its manifest says "
                            f"{entry['sha256'][:12]}...")
        except (KeyError, TypeError) as err:
            return f"its manifest's file list is malformed ({type(err).__name__}: {err})"
        with _DIGESTED_LOCK:
            _DIGESTED.add(memo)
        return None

    def manifest(self, stage: str, key: str) -> dict[str, Any]:
        path = self.path(stage, key) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"artifact {stage}/{key} has no manifest at {path}")
        try:
            return self._read_manifest(stage, key)
        except (OSError, ValueError) as err:
            raise ArtifactStoreError(f"artifact {stage}/{key}: its manifest {path} is unreadable "
                                     f"({err}); rerun to rebuild it") from err

    def verified_manifest(self, stage: str, key: str) -> dict[str, Any]:
        """The manifest of an artifact about to be loaded; a damaged artifact is refused, never
        loaded (a rerun sets it aside and rebuilds it)."""
        reusable, problem = self._intact(stage, key)
        if not reusable:
            problem = problem or "it is not built"
            raise ArtifactStoreError(f"artifact {stage}/{key} at {self.path(stage, key)} cannot "
                                     f"be loaded: {problem}. Rerun the same command: it sets a "
                                     "damaged artifact aside and rebuilds it")
        return self.manifest(stage, key)

    def _intact(self, stage: str, key: str) -> tuple[bool, Optional[str]]:
        """(reusable, what is wrong with a damaged one); (False, None) when nothing is there.
        A folder without its manifest is damaged, not unfinished: a build is renamed into place
        only after its manifest is written, so the manifest was lost afterwards."""
        if not self.exists(stage, key):
            if self.path(stage, key).is_dir():
                return False, "its manifest is missing"
            return False, None
        problem = self.problem(stage, key)
        return problem is None, problem

    def _writable(self, stage: str, key: str, problem: Optional[str]) -> None:
        """Raise a clear error where the cache cannot take a build. The probe creates the lock
        file, which the build needs anyway: os.access says yes to root on a read-only mount."""
        folder = self.path(stage, key).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            os.close(os.open(folder / f".{key}.lock", os.O_CREAT | os.O_RDWR, file_mode()))
        except OSError as err:
            state = f"is damaged ({problem})" if problem else "is not built"
            reason = os.strerror(err.errno) if err.errno else str(err)
            raise ArtifactStoreError(
                f"artifact {stage}/{key} {state}, and the artifact cache cannot be written "
                f"({reason}: {folder}). Set {ARTIFACTS_KEY} to a writable folder, or build this "
                f"config there first ({ARTIFACTS_KEY}={self.root})") from err

    def _set_aside(self, stage: str, key: str, problem: str) -> Path:
        final = self.path(stage, key)
        aside = final.parent / f".corrupt-{key}-{uuid.uuid4().hex[:8]}"
        os.rename(final, aside)
        log.warning("artifact %s/%s is damaged (%s): moved it to %s and rebuilding it", stage,
                    key, problem, aside)
        return aside

    def _follow(self, stage: str, key: str, build, collective: bool) -> tuple[Path, bool]:
        reusable, problem = self._intact(stage, key)
        if reusable:
            return self.path(stage, key), True
        self._writable(stage, key, problem)
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
        while not self._intact(stage, key)[0]:  # rank 0 sets a damaged one aside, then commits
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
        if self.rank != 0:
            return self._follow(stage, key, build, collective)
        reusable, problem = self._intact(stage, key)  # before the lock: read-only caches work
        if reusable:
            return final, True
        self._writable(stage, key, problem)
        with FileLock(str(final.parent / f".{key}.lock")):
            reusable, problem = self._intact(stage, key)  # another worker may have built it
            if reusable:
                return final, True
            if problem is not None:
                self._set_aside(stage, key, problem)
            for stale in final.parent.glob(f".tmp-{key}-*"):  # left by a killed process
                shutil.rmtree(stale, ignore_errors=True)
            tmp = final.parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            work = self.work_dir(stage, key)
            work.mkdir(parents=True, exist_ok=True)
            try:
                extra = build(tmp, work) or {}
                share_per_umask(tmp)
                files = inventory(tmp)
                write_json_atomic(tmp / MANIFEST, {**manifest, **extra, "key": key,
                                                   "stage": stage, "files": files})
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            stat = (final / MANIFEST).stat()
            with _DIGESTED_LOCK:  # just hashed: the first reuse in this process need not rehash
                _DIGESTED.add((str(final.resolve()), stat.st_ino, stat.st_mtime_ns))
            shutil.rmtree(work, ignore_errors=True)
            return final, False
