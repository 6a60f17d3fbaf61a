"""The fault matrix of issue 22, re-run: each fault injected into tiny runs of `python -m harness`,
and what happened. Writes the table into README.md (between the markers) and rows.json.

    OMP_NUM_THREADS=1 python experiments/fault_matrix/run_matrix.py [--only NAME ...]

Needs root (or CAP_SYS_ADMIN) for the full-disk and read-only rows: they mount a small tmpfs, as a
real full or read-only filesystem (root ignores permission bits, so chmod is no test). Every run
uses one tiny config (base 150 steps, a checkpoint every 5) and its own artifact cache; "metrics
= clean" compares the final metrics with an uninterrupted run's, key for key.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from harness.checkpoints import checkpoint_problem  # noqa: E402
from tests.test_cli import TINY  # noqa: E402

HERE = Path(__file__).resolve().parent
ARGS = [*TINY, "train.base.max_steps=150", "train.base.checkpoint_every_n_steps=5"]
SWEEP = ["-m", *ARGS, "attack.p=0,0.1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
WORK = Path(tempfile.mkdtemp(prefix="fault-matrix-"))
ROWS: list[dict] = []


class Run:
    """One `python -m harness` in the background, its output kept (a full pipe would block it)."""

    def __init__(self, cache: Path, run_dir: Path, args=ARGS, group=False):
        env = {**os.environ, "HARNESS_ARTIFACTS": str(cache), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(ROOT)}
        where = [f"hydra.sweep.dir={run_dir}"] if args[0] == "-m" else [f"hydra.run.dir={run_dir}"]
        self.cache, self.run_dir, self.out = cache, run_dir, []
        self.proc = subprocess.Popen([sys.executable, "-m", "harness", *args, *where], cwd=WORK,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=group)
        self._drain = threading.Thread(target=lambda: self.out.extend(self.proc.stdout),
                                       daemon=True)
        self._drain.start()

    def wait(self, timeout=600) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._drain.join(timeout=10)
        return rc

    @property
    def text(self) -> str:
        return "".join(self.out)

    def wait_checkpoint(self, timeout=300) -> Path:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            found = list((self.cache / "base" / ".work").glob("*/checkpoints/last.ckpt"))
            if found:
                return found[0]
            time.sleep(0.05)
        raise RuntimeError("no checkpoint written:\n" + self.text[-3000:])


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def first_line(text: str, *needles: str) -> str:
    for line in text.splitlines():
        if any(n in line for n in needles):
            line = re.sub(r"^\[[^\]]*\]\[[^\]]*\]\[[A-Z]+\] - ", "", line.strip())
            return line.replace(str(WORK), "$W")[:300]
    return ""


def same_metrics(res: dict, ref: dict) -> str:
    if res.get("status") != "ok":
        return "none reported"
    a, b = (strip_seconds(r["metrics"]) for r in (res, ref))
    return "= clean" if a == b else f"DIFFER: {sorted(k for k in a if a.get(k) != b.get(k))}"


def strip_seconds(metrics: dict) -> dict:
    """All but the evaluation's wall-clock seconds."""
    return {k: ({kk: vv for kk, vv in v.items() if kk != "seconds"} if isinstance(v, dict) else v)
            for k, v in metrics.items()}


def row(fault, happened, message, outcome, metrics, seconds=None):
    ROWS.append({"fault": fault, "what happened": happened, "message": message,
                 "outcome": outcome, "metrics": metrics,
                 **({"exit s": round(seconds, 1)} if seconds is not None else {})})
    print(json.dumps(ROWS[-1]), flush=True)


def mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)


