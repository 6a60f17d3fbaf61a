"""The post-hoc stage (posthoc=safelora|antidote): METHODS.md's hand-checkable numbers for each
method's math, the methods on a small peft model, the config checks, and the keys."""
import math

import pytest
import torch

from harness.artifacts import artifact_key
from harness.config import ConfigError
from harness.validation import validate
from harness.keys import eval_payload, stage_keys, stage_payloads
from harness.pipeline import Pipeline
from harness.stages import ModelRef
from harness.posthoc.antidote import Antidote
from harness.posthoc.base import PosthocContext, lora_layers
from harness.posthoc.math import (RunningSquares, antidote_mask, safelora_project,
                                  safelora_selected, wanda_scores)
from harness.posthoc.safelora import SafeLoRA
from tests.helpers import tiny_llama

E1 = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # e1 e1^T


# ================================================================ SafeLoRA's math
def test_safelora_2x2_cosine_and_threshold_switching():
    B, A = torch.tensor([[1.0], [1.0]]), torch.tensor([[1.0, 0.0]])
    cos, M = safelora_project(E1, B, A)  # BA = [[1,0],[1,0]], CBA = [[1,0],[0,0]]
    assert cos == 0.70711  # 1 / sqrt(2), rounded to 5 decimals
    assert torch.equal(M, torch.tensor([[1.0], [0.0]]))
    assert safelora_selected([cos], "threshold", 0.5, 10) == [False]  # tau 0.5: left alone
    assert safelora_selected([cos], "threshold", 0.8, 10) == [True]  # tau 0.8: B -> (1, 0)^T


def test_safelora_scaled_alignment_matrix_keeps_the_cosine_but_scales_b():
    """V = 2 e1 e1^T: C = V V^T / ||V||_F = 4 e1 e1^T / 2 is no projector, so C B = (2, 0)^T."""
    cos, M = safelora_project(2 * E1, torch.tensor([[1.0], [1.0]]), torch.tensor([[1.0, 0.0]]))
    assert cos == 0.70711
    assert torch.equal(M, torch.tensor([[2.0], [0.0]]))


def test_safelora_number_mode_projects_the_k_lowest_and_their_ties():
    assert safelora_selected([0.9, 0.1, 0.5, 0.3], "number", 0.0, 2) == [False, True, False, True]
    assert safelora_selected([0.3, 0.3, 0.3], "number", 0.0, 2) == [True, True, True]
    assert safelora_selected([0.2, 0.4], "number", 0.0, 10) == [True, True]  # k > modules


def test_safelora_low_rank_formulas_match_the_dense_computation():
    g = torch.Generator().manual_seed(0)
    V, B, A = (torch.randn(64, 64, generator=g), torch.randn(64, 4, generator=g),
               torch.randn(4, 64, generator=g))
    C = V @ V.T / torch.linalg.matrix_norm(V)
    dense = torch.nn.functional.cosine_similarity((C @ B @ A).flatten(), (B @ A).flatten(), 0)
    cos, M = safelora_project(V, B, A)
    assert abs(cos - float(dense)) < 1e-5  # cos is rounded to 5 decimals
    assert torch.allclose(M, C @ B, rtol=1e-5, atol=1e-4)
    assert safelora_project(V, torch.zeros(64, 4), A)[0] == 0.0  # an untrained B: no direction
    with pytest.raises(ValueError, match="W_aligned - W_base is zero"):
        safelora_project(torch.zeros(64, 64), B, A)


# ================================================================ Antidote's math
def test_antidote_mask_on_the_known_scores():
    W = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    scores = wanda_scores(W, torch.tensor([4.0, 1.0]))  # input column norms (2, 1)
    assert torch.equal(scores, torch.tensor([[2.0, 2.0], [6.0, 0.5]]))
    mask = antidote_mask(scores, 0.5)  # the tie in row 0: the later index ranks higher
    assert torch.equal(W.masked_fill(mask, 0.0), torch.tensor([[1.0, 0.0], [0.0, 0.5]]))
    assert not antidote_mask(scores, 0.0).any() and antidote_mask(scores, 1.0).all()
    big = antidote_mask(torch.rand(3, 256), 0.1)  # the anchor's 26 of 256 per row of lora_B
    assert big.sum(1).tolist() == [26, 26, 26]
    assert antidote_mask(torch.rand(2, 4096), 0.1).sum(1).tolist() == [410, 410]


def test_running_squares_is_the_mean_over_samples():
    s = RunningSquares()
    s.add(torch.tensor([[4.0]]))
    s.add(torch.tensor([[2.0]]))
    assert float(s.mean[0]) == 3.0 and s.samples == 2


