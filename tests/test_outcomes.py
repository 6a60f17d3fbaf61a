"""How a run that does not end well is recorded (results.json, the tracker) and reported (the
console, the exit status), without training anything."""
import errno
import json

import pytest

from harness.config import ConfigError
from harness.outcomes import Attempt, conclude, status_of


class Tracker:
    def __init__(self):
        self.finished = []

    def finish(self, status, error=None):
        self.finished.append((status, error))


def _raised(err):
    """``err`` with a traceback, as an except block sees it."""
    try:
        raise err
    except BaseException as caught:  # noqa: BLE001
        return caught


def test_status_of_each_ending():
    assert status_of(KeyboardInterrupt()) == "interrupted"
    assert status_of(SystemExit(3)) == "interrupted"
    assert status_of(SystemExit(0)) is None and status_of(SystemExit()) is None
    assert status_of(ValueError("x")) == "failed"


def test_a_failure_is_recorded_with_its_hint_and_traceback(tmp_path):
    attempt, tracker = Attempt({"seed": 1}, tmp_path, lead=True), Tracker()
    attempt.tracker = tracker
    attempt.record(_raised(OSError(errno.ENOSPC, "No space left on device", "/a/x.pt")))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "failed" and results["config"] == {"seed": 1}
    assert "writing /a/x.pt" in results["error"] and "Traceback" in results["error"]
    assert tracker.finished == [("failed", results["error"])]


def test_an_interrupt_is_recorded_and_a_clean_exit_is_not(tmp_path):
    Attempt({}, tmp_path, lead=True).record(_raised(KeyboardInterrupt()))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "interrupted" and results["error"] == "interrupted by SIGINT"
    (tmp_path / "results.json").unlink()
    Attempt({}, tmp_path, lead=True).record(SystemExit(0))
    assert not (tmp_path / "results.json").exists()


def test_only_rank_zero_writes(tmp_path):
    Attempt({}, tmp_path, lead=False).record(_raised(ValueError("x")))
    assert not (tmp_path / "results.json").exists()


def test_conclude_says_what_to_fix_and_exits(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"^config error: seed: bad$"):
        conclude(_raised(ConfigError("seed: bad")), tmp_path, "", False, True)
    with pytest.raises(SystemExit, match=r"run failed: ValueError: nope\n\(traceback: "):
        conclude(_raised(ValueError("nope")), tmp_path, "", False, True)
    assert "ValueError: nope" in (tmp_path / "error.log").read_text()
    with pytest.raises(SystemExit, match="no space left on the disk"):
        conclude(_raised(OSError(errno.ENOSPC, "full")), tmp_path, "", False, True)
    with pytest.raises(KeyError):  # a bug keeps its traceback
        conclude(_raised(KeyError("k")), tmp_path, "", False, True)
    with pytest.raises(SystemExit) as clean:  # a clean exit goes on as it was
        conclude(SystemExit(0), tmp_path, "", False, True)
    assert clean.value.code == 0


def test_a_sweep_job_s_failure_lets_the_sweep_go_on(tmp_path, capsys):
    assert conclude(_raised(ValueError("nope")), tmp_path, "[2/4] seed=1", True, True) is None
    assert "[2/4] seed=1: FAILED ValueError: nope" in capsys.readouterr().out


def test_an_interrupt_exits_128_plus_the_signal(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        conclude(_raised(KeyboardInterrupt()), tmp_path, "", False, True)
    assert stop.value.code == 128 + 2
    assert "run: INTERRUPTED by SIGINT" in capsys.readouterr().out
