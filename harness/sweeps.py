"""Attacker-side sweeps: Hydra's Optuna sweeper searches the attack's settings per
defense (+experiment=toy/worst_case); this module is the glue it needs.

- ``objective``: what a run returns to the sweeper, the final model's HS; a run whose FA falls
  below ``sweep.fa_floor`` returns HS - 100, below every feasible trial, so the sampler steers
  toward attacks that keep the model useful (the utility bound). A failed run returns None,
  which the sweeper records as a failed trial.
- ``remaining_trials``: the OmegaConf resolver ``${remaining_trials:storage,study,budget}``,
  so that ``hydra.sweeper.n_trials`` is the budget less the trials the on-disk study already
  finished: rerunning an interrupted sweep completes the budget instead of adding a new one.
"""
from __future__ import annotations

import os
from typing import Any, Optional

from omegaconf import OmegaConf

INFEASIBLE = 100.0  # HS lies in [0, 100]: HS - 100 is below every feasible trial


def objective(results: dict[str, Any], fa_floor: Optional[float]) -> Optional[float]:
    if results.get("status") != "ok":
        return None
    final = results.get("metrics", {}).get("final", {})
    if "hs" not in final:
        return None
    if fa_floor is not None and final.get("fa", 0.0) < fa_floor:
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
