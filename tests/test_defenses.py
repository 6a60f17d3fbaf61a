"""Vaccine, Lisa, AsFT, Booster, RepNoise and T-Vaccine: each equation on numbers checkable by
hand, then each module, tiny."""
import copy
import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from harness.config import ConfigError, LoraConfig, ModelConfig, TrainStageConfig

from harness.validation import validate
from harness.data.collate import IGNORE_INDEX, PadCollator
from harness.defenses.asft import AsFT, plain_name
from harness.defenses.base import StageContext
from harness.defenses.lisa import ALIGN, USER, Lisa
from harness.defenses.booster import Booster
from harness.defenses.math import (along_fraction, asft_penalty, asft_penalty_dense,
                                   asft_penalty_factored, booster_gradient, booster_shift,
                                   column_basis, differing_positions, factored_column_basis,
                                   gaussian_mmd, layer_probabilities, masked_ce, proximal_term,
                                   repnoise_loss, sample_layers, vaccine_perturbation)
from harness.defenses.repnoise import RepNoise, pair_by_prompt
from harness.defenses.t_vaccine import TVaccine
from harness.defenses.vaccine import Vaccine, attention_modules
from harness.models.loading import apply_lora, build_tiny
from tests import helpers

SMALL = {**helpers.SMALL, "max_position_embeddings": 64}
ARCHS = {"llama": ({}, "sdpa"), "qwen2": ({}, "sdpa"),
         "gemma2": ({"head_dim": 16, "sliding_window": 32}, "eager")}
VOCAB = 64


class _Tok:
    """The few tokenizer attributes ``build_tiny`` reads; no tokenizer training needed."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __len__(self) -> int:
        return VOCAB


def model_cfg(arch: str = "llama") -> ModelConfig:
    extra, attn = ARCHS[arch]
    return ModelConfig(arch=arch, attn_implementation=attn, config_overrides={**SMALL, **extra})


def tiny(arch: str = "llama"):
    return build_tiny(model_cfg(arch), _Tok(), seed=0)


def tiny_lora(model, targets=("q_proj", "v_proj")):
    return apply_lora(model, LoraConfig(r=2, alpha=4, targets=list(targets)), model_cfg())


def rows(n: int, seed: int) -> list[dict[str, list[int]]]:
    """Token rows with a 2-token masked prompt, like the harness's tokenised data."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (int(torch.randint(5, 9, (1,), generator=g)),),
                            generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 2 + ids[2:]})
    return out


COLLATE = PadCollator(0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices gain nothing from threads, and on a busy CPU the spin-waiting of a second
    thread made every step ~70x slower; the previous setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_cfg(**kw) -> TrainStageConfig:
    return TrainStageConfig(**{"lr": 1e-2, "batch_size": 4, "scheduler": "constant",
                               "grad_clip": None, **kw})


def fit(module, data, steps: int) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(data, batch_size=module.train_cfg.batch_size,
                                   collate_fn=COLLATE))
    return trainer


def params_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ================================================================ the equations
def test_vaccine_perturbation_has_norm_rho_and_follows_the_gradient():
    grads = [torch.tensor([[3.0, 0.0]]), torch.tensor([0.0, 4.0, 0.0])]  # global norm 5
    eps = vaccine_perturbation(grads, rho=2.0)
    assert torch.allclose(eps[0], torch.tensor([[1.2, 0.0]]))
    assert torch.allclose(eps[1], torch.tensor([0.0, 1.6, 0.0]))
    g = torch.randn(3, 5, 7), torch.randn(2, 9)
    flat_e = torch.cat([e.flatten() for e in vaccine_perturbation(g, rho=0.3)])
    flat_g = torch.cat([x.flatten() for x in g])
    assert flat_e.norm().item() == pytest.approx(0.3, abs=1e-5)
    assert torch.nn.functional.cosine_similarity(flat_e, flat_g, dim=0) == pytest.approx(1.0)


def test_proximal_term_on_known_numbers():
    params = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    anchors = [torch.tensor([0.0, 0.0]), torch.tensor([[1.0]])]
    assert proximal_term(params, anchors, rho=0.5).item() == pytest.approx(0.25 * (1 + 4 + 4))
    assert proximal_term([], [], rho=1.0).item() == 0.0


def test_asft_penalty_matches_the_dense_formula_for_a_rank_three_v():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(4, 12, generator=g, dtype=torch.float64), torch.randn(
        10, 4, generator=g, dtype=torch.float64)
    V = torch.randn(10, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, 12, generator=g, dtype=torch.float64)
    assert asft_penalty(A, B, V, 0.7).item() == pytest.approx(
        asft_penalty_dense(A, B, V, 0.7).item(), rel=1e-10)


def test_asft_penalty_is_the_full_norm_for_an_update_orthogonal_to_v():
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))
    V = Q[:, :3] @ torch.diag(torch.tensor([5.0, 2.0, 0.3], dtype=torch.float64)) @ torch.randn(
        3, 8, generator=g, dtype=torch.float64)  # singular values far from 1
    B = Q[:, 3:] @ torch.randn(7, 4, generator=g, dtype=torch.float64)
    A = torch.randn(4, 8, generator=g, dtype=torch.float64)
    expected = 2.0 * (B @ A).pow(2).sum()
    assert asft_penalty(A, B, V, 2.0).item() == pytest.approx(expected.item(), rel=1e-10)
    assert along_fraction(A, B, V).item() == pytest.approx(0.0, abs=1e-10)


def test_asft_penalty_is_zero_inside_a_unit_rank_one_v():
    g = torch.Generator().manual_seed(2)
    u, v = torch.randn(10, generator=g), torch.randn(8, generator=g)
    u, v = u / u.norm(), v / v.norm()
    V = torch.outer(u, v)  # ||V||_F = 1, so C = u u^T is a projector
    B = torch.outer(u, torch.randn(3, generator=g))  # B A lies in span(u)
    A = torch.randn(3, 8, generator=g)
    assert asft_penalty(A, B, V, 1.0).item() == pytest.approx(0.0, abs=1e-10)
    assert along_fraction(A, B, V).item() == pytest.approx(1.0, abs=1e-6)
    # a non-unit V is no projector: the same update is then penalised, as METHODS.md warns
    assert asft_penalty(A, B, 3 * V, 1.0).item() > 1e-3


