"""SIGTERM and SIGINT stop a run cleanly: results.json says interrupted, the exit code names the
signal, a local sweep stops with it, and the rerun resumes and finishes."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.test_cli import TINY

pytestmark = pytest.mark.slow  # each test trains in a subprocess and signals it
LONG_BASE = [*TINY, "train.base.max_steps=3000", "train.base.checkpoint_every_n_steps=5"]


def _start(args, tmp_path):
    env = {**os.environ, "HARNESS_ARTIFACTS": str(tmp_path / "artifacts"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "harness", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(proc, needle, timeout=180):
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if needle in line:
            return seen
    proc.kill()
    raise AssertionError(f"never saw {needle!r}:\n{''.join(seen)[-3000:]}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_training_records_interrupted_and_the_rerun_resumes(tmp_path, signum):
    run_dir = tmp_path / "run"
    proc = _start([*LONG_BASE, f"hydra.run.dir={run_dir}"], tmp_path)
    _wait_for(proc, "[base] training")
    time.sleep(3)  # into the fit, past a few checkpoints
    t0 = time.monotonic()
    proc.send_signal(signum)
    rest, _ = proc.communicate(timeout=60)
    exit_seconds = time.monotonic() - t0
    assert proc.returncode == 128 + signum, rest[-3000:]
    assert exit_seconds < 30, exit_seconds  # measured: 1-3 s
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "interrupted"
    assert results["error"] == f"interrupted by {signal.Signals(signum).name}"
    assert "INTERRUPTED" in rest and "Rerun the same command" in rest
    work = list((tmp_path / "artifacts" / "base" / ".work").glob("*/checkpoints/*.ckpt"))
    assert work, "the stage in progress kept its checkpoints"


def test_sigterm_stops_the_whole_local_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _start(["-m", *LONG_BASE, "attack.p=0,0.1", f"hydra.sweep.dir={sweep}"], tmp_path)
    _wait_for(proc, "[base] training")
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, rest[-3000:]
    assert json.loads((sweep / "0" / "results.json").read_text())["status"] == "interrupted"
    assert not (sweep / "1" / "results.json").exists(), "the sweep went on after SIGTERM"


def test_sigterm_to_a_joblib_launcher_reaches_its_workers(tmp_path):
    """The launcher forwards SIGTERM to its workers, which record their runs as interrupted;
    without it the workers went on training after the launcher died (measured before the fix:
    an orphaned worker trained for minutes)."""
    import psutil

    sweep = tmp_path / "sweep"
    proc = _start(["-m", *LONG_BASE, "attack.p=0,0.1", "hydra/launcher=joblib",
                   "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}"], tmp_path)
    _wait_for(proc, "[base] training")
    time.sleep(3)
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
               if "loky" in " ".join(c.cmdline())]
    assert workers
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"workers still running after the launcher stopped: {alive}"
    statuses = {json.loads(p.read_text())["status"] for p in sweep.glob("*/results.json")}
    assert statuses == {"interrupted"}, statuses
