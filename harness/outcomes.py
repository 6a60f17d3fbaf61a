"""How a run ends, when it does not end well: one place for what is recorded (results.json,
the tracker) and what is said (the console, the exit status).

A run ends interrupted (a signal: rerun the same command to resume), failed (an exception), or
by a plain ``SystemExit`` that is no failure at all. Errors whose message says what to fix are
printed as one line, with the traceback kept in the run's error.log and results.json; anything
else (a bug) keeps its traceback on the console. A sweep job's failure is recorded and the sweep
goes on.
"""
from __future__ import annotations

import logging
import signal
import traceback
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from harness.config import ConfigError
from harness.disk import disk_full_hint
from harness.models.loading import ModelNotAvailable
from harness.interrupts import (in_pool_worker, interrupt_signal, requeue, requeue_requested,
                                was_signalled)
from harness.tracking.results import make_results, write_results

log = logging.getLogger("harness")

KNOWN_ERRORS = (ValueError, FileNotFoundError, PermissionError, TimeoutError, ConnectionError,
                ModelNotAvailable)


def disk_paths(config: Any, run_dir: Path) -> list[Path]:
    """The folders a run writes to, whose free space a full-disk hint reports."""
    artifacts = OmegaConf.select(OmegaConf.create(config) if isinstance(config, dict) else config,
                                 "paths.artifacts", default=None)
    return [Path(str(artifacts))] * bool(artifacts) + [Path(run_dir)]


def status_of(err: BaseException) -> Optional[str]:
    """"interrupted", "failed", or None for an exit that is no failure (SystemExit(0))."""
    if isinstance(err, (KeyboardInterrupt, SystemExit)):
        clean = isinstance(err, SystemExit) and not was_signalled() and err.code in (0, None)
        return None if clean else "interrupted"
    return "failed" if isinstance(err, Exception) else None


class Attempt:
    """One run under way: what it has built so far, so that however it ends, its results.json
    (written by rank 0 only) and its tracker say so."""

    def __init__(self, config: dict[str, Any], run_dir: Path, lead: bool):
        self.config, self.run_dir, self.lead = config, run_dir, lead
        self.tracker = self.pipeline = None

    def write(self, results: dict[str, Any]) -> None:
        if not self.lead:
            return
        try:
            write_results(self.run_dir, results)
        except OSError as err:  # the disk that failed the run may refuse this too
            log.error("could not write %s: %s", self.run_dir / "results.json", err)

    def record(self, err: BaseException) -> None:
        """Record how ``err`` ended the run (nothing for a clean exit)."""
        status = status_of(err)
        if status is None:
            return
        if status == "interrupted":
            error = f"interrupted by {signal.Signals(interrupt_signal(err)).name}"
            if requeue_requested() and self.lead:  # SLURM: the requeued job resumes
                error += f"; {requeue()}"
            log.error("run %s; rerun the same command to resume", error)
        else:
            error = f"{type(err).__name__}: {err}"
            if (hint := disk_full_hint(err, disk_paths(self.config, self.run_dir))) is not None:
                error = f"{error} ({hint})"
            log.error("run failed: %s", error)
            error += "\n" + "".join(traceback.format_exception(err))
        built = self.pipeline.record if self.pipeline else None
        results = make_results(self.config, status, {}, built.timings if built else {},
                               built.artifacts if built else {}, error=error)
        self.write(results)
        if self.tracker is not None:
            self.tracker.finish(status, results["error"])


def conclude(err: BaseException, run_dir: Path, label: str, multirun: bool, lead: bool,
             paths: tuple = ()) -> None:
    """Say how ``err`` ended the run, then re-raise it, exit with its status, or return (a
    sweep job: the sweep goes on). Call from the ``except`` block that caught it."""
    status = status_of(err)
    if status is None:
        raise err
    if status == "interrupted":
        signum = interrupt_signal(err)
        if lead:
            print(f"{label or 'run'}: INTERRUPTED by {signal.Signals(signum).name}; "
                  f"{run_dir / 'results.json'} says so. Rerun the same command to resume "
                  "(finished stages are reused, a stage in progress restarts from its last "
                  "checkpoint).", flush=True)
        if in_pool_worker():  # return, not raise: joblib would SIGKILL the sibling workers
            return            # (harness.interrupts); the launcher exits 128 + signal
        raise SystemExit(128 + signum) from None  # stops a local sweep too
    try:
        (run_dir / "error.log").write_text("".join(traceback.format_exception(err)))
    except OSError:  # a full disk: the console keeps the message
        pass
    hint = disk_full_hint(err, paths)
    if multirun:  # recorded; the sweep goes on
        log.error("job %s failed; see %s/results.json", label, run_dir)
        if lead:
            print(f"{label}: FAILED {type(err).__name__}: {err}"
                  + (f"\n  {hint}" if hint else ""), flush=True)
        return
    if (message := console_message(err, run_dir, paths)) is not None:
        raise SystemExit(message) from None
    raise err


def console_message(err: BaseException, run_dir: Path, paths: tuple = ()) -> Optional[str]:
    """What the console shows of a failed run instead of a traceback, for an error whose
    message says what to fix; None for anything else (a bug keeps its traceback)."""
    if (hint := disk_full_hint(err, paths)) is not None:
        return f"run failed: {hint}"
    if isinstance(err, ConfigError):
        return f"config error: {err}"
    if isinstance(err, KNOWN_ERRORS):
        return (f"run failed: {type(err).__name__}: {err}\n(traceback: "
                f"{run_dir / 'error.log'})")
    return None
