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


def _on_sigterm(signum, frame) -> None:
    _received.append(signum)
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
    _received.append(signum)
    raise KeyboardInterrupt


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def was_signalled() -> bool:
    return bool(_received)
