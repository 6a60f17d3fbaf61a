"""Stopping cleanly on a signal.

SIGINT (Ctrl-C) raises KeyboardInterrupt; SIGTERM (``kill``, SLURM's warning before it kills a
job, a scheduler's pre-emption) is made to raise one too, so both take one path: Lightning stops
the fit gracefully (its KeyboardInterrupt handling), the run writes ``results.json`` with
``status: interrupted`` and finishes W&B, and the process exits 128 + the signal number, which
also stops a local ``-m`` sweep. SIGKILL cannot be caught: then the stage resumes from its last
checkpoint when the same command runs again.
"""
from __future__ import annotations

import signal

_received: list[int] = []  # the signals that asked this process to stop


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C: Lightning then stops a fit gracefully, as for SIGINT."""


GRACE_SECONDS = 60  # how long a process waits for its workers to record their interruption


def _our_children() -> list:
    """Child processes that run our code: a joblib launcher's workers and DDP ranks (not W&B's
    service, which must outlive the run's finish())."""
    import psutil

    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "harness" in cmd or "loky" in cmd:
            found.append(child)
    return found


def _forward(signum: int) -> None:
    """Pass the signal on to our workers and wait for them: each records its run as
    interrupted; without this a killed sweep launcher leaves its workers training."""
    import psutil

    children = _our_children()
    for child in children:
        try:
            child.send_signal(signum)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=GRACE_SECONDS)


def _on_sigterm(signum, frame) -> None:
    _received.append(signum)
    _forward(signum)
    raise Interrupted(f"signal {signum}")


def interrupt_signal(err: BaseException) -> int:
    if _received:
        return _received[-1]
    return signal.SIGINT if isinstance(err, KeyboardInterrupt) else signal.SIGTERM


def install_signal_handlers() -> None:
    """SIGTERM (SLURM's warning before a kill, `kill`) stops the run as Ctrl-C does: the stage
    in progress keeps its checkpoints, results.json says ``interrupted``, W&B is finished, and
    the whole local sweep stops. Rerunning the same command resumes."""
    if not _main_thread():  # a joblib worker's thread: its parent process handles signals
        return
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, _on_sigint)


def _on_sigint(signum, frame) -> None:
    # Ctrl-C reaches the whole foreground process group already: nothing to forward
    _received.append(signum)
    raise KeyboardInterrupt


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def was_signalled() -> bool:
    return bool(_received)