# ================================================================ the methods on a peft model
def _tiny(seed):
    return tiny_llama(40, seed, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      max_position_embeddings=32)


def _peft(model, seed=1):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(seed)
    for _, layer, adapter in lora_layers(peft):  # a trained-looking update: B no longer zero
        layer.lora_B[adapter].weight.data = torch.randn(
            layer.lora_B[adapter].weight.shape, generator=g)
    return peft.eval()


def _models():
    base, aligned = _tiny(0), _tiny(0)
    with torch.no_grad():
        for p in aligned.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return base, aligned


@pytest.mark.parametrize("threshold,projected", [(1.0, 2), (-1.0, 0)])
def test_safelora_on_a_peft_model_projects_b_onto_each_layers_alignment_matrix(threshold,
                                                                               projected):
    base, aligned = _models()
    models = {"base": base, "align": aligned}
    ref = {n: dict(aligned.named_parameters())[f"{n}.weight"] - dict(base.named_parameters())[
        f"{n}.weight"] for n in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")}
    peft = _peft(_tiny(0))
    before = {n: (l.lora_A[a].weight.clone(), l.lora_B[a].weight.clone())
              for n, l, a in lora_layers(peft)}
    stats = SafeLoRA(SafeLoRA.Params(threshold=threshold)).apply(
        peft, PosthocContext(load_model=models.__getitem__))
    assert (stats["n_modules"], stats["n_projected"]) == (2, projected)
    assert set(stats["cosines"]) == set(ref)
    for name, layer, adapter in lora_layers(peft):
        A0, B0 = before[name]
        V = ref[name].detach()
        A0, B0 = A0.detach(), B0.detach()
        C = V @ V.T / torch.linalg.matrix_norm(V)
        assert torch.equal(layer.lora_A[adapter].weight, A0)  # A is never touched
        want = C @ B0 if projected else B0
        assert torch.allclose(layer.lora_B[adapter].weight, want, atol=1e-5)
        dense = torch.nn.functional.cosine_similarity((C @ B0 @ A0).flatten(),
                                                      (B0 @ A0).flatten(), 0)
        assert stats["cosines"][name] == pytest.approx(float(dense), abs=1e-5)


def _calibration(rows=3, length=5):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 40, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[0, 3:] = 0  # a padded row: its pads are excluded from s
    return lambda batch_size, limit: [{"input_ids": ids[i:i + batch_size],
                                       "attention_mask": mask[i:i + batch_size]}
                                      for i in range(0, rows, batch_size)]


def test_antidote_at_dense_ratio_one_zeroes_the_adapter_and_gives_the_aligned_logits():
    aligned = _tiny(0)
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        want = aligned(input_ids=ids).logits
    peft = _peft(_tiny(0))
    with torch.no_grad():
        assert not torch.equal(peft(input_ids=ids).logits, want)  # the adapter acts
    stats = Antidote(Antidote.Params(dense_ratio=1.0, batch_size=2)).apply(
        peft, PosthocContext(load_model=None, harmful_batches=_calibration()))
    with torch.no_grad():
        assert torch.equal(peft(input_ids=ids).logits, want)
    assert stats["weights_pruned"] == stats["adapter_weights"] == 2 * (2 * 16 + 16 * 2)
    assert stats["calibration_rows"] == 3 and stats["n_modules"] == 4


def test_antidote_prunes_each_rows_top_share_on_the_calibration_scores():
    """dense_ratio 0.5: lora_A rows (16 columns) lose 8 each, lora_B rows (2 columns) 1 each;
    the zeroed entries are the highest |W| * sqrt(s) of their row, s from the unpruned model's
    inputs with pads left out (checked against a manual pass on one layer)."""
    peft = _peft(_tiny(0))
    name, layer, adapter = lora_layers(peft)[0]
    A0 = layer.lora_A[adapter].weight.clone()
    seen = []
    h = layer.lora_A[adapter].register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    batches = _calibration()
    with torch.no_grad():
        for b in batches(3, None):
            peft(**b)
    h.remove()
    x, m = seen[0], batches(3, None)[0]["attention_mask"].float()
    s = ((x ** 2) * m.unsqueeze(-1)).sum(1).mean(0)
    stats = Antidote(Antidote.Params(dense_ratio=0.5, batch_size=2)).apply(
        peft, PosthocContext(load_model=None, harmful_batches=batches))
    A1 = layer.lora_A[adapter].weight
    assert torch.equal(A1 == 0, antidote_mask(A0.abs() * s.sqrt(), 0.5))
    assert stats["pruned"][f"{name}.lora_A"] == 8 * 2 and stats["pruned"][f"{name}.lora_B"] == 16
    unchanged = _peft(_tiny(0))
    Antidote(Antidote.Params(dense_ratio=0.0)).apply(
        unchanged, PosthocContext(load_model=None, harmful_batches=batches))
    assert torch.equal(lora_layers(unchanged)[0][1].lora_A[adapter].weight, A0)


# ================================================================ config and keys
def test_posthoc_config_errors_name_the_key(make_cfg):
    for overrides, key in [(("posthoc=safelora", "defense=none"), "defense.align.module"),
                           (("posthoc=antidote", "train.finetune.lora=null"), "train.finetune.lora"),
                           (("posthoc=safelora", "posthoc.params.threshold=2"), "posthoc.params"),
                           (("posthoc=antidote", "posthoc.params.dense_ratio=1.5"),
                            "posthoc.params"),
                           (("posthoc=antidote", "alignment.harmful=null"), "alignment.harmful")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate(make_cfg(*overrides))


def test_posthoc_none_keeps_every_key_and_a_method_adds_its_stage_and_moves_eval(make_cfg,
                                                                                  tmp_path):
    def pipe(*o):
        return Pipeline(validate(make_cfg(*o)), tmp_path)

    default, none = stage_keys(pipe().inputs), stage_keys(pipe("posthoc=none").inputs)
    assert none == default and "posthoc" not in none
    methods = {}
    for method in ("safelora", "antidote"):
        p = pipe(f"posthoc={method}")
        keys = methods[method] = stage_keys(p.inputs)
        assert {k: keys[k] for k in default} == default  # the stages before it are untouched
        # attack.p etc. reach it
        assert stage_payloads(p.inputs)["posthoc"]["input"] == keys["finetune"]
        # evaluation of the final model reads the post-hoc artifact, so its key moves
        assert artifact_key(eval_payload(p.inputs, ModelRef("posthoc", keys["posthoc"]))) != \
            artifact_key(eval_payload(p.inputs, ModelRef("finetune", keys["finetune"])))
    safelora, antidote = methods["safelora"]["posthoc"], methods["antidote"]["posthoc"]
    posthoc_key = lambda *o: stage_keys(pipe(*o).inputs)["posthoc"]  # noqa: E731
    assert posthoc_key("posthoc=safelora", "posthoc.params.threshold=0.3") != safelora
    assert posthoc_key("posthoc=safelora", "alignment.harmful_size=5") == safelora
    assert posthoc_key("posthoc=antidote", "alignment.harmful_size=5") != antidote


def test_the_report_gives_a_posthoc_run_its_own_defense_row(tmp_path):
    import json

    from harness.reporting.cells import collect

    paths = []
    for name, posthoc in (("a", "none"), ("b", "safelora"), ("c", None)):
        cfg = {"defense": {"name": "sft"}, "attack": {"p": 0.1}, "seed": 0}
        if posthoc:
            cfg["posthoc"] = {"name": posthoc}
        path = tmp_path / name / "results.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"status": "ok", "config": cfg,
                                    "metrics": {"final": {"hs": 1.0}}}))
        paths.append(path)
    assert collect(paths)["defense"].tolist() == ["sft", "sft+safelora", "sft"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["safelora", "antidote"])
