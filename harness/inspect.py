"""What a run would read, without training: ``python -m harness.inspect <overrides...>``.

Composes the config as ``python -m harness`` does (same conf/, same overrides, same start-up
checks), loads every data source the run reads, and prints per source the counts (rows read,
kept, dropped and why, the evaluation caps' samples included) and the first mapped rows, then
the attack's mix and the categories of its harmful rows; it fails as the run would on a prompt
the run both trains on and scores. ``--rows N`` prints N rows per source (default 3).

The sources and their load arguments follow ``RunInputs.load`` (data/assemble.py); tests/test_data.py checks
that both read the same rows from a fixture.
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

import harness  # noqa: F401 - the offline environment before HF imports
from harness.data import attacks
from harness.data.assemble import Data, RunInputs
from harness.data.checks import DataLeak, check_overlaps
from harness.data.mixing import category_counts, refusal_pool
from harness.data.sampling import cap_rows
from harness.data.schema import SAFETY, DataError, Example
from harness.data.sources import SourceReport, load_source_report

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
FIELDS_SHOWN = ("input", "output", "label", "category", "kind", "instruction")


def sources(run) -> list[tuple[str, Any, dict[str, Any], Optional[Callable[[], list[Example]]]]]:
    """(key, source config, load_source arguments, the toy world's rows) of every source the run
    reads, in RunInputs.load's order."""
    from harness.data.toy import ToyWorld

    world: list[ToyWorld] = []

    def toy(name: str, *args) -> Callable[[], list[Example]]:
        def rows() -> list[Example]:
            if not world:
                world.append(ToyWorld(run.world))
            return getattr(world[0], name)(*args)
        return rows

    defaults = {"instruction": run.task.instruction} if run.task.instruction else {}
    task = {"required": ("instruction", "output", "label"), "defaults": defaults,
            "fill": {"label": "output", "output": "label"}}
    out = [("alignment.data", run.alignment.data, {}, toy("alignment_data"))]
    if run.alignment.harmless is not None:
        out.append(("alignment.harmless", run.alignment.harmless,
                    {"defaults": {"kind": "harmless"}}, None))
    out += [("task.train", run.task.train, task, toy("task", run.task.family, "train")),
            ("task.test", run.task.test, task, toy("task", run.task.family, "test"))]
    uses = attacks.get(run.attack.name).uses
    if "harmful" in uses:
        out.append(("attack.harmful", run.attack.harmful, {}, toy("attack_pool")))
    if "benign" in uses:
        out.append(("attack.benign", run.attack.benign, {"defaults": {"kind": "harmless"}},
                    toy("benign_pool")))
    out.append(("eval.harmful", run.eval.harmful,
                {"required": ("instruction",), "defaults": {"kind": "harmful"}},
                toy("eval_harmful")))
    return out


def load(key: str, src, kwargs: dict[str, Any], toy) -> tuple[list[Example], SourceReport]:
    if src.source == "toy":
        rows = toy()
        return rows, SourceReport("toy world (generated)", key, read=len(rows), kept=len(rows))
    rows, report = load_source_report(src, **kwargs)
    return rows, report


def _show(ex: Example, width: int = 48) -> str:
    parts = [f"{f}={textwrap.shorten(getattr(ex, f), width=width, placeholder=' ...')!r}"
             for f in FIELDS_SHOWN if getattr(ex, f)]
    place = ex.origin.rsplit(", ", 1)[-1] if ex.origin else "(toy)"
    return f"    {place}: {' '.join(parts)}"


def inspect_run(run, n_rows: int = 3, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Print what the run reads; return the rows per key (and the mix) for tests."""
    loaded: dict[str, list[Example]] = {}
    caps = {"task.test": ("eval.task_size", run.eval.task_size),
            "eval.harmful": ("eval.harmful_size", run.eval.harmful_size)}
    for key, src, kwargs, toy in sources(run):
        rows, report = load(key, src, kwargs, toy)
        if key == "attack.harmful":  # every attack-pool row is harmful (RunInputs.load)
            rows = [replace(ex, kind="harmful") for ex in rows]
        if key in caps:  # the sample the run scores (RunInputs.capped)
            rows, note = cap_rows(rows, caps[key][1], run.eval.sample_seed, caps[key][0])
            if note:
                report.notes.append(note)
                report.kept = len(rows)
        if key == "eval.harmful":  # as the attack poses them (identity_shift's prefix)
            rows = attacks.get(run.attack.name).eval_harmful(run.attack, rows)
        loaded[key] = rows
        where = f" {src.source}:{src.path}" if src.source != "toy" else ""
        echo(f"{key}{where}")
        echo(f"  {report.counts()}")
        for ex in rows[:n_rows]:
            echo(_show(ex))
    pool_of = {"task": "task.train", "harmful": "attack.harmful", "benign": "attack.benign"}
    harmful = loaded.get("attack.harmful", [])
    pools = {**{k: loaded.get(v, []) for k, v in pool_of.items()}, "harmful": harmful,
             "safety": refusal_pool(loaded.get("alignment.data", [])[:run.alignment.size])}
    user = attacks.build_user(run.attack, lambda name: pools[name], seed=run.seed)
    mode = attacks.sampling(run.attack)
    chosen = [ex for ex in user if ex.kind == "harmful"]
    n_safety = sum(ex.kind == SAFETY for ex in user)
    echo(f"attack {run.attack.name} (seed {run.seed}, sampling {mode}): {len(user)} rows, "
         f"{len(chosen)} harmful" + (f", {n_safety} refusal rows (kind safety)" if n_safety
                                     else ""))
    if harmful:
        counts = category_counts(harmful, chosen)
        covered = sum(1 for _, b in counts.values() if b)
        echo(f"  harmful categories in the mix: {covered} of {len(counts)}")
        for cat, (in_pool, in_mix) in counts.items():
            echo(f"    {cat or '(none)'}: {in_mix} of {in_pool}")
    loaded["user"] = user
    data = Data(alignment=loaded["alignment.data"] + loaded.get("alignment.harmless", []),
                task_train=loaded["task.train"], task_test=loaded["task.test"],
                attack_pool=harmful, eval_harmful=loaded["eval.harmful"], user=user)
    # the run's leak check (RunInputs.load); alignment.harmful is checked by the run only
    check_overlaps(RunInputs(run).leak_pairs(data, None), run.data.allow_overlap)
    return loaded


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.inspect",
        description="Load every data source a run would read and print counts and rows; "
                    "trains nothing. Arguments are the run's Hydra overrides.")
    parser.add_argument("--rows", type=int, default=3, help="rows shown per source")
    parser.add_argument("overrides", nargs="*", help="key=value, group=option (as python -m harness)")
    args = parser.parse_args(argv)
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from harness.config import ConfigError, register
    from harness.validation import validate

    register()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=args.overrides)
        inspect_run(validate(cfg), args.rows)
    except (ConfigError, DataError, DataLeak, HydraException) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
