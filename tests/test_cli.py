"""The command line as a user meets it: help, early config errors, and a sweep that survives a
failed job and reuses shared stages."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import HANG_S, TINY, harness_env

__all__ = ["TINY"]  # older test files import it from here

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path, timeout=HANG_S):
    env = harness_env(HARNESS_ARTIFACTS=str(tmp_path / "artifacts"))
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_help_lists_groups_and_usage(tmp_path):
    out = _run(["--help"], tmp_path)
    assert out.returncode == 0
    for text in ("python -m harness -m attack.p=", "defense: ", "model:", "tiny_llama",
                 "llama2_7b", "trainer: "):
        assert text in out.stdout
    defenses = next(line for line in out.stdout.splitlines() if line.startswith("defense: "))
    assert {"none", "sft"} <= {d.strip() for d in defenses[len("defense: "):].split(",")}


def test_bad_value_fails_before_anything_is_built(tmp_path):
    out = _run(["attack.p=1.5"], tmp_path)
    assert out.returncode != 0
    assert "attack.p: must lie in [0, 1], got 1.5" in out.stderr
    assert not (tmp_path / "artifacts").exists()


def test_malformed_task_file_fails_before_training(tmp_path):
    bad = tmp_path / "task.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    out = _run([*TINY, "task.train.source=local", f"task.train.path={bad}"], tmp_path)
    assert out.returncode != 0
    assert "task.jsonl, line 2: not valid JSON" in out.stderr
    assert not list((tmp_path / "artifacts").glob("base/*"))


@pytest.mark.slow  # a sweep of real runs in a subprocess (35-50 s)
def test_sweep_records_a_failed_job_and_reuses_stages(tmp_path):
    out = _run(["-m", *TINY, "attack.p=0,1.5,0.1", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
               tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    results = {int(p.parent.name): json.loads(p.read_text())
               for p in (tmp_path / "sweep").glob("*/results.json")}
    assert [results[i]["status"] for i in range(3)] == ["ok", "failed", "ok"]
    assert "attack.p" in results[1]["error"]
    assert not results[0]["timings"]["base"]["reused"]
    assert results[2]["timings"]["base"]["reused"] and results[2]["timings"]["align"]["reused"]
    assert not results[2]["timings"]["finetune"]["reused"]

    # the report marks the failed cell
    from harness.report import main as report
    report([str(tmp_path / "sweep"), "--out", str(tmp_path / "report")])
    md = (tmp_path / "report" / "report.md").read_text()
    assert "**runs**: 3, 1 failed" in md and "attack.p" in md.split("## Failed runs")[1]

    # a sweep killed after job 1: job 2's results are gone; the re-run does job 2 (and retries
    # the failed job 1) and skips job 0
    (tmp_path / "sweep" / "2" / "results.json").unlink()
    again = _run(["-m", *TINY, "attack.p=0,1.5,0.1", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                 tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    lines = [ln for ln in again.stdout.splitlines() if re.match(r"\[\d+(/\d+)?\] ", ln)]
    assert "skipped" in lines[0] and "FAILED" in lines[1] and "skipped" not in lines[2], lines
    # [k/N]: N from the command line's own sweep (no preset params)
    assert [ln.split(":")[0] for ln in lines] == ["[1/3] attack.p=0", "[2/3] attack.p=1.5",
                                                  "[3/3] attack.p=0.1"], lines
    redone = json.loads((tmp_path / "sweep" / "2" / "results.json").read_text())
    assert redone["status"] == "ok" and redone["timings"]["finetune"]["reused"]


@pytest.mark.slow  # a sweep of real runs in a subprocess (35-50 s)
def test_ddp_sweep_runs_each_job_once_on_two_ranks(tmp_path):
    """Under -m, Lightning's relaunched rank must run its parent's job, not a second sweep."""
    out = _run(["-m", *TINY, "trainer=ddp_cpu", "attack.p=0,0.1",
                f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in out.stderr
    jobs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    for job in jobs:
        assert (tmp_path / "sweep" / job / "train_ddp_process_1.log").is_file()
        assert json.loads((tmp_path / "sweep" / job / "results.json").read_text())["status"] == "ok"
    assert not (tmp_path / "multirun").exists()  # no stray sweep started by a worker


@pytest.mark.slow  # a sweep of real runs in a subprocess (35-50 s)
def test_joblib_sweep_runs_jobs_in_parallel_and_builds_shared_stages_once(tmp_path):
    """Two jobs start together under the joblib launcher; the file lock lets one build base and
    align while the other waits and reuses them."""
    out = _run(["-m", *TINY, "attack.p=0,0.1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    results = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/results.json"))]
    assert [r["status"] for r in results] == ["ok", "ok"]
    for stage in ("base", "align"):
        assert sorted(r["timings"][stage]["reused"] for r in results) == [False, True], stage
        assert len({r["artifacts"][stage]["key"] for r in results}) == 1
    assert not any(r["timings"]["finetune"]["reused"] for r in results)


def test_a_full_disk_says_what_to_free_and_keeps_the_record(make_cfg, tmp_path, monkeypatch):
    """ENOSPC mid-run: results.json records the failure with what to do, and the console's
    one line (harness.outcomes.disk_full_hint) names the fix; other OSErrors get no such hint."""
    import errno

    from harness import run as cli
    from harness.outcomes import disk_full_hint
    from harness.pipeline import Pipeline

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "artifacts/x.pt"))

    monkeypatch.setattr(Pipeline, "run_all", full)
    with pytest.raises(OSError):
        cli.execute(make_cfg(*TINY), tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "failed"
    assert "No space left on device" in results["error"]
    assert "writing " + str(tmp_path / "artifacts/x.pt") in results["error"]
    assert "set paths.artifacts to a larger disk, then rerun the same command" in results["error"]
    assert disk_full_hint(OSError(errno.EACCES, "denied")) is None


# ============================================================== the sweep job's label
BASIC = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def _fake_hydra(tmp_path, params, arguments, job, num=0, target=BASIC):
    """The HydraConfig fields job_label reads, and the multirun.yaml the sweeper writes."""
    from omegaconf import OmegaConf

    if arguments is not None:
        OmegaConf.save({"hydra": {"overrides": {"task": arguments}}}, tmp_path / "multirun.yaml")
    return OmegaConf.create({"sweeper": {"_target_": target, "params": params},
                             "sweep": {"dir": str(tmp_path)}, "overrides": {"task": job},
                             "job": {"num": num}})


def _hydra_count(params, arguments):
    """The number of jobs Hydra's basic sweeper itself makes of the same overrides."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(
        [f"{k}={v}" for k, v in params.items()] + arguments)
    return len(BasicSweeper.split_arguments(parsed, None)[0])


