"""SLURM, simulated offline: SLURM_* variables set and a fake `scontrol` on PATH that records its
arguments. SIGUSR1 (`sbatch --signal=USR1@<s>`) mid-stage writes last.ckpt at the next step end,
requeues the job with its id, records `interrupted`; the requeued run (the same command) resumes
and ends with the uninterrupted run's weights, bit for bit."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import HANG_S, TINY, wait_until

pytestmark = pytest.mark.slow  # three tiny runs in subprocesses
ROOT = str(Path(__file__).resolve().parents[1])
# the signal lands just after the first checkpoint (step 5): 60 steps leave it room on a busy
# machine, and the resumed base trains on past it to the end
ARGS = [*TINY, "train.base.max_steps=60", "train.base.checkpoint_every_n_steps=5"]
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "harness-test",
         "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
         "SLURM_NODELIST": "localhost"}


def _env(tmp_path, cache, slurm=True):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "scontrol"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.calls"}\n')
    fake.chmod(0o755)
    env = {**os.environ, "HARNESS_ARTIFACTS": str(tmp_path / cache), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ROOT, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return {**env, **SLURM} if slurm else env


def _run(tmp_path, cache, run_dir, slurm=True, **kw):
    return subprocess.Popen([sys.executable, "-m", "harness", *ARGS, f"hydra.run.dir={run_dir}"],
                            cwd=tmp_path, env=_env(tmp_path, cache, slurm),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _weights(cache: Path, stage: str) -> dict:
    (folder,) = [p for p in (cache / stage).iterdir() if not p.name.startswith(".")]
    files = json.loads((folder / "manifest.json").read_text())["files"]
    # the weights only: an adapter's config and README name the cache folder they were built in
    return {f["path"]: f["sha256"] for f in files if f["path"].endswith(".safetensors")}


def test_sigusr1_under_slurm_checkpoints_requeues_and_the_requeued_run_resumes_exactly(tmp_path):
    whole = _run(tmp_path, "whole", tmp_path / "whole-run", slurm=False)
    proc = _run(tmp_path, "artifacts", tmp_path / "run")
    ckpts = tmp_path / "artifacts" / "base" / ".work"
    # past the first periodic save
    assert wait_until(lambda: list(ckpts.glob("*/checkpoints/last.ckpt")), timeout=600,
                      while_running=proc), proc.stdout.read()[-3000:]
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 128 + signal.SIGUSR1, out[-3000:]
    assert (tmp_path / "scontrol.calls").read_text() == "requeue 4242\n"
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "interrupted"
    assert results["error"] == "interrupted by SIGUSR1; requeued SLURM job 4242"
    (last,) = ckpts.glob("*/checkpoints/last.ckpt")
    stopped_at = torch.load(last, weights_only=False)["global_step"]
    assert 5 <= stopped_at < 60, stopped_at  # written at the step the signal stopped
    assert not [p for p in (tmp_path / "artifacts" / "base").iterdir()
                if not p.name.startswith(".")], "an interrupted stage stored no artifact"

    again = _run(tmp_path, "artifacts", tmp_path / "run")  # the requeued job: the same command
    out2, _ = again.communicate(timeout=HANG_S)
    assert again.returncode == 0, out2[-3000:]
    assert f"[base] resuming from {last}" in out2
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "ok"
    assert (tmp_path / "scontrol.calls").read_text() == "requeue 4242\n"  # no second requeue
    out_whole, _ = whole.communicate(timeout=HANG_S)
    assert whole.returncode == 0, out_whole[-3000:]
    for stage in ("base", "align", "finetune"):  # equal sha256 of every weight file
        ours, clean = _weights(tmp_path / "artifacts", stage), _weights(tmp_path / "whole", stage)
        assert ours and ours == clean, stage
    resumed, clean = (_metrics(tmp_path / d / "results.json") for d in ("run", "whole-run"))
    assert resumed == clean and resumed["final"]["hs"] == clean["final"]["hs"]


def _metrics(path: Path) -> dict:
    """The metrics but the evaluation's wall-clock seconds."""
    metrics = json.loads(path.read_text())["metrics"]
    return {k: ({kk: vv for kk, vv in v.items() if kk != "seconds"} if isinstance(v, dict) else v)
            for k, v in metrics.items()}
