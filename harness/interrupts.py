"""Stopping cleanly on a signal.

SIGINT (Ctrl-C) raises KeyboardInterrupt; SIGTERM (``kill``, SLURM's warning before it kills a
job, a scheduler's pre-emption) is made to raise one too, so both take one path: Lightning stops
the fit gracefully (its KeyboardInterrupt handling), the run writes ``results.json`` with
``status: interrupted`` and finishes W&B, and the process exits 128 + the signal number, which
also stops a local ``-m`` sweep. SIGKILL cannot be caught: then the stage resumes from its last
checkpoint when the same command runs again.

Under ``hydra/launcher=joblib`` the runs live in loky worker processes and the launcher waits in
joblib. A signal to the launcher (or Ctrl-C to the whole group) is forwarded to the workers and
the launcher does *not* raise: joblib, on an error, SIGKILLs every worker (loky's "broken
executor"), which would kill a sibling still writing its results.json. Instead each worker
records its running job as interrupted and returns, the jobs not started yet return at once
without running, and the drained sweep exits 128 + the signal. A second signal, or a sweep still
not drained after ``GRACE_SECONDS``, stops it hard.

Under SLURM (``SLURM_JOB_ID`` set), SIGUSR1 (``sbatch --signal=USR1@<s>``, Lightning's requeue
signal) or SIGUSR2 (what hydra's submitit launcher sends ``signal_delay_s`` before the time
limit) asks for a requeue: the fit stops at the next step boundary after writing ``last.ckpt``
(``RequeueAtStepEnd``), the run calls ``scontrol requeue <job>``, results.json says
``interrupted`` and which job was requeued, and the requeued job (the same command) resumes from
that checkpoint exactly. Lightning's own handler is not used: it saves from inside the signal
handler, mid-step (a resume then double-applies or skips a step), and it trains on afterwards.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

import lightning as L

_received: list[int] = []  # the signals that asked this process to stop
_state = {"pool_worker": False, "in_run": False, "requeue": False, "in_fit": False}
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)  # sbatch/Lightning's, submitit's

GRACE_SECONDS = 60  # how long a launcher waits for its workers to record their interruption


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C: Lightning then stops a fit gracefully, as for SIGINT."""


def _children(pool: bool) -> list:
    """Our worker processes: loky's (``pool``) or DDP ranks relaunched as ``python -m harness``.
    Neither loky's nor multiprocessing's resource tracker (they ignore SIGTERM and SIGINT and exit
    when this process does: waiting on them stalled the launcher for the whole grace period) nor
    W&B's service (it must outlive the run's finish())."""
    import psutil

    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "resource_tracker" in cmd:
            continue
        if ("popen_loky_posix" in cmd) if pool else ("harness" in cmd):
            found.append(child)
    return found


def _send(procs, signum: int) -> None:
    import psutil

    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signum)


def _hard_stop(signum: int) -> None:
    """The sweep did not drain in time: kill the workers and leave (their jobs resume)."""
    import psutil

    workers = _children(pool=True)
    for proc in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    print(f"sweep: workers did not stop within {GRACE_SECONDS} s of "
          f"{signal.Signals(signum).name}; killed them", file=sys.stderr, flush=True)
    os._exit(128 + signum)


def _on_signal(signum, frame) -> None:
    if signum in REQUEUE_SIGNALS:
        if not _received:  # the fit stops at its next step end (RequeueAtStepEnd)
            _state["requeue"] = True
            _received.append(signum)
            if not _state["in_fit"]:
                raise Interrupted(f"signal {signum}")
        return
    first = not _received
    _received.append(signum)
    if _state["pool_worker"]:
        # a joblib worker: stop the job it runs, once (a repeat, e.g. Ctrl-C reaching both the
        # group and the launcher's forward, must not break its recording); between jobs only
        # remember it, the next job then does not start (harness.run)
        if first and _state["in_run"]:
            raise Interrupted(f"signal {signum}")
        return
    workers = _children(pool=True)
    if workers:  # a joblib launcher: let its workers record and the sweep drain (see above)
        if not first:
            raise Interrupted(f"signal {signum}")
        _send(workers, signum)
        timer = threading.Timer(GRACE_SECONDS, _hard_stop, args=(signum,))
        timer.daemon = True
        timer.start()
        return
    if not first:  # already stopping (a second Ctrl-C, SLURM's SIGTERM after a requeue)
        return
    ranks = _children(pool=False)
    if ranks and signum == signal.SIGTERM:  # Ctrl-C reaches DDP ranks through the group
        import psutil

        _send(ranks, signum)
        psutil.wait_procs(ranks, timeout=GRACE_SECONDS)
    raise Interrupted(f"signal {signum}") if signum == signal.SIGTERM else KeyboardInterrupt


def interrupt_signal(err: BaseException | None = None) -> int:
    if _received:
        return _received[0]  # the cause; later ones (SLURM's SIGTERM after a requeue) only follow
    return signal.SIGINT if isinstance(err, KeyboardInterrupt) else signal.SIGTERM


def install_signal_handlers(pool_worker: bool = False) -> None:
    """SIGTERM (SLURM's warning before a kill, `kill`) stops the run as Ctrl-C does: the stage
    in progress keeps its checkpoints, results.json says ``interrupted``, W&B is finished, and
    the whole local sweep stops. Rerunning the same command resumes."""
    if threading.current_thread() is not threading.main_thread():
        return  # signals are delivered to the main thread only
    _state["pool_worker"] = _state["pool_worker"] or pool_worker
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    if slurm_job_id() is not None:  # installed first, Lightning then leaves SIGUSR1 to us
        for signum in REQUEUE_SIGNALS:  # and submitit's USR2 handler gives way to ours
            signal.signal(signum, _on_signal)


@contextlib.contextmanager
def running():
    """A run is in progress: a signal to a pool worker now stops it (outside, it is noted)."""
    _state["in_run"] = True
    try:
        yield
    finally:
        _state["in_run"] = False


def was_signalled() -> bool:
    return bool(_received)


def in_pool_worker() -> bool:
    return _state["pool_worker"]


def stop_idle_pool() -> None:
    """After a drained joblib sweep every worker is idle (each job has returned): stop them now
    instead of waiting out loky's exit-time join (torch interpreters' teardown, 6 s measured)."""
    from joblib.externals.loky import reusable_executor

    executor = reusable_executor._executor
    if executor is not None:
        executor.shutdown(wait=True, kill_workers=True)


# ================================================================ SLURM requeue
def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for an array task."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_requested() -> bool:
    return _state["requeue"]


def requeue() -> str:
    """``scontrol requeue`` this job; what happened, for results.json and the console."""
    import subprocess

    job = slurm_job_id()
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"requeue of SLURM job {job} failed: {err}"
    if done.returncode != 0:
        return (f"requeue of SLURM job {job} failed (scontrol exit {done.returncode}: "
                f"{done.stderr.strip()})")
    return f"requeued SLURM job {job}"


class RequeueAtStepEnd(L.Callback):
    """A SLURM requeue signal stops the fit at a step end, after writing ``last.ckpt`` there:
    the state a periodic checkpoint holds, so the resume is exact."""

    def on_train_start(self, trainer, pl_module) -> None:
        _state["in_fit"] = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not _state["requeue"]:
            return
        _state["in_fit"] = False
        folder = getattr(trainer.checkpoint_callback, "dirpath", None)
        if folder is not None:
            from harness.checkpoints import LAST

            trainer.save_checkpoint(os.path.join(folder, LAST))
        raise Interrupted(f"signal {_received[-1]}")

    def teardown(self, trainer, pl_module, stage) -> None:
        _state["in_fit"] = False
