"""Hydra entry point: compose -> validate -> pipeline -> results.json. No method logic here."""
from __future__ import annotations

import json
import logging
import signal
import time
import traceback
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

import harness  # noqa: F401 - sets the offline environment before HF or W&B import
from harness.config import ConfigError, register, validate
from harness.data.collate import forget_warnings
from harness.disk import disk_full_hint
from harness.distributed import end_job, is_rank_zero, patch_ddp_launch
from harness.interrupts import (in_pool_worker, install_signal_handlers, interrupt_signal,
                                requeue, requeue_requested, running, was_signalled)
from harness.reproducibility import pin_threads
from harness.sweeps import objective, register_resolvers
from harness.tracking.console import status_line, summary_table
from harness.tracking.results import make_results, write_results

log = logging.getLogger("harness")
# Lightning's per-fit banner (GPU/TPU available, tips) repeats for every stage; keep warnings.
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
register()
register_resolvers()  # ${remaining_trials:...}, for the Optuna sweeper's n_trials


# Errors whose message says what to fix: printed as one line, the traceback kept in the run's
# error.log and results.json. Anything else (a bug) keeps its traceback on the console.
KNOWN_ERRORS = (ValueError, FileNotFoundError, PermissionError, TimeoutError, ConnectionError)


def disk_paths(cfg: DictConfig, run_dir: Path) -> list[Path]:
    """The folders a run writes to, whose free space a full-disk hint reports."""
    artifacts = OmegaConf.select(cfg, "paths.artifacts", default=None)
    return [Path(str(artifacts))] * bool(artifacts) + [Path(run_dir)]


def run_name(cfg: DictConfig) -> str:
    return (f"{cfg.defense.name}-p{cfg.attack.p}-n{cfg.attack.n}-{cfg.task.name}"
            f"-{cfg.model.name}-s{cfg.seed}")


def execute(cfg: DictConfig, run_dir: Path) -> dict:
    """One run, always leaving a results.json (status ok or failed) and a finished W&B run."""
    from harness.pipeline import Pipeline
    from harness.tracking.tracker import Tracker

    config = OmegaConf.to_container(cfg, resolve=True)
    t0 = time.perf_counter()
    tracker = pipeline = None
    lead = is_rank_zero()  # DDP workers train, but only rank 0 logs and writes results
    forget_warnings()
    try:
        run = validate(cfg)
        pin_threads(run.torch_threads)  # before any tensor work: the count is part of the keys
        run.paths.artifacts = to_absolute_path(run.paths.artifacts)
        if run.trainer.strategy.startswith("ddp") or run.trainer.strategy == "fsdp":
            patch_ddp_launch()  # both relaunch ranks through Lightning's subprocess launcher
        tags = [f"defense:{run.defense.name}", f"p:{run.attack.p}", f"n:{run.attack.n}",
                f"task:{run.task.name}", f"model:{run.model.name}", f"seed:{run.seed}",
                f"protocol:{run.protocol.name}"]
        if not lead:
            run.logger.kind = "none"
        tracker = Tracker(run.logger, run_dir, run_name(cfg), config, tags)
        pipeline = Pipeline(run, run_dir, tracker)
        metrics = pipeline.run_all()
        tracker.log_metrics({k: v for k, v in metrics.items() if k != "data"})
        timings = {**pipeline.timings, "total": round(time.perf_counter() - t0, 3)}
        results = make_results(config, "ok", metrics, timings, pipeline.artifacts)
        if lead:
            write_results(run_dir, results)
        tracker.finish("ok")
        return results
    except (KeyboardInterrupt, SystemExit) as err:
        if isinstance(err, SystemExit) and not was_signalled() and err.code in (0, None):
            raise
        name = signal.Signals(interrupt_signal(err)).name
        error = f"interrupted by {name}"
        if requeue_requested() and lead:  # SLURM: the requeued job resumes (harness.interrupts)
            error += f"; {requeue()}"
        log.error("run %s; rerun the same command to resume", error)
        results = make_results(config, "interrupted", {}, pipeline.timings if pipeline else {},
                               pipeline.artifacts if pipeline else {}, error=error)
        if lead:
            write_results(run_dir, results)
        if tracker is not None:
            tracker.finish("interrupted", results["error"])
        raise
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
        if (hint := disk_full_hint(err, disk_paths(cfg, run_dir))) is not None:
            error = f"{error} ({hint})"
        log.error("run failed: %s", error)
        results = make_results(config, "failed", {}, pipeline.timings if pipeline else {},
                               pipeline.artifacts if pipeline else {},
                               error=error + "\n" + traceback.format_exc())
        if lead:
            try:
                write_results(run_dir, results)
            except OSError as write_err:  # the disk that failed the run may refuse this too
                log.error("could not write %s: %s", run_dir / "results.json", write_err)
        if tracker is not None:
            tracker.finish("failed", results["error"])
        raise
    finally:
        end_job()


