"""SIGTERM and SIGINT stop a run cleanly: results.json says interrupted, the exit code names the
signal, a local sweep stops with it, and the rerun resumes and finishes."""
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import TINY, wait_until

pytestmark = pytest.mark.slow  # each test trains in a subprocess and signals it
LONG_BASE = [*TINY, "train.base.max_steps=3000", "train.base.checkpoint_every_n_steps=5"]
# A signal stops a run within seconds (measured 1-4 s; 7 s in the fault matrix); what this bound
# tells apart is a run that waits out the 60 s grace or trains on, and it holds at a load of 6 on
# 2 cores. Everything else here waits for an event (a checkpoint file, a log line, an exit).
EXIT_LIMIT_S = 40
ROOT = str(Path(__file__).resolve().parents[1])


def _env(tmp_path):
    # PYTHONPATH: the subprocess imports this checkout's harness, not an installed one
    return {**os.environ, "HARNESS_ARTIFACTS": str(tmp_path / "artifacts"), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": ROOT}


def _start(args, tmp_path):
    return subprocess.Popen([sys.executable, "-m", "harness", *args], cwd=tmp_path,
                            env=_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _drain(proc) -> tuple[list[str], threading.Thread]:
    """Collect the process's output as it comes: a full pipe would block it."""
    seen: list[str] = []
    thread = threading.Thread(target=lambda: seen.extend(proc.stdout), daemon=True)
    thread.start()
    return seen, thread


def _stopped_within(proc, drain, limit_s=EXIT_LIMIT_S) -> tuple[float, str]:
    """Seconds from now until the process exits (killed past ``limit_s``), and its output."""
    t0 = time.monotonic()
    try:
        proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    exit_seconds = time.monotonic() - t0
    drain[1].join(timeout=60)
    return exit_seconds, "".join(drain[0])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_training_records_interrupted_and_keeps_checkpoints_to_resume(tmp_path, signum):
    run_dir = tmp_path / "run"
    proc = _start([*LONG_BASE, f"hydra.run.dir={run_dir}"], tmp_path)
    drain = _drain(proc)
    _wait_for_checkpoint(tmp_path, proc, drain[0])  # into the fit, a checkpoint written
    proc.send_signal(signum)
    exit_seconds, rest = _stopped_within(proc, drain)
    assert exit_seconds < EXIT_LIMIT_S, rest[-3000:]
    assert proc.returncode == 128 + signum, rest[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "interrupted"
    assert results["error"] == f"interrupted by {signal.Signals(signum).name}"
    assert "INTERRUPTED" in rest and "Rerun the same command" in rest
    work = list((tmp_path / "artifacts" / "base" / ".work").glob("*/checkpoints/*.ckpt"))
    assert work, "the stage in progress kept its checkpoints"


def test_sigterm_stops_the_whole_local_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _start(["-m", *LONG_BASE, "attack.p=0,0.1", f"hydra.sweep.dir={sweep}"], tmp_path)
    drain = _drain(proc)
    _wait_for_checkpoint(tmp_path, proc, drain[0])  # the first job is training
    proc.send_signal(signal.SIGTERM)
    exit_seconds, rest = _stopped_within(proc, drain)
    assert exit_seconds < EXIT_LIMIT_S, rest[-3000:]
    assert proc.returncode == 128 + signal.SIGTERM, rest[-3000:]
    assert json.loads((sweep / "0" / "results.json").read_text())["status"] == "interrupted"
    assert not (sweep / "1" / "results.json").exists(), "the sweep went on after SIGTERM"


def _alive(pids):
    import psutil

    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


JOBLIB_SWEEP = ["-m", *LONG_BASE, "attack.p=0,0.1,0.2", "hydra/launcher=joblib",
                "hydra.launcher.n_jobs=2"]


@pytest.mark.parametrize("signum,group", [(signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["sigterm-to-launcher", "ctrl-c-to-group"])
def test_a_signal_stops_the_whole_joblib_sweep_within_seconds(tmp_path, signum, group):
    """The launcher, its workers and loky's resource tracker all exit within seconds; both
    running jobs record `interrupted`, the third job does not start, and the rerun resumes.
    Before the fix the launcher waited on the resource tracker (it ignores SIGTERM) for the
    whole 60 s grace, then joblib SIGKILLed the workers; measured after: 3.2-3.6 s."""
    import psutil

    sweep = tmp_path / "sweep"
    env = _env(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "harness", *JOBLIB_SWEEP,
                             f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own group: Ctrl-C must not hit pytest
    seen, drain = _drain(proc)
    _wait_for_checkpoint(tmp_path, proc, seen)  # so the rerun has something to resume from
    tree = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    cmds = " ".join(" ".join(psutil.Process(p).cmdline()) for p in tree[1:])
    assert cmds.count("popen_loky_posix") == 2 and "resource_tracker" in cmds, cmds
    t0 = time.monotonic()
    os.killpg(proc.pid, signum) if group else proc.send_signal(signum)
    wait_until(lambda: not _alive(tree), timeout=120)
    exit_seconds = time.monotonic() - t0
    assert not _alive(tree), f"still running: {_alive(tree)}"
    drain.join(timeout=10)
    rest = "".join(seen)
    # measured 3.2-3.6 s on 2 loaded cores, 7.2 s in the fault matrix; the bug it guards against
    # waited out the 60 s grace
    assert exit_seconds < EXIT_LIMIT_S, exit_seconds
    assert proc.wait(timeout=10) == 128 + signum, rest[-3000:]
    statuses = {p.parent.name: json.loads(p.read_text())["status"]
                for p in sweep.glob("*/results.json")}
    assert statuses == {"0": "interrupted", "1": "interrupted"}, statuses
    # the third job's label ([3/N]: job_label counts the grid) says it never started
    assert re.search(r"\[3(/\d+)?\] .*not started \(sweep interrupted", rest), rest[-3000:]
    assert "sweep: INTERRUPTED by " + signal.Signals(signum).name in rest
    assert "Traceback" not in rest, rest[-3000:]
    if group:
        return
    again = subprocess.Popen([sys.executable, "-m", "harness", *JOBLIB_SWEEP,
                              f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # the rerun picks up the interrupted stage
    assert wait_until(lambda: any("[base] resuming from" in p.read_text()
                                  for p in sweep.glob("*/run.log")),
                      timeout=600, while_running=again)
    # resumed: that is what this rerun shows. It is then killed outright: a second SIGTERM right
    # after a worker's resume once took over 60 s to end it on 2 cores at load 6 (not diagnosed;
    # the first signal's stop is what the assertions above time)
    tree = [again.pid, *(c.pid for c in psutil.Process(again.pid).children(recursive=True))]
    for pid in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()
    again.wait(timeout=60)


def _wait_for_checkpoint(tmp_path, proc, seen, timeout=600):
    """Poll until the base stage has written a checkpoint (the generous timeout is for a hang,
    not for a busy machine)."""
    work = tmp_path / "artifacts" / "base" / ".work"
    if not wait_until(lambda: list(work.glob("*/checkpoints/*.ckpt")), timeout,
                      while_running=proc):
        proc.kill()
        raise AssertionError("no checkpoint written:\n" + "".join(seen)[-3000:])
