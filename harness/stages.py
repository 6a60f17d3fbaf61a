"""A stage's output as a reference (stage, key), and the record of every stage a run built or
reused, for results.json: its timing, artifact path, and its builder's provenance (the commit,
whether the tree was dirty, the library versions), read from the artifact's manifest, so a
reused stage is credited to the code that built it, not to the process that reused it."""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from harness.artifacts import ArtifactStore, library_mismatch, provenance

log = logging.getLogger("harness")


@functools.cache
def method_class(module: str) -> type:
    """The stage or post-hoc method class at its dotted path (``harness.defenses.sft.SFT``),
    imported once per process for the validator, the data, the keys, the stages and the bench.
    The flags read off it are declared, with their defaults, on ``StageModule`` and
    ``PosthocMethod``."""
    from hydra.utils import get_class

    return get_class(module)


@dataclass(frozen=True)
class ModelRef:
    stage: str
    key: str


class StageRecorder:
    """Builds (or reuses) one stage's artifact through the store and records what happened."""

    def __init__(self, store: ArtifactStore):
        self.store = store
        self.timings: dict[str, dict[str, Any]] = {}
        self.artifacts: dict[str, dict[str, Any]] = {}

    def __call__(self, stage: str, key: str, payload: dict, build: Callable,
                 label: Optional[str] = None, collective: bool = False) -> ModelRef:
        label = label or stage
        t0 = time.perf_counter()
        now = provenance()
        manifest = {"payload": payload, "provenance": now}
        _, reused = self.store.get_or_build(stage, key, manifest, build, collective)
        seconds = time.perf_counter() - t0
        self.timings[label] = {"seconds": round(seconds, 3), "reused": reused}
        built_by = self.store.manifest(stage, key).get("provenance") or {}
        self.artifacts[label] = {"key": key, "path": str(self.store.path(stage, key)),
                                 "reused": reused, "built_by": built_by,
                                 "dirty": bool(built_by.get("dirty")
                                               or str(built_by.get("git", "")).endswith("-dirty"))}
        mismatch = library_mismatch(built_by, now) if reused else {}
        if mismatch:
            self.artifacts[label]["library_mismatch"] = mismatch
            log.warning("[%s] reused artifact %s was built with %s; this process has %s. Its "
                        "numbers may differ from a rebuild here: delete %s to rebuild it",
                        label, key, ", ".join(f"{k} {v[0]}" for k, v in mismatch.items()),
                        ", ".join(f"{k} {v[1]}" for k, v in mismatch.items()),
                        self.store.path(stage, key))
        verb = "reused" if reused else ("built" if self.store.rank == 0 else "joined the build of")
        log.info("[%s] %s artifact %s (%.1fs)", label, verb, key, seconds)
        return ModelRef(stage, key)
