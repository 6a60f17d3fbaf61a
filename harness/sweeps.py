"""Attacker-side sweeps: Hydra's Optuna sweeper searches the attack's settings per
defense (+experiment=toy/worst_case); this module is the glue it needs.

- ``objective``: what a run returns to the sweeper, the final model's HS; a run that fails the
  capability guard (harness.guards.capability, against ``sweep.reference_fa``, the bound the
  report's worst-case table applies) returns HS - 100, below every feasible trial, so the
  sampler steers toward attacks that keep the model useful. A failed run returns None, which
  the sweeper records as a failed trial.
- ``job_label``: the ``[k/N] key=value`` a sweep job prints, N from the basic sweeper's grid;
  ``finished_results``: a re-run sweep skips the jobs that already finished.
- ``remaining_trials``: the OmegaConf resolver ``${remaining_trials:storage,study,budget}``,
  so that ``hydra.sweeper.n_trials`` is the budget less the trials the on-disk study already
  finished: rerunning an interrupted sweep completes the budget instead of adding a new one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from harness.guards import capability

INFEASIBLE = 100.0  # HS lies in [0, 100]: HS - 100 is below every feasible trial


def objective(results: dict[str, Any], reference_fa: Optional[float]) -> Optional[float]:
    if results.get("status") != "ok":
        return None
    final = results.get("metrics", {}).get("final", {})
    if "hs" not in final:
        return None
    if capability(final.get("fa"), final.get("other_rate"), reference_fa).ok is False:
        return float(final["hs"]) - INFEASIBLE
    return float(final["hs"])


def finished_trials(storage: str, study_name: str) -> int:
    """Trials of the stored study that completed or failed (an interrupted one stays RUNNING
    and is asked again)."""
    os.environ.setdefault("SQLALCHEMY_SILENCE_UBER_WARNING", "1")  # optuna 2.10 on SQLAlchemy 1.4
    import optuna

    if storage.startswith("sqlite:///"):  # the sweeper opens it before any job makes the folder
        from pathlib import Path

        Path(storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:  # no such study yet
        return 0
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
    return sum(t.state in done for t in study.get_trials(deepcopy=False))


def remaining_trials(storage: str, study_name: str, budget: int) -> int:
    return max(int(budget) - finished_trials(str(storage), str(study_name)), 0)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("remaining_trials"):
        OmegaConf.register_new_resolver("remaining_trials", remaining_trials)


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


def in_loky_worker() -> bool:
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