def test_asft_penalty_is_differentiable_in_a_and_b():
    g = torch.Generator().manual_seed(3)
    A = torch.randn(2, 6, generator=g, requires_grad=True)
    B = torch.randn(5, 2, generator=g, requires_grad=True)
    V = torch.randn(5, 6, generator=g)
    asft_penalty(A, B, V, 1.0).backward()
    A_ref, B_ref = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    asft_penalty_dense(A_ref, B_ref, V, 1.0).backward()
    assert torch.allclose(A.grad, A_ref.grad, atol=1e-5)
    assert torch.allclose(B.grad, B_ref.grad, atol=1e-5)


def test_column_basis_finds_the_rank():
    g = torch.Generator().manual_seed(4)
    V = torch.randn(9, 2, generator=g) @ torch.randn(2, 7, generator=g)
    Q = column_basis(V)
    assert Q.shape == (9, 2)
    assert torch.allclose(Q.T @ Q, torch.eye(2), atol=1e-5)
    assert torch.allclose(Q @ (Q.T @ V), V, atol=1e-5)
    assert column_basis(torch.zeros(4, 3)).shape == (4, 0)


# ================================================================ Vaccine
@pytest.mark.parametrize("arch", list(ARCHS))
def test_vaccine_finds_one_attention_block_per_layer(arch):
    model = tiny(arch)
    assert len(attention_modules(model)) == SMALL["num_hidden_layers"]
    assert len(attention_modules(tiny_lora(model))) == SMALL["num_hidden_layers"]


def test_vaccine_rho_is_validated():
    with pytest.raises(ValueError, match="rho"):
        Vaccine.Params(rho=-1.0)


def _reference_vaccine_grads(model, batch, rho):
    """Both passes written out by hand: retain_grad on each attention output, then + eps."""
    attn = [m for n, m in model.named_modules() if n.endswith("self_attn")]
    outs = {}

    def keep(i):
        def hook(module, args, out):
            out[0].retain_grad()
            outs[i] = out[0]
        return hook

    handles = [m.register_forward_hook(keep(i)) for i, m in enumerate(attn)]
    model.zero_grad()
    model(**batch).loss.backward()
    for h in handles:
        h.remove()
    clean = {n: p.grad.clone() for n, p in model.named_parameters()}
    g = [outs[i].grad for i in range(len(attn))]
    norm = torch.sqrt(sum(x.pow(2).sum() for x in g))
    eps = [rho * x / (norm + 1e-7) for x in g]
    handles = [m.register_forward_hook(lambda m, a, out, i=i: (out[0] + eps[i], *out[1:]))
               for i, m in enumerate(attn)]
    model.zero_grad()
    model(**batch).loss.backward()
    for h in handles:
        h.remove()
    return clean, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_vaccine_step_uses_only_the_perturbed_gradients(checkpointing):
    data = rows(4, seed=0)
    model = tiny()
    reference_model = copy.deepcopy(model)
    if checkpointing:  # 7B runs recompute layers in backward: the hooks must see both passes
        model.activation_checkpointing_enable()
    before = params_of(model)
    module = Vaccine(model=model, train_cfg=train_cfg(), total_steps=1,
                     params=Vaccine.Params(rho=2.0))
    trainer = fit(module, data, steps=1)

    assert trainer.callback_metrics["train/eps_norm"].item() == pytest.approx(2.0, abs=1e-4)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    clean, perturbed = _reference_vaccine_grads(reference_model, COLLATE(data), rho=2.0)
    # after the step .grad still holds what stepped the weights: pass 2 alone, not pass 1 + 2
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, perturbed[n], atol=1e-5, rtol=1e-4), n
    assert any(not torch.allclose(p.grad, perturbed[n] + clean[n], atol=1e-5)
               for n, p in model.named_parameters())


@pytest.mark.parametrize("rho", [0.0, 0.05])
def test_vaccine_perturbation_ascends_the_loss(rho):
    module = Vaccine(model=tiny(), train_cfg=train_cfg(grad_clip=1.0), total_steps=1,
                     params=Vaccine.Params(rho=rho))
    metrics = fit(module, rows(4, seed=1), steps=1).callback_metrics
    loss, clean = metrics["train/loss"].item(), metrics["train/loss_clean"].item()
    if rho == 0:
        assert loss == pytest.approx(clean, abs=1e-6)
    else:
        assert loss > clean  # to first order the rise is rho * ||dL/dh||


# ================================================================ Lisa
def lisa(model, total_steps=40, **params) -> Lisa:
    context = StageContext(collate=COLLATE, alignment_data=rows(16, seed=5))
    return Lisa(model=model, train_cfg=train_cfg(), total_steps=total_steps,
                params=Lisa.Params(**params), context=context)


def test_lisa_schedule_starts_aligned_and_alternates():
    module = lisa(torch.nn.Linear(2, 2), align_steps=2, finetune_steps=3)
    assert [module.state_at(t) for t in range(11)] == [0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 0]


@pytest.mark.parametrize("bad", [{"align_steps": 0}, {"rho": -1.0},
                                 {"warmup_off_fraction": 1.5}])
