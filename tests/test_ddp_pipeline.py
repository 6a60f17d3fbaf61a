"""trainer=ddp_cpu through the whole pipeline (2 gloo ranks, each half of every global batch),
against one process on the same base and align: the CPU proof that several GPUs neither drop
nor double-count data. The method-level equalities are tests/test_ddp_methods.py; here the run
as a user launches it: the same finetune key, adapter weights within 1e-5 (only float
summation order differs: the loss is the global token mean on every rank), each evaluation
prompt answered once (half per rank), and HS, FA and the rates within one answer of the prompts
judged (a near-tie in greedy decoding is what such a weight difference could flip)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from harness.run import execute
from tests.conftest import CONF
from tests.helpers import HANG_S, TINY, harness_env

pytestmark = pytest.mark.slow
RUN = [*TINY, "attack.p=0.3", "eval.stages=[final]"]


def test_two_cpu_processes_train_and_evaluate_like_one(tmp_path):
    from safetensors.torch import load_file

    one_store, two_store = tmp_path / "one", tmp_path / "two"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[*RUN, f"paths.artifacts={one_store}"])
    (tmp_path / "single").mkdir()
    single = execute(cfg, tmp_path / "single")
    # the two-rank run reuses base and align, and must build the finetune itself
    for stage in ("tokenizer", "base", "align"):
        shutil.copytree(one_store / stage, two_store / stage, ignore=shutil.ignore_patterns(".*"))
    out = subprocess.run(
        [sys.executable, "-m", "harness", *RUN, "trainer=ddp_cpu",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, env=harness_env(HARNESS_ARTIFACTS=str(two_store)),
        capture_output=True, text=True, timeout=HANG_S)
    assert out.returncode == 0, out.stderr[-3000:]
    ddp = json.loads((tmp_path / "run" / "results.json").read_text())
    assert ddp["timings"]["base"]["reused"] and ddp["timings"]["align"]["reused"]
    assert not ddp["timings"]["finetune"]["reused"]
    assert ddp["artifacts"]["finetune"]["key"] == single["artifacts"]["finetune"]["key"]

    one, two = single["metrics"]["final"], ddp["metrics"]["final"]
    n = one["n_harmful"]
    assert (one["eval_processes"], two["eval_processes"]) == (1, 2)
    assert two["eval_shard_sizes"] == [n // 2, n // 2] and two["n_harmful"] == n == 16
    assert two["n_task"] == one["n_task"]
    one_answer = {"hs": 100 / n, "refusal_rate": 100 / n, "other_rate": 100 / n,
                  "fa": 100 / one["n_task"], "p_comply_opening": 1e-3}
    for k, tol in one_answer.items():
        assert abs(two[k] - one[k]) <= tol + 1e-9, (k, one[k], two[k])
    a, b = (load_file(next(Path(r["artifacts"]["finetune"]["path"]).glob(
        "adapter/*.safetensors"))) for r in (single, ddp))
    assert set(a) == set(b)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff < 1e-5, diff