def test_posthoc_runs_through_the_pipeline_and_final_evaluates_it(make_cfg, tmp_path, method):
    from harness.run import execute

    cfg = make_cfg(f"posthoc={method}", "logger=none", "trainer.enable_progress_bar=false",
                   "train.base.max_steps=3", "train.align.max_steps=2",
                   "train.finetune.max_steps=2", "attack.n=20", "alignment.size=20",
                   "alignment.harmful_size=6", "eval.stages=[final]", "eval.harmful_size=4",
                   "eval.task_size=4", "eval.max_new_tokens=2",
                   *(("posthoc.params.threshold=1.0",) if method == "safelora" else ()))
    results = execute(cfg, tmp_path / "run")
    assert results["status"] == "ok", results.get("error")
    arts, stats = results["artifacts"], results["metrics"]["posthoc"]
    assert set(arts) >= {"finetune", "posthoc", "eval_final"}
    import json
    from pathlib import Path

    payload = json.loads((Path(arts["eval_final"]["path"]) / "manifest.json").read_text())
    assert payload["payload"]["model"] == {"stage": "posthoc", "key": arts["posthoc"]["key"]}
    assert results["timings"]["posthoc"]["seconds"] > 0
    if method == "safelora":
        assert stats["n_projected"] == stats["n_modules"] > 0  # threshold 1: every module
    else:
        assert stats["calibration_rows"] == 6
        # each row keeps floor(0.9 cols): at least 10% go, and lora_B's 8 columns lose 1 (12.5%)
        assert 0.1 <= stats["pruned_share"] <= 0.125
    assert not math.isnan(results["metrics"]["final"]["hs"])