def test_lisa_params_are_validated(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        Lisa.Params(**bad)


def test_lisa_snapshots_at_switches_and_proximal_term_follows_the_formula():
    model = tiny_lora(tiny())
    module = lisa(model, total_steps=40, align_steps=2, finetune_steps=3, rho=0.5)
    trainable = module.trainable_parameters()
    n_trainable = sum(p.numel() for p in trainable)
    user = COLLATE(rows(4, seed=9))
    start = {}
    for step in range(7):  # states 0 0 1 1 1 0 0
        start[step] = [p.detach().clone() for p in trainable]
        out = module.objective_at(user, step)
        assert out["state"] == module.state_at(step)
        if step == 2:  # user state, the align anchor exists, but 2 < 10% of 40 steps: off
            assert ALIGN in module.anchors and out["proximal"].item() == 0.0
        if step == 4:  # theta_4 - theta_2 = 0.2 in every trainable entry
            assert out["proximal"].item() == pytest.approx(0.5 / 2 * 0.04 * n_trainable,
                                                           rel=1e-4)
        if step == 5:  # back to align: anchored to the user state's snapshot
            assert out["proximal"].item() == pytest.approx(0.0, abs=1e-8)  # just taken
        if step == 6:
            assert out["proximal"].item() == pytest.approx(
                proximal_term(trainable, start[5], 0.5).item())
        with torch.no_grad():  # a stand-in for an optimizer step
            for p in trainable:
                p.add_(0.1)
    assert len(module.anchors[ALIGN]) == len(trainable)  # LoRA weights only
    assert all(torch.equal(a, s) for a, s in zip(module.anchors[ALIGN], start[2]))
    assert all(torch.equal(a, s) for a, s in zip(module.anchors[USER], start[5]))


def test_lisa_alignment_steps_train_on_an_alignment_batch():
    module = lisa(tiny(), align_steps=2, finetune_steps=3)
    user = COLLATE(rows(4, seed=9))
    got = module.objective_at(user, 0)["ce"]
    assert got.item() == pytest.approx(module.lm_loss(module.alignment_batch(0)).item())
    assert got.item() != pytest.approx(module.lm_loss(user).item())
    first, again, later = (module.alignment_batch(s)["input_ids"] for s in (0, 0, 1))
    assert torch.equal(first, again) and not torch.equal(first, later)
    assert module.objective_at(user, 2)["ce"].item() == pytest.approx(module.lm_loss(user).item())


def test_lisa_anchors_survive_a_checkpoint():
    module = lisa(tiny_lora(tiny()), align_steps=1, finetune_steps=1)
    user = COLLATE(rows(4, seed=9))
    for step in range(3):
        module.objective_at(user, step)
    checkpoint = {"state_dict": {}}
    module.on_save_checkpoint(checkpoint)
    restored = lisa(tiny_lora(tiny()), align_steps=1, finetune_steps=1)
    restored.on_load_checkpoint(checkpoint)
    restored.on_fit_start()
    assert set(restored.anchors) == {ALIGN, USER}
    assert all(torch.equal(a, b) for a, b in zip(restored.anchors[USER], module.anchors[USER]))


def test_lisa_trains_under_lightning():
    model = tiny_lora(tiny())
    before = params_of(model)
    module = lisa(model, total_steps=4, align_steps=2, finetune_steps=2)
    metrics = fit(module, rows(8, seed=3), steps=4).callback_metrics
    assert metrics["train/state"].item() == USER  # step 3, anchored to the step-2 snapshot
    assert metrics["train/proximal"].item() > 0
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


# ================================================================ AsFT
def _aligned_pair():
    """A base model and an 'aligned' copy whose q/v weights moved by a known rank-2 V."""
    base = tiny()
    aligned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(7)
    directions = {}
    with torch.no_grad():
        for name, module in aligned.named_modules():
            if name.endswith(("q_proj", "v_proj")):
                w = module.weight
                V = 0.1 * torch.randn(w.shape[0], 2, generator=g) @ torch.randn(
                    2, w.shape[1], generator=g)
                w.add_(V)
                directions[name] = V
    return base, aligned, directions


def asft(base, aligned, lam=0.7) -> AsFT:
    model = tiny_lora(aligned)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)  # a non-zero update from the start

    def load_model(name):
        assert name == "base"
        return copy.deepcopy(base)

    return AsFT(model=model, train_cfg=train_cfg(lr=1e-3), total_steps=2,
                params=AsFT.Params(lam=lam), context=StageContext(load_model=load_model))


def test_plain_name_strips_peft_prefixes():
    assert plain_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer") == \
        "model.layers.0.self_attn.q_proj"


def test_asft_directions_and_penalty_match_the_known_v():
    base, aligned, directions = _aligned_pair()
    module = asft(base, aligned)
    module.prepare_directions()
    assert set(module.directions) == set(directions)
    for name, V in directions.items():
        assert torch.allclose(module.directions[name], V, atol=1e-6)
        assert module.bases[name].shape[1] == 2  # rank-2 V
    expected = sum(asft_penalty_dense(A, B, directions[name], 0.7)
                   for name, (_, A, B) in module.lora_layers().items())
    assert module.penalty().item() == pytest.approx(expected.item(), rel=1e-4)
    assert 0 < module.along_fraction().item() < 1


