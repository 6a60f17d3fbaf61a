"""``results.json``: the typed, versioned record of one run. W&B and reports are views of it.

``git`` and ``versions`` describe the process that wrote the file; each stage's own builder is
under ``artifacts.<stage>.built_by`` (a reused stage was built by an earlier process), and
``dirty_stages`` names the stages built from a tree with uncommitted changes."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.artifacts import provenance, write_json_atomic
from harness.protocols import protocol_record

SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"


def make_results(config: dict[str, Any], status: str, metrics: dict, timings: dict,
                 artifacts: dict, error: str | None = None) -> dict[str, Any]:
    prov = provenance()
    # the stages whose builder ran uncommitted code: their numbers belong to no commit
    dirty = sorted(label for label, a in artifacts.items()
                   if isinstance(a, dict) and a.get("dirty"))
    return {"schema_version": SCHEMA_VERSION, "git": prov["git"], "versions": prov,
            "dirty_stages": dirty,
            "status": status, "error": error, "config": config,
            "protocol": protocol_record(config),  # name + hash: the report compares hashes
            "metrics": metrics,
            "timings": timings, "artifacts": artifacts}


def write_results(run_dir: Path, results: dict[str, Any]) -> Path:
    path = Path(run_dir) / RESULTS_FILE
    write_json_atomic(path, results)
    return path

