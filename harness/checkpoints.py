"""Lightning checkpoints a stage can resume from: written atomically, checked before use.

Lightning 2.6 serialises a checkpoint in memory and writes it through fsspec, whose temp file lies
in the system temp folder: the final move is a copy when that is another filesystem, so a full
disk or a kill mid-copy leaves a truncated ``last.ckpt``, and every later resume of the stage dies
reading it. ``AtomicCheckpointIO`` writes beside the target and renames; ``resumable_checkpoint``
sets aside a checkpoint that does not read back and falls back to an older one, or to none.
"""
from __future__ import annotations

import logging
import os
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from harness.artifacts import file_mode

log = logging.getLogger(__name__)
LAST = "last.ckpt"


def checkpoint_problem(path: Path) -> Optional[str]:
    """What makes ``path`` unusable as a checkpoint, or None. torch.save writes a zip archive
    with a CRC per member: reading every member back catches truncation and overwritten bytes
    for the cost of one read, without unpickling (or holding) the whole checkpoint."""
    path = Path(path)
    try:
        if not zipfile.is_zipfile(path):
            return f"not a zip archive ({path.stat().st_size} bytes; truncated?)"
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as err:
        return f"unreadable ({type(err).__name__}: {err})"
    if bad is not None:
        return f"its member {bad} fails its CRC check"
    if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return "a zip archive, but not one torch.save wrote (no data.pkl)"
    return None


def _aside(path: Path) -> Path:
    n = 0
    while path.with_name(f"{path.name}.corrupt-{n}").exists():
        n += 1
    return path.with_name(f"{path.name}.corrupt-{n}")


def resumable_checkpoint(ckpt_dir: Path, label: str = "", set_aside: bool = True
                         ) -> Optional[Path]:
    """``last.ckpt`` if it reads back, else the newest ``*.ckpt`` that does, else None (the stage
    starts from scratch). Unusable ones are renamed ``<name>.corrupt-<n>`` with a warning, and
    temp files of an interrupted save are removed. ``set_aside=False`` (DDP workers, which look
    at the same folder as rank 0) only skips them: every rank reaches the same choice."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    prefix = f"[{label}] " if label else ""
    if set_aside:
        for stale in ckpt_dir.glob(".*.ckpt.*.tmp"):  # a save killed before its rename
            stale.unlink(missing_ok=True)
    candidates = sorted((p for p in ckpt_dir.glob("*.ckpt") if p.is_file()),
                        key=lambda p: (p.name != LAST, -p.stat().st_mtime_ns, p.name))
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            if path.name != LAST:
                log.warning("%sresuming from the older checkpoint %s instead", prefix, path)
            return path
        where = ""
        if set_aside:
            aside = _aside(path)
            os.rename(path, aside)
            where = f"; moved it to {aside}"
        log.warning("%scheckpoint %s is unusable: %s%s", prefix, path, problem, where)
    if candidates:
        log.warning("%sno usable checkpoint in %s: the stage starts again from its first step",
                    prefix, ckpt_dir)
    return None


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder; the rename still happened
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save to a temp file in the target's folder, fsync, then rename over the target: the
    previous checkpoint stays whole until the new one is complete on disk. Pass it to the
    Trainer as ``plugins=[AtomicCheckpointIO()]``; loading is TorchCheckpointIO's."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fchmod(f.fileno(), file_mode())
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)


class RngState(L.Callback):
    """Carries the global random states (torch CPU and CUDA, numpy, random) in the checkpoint
    and restores them when training starts, after everything a resumed fit builds first: a
    method or a LoRA adapter with dropout then draws what the uninterrupted run drew.

    Only rank 0 writes the checkpoint, so under DDP every rank gets rank 0's states back; ranks
    whose padded batches differ in shape have drawn differently, so with dropout a multi-process
    resume is exact in data, weights and optimizer state up to the stop, not in later masks."""

    def __init__(self) -> None:
        self._pending: Optional[dict[str, Any]] = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        np_state = np.random.get_state()
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            # lists, not arrays: torch.load(weights_only=True) reads them
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": random.getstate()}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._pending = checkpoint.get("rng_states")

    def on_train_start(self, trainer, pl_module) -> None:
        state, self._pending = self._pending, None
        if state is None:
            return
        torch.set_rng_state(state["torch"])
        if state["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        name, key, *rest = state["numpy"]
        np.random.set_state((name, np.asarray(key, dtype=np.uint32), *rest))
        random.setstate(tuple(x if not isinstance(x, list) else tuple(x)
                              for x in state["python"]))