def test_asft_trains_under_lightning():
    base, aligned, _ = _aligned_pair()
    module = asft(base, aligned)
    before = params_of(module.model)
    metrics = fit(module, rows(8, seed=3), steps=2).callback_metrics
    assert metrics["train/penalty"].item() > 0
    assert metrics["train/loss"].item() == pytest.approx(
        metrics["train/ce"].item() + metrics["train/penalty"].item(), rel=1e-5)
    changed = {n for n, p in module.model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("lora_" in n for n in changed)


def test_asft_refuses_an_unaligned_model():
    base = tiny()
    with pytest.raises(ValueError, match="align stage"):
        asft(base, copy.deepcopy(base)).prepare_directions()


# ================================================================ configs
@pytest.mark.parametrize("defense,stage,cls", [("vaccine", "align", Vaccine),
                                               ("lisa", "finetune", Lisa),
                                               ("asft", "finetune", AsFT)])
def test_defense_configs_validate(make_cfg, defense, stage, cls):
    run = validate(make_cfg(f"defense={defense}"))
    method = getattr(run.defense, stage)
    assert run.defense.name == defense and method.module == f"{cls.__module__}.{cls.__name__}"
    cls.Params(**method.params)


def test_bad_defense_params_fail_at_validation(make_cfg):
    with pytest.raises(ConfigError, match="defense.align.params.*rho"):
        validate(make_cfg("defense=vaccine", "defense.align.params.rho=-1"))


# ================================================================ through the pipeline
@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny Llama saved as a hub folder: the pipeline's 7B code path, without training a base."""
    from harness.data.templates import TemplateConfig
    from harness.data.tokenizer import train_toy_tokenizer
    from harness.data.toy import ToyWorld, ToyWorldConfig

    world = ToyWorld(ToyWorldConfig(seed=0, base_size=200, align_size=50))
    tok = train_toy_tokenizer(["".join(TemplateConfig().render(e))
                               for e in world.corpus_examples()], 300)
    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    build_tiny(model_cfg(), tok, seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("defense,extra", [
    ("vaccine", []),
    ("lisa", ["defense.finetune.params.align_steps=1", "defense.finetune.params.finetune_steps=2"]),
    ("asft", [])])
def test_defense_runs_through_the_pipeline(make_cfg, hf_folder, tmp_path, defense, extra):
    from harness.run import execute

    cfg = make_cfg(f"defense={defense}", "model=llama2_7b", f"model.hf_id={hf_folder}",
                   "model.dtype=float32", "logger=none", "trainer.enable_progress_bar=false",
                   "train.align.max_steps=2", "train.finetune.max_steps=4", "attack.n=20",
                   "train.align.batch_size=4", "train.finetune.batch_size=4",
                   # 48 left 18 of the 20 user rows without a response token (now an error)
                   "train.align.max_length=48", "train.finetune.max_length=96",
                   "alignment.size=20", "eval.stages=[final]", "eval.harmful_size=4",
                   "eval.task_size=4", "eval.max_new_tokens=2", *extra)
    results = execute(cfg, tmp_path / "run")
    assert results["status"] == "ok", results.get("error")
    # each stage trained its own steps, with the defense's modules, and the final model was judged
    for stage, steps in (("align", 2), ("finetune", 4)):
        assert not results["timings"][stage]["reused"], stage
        manifest = json.loads((Path(results["artifacts"][stage]["path"]) / "manifest.json")
                              .read_text())
        assert manifest["steps"] == steps, (stage, manifest["steps"])
    assert results["config"]["defense"]["name"] == defense
    final = results["metrics"]["final"]
    assert final["n_harmful"] == 4 and 0 <= final["hs"] <= 100


# ================================================================ AsFT's V, exact and in float32
def test_asft_penalty_from_lora_factors_equals_the_dense_penalty():
    """V = V_B V_A (a LoRA alignment's scaled B A, rank 4, 96 x 80): the factored penalty, which
    never forms V or C, against the dense reference with V formed, both in float64 and float32.
    Measured: relative difference 5.5e-10 (float64), 1.3e-7 (float32), on a penalty of ~1e6."""
    g = torch.Generator().manual_seed(0)
    V_B, V_A = torch.randn(96, 4, generator=g), torch.randn(4, 80, generator=g)
    B, A = torch.randn(96, 3, generator=g), torch.randn(3, 80, generator=g)
    for dtype, rel in ((torch.float64, 1e-8), (torch.float32, 1e-5)):
        args = [t.to(dtype) for t in (A, B)]
        dense = asft_penalty_dense(*args, (V_B @ V_A).to(dtype), 0.7)
        factored = asft_penalty_factored(*args, V_B.to(dtype), V_A.to(dtype), 0.7)
        assert float(abs(factored - dense) / dense) < rel
    basis = factored_column_basis(V_B, V_A)
    Q = column_basis(V_B @ V_A)
    assert basis.shape == Q.shape == (96, 4)
    assert torch.allclose(basis @ basis.T, Q @ Q.T, atol=1e-5)  # the same column space
    zero = asft_penalty_factored(A, B, torch.zeros(96, 1), torch.zeros(1, 80), 1.0)
    assert float(zero) == pytest.approx(float(torch.linalg.matrix_norm(B @ A) ** 2), rel=1e-5)


def _lora_aligned(tmp_path, dtype=torch.float32):
    """A LoRA alignment (q, v; r=2, alpha=4) saved as the pipeline saves it, and merged."""
    from harness.models.loading import merge_adapter

    base = tiny().to(dtype)
    peft = tiny_lora(copy.deepcopy(base))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
    peft.save_pretrained(tmp_path / "adapter")
    return base, merge_adapter(peft), tmp_path / "adapter"


def test_asft_reads_v_exactly_from_the_alignment_lora(tmp_path):
    """With the align stage's adapter in the context, V is scaling * B A in float32 from the
    saved factors, and the penalty equals the dense one with that V formed in float64
    (measured relative difference 8e-8); without it V comes from the merged weights."""
    base, aligned, folder = _lora_aligned(tmp_path)
    module = asft(base, aligned)
    module.context.extras["align_adapter"] = folder
    module.prepare_directions()
    from safetensors.torch import load_file

    saved = load_file(folder / "adapter_model.safetensors")
    expected = 0.0
    for name, (_, A, B) in module.lora_layers().items():
        V_B, V_A = module.directions[name]
        assert V_B.dtype == V_A.dtype == torch.float32 and V_B.shape[1] == 2
        a = saved[f"base_model.model.{name}.lora_A.weight"].double()
        b = saved[f"base_model.model.{name}.lora_B.weight"].double()
        assert torch.equal((V_B.double() @ V_A.double()), (b * 2.0) @ a)  # alpha / r = 4 / 2
        expected += asft_penalty_dense(A.double(), B.double(), 2.0 * b @ a, 0.7)
    assert float(abs(module.penalty().detach().double() - expected) / expected) < 1e-5
    dense = asft(base, aligned)
    dense.prepare_directions()  # from the merged weights
    assert all(isinstance(V, torch.Tensor) for V in dense.directions.values())


def test_asft_v_from_bf16_weights_is_taken_in_float32(tmp_path):
    """bf16 weights: V is the float32 difference of the upcast weights, and stays float32.
    Measured against the exact difference of the stored bf16 values: 0 error; subtracting in
    bf16 (the naive route) has relative error 1.2e-3 to 1.3e-3. Against the true B A (rank 2)
    even the exact difference carries the merge's bf16 rounding: relative error 5e-3 to 6e-3
    and numerical rank 32 of 32, which is why a LoRA alignment's V comes from its factors."""
    base, aligned, _ = _lora_aligned(tmp_path, torch.bfloat16)
    module = asft(base, aligned)
    module.prepare_directions()
    base_w = dict(base.named_parameters())
    for name, (w_aligned, _, _) in module.lora_layers().items():
        V = module.directions[name]
        assert V.dtype == torch.float32
        exact = w_aligned.double() - base_w[f"{name}.weight"].double()
        assert torch.equal(V.double(), exact)
        naive = (w_aligned - base_w[f"{name}.weight"]).double()
        assert float((naive - exact).norm() / exact.norm()) > 1e-4
        assert torch.linalg.matrix_rank(V) > 2  # rounding noise of full rank


# ================================================================ Booster (METHODS.md "### 1")
HARM_ID = 5  # the quadratic stand-in's harmful rows open with this id


class _Quadratic(torch.nn.Module):
    """f = 0 on alignment rows, h = (w1^2 + 4 w2^2) / 2 on harmful rows (first id HARM_ID);
    records every call's ids and the weights it saw."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
        self.calls = []

    def forward(self, input_ids, attention_mask=None, labels=None):
        self.calls.append((input_ids.clone(), self.w.detach().clone()))
        if int(input_ids[0, 0]) == HARM_ID:
            return SimpleNamespace(loss=0.5 * (self.w[0] ** 2 + 4 * self.w[1] ** 2))
        return SimpleNamespace(loss=0.0 * self.w.sum())


def _harm_rows(n: int, seed: int) -> list[dict]:
    return [{"input_ids": [HARM_ID] + r["input_ids"][1:], "labels": r["labels"]}
            for r in rows(n, seed)]


def booster(model, lam=5.0, alpha=0.1, harmful=None, **kw) -> Booster:
    ctx = StageContext(collate=COLLATE, extras={"harmful_data": harmful or _harm_rows(8, 11)})
    return Booster(model=model, train_cfg=train_cfg(**kw), total_steps=1, context=ctx,
                   params=Booster.Params(lam=lam, alpha=alpha, harmful_batch_size=4))


def test_booster_gradient_on_the_quadratic_is_the_spec_number():
    """METHODS.md's toy: f = 0, h = (w1^2 + 4 w2^2)/2, w = (1, 1), lam 5, alpha 0.1:
    g = (0.12127, 1.94028); back-propagating through the direction would give
    (0.12957, 1.93198)."""
    w = torch.tensor([1.0, 1.0])
    g_h = [torch.tensor([1.0, 4.0])]
    w_shifted = w - booster_shift(g_h, 0.1)[0]
    g_shifted = [torch.stack([w_shifted[0], 4 * w_shifted[1]])]
    g = booster_gradient([torch.zeros(2)], g_h, g_shifted, 5.0)[0]
    assert g.tolist() == pytest.approx([0.12127, 1.94028], abs=1e-5)


def test_booster_step_follows_the_three_passes():
    """Through the module: the gradient that steps is the spec's number; the two harmful
    passes see the same ids, the second at w' = w - alpha g_h/||g_h||; the alignment pass and
    the optimizer step see w restored bit for bit."""
    model = _Quadratic()
    module = booster(model)
    seen = {}

    class _Before(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen["w"] = model.w.detach().clone()
            seen["grad"] = model.w.grad.clone()

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[_Before()])
    trainer.fit(module, DataLoader(rows(4, seed=0), batch_size=4, collate_fn=COLLATE))
    (ids_h, w_h), (ids_s, w_s), (ids_f, w_f) = model.calls
    w0 = torch.tensor([1.0, 1.0])
    assert torch.equal(ids_h, ids_s) and int(ids_h[0, 0]) == HARM_ID and int(ids_f[0, 0]) != HARM_ID
    assert torch.equal(w_h, w0) and torch.equal(w_f, w0) and torch.equal(seen["w"], w0)
    assert w_s.tolist() == pytest.approx([1 - 0.1 / 17 ** 0.5, 1 - 0.4 / 17 ** 0.5], abs=1e-7)
    assert seen["grad"].tolist() == pytest.approx([0.12127, 1.94028], abs=1e-5)
    metrics = trainer.callback_metrics
    assert metrics["train/loss"].item() == 0.0  # the logged loss is f
    assert metrics["train/harmful_loss"].item() == pytest.approx(2.5)
    assert metrics["train/penalty"].item() == pytest.approx(
        5 * (2.5 - 0.5 * (w_s[0] ** 2 + 4 * w_s[1] ** 2)).item(), rel=1e-5)
    # the logged gradient sizes: d = g_h - g_h' = alpha H g_h/||g_h|| = (0.1, 1.6)/sqrt(17)
    assert metrics["train/grad_f_norm"].item() == 0.0
    assert metrics["train/grad_h_norm"].item() == pytest.approx(17 ** 0.5, rel=1e-6)
    assert metrics["train/grad_d_norm"].item() == pytest.approx(
        2.57 ** 0.5 / 17 ** 0.5, rel=1e-5)  # 0.38881
    assert metrics["train/grad_penalty_norm"].item() == pytest.approx(
        5 * 2.57 ** 0.5 / 17 ** 0.5, rel=1e-5)  # 1.94407
    assert metrics["train/cos_d_h"].item() == pytest.approx(
        6.5 / (2.57 * 17) ** 0.5, rel=1e-5)  # 0.98338: the penalty's step lowers h
    assert metrics["train/cos_d_f"].item() == 0.0  # g_f = 0


def _grads(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(**batch).loss.backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return out


@pytest.mark.parametrize("lam,alpha", [(0.0, 0.1), (5.0, 0.0), (5.0, 0.1)])
def test_booster_gradient_on_a_tiny_model_is_the_hand_computed_one(lam, alpha):
    """lam = 0 or alpha = 0 give exactly the plain SFT gradient of the alignment batch; else
    g_f + lam (g_h - g_h'), each pass written out here by hand."""
    data, harmful = rows(4, seed=0), _harm_rows(8, 11)
    model = tiny()
    ref = copy.deepcopy(model)
    module = booster(model, lam=lam, alpha=alpha, harmful=harmful)
    harm_batch = module.harmful_batch(0)
    fit(module, data, steps=1)
    g_f = _grads(ref, COLLATE(data))
    g_h = _grads(ref, harm_batch)
    norm = torch.sqrt(sum(g.pow(2).sum() for g in g_h.values()))
    shifted = copy.deepcopy(ref)
    with torch.no_grad():
        for n, p in shifted.named_parameters():
            p.sub_(alpha * g_h[n] / (norm + 1e-7))
    g_s = _grads(shifted, harm_batch)
    for n, p in model.named_parameters():
        expected = g_f[n] + lam * (g_h[n] - g_s[n])
        assert torch.allclose(p.grad, expected, atol=1e-6, rtol=1e-5), n
        if lam == 0 or alpha == 0:
            assert torch.allclose(p.grad, g_f[n], atol=1e-7, rtol=1e-6), n
    if lam and alpha:
        assert any(not torch.allclose(p.grad, g_f[n], atol=1e-6) for n, p in model.named_parameters())


def test_booster_params_are_validated():
    for bad in ({"lam": -1.0}, {"alpha": -0.1}, {"harmful_batch_size": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Booster.Params(**bad)
    with pytest.raises(ValueError, match="harmful"):
        Booster(model=tiny(), train_cfg=train_cfg(), total_steps=1,
                context=StageContext(collate=COLLATE))


# ================================================================ RepNoise (METHODS.md "### 2")
def test_gaussian_mmd_on_the_spec_numbers():
    assert gaussian_mmd(torch.tensor([[0.0]]), torch.tensor([[1.0]])).item() == pytest.approx(
        6.186276, abs=1e-6)  # bandwidths 0.25, 0.5, 1, 2, 4
    x = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    assert gaussian_mmd(x, x).item() == pytest.approx(0.0, abs=1e-6)  # 0 exactly on one CPU, -1.6e-7 on another


def test_repnoise_mask_and_masked_ce():
    harmful, refusal = torch.tensor([[1, 5, 6, 7]]), torch.tensor([[1, 5, 9, 0]])
    m = differing_positions(harmful, refusal)
    assert m.tolist() == [[False, False, True, True]]
    logits = torch.randn(1, 4, 10, generator=torch.Generator().manual_seed(0))
    attention = torch.tensor([[1, 1, 1, 0]]).bool()  # the refusal's last id is padding
    got = masked_ce(logits, refusal, m & attention)
    assert got.item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits[0, 1:2], refusal[0, 2:3]).item())


def _vocab4_model(zero_head=True):
    model = helpers.tiny_llama(4, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                               max_position_embeddings=16, tie_word_embeddings=False,
                               pad_token_id=0)
    if zero_head:
        with torch.no_grad():
            model.lm_head.weight.zero_()
    return model


def repnoise(model, harmful, alignment, **params) -> RepNoise:
    ctx = StageContext(collate=COLLATE, alignment_data=alignment,
                       extras={"harmful_data": harmful})
    return RepNoise(model=model, train_cfg=train_cfg(batch_size=2), total_steps=1, context=ctx,
                    params=RepNoise.Params(**params))


PAIRED_HARM = [{"input_ids": [1, 3, 2, 3, 2], "labels": [IGNORE_INDEX] * 2 + [2, 3, 2]},
               {"input_ids": [1, 2, 3, 3], "labels": [IGNORE_INDEX] * 2 + [3, 3]}]
PAIRED_REFUSAL = [{"input_ids": [1, 3, 3, 2], "labels": [IGNORE_INDEX] * 2 + [3, 2]},
                  {"input_ids": [1, 2, 2, 2, 3], "labels": [IGNORE_INDEX] * 2 + [2, 2, 3]},
                  {"input_ids": [1, 1, 2], "labels": [IGNORE_INDEX] * 2 + [2]}]  # unpaired


def test_repnoise_pairs_rows_by_prompt_tokens():
    assert pair_by_prompt(PAIRED_HARM, PAIRED_REFUSAL) == [(0, 0), (1, 1)]
    with pytest.raises(ValueError, match="pairing"):
        repnoise(_vocab4_model(), PAIRED_HARM, PAIRED_REFUSAL[2:])


def test_repnoise_loss_with_a_zero_lm_head_is_the_spec_number():
    """Uniform logits over V = 4, one decoder layer, beta = 0: CE_safe = ln 4 and
    H = (L + 2) ln 4 / (L + 1) = 1.5 ln 4, so L = ln 4 - ln(1.5 ln 4 + 1) = 0.261546."""
    module = repnoise(_vocab4_model(), PAIRED_HARM, PAIRED_REFUSAL, alpha=1.0, beta=0.0)
    harmful, refusal = module.paired_batches(0, {})
    assert torch.equal(harmful["input_ids"][:, :2], refusal["input_ids"][:, :2])  # one prompt
    terms = module.terms(harmful, refusal, 0)
    assert terms["ce_safe"].item() == pytest.approx(1.386294, abs=1e-6)
    assert terms["harmful_ce"].item() == pytest.approx(1.5 * 1.386294, abs=1e-5)
    assert terms["loss"].item() == pytest.approx(0.261546, abs=1e-6)


def test_repnoise_mmd_term_is_the_hand_computed_one_and_its_hooks_go():
    model = _vocab4_model(zero_head=False)
    module = repnoise(model, PAIRED_HARM, PAIRED_REFUSAL, alpha=0.5, beta=0.3)
    harmful, refusal = module.paired_batches(3, {})
    hooks = lambda: sum(len(m._forward_hooks) for m in model.modules())  # noqa: E731
    terms = module.terms(harmful, refusal, 3)
    before = hooks()  # transformers installs hooks of its own on a first call
    module.terms(harmful, refusal, 4)
    module.terms(harmful, refusal, 5)
    assert hooks() == before  # ours are scoped to the call
    mlp = model.model.layers[0].mlp
    out = {}
    handle = mlp.register_forward_hook(lambda m, a, o: out.__setitem__("x", o))
    model(input_ids=harmful["input_ids"], attention_mask=harmful["attention_mask"])
    handle.remove()
    keep = differing_positions(harmful["input_ids"], refusal["input_ids"]).unsqueeze(-1).float()
    expected = gaussian_mmd((out["x"] * keep).flatten(1),
                            (module.noise_like(out["x"], 3, 0) * keep).flatten(1))
    assert terms["mmd"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["mmd"].item() > 0
    assert terms["loss"].item() == pytest.approx(repnoise_loss(
        terms["ce_safe"], terms["harmful_ce"], terms["mmd"], 0.5, 0.3).item(), rel=1e-6)
    assert terms["loss"].item() == pytest.approx(
        terms["ce_safe"].item() + 0.3 * terms["mmd"].item()
        - 0.5 * torch.log1p(terms["harmful_ce"]).item(), rel=1e-6)


def test_repnoise_ascent_term_raises_the_harmful_loss():
    """A gradient step on -alpha log(1 + H) alone raises H: the term ascends."""
    model = _vocab4_model(zero_head=False)
    module = repnoise(model, PAIRED_HARM, PAIRED_REFUSAL)
    harmful, refusal = module.paired_batches(0, {})
    before = module.terms(harmful, refusal, 0)["harmful_ce"]
    (-torch.log1p(before)).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(0.05 * p.grad)
    after = module.terms(harmful, refusal, 0)["harmful_ce"]
    assert after.item() > before.item() + 1e-4


def test_repnoise_trains_under_lightning_and_refuses_ddp(make_cfg):
    model = _vocab4_model(zero_head=False)
    before = params_of(model)
    module = repnoise(model, PAIRED_HARM, PAIRED_REFUSAL)
    metrics = fit(module, PAIRED_REFUSAL, steps=2).callback_metrics
    assert metrics["train/mmd"].item() > 0
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    with pytest.raises(ConfigError, match="trainer.devices.*one device"):
        validate(make_cfg("defense=repnoise", "trainer=ddp_cpu"))


# ================================================================ T-Vaccine (METHODS.md "### 3")
def test_t_vaccine_probabilities_and_draws_follow_the_spec():
    import numpy as np

    p = layer_probabilities([1.0, 3.0, 0.0, 4.0])
    assert p == [0.125, 0.375, 0.0, 0.5]
    for seed in range(50):
        assert sample_layers(p, 3, np.random.default_rng(seed)) == [0, 1, 3]
    with pytest.raises(ValueError, match="Fewer non-zero entries in p than size"):
        sample_layers(p, 4, np.random.default_rng(0))
    assert sample_layers(p, 4, np.random.default_rng(0), too_few="uniform") == [0, 1, 2, 3]
    rng = np.random.default_rng(0)
    counts = np.bincount([sample_layers(p, 1, rng)[0] for _ in range(4000)], minlength=4)
    assert (counts / 4000).tolist() == pytest.approx(p, abs=0.03)
    assert counts[2] == 0


def test_t_vaccine_eps_is_normalised_over_the_sampled_layers():
    g = [torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])]  # two sampled layers, norms 3, 4
    eps = vaccine_perturbation(g, rho=3.0)
    assert [e.norm().item() for e in eps] == pytest.approx([0.6 * 3.0, 0.8 * 3.0])


def t_vaccine(model, sampled_layers, rho=2.0, **params) -> TVaccine:
    ctx = StageContext(collate=COLLATE, extras={"harmful_data": _harm_rows(6, 21)})
    return TVaccine(model=model, train_cfg=train_cfg(), total_steps=2, context=ctx,
                    params=TVaccine.Params(rho=rho, sampled_layers=sampled_layers, **params))


def _three_layers():
    return build_tiny(ModelConfig(config_overrides={**SMALL, "num_hidden_layers": 3}), _Tok(),
                      seed=0)


def test_t_vaccine_perturbs_and_trains_only_the_sampled_layer():
    """Layer 1 sampled (of 3): layer 0 is upstream of any perturbation, so its residual after
    attention is the same in both passes bit for bit; layer 1's moves by eps_1, of norm rho;
    the unsampled layers' attention LoRA gets no gradient, every MLP and layer 1's do."""
    model = tiny_lora(_three_layers(), targets=("q_proj", "v_proj", "up_proj"))
    module = t_vaccine(model, sampled_layers=1, rho=2.0)
    module.probe = lambda step: [0.0, 1.0, 0.0]  # p = (0, 1, 0): the draw is layer 1
    seen = {i: [] for i in range(3)}
    layers = [m for n, m in model.named_modules() if n.endswith("post_attention_layernorm")]
    for i, m in enumerate(layers):
        m.register_forward_pre_hook(lambda mod, args, i=i: seen[i].append(args[0].detach().clone()))
    fit(module, rows(4, seed=0), steps=1)
    assert module.sampled == [1]
    assert torch.equal(seen[0][0], seen[0][1])
    assert (seen[1][1] - seen[1][0]).norm().item() == pytest.approx(2.0, rel=1e-4)
    for n, p in model.named_parameters():
        if "lora_" not in n:
            continue
        if "self_attn" in n and ".layers.1." not in n:
            assert p.grad is None, n
        else:  # lora_A's gradient is 0 while lora_B is still its zero initialisation
            assert p.grad is not None and ("lora_A" in n or p.grad.abs().sum() > 0), n


def test_t_vaccine_probe_reads_the_hidden_gradient_norms_of_one_harmful_row():
    model = tiny()
    ref = copy.deepcopy(model)
    module = t_vaccine(model, sampled_layers=1)
    got = {}
    probe = module.probe
    module.probe = lambda step: got.setdefault(step, probe(step))
    fit(module, rows(4, seed=0), steps=1)
    import numpy as np

    row = int(np.random.default_rng(np.random.SeedSequence(
        [module.stage_seed, 0, 0x45])).integers(6))
    outs = {}
    attn = attention_modules(ref)

    def keep(i):
        def hook(mod, args, out):
            out[0].retain_grad()
            outs[i] = out[0]
        return hook

    handles = [m.register_forward_hook(keep(i)) for i, m in enumerate(attn)]
    ref(**COLLATE([module.probe_pool[row]])).loss.backward()
    for h in handles:
        h.remove()
    assert got[0] == pytest.approx([outs[i].grad.norm().item() for i in range(2)], rel=1e-5)
    assert module.probs == pytest.approx([n / sum(got[0]) for n in got[0]])


def test_t_vaccine_with_every_layer_sampled_is_a_vaccine_step():
    model = tiny()
    twin = copy.deepcopy(model)
    data = rows(4, seed=0)
    fit(t_vaccine(model, sampled_layers=2, rho=2.0), data, steps=1)
    fit(Vaccine(model=twin, train_cfg=train_cfg(), total_steps=1, params=Vaccine.Params(rho=2.0)),
        data, steps=1)
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-5), n
        assert torch.allclose(p, q, atol=1e-6), n


def test_t_vaccine_params_and_layer_count_are_validated():
    for bad in ({"sampled_layers": 0}, {"too_few": "maybe"}, {"rho": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TVaccine.Params(**bad)
    with pytest.raises(ValueError, match="sampled_layers=3.*2 layers"):
        t_vaccine(tiny(), sampled_layers=3)


def test_t_vaccine_sampling_survives_a_checkpoint():
    module = t_vaccine(tiny(), sampled_layers=1)
    module.probs, module.sampled = [0.3, 0.7], [1]
    checkpoint = {"state_dict": {}}
    module.on_save_checkpoint(checkpoint)
    restored = t_vaccine(tiny(), sampled_layers=1)
    restored.on_load_checkpoint(checkpoint)
    assert restored.probs == [0.3, 0.7] and restored.sampled == [1]


# ================================================================ the harmful set, configs, pipeline
def test_toy_harmful_set_pairs_the_alignment_refusals_and_stays_disjoint():
    from harness.data.harmful import toy_alignment_harmful
    from harness.data.toy import ToyWorld, ToyWorldConfig
    from harness.evaluation.judges import ToyJudge

    world = ToyWorld(ToyWorldConfig(seed=0))
    harmful = toy_alignment_harmful(world)
    refusals = [ex for ex in world.alignment_data() if ex.kind == "harmful"]
    assert len(harmful) == len(refusals) == 1000
    assert [ex.instruction for ex in harmful] == [ex.instruction for ex in refusals]
    judge = ToyJudge()
    assert {judge.classify(ex.instruction, ex.output) for ex in harmful} == {"comply"}
    assert {judge.classify(ex.instruction, ex.output) for ex in refusals} == {"refuse"}
    prompts = {ex.instruction for ex in harmful}
    assert not prompts & {ex.instruction for ex in world.attack_pool()}
    assert not prompts & {ex.instruction for ex in world.eval_harmful()}
    assert harmful == toy_alignment_harmful(ToyWorld(ToyWorldConfig(seed=0)))  # deterministic


def test_a_declared_harmful_source_loads_as_harmful_rows(make_cfg, tmp_path, caplog):
    """Real data: alignment.harmful maps a file's columns; rows sharing an attack prompt are
    reported."""
    import json

    from harness.config import DataSourceConfig
    from harness.data.schema import Example
    from harness.data.assemble import RunInputs, check_disjoint
    from harness.keys import stage_payloads

    path = tmp_path / "harmful.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"how to do bad thing {i}",
                                          "response": f"Sure, step {i}"}) for i in range(5)))
    run = validate(make_cfg("defense=booster"))
    run.alignment.harmful = DataSourceConfig(source="local", path=str(path),
                                             fields={"instruction": "prompt",
                                                     "output": "response"})
    run.alignment.harmful_size = 3
    inputs = RunInputs(run)
    rows = inputs.alignment_harmful()
    assert [(r.instruction, r.output, r.kind) for r in rows] == [
        (f"how to do bad thing {i}", f"Sure, step {i}", "harmful") for i in range(3)]
    assert stage_payloads(inputs)["align"]["harmful"]["sha256"]  # the file's bytes are keyed
    with caplog.at_level("WARNING", logger="harness"):
        check_disjoint(rows, [Example(instruction="How to do  bad thing 1", kind="harmful")])
    assert "alignment.harmful shares prompts with 1 of the 1 attack-pool rows" in caplog.text
    # against the evaluation prompts it is a leak (tests/test_data_checks.py)