def finished_results(cfg: DictConfig, run_dir: Path) -> dict | None:
    """The results of an earlier, successful run of this same config in this dir, if any."""
    path = run_dir / "results.json"
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    same = old.get("config") == OmegaConf.to_container(cfg, resolve=True)
    return old if old.get("status") == "ok" and same else None


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> Optional[float]:
    """Returns the run's objective (harness.sweeps): the Optuna sweeper maximises it."""
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    lead = is_rank_zero()
    multirun = hc.mode == RunMode.MULTIRUN
    label = job_label(hc) if multirun else ""
    if multirun and (done := finished_results(cfg, run_dir)) is not None:
        if lead:  # a re-run sweep picks up where it stopped
            print(status_line(done, label, " (results exist; skipped)"), flush=True)
        return objective(done, cfg.sweep.fa_floor)
    install_signal_handlers(pool_worker=_in_loky_worker())
    if in_pool_worker() and was_signalled():  # the sweep is stopping: start no new job
        print(f"{label}: not started (sweep interrupted by "
              f"{signal.Signals(interrupt_signal()).name})", flush=True)
        return None
    try:
        with running():
            results = execute(cfg, run_dir)
    except (KeyboardInterrupt, SystemExit) as err:
        if isinstance(err, SystemExit) and not was_signalled() and err.code in (0, None):
            raise
        signum = interrupt_signal(err)
        if lead:
            print(f"{label or 'run'}: INTERRUPTED by {signal.Signals(signum).name}; "
                  f"{run_dir / 'results.json'} says so. Rerun the same command to resume "
                  "(finished stages are reused, a stage in progress restarts from its last "
                  "checkpoint).", flush=True)
        if in_pool_worker():  # return, not raise: joblib would SIGKILL the sibling workers
            return None       # (harness.interrupts); the launcher exits 128 + signal
        raise SystemExit(128 + signum) from None  # stops a local sweep too
    except Exception as err:
        try:
            (run_dir / "error.log").write_text(traceback.format_exc())
        except OSError:  # a full disk: the console keeps the message
            pass
        hint = disk_full_hint(err, disk_paths(cfg, run_dir))
        if multirun:  # record it and let the sweep go on
            log.error("job %s failed; see %s/results.json", hc.job.num, run_dir)
            if lead:
                print(f"{label}: FAILED {type(err).__name__}: {err}"
                      + (f"\n  {hint}" if hint else ""), flush=True)
            return
        if hint is not None:
            raise SystemExit(f"run failed: {hint}") from None
        if isinstance(err, ConfigError):
            raise SystemExit(f"config error: {err}") from None
        if isinstance(err, KNOWN_ERRORS):
            raise SystemExit(f"run failed: {type(err).__name__}: {err}\n(traceback: "
                             f"{run_dir / 'error.log'})") from None
        raise
    if lead and multirun:
        print(status_line(results, label), flush=True)
    elif lead:
        print(summary_table(results))
        print(f"results: {run_dir / 'results.json'}")
    return objective(results, cfg.sweep.fa_floor)


def _in_loky_worker() -> bool:
    """A hydra/launcher=joblib worker (with n_jobs=1 joblib runs the jobs in-process)."""
    import multiprocessing

    return multiprocessing.current_process().name.startswith("LokyProcess")


def sweep_grid(params: dict, arguments: list[str]) -> Optional[dict[str, int]]:
    """Values per key of the basic sweeper's grid, as it builds it: its params, then the
    command line's overrides, the later winning for the same key (BasicSweeper.split_arguments).
    None when the count cannot be known without the config loader or a sampler (glob, interval)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType

    parsed = OverridesParser.create().parse_overrides(
        [f"{k}={v}" for k, v in params.items()] + list(arguments))
    grid: dict[str, Optional[int]] = {}
    for o in parsed:
        if not o.is_sweep_override():
            grid[o.get_key_element()] = 1
        elif o.is_discrete_sweep() and o.value_type != ValueType.GLOB_CHOICE_SWEEP:
            grid[o.get_key_element()] = len(list(o.sweep_string_iterator()))
        else:
            grid[o.get_key_element()] = None
    return None if None in grid.values() else grid  # type: ignore[return-value]


def sweep_arguments(hc) -> Optional[list[str]]:
    """The sweep's command-line overrides: the sweeper saves its config (with them, sweep
    expressions unexpanded) as multirun.yaml in the sweep dir before it launches any job."""
    path = Path(hc.sweep.dir) / "multirun.yaml"
    try:
        return list(OmegaConf.load(path).hydra.overrides.task)
    except Exception:  # noqa: BLE001 - absent or unreadable: the count is unknown
        return None


def job_label(hc) -> str:
    """``[k/N] key=value ...`` for a sweep job: N from the basic sweeper's grid (its params and
    the command line's sweeps), ``[k]`` where unknown (a glob, another sweeper as Optuna); the
    overrides shown are the job's values of the swept keys."""
    params = dict(getattr(hc.sweeper, "params", None) or {})
    arguments = sweep_arguments(hc)
    basic = str(hc.sweeper.get("_target_", "")).endswith("BasicSweeper")
    grid = sweep_grid(params, arguments) if basic and arguments is not None else None
    total = 1
    for n in (grid or {}).values():
        total *= n
    swept = {k.lstrip("+~") for k, n in (grid or {}).items() if n > 1} or {
        k.lstrip("+~") for k in params}
    job = [o for o in hc.overrides.task if not o.startswith("hydra")]
    shown = [o for o in job if o.split("=")[0].lstrip("+~") in swept] or job
    index = f"[{hc.job.num + 1}/{total}]" if grid is not None else f"[{hc.job.num + 1}]"
    return f"{index} {' '.join(shown)}"


if __name__ == "__main__":
    main()
