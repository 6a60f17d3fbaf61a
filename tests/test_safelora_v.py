"""SafeLoRA's alignment direction V: from the alignment LoRA's factors (exact, rank r_align, in
float32) when the align stage trained one, else the float32 difference of the weights; its
rank is in the stats. On a bf16 model the merged-weight difference carries rounding noise of
full rank, which moves the cosines and the number-mode selection; the factors do not."""
import copy

import pytest
import torch

from harness.models.loading import adapter_factors, merge_adapter
from harness.posthoc.base import PosthocContext, lora_layers
from harness.posthoc.math import (factored_rank, numerical_rank, safelora_project,
                                  safelora_project_factored, safelora_selected)
from harness.posthoc.safelora import SafeLoRA


def test_the_factored_projection_equals_the_dense_one():
    """Random V = V_B V_A (64 x 64, rank 4), B 64 x 4, A 4 x 64: the same cosine and projected B
    as with V formed (float64 reference), and the rank read from the factors is V's."""
    g = torch.Generator().manual_seed(0)
    V_B, V_A = torch.randn(64, 4, generator=g), torch.randn(4, 64, generator=g)
    B, A = torch.randn(64, 4, generator=g), torch.randn(4, 64, generator=g)
    cos, M = safelora_project_factored(V_B, V_A, B, A)
    cos_ref, M_ref = safelora_project((V_B @ V_A).double(), B.double(), A.double())
    assert cos == pytest.approx(cos_ref, abs=1e-5)
    assert torch.allclose(M.double(), M_ref.double(), rtol=1e-5, atol=1e-5)
    assert M.dtype == torch.float32
    assert factored_rank(V_B, V_A) == numerical_rank(V_B @ V_A) == 4
    assert factored_rank(V_B[:, :1] @ torch.ones(1, 4), V_A) == 1  # rank below the factors'
    assert factored_rank(torch.zeros(64, 2), torch.zeros(2, 64)) == 0
    with pytest.raises(ValueError, match="alignment adapter's update is zero"):
        safelora_project_factored(torch.zeros(64, 2), torch.zeros(2, 64), B, A)


def _llama(hidden, layers, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=40, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=32)).to(dtype)