PRESET = {"defense": "sft,vaccine", "attack.p": "0,0.1,0.2"}


@pytest.mark.parametrize("params,arguments,total", [
    (PRESET, ["+experiment=toy/x"], 6),  # the preset's grid
    (PRESET, ["+experiment=toy/x", "attack.p=0,0.3"], 4),  # the command line wins for attack.p
    (PRESET, ["+experiment=toy/x", "attack.p=0.5"], 2),  # ... also with one value
    (PRESET, ["+experiment=toy/x", "seed=0,1"], 12),  # a sweep of its own multiplies
    ({}, ["seed=range(0,3)", "attack.p=choice(0,0.1)", "defense=sft"], 6),
    ({}, ["attack.p=0,1.5,0.1"], 3),
])
def test_job_label_counts_the_grid_hydra_sweeps(tmp_path, params, arguments, total):
    from harness.sweeps import job_label

    assert _hydra_count(params, arguments) == total
    job = ["+experiment=toy/x", "defense=vaccine", "attack.p=0.1", "seed=1"]
    label = job_label(_fake_hydra(tmp_path, params, arguments, job, num=1))
    index, shown = label.split(" ", 1)
    assert index == f"[2/{total}]"
    assert "+experiment=toy/x" not in shown.split()  # one value: not a swept key


@pytest.mark.parametrize("params,arguments,target", [
    ({"defense": "glob(*)"}, [], BASIC),  # a glob's size needs the config loader
    (PRESET, ["attack.p=interval(0,1)"], BASIC),
    ({"attack.p": "interval(0.05, 0.3)"}, [],
     "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"),
    (PRESET, None, BASIC),  # no multirun.yaml to read the command line from
])
def test_job_label_without_a_known_count_is_the_index_alone(tmp_path, params, arguments, target):
    from harness.sweeps import job_label

    label = job_label(_fake_hydra(tmp_path, params, arguments, ["defense=sft", "attack.p=0.1"],
                                  num=4, target=target))
    assert label.startswith("[5] ") and set(label.split()[1:]) <= {"defense=sft", "attack.p=0.1"}
