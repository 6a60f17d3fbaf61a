"""Vaccine, Lisa and AsFT: each equation on numbers checkable by hand, then each module, tiny."""
import copy

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from harness.config import ConfigError, LoraConfig, ModelConfig, TrainStageConfig, validate
from harness.data.collate import IGNORE_INDEX, PadCollator
from harness.defenses.asft import AsFT, plain_name
from harness.defenses.base import StageContext
from harness.defenses.lisa import ALIGN, USER, Lisa
from harness.defenses.math import (along_fraction, asft_penalty, asft_penalty_dense,
                                   asft_penalty_factored, column_basis, factored_column_basis,
                                   proximal_term, vaccine_perturbation)
from harness.defenses.vaccine import Vaccine, attention_modules
from harness.models.loading import apply_lora, build_tiny

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64}
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