def _lora(model, r, seed, std=0.02):
    """A LoRA on q and v with a trained-looking B (normal, ``std``)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # lora_A's init draws from the global generator
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r,
                                            target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer, adapter in lora_layers(peft):
            w = layer.lora_B[adapter].weight
            w.copy_(torch.randn(w.shape, generator=g) * std)
    return peft


def _aligned_by_lora(tmp_path, dtype, hidden=128, layers=8, r_align=2, std=0.02):
    """The pipeline's LoRA align stage: an adapter on the base, saved, then merged in
    ``dtype``; and a finetune LoRA on the merged model."""
    base = _llama(hidden, layers, dtype)
    align = _lora(copy.deepcopy(base), r_align, seed=0, std=std)
    align.save_pretrained(tmp_path / "adapter")
    aligned = merge_adapter(align)
    return base, aligned, tmp_path / "adapter"


def _safelora(base, aligned, folder, mode="number", **params):
    finetuned = _lora(copy.deepcopy(aligned), 4, seed=100)
    extras = {} if folder is None else {"align_adapter": folder}
    models = {"base": base, "align": aligned}
    return SafeLoRA(SafeLoRA.Params(mode=mode, **params)).apply(
        finetuned, PosthocContext(load_model=models.__getitem__, extras=extras)), finetuned


def test_bf16_selection_follows_the_exact_v_not_the_rounding(tmp_path):
    """bf16 tiny Llama (8 blocks, 128 wide, q and v: 16 modules), aligned by an r = 2 LoRA whose
    update is about one bf16 rounding step of the weights (B's std 5e-4), merged; number mode,
    k = 8. Exact reference: V = scaling * B A of the saved factors in float64. From the factors:
    rank 2 in every module, cosines within 1e-5 of the reference, and the reference's selection.
    From the merged bf16 weights (measured): rank 127-128, cosines off by up to 0.045, and 2 of
    the 16 modules swapped (3.q_proj projected in place of 4.v_proj). Merged in float32 instead,
    the weight difference has rank 2 and the reference's selection."""
    base, aligned, folder = _aligned_by_lora(tmp_path, torch.bfloat16, std=5e-4)
    exact = {n: (b.double() @ a.double()) for n, (b, a) in adapter_factors(folder).items()}
    stats, finetuned = _safelora(base, aligned, folder, num_layers=8)
    before = _lora(copy.deepcopy(aligned), 4, seed=100)  # the same update, unprojected
    ref_cos = []
    for name, layer, adapter in lora_layers(before):
        B, A = (w.weight.detach().double() for w in (layer.lora_B[adapter], layer.lora_A[adapter]))
        ref_cos.append(safelora_project(exact[name], B, A)[0])
    names = [n for n, _, _ in lora_layers(before)]
    reference = [n for n, pick in zip(names, safelora_selected(ref_cos, "number", 0, 8)) if pick]
    assert stats["v_source"] == "align_adapter"
    assert set(stats["v_rank"].values()) == {2}  # r_align
    assert [stats["cosines"][n] for n in names] == pytest.approx(ref_cos, abs=1e-5)
    assert stats["projected"] == reference
    merged, _ = _safelora(base, aligned, None, num_layers=8)
    assert merged["v_source"] == "weights"
    assert min(merged["v_rank"].values()) > 100  # the merge's rounding noise, full rank
    assert max(abs(merged["cosines"][n] - c) for n, c in zip(names, ref_cos)) > 5e-3
    assert merged["projected"] != reference  # the rounding changes what is projected
    assert len(set(merged["projected"]) ^ set(reference)) == 2


def test_v_rank_equals_r_align_and_the_projection_uses_it(tmp_path):
    """float32, r_align = 3: V's rank from the factors is 3 in every module; threshold 1 projects
    every module onto V's column space (B <- V V^T B / ||V||_F, with V formed here)."""
    base, aligned, folder = _aligned_by_lora(tmp_path, torch.float32, hidden=32, layers=2,
                                             r_align=3)
    stats, finetuned = _safelora(base, aligned, folder, mode="threshold", threshold=1.0)
    assert stats["v_rank"] == {n: 3 for n, _, _ in lora_layers(finetuned)}
    assert stats["n_projected"] == stats["n_modules"] == 4
    before = _lora(copy.deepcopy(aligned), 4, seed=100)
    factors = adapter_factors(folder)
    for (name, layer, adapter), (_, old, a2) in zip(lora_layers(finetuned), lora_layers(before)):
        V = factors[name][0] @ factors[name][1]
        B0 = old.lora_B[a2].weight.detach()
        assert torch.allclose(layer.lora_B[adapter].weight,
                              V @ (V.T @ B0) / torch.linalg.matrix_norm(V), atol=1e-6)
    # a full-weight alignment (no adapter): V is the float32 weight difference, full rank here
    full, _ = _safelora(base, aligned, None, mode="threshold", threshold=1.0)
    assert full["v_source"] == "weights" and set(full["v_rank"].values()) == {3}
    assert full["cosines"] == pytest.approx(stats["cosines"], abs=1e-4)


def test_an_alignment_adapter_missing_a_finetuned_module_names_the_key(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = _llama(32, 1, torch.float32)
    align = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        for _, layer, adapter in lora_layers(align):
            layer.lora_B[adapter].weight.fill_(0.01)
    align.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"v_proj.*train\.align\.lora"):
        _safelora(base, merge_adapter(align), tmp_path / "adapter", mode="threshold")


def test_safelora_keys_its_v_source(make_cfg, tmp_path):
    from harness.validation import validate
    from harness import keys
    from harness.pipeline import Pipeline

    pipe = Pipeline(validate(make_cfg("posthoc=safelora")), tmp_path)
    assert keys.stage_payloads(pipe.inputs)["posthoc"]["v_from_align_adapter"] is True
    pipe = Pipeline(validate(make_cfg("posthoc=antidote")), tmp_path)
    assert "v_from_align_adapter" not in keys.stage_payloads(pipe.inputs)["posthoc"]
