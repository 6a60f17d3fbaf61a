"""A toy run pins its torch thread count, keys on it and records it with the CPU: the same seed
gives the same weights and metrics whatever OMP_NUM_THREADS the shell has."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harness.config import ConfigError

from harness.validation import validate
from harness.keys import stage_keys
from harness.pipeline import Pipeline
from harness.reproducibility import cpu_info, pin_threads
from tests.helpers import HANG_S, TINY, harness_env


def test_thread_count_is_in_every_training_and_eval_key(make_cfg, tmp_path):
    before = torch.get_num_threads()
    try:
        keys = {}
        for n in (1, 2):
            pin_threads(n)
            keys[n] = stage_keys(Pipeline(validate(make_cfg()), tmp_path).inputs)
    finally:
        torch.set_num_threads(before)
    for stage in ("base", "align", "finetune"):
        assert keys[1][stage] != keys[2][stage], stage
    assert keys[1]["tokenizer"] == keys[2]["tokenizer"]  # no float work in it


def test_torch_threads_is_checked_and_recorded(make_cfg):
    with pytest.raises(ConfigError, match="torch_threads"):
        validate(make_cfg("torch_threads=-1"))
    assert validate(make_cfg()).torch_threads == 1  # the default pins
    info = cpu_info()
    assert info["cpu_model"] and info["cpu_capability"] in (
        "DEFAULT", "NO AVX", "AVX2", "AVX512", "ZVECTOR", "VSX", "SVE256", "SVE")


def _run(tmp_path, name, omp):
    env = harness_env(HARNESS_ARTIFACTS=str(tmp_path / name / "artifacts"),
                      OMP_NUM_THREADS=str(omp))
    out = subprocess.run([sys.executable, "-m", "harness", *TINY, "torch_threads=1",
                          f"hydra.run.dir={tmp_path / name / 'run'}"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=HANG_S)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((tmp_path / name / "run" / "results.json").read_text())


@pytest.mark.slow
def test_pinned_run_is_identical_under_any_omp_setting(tmp_path):
    """Two fresh stores, OMP_NUM_THREADS 1 and 2, torch_threads=1: the same keys, bit-identical
    adapters and identical metrics (measured: max |difference| 0.0)."""
    one, two = _run(tmp_path, "omp1", 1), _run(tmp_path, "omp2", 2)
    assert one["versions"]["torch_threads"] == two["versions"]["torch_threads"] == 1
    assert {k: v["key"] for k, v in one["artifacts"].items()} == \
        {k: v["key"] for k, v in two["artifacts"].items()}
    a, b = (load_file(next(Path(r["artifacts"]["finetune"]["path"]).glob(
        "adapter/*.safetensors"))) for r in (one, two))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    for k in ("hs", "fa", "refusal_rate", "other_rate", "p_comply_opening"):
        assert one["metrics"]["final"][k] == two["metrics"]["final"][k], k
    assert one["metrics"]["final"]["outcomes"] == two["metrics"]["final"]["outcomes"]
