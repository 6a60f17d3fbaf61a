"""The whole pipeline on the default toy world: the phenomenon shows, harm grades with p,
Ref-Teacher's filter and separation work, sweeps reuse stages, and the offline W&B run reads
back.

Three SFT runs share one artifact store (p = 0, 0.05 and 0.3; the later ones must reuse base
and align), and Ref-Teacher runs at p = 0.3. The behavioural bounds are ``tests/e2e_checks.py``:
each held on seeds 0, 1 and 2 at 1 and at 2 torch threads in the noise-floor study, whose table
of margins is experiments/thread_noise/margins.md. Comparisons of outcomes between defenses
(Ref-Teacher's HS against SFT's) are not asserted here: they move with the seed and the CPU, so
they live in the multi-seed studies with intervals (experiments/toy_poison_ratio).

The run pins one torch thread (the config default), so on one CPU it is bit-identical whatever
OMP_NUM_THREADS is (tests/test_reproducibility.py); HARNESS_E2E_TORCH_THREADS=2 reruns it at two.
"""
import json
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from harness.run import execute
from harness.tracking.wandb_offline import read_offline_run
from tests.conftest import CONF, E2E
from tests.e2e_checks import CHECKS

# one worker runs them all, so the `runs` fixture trains once (make test: --dist loadfile)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("end_to_end")]
P_VALUES = (0.0, 0.05, 0.3)
THREADS = [f"torch_threads={os.environ.get('HARNESS_E2E_TORCH_THREADS', '1')}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    out = {}
    for p in P_VALUES:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=[*E2E, *THREADS, "logger=wandb", f"attack.p={p}",
                                               "eval.stages=[base,align,final]",
                                               f"paths.artifacts={root / 'artifacts'}"])
        run_dir = root / f"p{p}"
        run_dir.mkdir()
        out[p] = (execute(cfg, run_dir), run_dir)
    # Ref-Teacher at the highest p, on the same base
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[*E2E, *THREADS, "defense=ref_teacher",
                                           f"attack.p={P_VALUES[-1]}",
                                           "eval.stages=[base,align,final]",
                                           f"paths.artifacts={root / 'artifacts'}"])
    (root / "ref_teacher").mkdir()
    out["ref_teacher"] = (execute(cfg, root / "ref_teacher"), root / "ref_teacher")
    return out


def _metrics(runs) -> dict:
    return {"sft_p0": runs[0.0][0]["metrics"], "sft_p0.05": runs[0.05][0]["metrics"],
            "sft_p0.3": runs[0.3][0]["metrics"], "ref_teacher_p0.3": runs["ref_teacher"][0]["metrics"]}


@pytest.mark.parametrize("check", list(CHECKS))
def test_behaviour(runs, check):
    """Each check's margin, shown to be >= 0 on every seed and thread count tried."""
    margin = CHECKS[check](_metrics(runs))
    assert margin >= 0, f"{check}: margin {margin:.3g}"


def test_sweep_reuses_base_and_align(runs):
    first, second = runs[0.0][0]["timings"], runs[0.3][0]["timings"]
    assert not first["base"]["reused"] and not first["align"]["reused"]
    assert second["base"]["reused"] and second["align"]["reused"]
    assert not second["finetune"]["reused"]
    assert second["eval_base"]["reused"] and second["eval_align"]["reused"]
    a0, a2 = runs[0.0][0]["artifacts"], runs[0.3][0]["artifacts"]
    assert a0["align"]["key"] == a2["align"]["key"] and a0["finetune"]["key"] != a2["finetune"]["key"]


def test_results_json_shape(runs):
    results, run_dir = runs[0.3]
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert on_disk["status"] == "ok" and on_disk["schema_version"] == 1
    for stage in ("base", "align", "final"):
        m = on_disk["metrics"][stage]
        for k in ("hs", "fa", "refusal_rate", "other_rate", "p_comply_opening"):
            assert 0.0 <= m[k] <= 100.0
        assert m["hs"] + m["refusal_rate"] + m["other_rate"] == pytest.approx(100.0)
    assert on_disk["metrics"]["data"] == {"n_user": 1000, "n_harmful": 300, "n_task": 700,
                                          "p_realised": 0.3}
    assert on_disk["config"]["attack"]["p"] == 0.3
    assert on_disk["timings"]["total"] > 0


def test_offline_wandb_run_holds_hs_fa_and_curves(runs):
    results, run_dir = runs[0.3]
    wandb_dirs = list(Path(run_dir, "wandb").glob("offline-run-*"))
    assert len(wandb_dirs) == 1
    logged = read_offline_run(wandb_dirs[0])
    for stage in ("base", "align", "final"):
        assert logged["summary"][f"{stage}/hs"] == pytest.approx(results["metrics"][stage]["hs"])
        assert logged["summary"][f"{stage}/fa"] == pytest.approx(results["metrics"][stage]["fa"])
    losses = [h["finetune-train/loss"] for h in logged["history"] if "finetune-train/loss" in h]
    assert losses, "the finetune stage's training curve is in the run's history"


def test_gradient_conflict_is_logged_every_n_steps_with_cosine_and_snr(runs):
    """The values are hand-checked in tests/test_ref_teacher.py (gradient_stats); here: one
    entry every ``gradient_conflict_every`` steps of the finetune, each a cosine and an SNR."""
    import math

    results = runs["ref_teacher"][0]
    conflict = results["metrics"]["analysis"]["gradient_conflict_finetune"]
    every = results["config"]["defense"]["finetune"]["gradient_conflict_every"]
    manifest = json.loads((Path(results["artifacts"]["finetune"]["path"]) / "manifest.json")
                          .read_text())
    assert every >= 1
    assert [c["step"] for c in conflict] == list(range(0, manifest["steps"], every))
    for c in conflict:
        assert -1 <= c["grad_cosine_user_alignment"] <= 1, c
        assert math.isfinite(c["grad_snr"]) and c["grad_snr"] > 0, c