def remount_ro(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


# ================================================================ the rows
def reference() -> dict:
    run = Run(WORK / "ref", WORK / "ref-run")
    assert run.wait() == 0, run.text[-3000:]
    return results(WORK / "ref-run")


def align_artifact(cache: Path) -> Path:
    (folder,) = [p for p in (cache / "align").iterdir() if not p.name.startswith(".")]
    return folder


def damaged_artifact(ref, name, damage):
    cache = WORK / name
    shutil.copytree(WORK / "ref", cache)
    folder = align_artifact(cache)
    damage(folder)
    run = Run(cache, WORK / f"{name}-run")
    rc = run.wait()
    res = results(WORK / f"{name}-run")
    rebuilt = not res.get("timings", {}).get("align", {}).get("reused", True)
    row(name.replace("_", " "), f"exit {rc}, status {res['status']}, align "
        f"{'rebuilt' if rebuilt else 'reused'}", first_line(run.text, "damaged", "corrupt"),
        "recovered" if rc == 0 and rebuilt else "FAILED", same_metrics(res, ref))


def weights_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def truncate_half(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def overwrite_middle(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(os.urandom(min(65536, size // 4)))


def full_disk(ref):
    disk = WORK / "disk"
    if not mount_tmpfs(disk, "64m"):
        return row("full disk during a checkpoint", "not run: cannot mount a tmpfs", "", "-", "-")
    try:
        run = Run(disk / "artifacts", WORK / "disk-run")
        last = run.wait_checkpoint()
        filler = disk / "filler"
        with open(filler, "wb") as f:  # fill the disk: the next checkpoint cannot be written
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
            except OSError:
                pass
        rc = run.wait()
        res = results(WORK / "disk-run")
        intact = checkpoint_problem(last) is None
        filler.unlink()  # space freed: the same command again
        again = Run(disk / "artifacts", WORK / "disk-run")
        rc2 = again.wait()
        res2 = results(WORK / "disk-run")
        resumed = "resuming from" in again.text
        row("full disk during a checkpoint",
            f"exit {rc}, status {res['status']}; last.ckpt {'intact' if intact else 'DAMAGED'}; "
            f"after freeing space: exit {rc2}, {res2['status']}, "
            f"{'resumed from last.ckpt' if resumed else 'started over'}",
            first_line(run.text, "No space", "run failed"),
            "recovered" if rc2 == 0 and intact else "FAILED", same_metrics(res2, ref))
    finally:
        umount(disk)


def truncated_checkpoint(ref):
    cache = WORK / "ckpt"
    run = Run(cache, WORK / "ckpt-run")
    last = run.wait_checkpoint()
    time.sleep(1)
    run.proc.kill()
    run.wait()
    truncate_half(last)
    again = Run(cache, WORK / "ckpt-run")
    rc = again.wait()
    res = results(WORK / "ckpt-run")
    row("truncated last.ckpt (SIGKILL, then cut in half)", f"exit {rc}, status {res['status']}",
        first_line(again.text, "unusable", "no usable"), "recovered" if rc == 0 else "FAILED",
        same_metrics(res, ref))


def read_only(ref, built: bool):
    name = "ro-built" if built else "ro-empty"
    mnt = WORK / name
    label = f"read-only cache ({'built' if built else 'empty'})"
    if not mount_tmpfs(mnt, "256m"):
        return row(label, "not run: cannot mount a tmpfs", "", "-", "-")
    try:
        if built:
            shutil.copytree(WORK / "ref", mnt / "artifacts")
        else:
            (mnt / "artifacts").mkdir()
        remount_ro(mnt)
        run = Run(mnt / "artifacts", WORK / f"{name}-run")
        rc = run.wait()
        res = results(WORK / f"{name}-run")
        reused = all(t.get("reused") for t in res.get("timings", {}).values()
                     if isinstance(t, dict) and "reused" in t)
        tb = "Traceback" in run.text
        if built:
            row(label, f"exit {rc}, status {res['status']}, every stage reused: {reused}", "",
                "served" if rc == 0 and reused else "FAILED", same_metrics(res, ref))
        else:
            row(label, f"exit {rc}, status {res['status']}, traceback on console: {tb}",
                first_line(run.text, "paths.artifacts"),
                "failed cleanly" if rc != 0 and not tb else "FAILED", same_metrics(res, ref))
    finally:
        umount(mnt)


def two_workers(ref):
    cache = WORK / "two"
    a = Run(cache, WORK / "two-a")
    a.wait_checkpoint()
    b = Run(cache, WORK / "two-b")
    time.sleep(8)  # B is up and waiting on A's lock
    a.proc.kill()
    a.wait()
    rc = b.wait()
    res = results(WORK / "two-b")
    row("two workers on one cache, the lock holder SIGKILLed",
        f"B: exit {rc}, status {res['status']}, "
        + ("resumed A's checkpoint" if "resuming from" in b.text else "started over"),
        first_line(b.text, "resuming from"), "recovered" if rc == 0 else "FAILED",
        same_metrics(res, ref))


def single_signal(ref, signum):
    name = signal.Signals(signum).name
    cache, run_dir = WORK / f"sig-{name}", WORK / f"sig-{name}-run"
    run = Run(cache, run_dir)
    run.wait_checkpoint()
    time.sleep(1)
    t0 = time.monotonic()
    run.proc.send_signal(signum)
    rc = run.wait()
    seconds = time.monotonic() - t0
    res = results(run_dir)
    again = Run(cache, run_dir)
    rc2 = again.wait()
    res2 = results(run_dir)
    row(f"{name} in a single run (base stage)",
        f"exit {rc}, results.json {res['status']} ({res.get('error')}); rerun: exit {rc2}, "
        f"{res2['status']}, {'resumed' if 'resuming from' in again.text else 'started over'}",
        first_line(run.text, "INTERRUPTED"), "recovered" if rc2 == 0 else "FAILED",
        same_metrics(res2, ref), seconds)


def sweep_signal(ref, signum, group):
    import psutil

    name = signal.Signals(signum).name
    how = "Ctrl-C to the group" if group else f"{name} to the launcher"
    cache, sweep = WORK / f"sweep-{name}", WORK / f"sweep-{name}-dir"
    run = Run(cache, sweep, SWEEP, group=True)
    run.wait_checkpoint()
    time.sleep(1)
    tree = [run.proc.pid, *(c.pid for c in psutil.Process(run.proc.pid).children(True))]
    t0 = time.monotonic()
    os.killpg(run.proc.pid, signum) if group else run.proc.send_signal(signum)
    while time.monotonic() - t0 < 120 and any(
            psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
            for p in tree):
        time.sleep(0.05)
    seconds = time.monotonic() - t0
    rc = run.wait()
    statuses = sorted(results(p.parent)["status"] for p in sweep.glob("*/results.json"))
    again = Run(cache, sweep, SWEEP)
    rc2 = again.wait()
    res2 = results(sweep / "1")  # attack.p=0.1, the default: the reference config
    row(f"{how}, joblib sweep (2 jobs, n_jobs=2)",
        f"exit {rc}, {len(tree)} processes gone, jobs: {statuses}; rerun: exit {rc2}, "
        f"{'resumed' if 'resuming from' in again.text else 'started over'}",
        first_line(run.text, "sweep: INTERRUPTED"), "recovered" if rc2 == 0 else "FAILED",
        same_metrics(res2, ref), seconds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args()
    t0 = time.monotonic()
    ref = reference()
    cases = {
        "full_disk": lambda: full_disk(ref),
        "truncated_weights": lambda: damaged_artifact(
            ref, "truncated_weights", lambda f: truncate_half(weights_file(f))),
        "overwritten_weights": lambda: damaged_artifact(
            ref, "overwritten_weights", lambda f: overwrite_middle(weights_file(f))),
        "truncated_manifest": lambda: damaged_artifact(
            ref, "truncated_manifest", lambda f: truncate_half(f / "manifest.json")),
        "truncated_checkpoint": lambda: truncated_checkpoint(ref),
        "ro_empty": lambda: read_only(ref, built=False),
        "ro_built": lambda: read_only(ref, built=True),
        "two_workers": lambda: two_workers(ref),
        "sigterm": lambda: single_signal(ref, signal.SIGTERM),
        "sigint": lambda: single_signal(ref, signal.SIGINT),
        "sweep_sigterm": lambda: sweep_signal(ref, signal.SIGTERM, group=False),
        "sweep_ctrl_c": lambda: sweep_signal(ref, signal.SIGINT, group=True),
    }
    for name, case in cases.items():
        if args.only and name not in args.only:
            continue
        try:
            case()
        except Exception as err:  # a row that could not be run is a row too
            row(name, f"HARNESS OF THE MATRIX FAILED: {type(err).__name__}: {err}"[:300], "",
                "not run", "-")
    total = time.monotonic() - t0
    (HERE / "rows.json").write_text(json.dumps(ROWS, indent=1) + "\n")
    cols = ["fault", "what happened", "message", "outcome", "metrics", "exit s"]
    table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in ROWS:
        table.append("| " + " | ".join(str(r.get(c, "")).replace("|", "\\|") for c in cols)
                     + " |")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    table.append(f"\n{len(ROWS)} rows in {total:.0f} s ({when}, {os.cpu_count()} CPUs, "
                 "OMP_NUM_THREADS=1).")
    readme = HERE / "README.md"
    text = readme.read_text()
    start, end = "<!-- matrix -->", "<!-- /matrix -->"
    text = text[:text.index(start) + len(start)] + "\n" + "\n".join(table) + "\n" + \
        text[text.index(end):]
    readme.write_text(text)
    shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
