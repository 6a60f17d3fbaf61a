"""Hydra entry point: compose -> validate -> pipeline -> results.json. No method logic here;
how a run that does not end well is recorded and reported lives in ``harness.outcomes``, the
sweep job's label and skip in ``harness.sweeps``."""
from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

import harness  # noqa: F401 - sets the offline environment before HF or W&B import
from harness.config import register
from harness.preflight import preflight
from harness.validation import validate
from harness.data.collate import forget_warnings
from harness.distributed import end_job, is_rank_zero, patch_ddp_launch
from harness.interrupts import (in_pool_worker, install_signal_handlers, interrupt_signal,
                                running, was_signalled)
from harness.outcomes import Attempt, conclude, disk_paths
from harness.reproducibility import pin_threads
from harness.sweeps import (finished_results, in_loky_worker, job_label, objective,
                            register_resolvers)
from harness.tracking.console import status_line, summary_table
from harness.tracking.results import make_results

log = logging.getLogger("harness")
# Lightning's per-fit banner (GPU/TPU available, tips) repeats for every stage; keep warnings.
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
register()
register_resolvers()  # ${remaining_trials:...}, for the Optuna sweeper's n_trials


def execute(cfg: DictConfig, run_dir: Path) -> dict:
    """One run, always leaving a results.json (status ok, failed or interrupted; rank 0 writes
    it) and a finished tracker run; a failure is re-raised once recorded."""
    from harness.pipeline import Pipeline
    from harness.tracking.tracker import Tracker, run_name, run_tags

    config = OmegaConf.to_container(cfg, resolve=True)
    t0 = time.perf_counter()
    attempt = Attempt(config, run_dir, lead=is_rank_zero())
    forget_warnings()
    try:
        run = validate(cfg)
        preflight(run)  # this machine's devices and models, before anything loads or trains
        pin_threads(run.torch_threads)  # before any tensor work: the count is part of the keys
        run.paths.artifacts = to_absolute_path(run.paths.artifacts)
        if run.trainer.strategy.startswith("ddp") or run.trainer.strategy == "fsdp":
            patch_ddp_launch()  # both relaunch ranks through Lightning's subprocess launcher
        if not attempt.lead:  # DDP workers train, but only rank 0 logs and writes results
            run.logger.kind = "none"
        attempt.tracker = tracker = Tracker(run.logger, run_dir, run_name(run), config,
                                            run_tags(run))
        attempt.pipeline = pipeline = Pipeline(run, run_dir, tracker)
        metrics = pipeline.run_all()
        tracker.log_metrics({k: v for k, v in metrics.items() if k != "data"})
        timings = {**pipeline.record.timings, "total": round(time.perf_counter() - t0, 3)}
        results = make_results(config, "ok", metrics, timings, pipeline.record.artifacts)
        attempt.write(results)
        tracker.finish("ok")
        return results
    except BaseException as err:
        attempt.record(err)
        raise
    finally:
        end_job()


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
        return objective(done, cfg.sweep.reference_fa)
    install_signal_handlers(pool_worker=in_loky_worker())
    if in_pool_worker() and was_signalled():  # the sweep is stopping: start no new job
        print(f"{label}: not started (sweep interrupted by "
              f"{signal.Signals(interrupt_signal()).name})", flush=True)
        return None
    try:
        with running():
            results = execute(cfg, run_dir)
    except BaseException as err:
        conclude(err, run_dir, label, multirun, lead, tuple(disk_paths(cfg, run_dir)))
        return None
    if lead:
        print(status_line(results, label) if multirun else
              f"{summary_table(results)}\nresults: {run_dir / 'results.json'}", flush=True)
    return objective(results, cfg.sweep.reference_fa)


if __name__ == "__main__":
    main()