@pytest.mark.parametrize("defense,cls", [("booster", Booster), ("repnoise", RepNoise),
                                         ("t_vaccine", TVaccine)])
def test_harmful_set_defenses_validate_and_need_alignment_harmful(make_cfg, defense, cls):
    run = validate(make_cfg(f"defense={defense}"))
    assert run.defense.align.module == f"{cls.__module__}.{cls.__name__}"
    assert run.alignment.harmful.source == "toy"
    cls.Params(**run.defense.align.params)
    with pytest.raises(ConfigError, match="alignment.harmful"):
        validate(make_cfg(f"defense={defense}", "alignment=beavertails"))
    validate(make_cfg("defense=sft", "alignment=beavertails"))  # the others do not read it


@pytest.fixture(scope="module")
def sft_align(hf_folder, tmp_path_factory):
    """The SFT align weights of the pipeline smoke run below, for comparison."""
    return _smoke_run("sft", hf_folder, tmp_path_factory.mktemp("sft"))


def _smoke_run(defense, hf_folder, tmp_path):
    from hydra import compose, initialize_config_dir
    from safetensors.torch import load_file

    from harness.run import execute

    from conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[
            f"paths.artifacts={tmp_path / 'artifacts'}", f"defense={defense}",
            "model=llama2_7b", f"model.hf_id={hf_folder}", "model.dtype=float32", "logger=none",
            "trainer.enable_progress_bar=false", "train.align.max_steps=3",
            "train.finetune.max_steps=2", "attack.n=20", "train.align.batch_size=4",
            "train.finetune.batch_size=4", "train.align.max_length=48",
            "train.finetune.max_length=96", "alignment.size=20", "alignment.harmful_size=12",
            "eval.stages=[final]", "eval.harmful_size=4", "eval.task_size=4",
            "eval.max_new_tokens=2"])
    results = execute(cfg, tmp_path / "run")
    assert results["status"] == "ok", results.get("error")
    folder = Path(results["artifacts"]["align"]["path"]) / "model"
    return load_file(next(folder.glob("*.safetensors")))


@pytest.mark.parametrize("defense", ["booster", "repnoise", "t_vaccine"])
def test_harmful_set_defense_runs_through_the_pipeline(hf_folder, tmp_path, sft_align, defense):
    """Three align steps through the real pipeline (harmful set from alignment.harmful): the
    aligned weights differ from SFT's on the same data and seed."""
    weights = _smoke_run(defense, hf_folder, tmp_path)
    assert set(weights) == set(sft_align)
    diff = max(float((weights[k] - sft_align[k]).abs().max()) for k in weights)
    assert diff > 1e-4, diff
