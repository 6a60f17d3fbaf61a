"""The hub-model path on a local folder (no download), LoRA merge, and offline failures."""

import pytest
import torch
from hydra import compose, initialize_config_dir

from harness.config import LoraConfig, ModelConfig
from harness.data.templates import TemplateConfig
from harness.data.tokenizer import train_toy_tokenizer
from harness.data.toy import ToyWorld, ToyWorldConfig
from harness.models.loading import (ModelNotAvailable, apply_lora, build_tiny, load_hf_model,
                                    merge_adapter)
from harness.run import execute
from tests.conftest import CONF
from tests.helpers import SMALL, refuse_network



@pytest.fixture(scope="module")
def tokenizer():
    world = ToyWorld(ToyWorldConfig(seed=0, base_size=400, align_size=100))
    return train_toy_tokenizer(["".join(TemplateConfig().render(e))
                                for e in world.corpus_examples()], 400)


@pytest.mark.parametrize("arch,extra", [("llama", {}), ("qwen2", {}), ("mistral", {}),
                                        ("gemma2", {"head_dim": 16, "sliding_window": 32})])
def test_tiny_models_of_every_family_build_and_train(tokenizer, arch, extra):
    attn = "eager" if arch == "gemma2" else "sdpa"
    cfg = ModelConfig(arch=arch, attn_implementation=attn, config_overrides={**SMALL, **extra})
    model = build_tiny(cfg, tokenizer, seed=0)
    peft = apply_lora(model, LoraConfig(r=4, alpha=8), cfg)
    ids = torch.tensor([[1, 5, 6, 7, 2]])
    loss = peft(input_ids=ids, labels=ids).loss
    loss.backward()
    trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is not None for n, p in peft.named_parameters() if p.requires_grad)


def test_merged_adapter_equals_the_adapted_model(tokenizer, tmp_path):
    cfg = ModelConfig(config_overrides=SMALL)
    peft = apply_lora(build_tiny(cfg, tokenizer, seed=0), LoraConfig(r=4, alpha=8), cfg)
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)  # a non-trivial update
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected = peft(input_ids=ids).logits
    peft.save_pretrained(tmp_path / "adapter")
    merged = merge_adapter(build_tiny(cfg, tokenizer, seed=0), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5)


def test_hub_id_offline_fails_without_a_network_call_and_with_advice(monkeypatch):
    tried = refuse_network(monkeypatch)
    with pytest.raises(ModelNotAvailable, match="not in the local HF cache.*model.hf_id"):
        load_hf_model(ModelConfig(source="hf", hf_id="meta-llama/Llama-2-7b-hf"))
    assert tried == []  # so no hub retry


def test_real_path_runs_on_a_local_hf_folder(tokenizer, tmp_path):
    """model=llama2_7b with hf_id pointing at a local folder: the code a GPU run uses."""
    folder = tmp_path / "tiny-hf-llama"
    build_tiny(ModelConfig(config_overrides=SMALL), tokenizer, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[
            "model=llama2_7b", f"model.hf_id={folder}", "model.dtype=float32",
            "model.gradient_checkpointing=false", "logger=none",
            "trainer.enable_progress_bar=false", "train.align.max_steps=2",
            "train.finetune.max_steps=2", "attack.n=20", "eval.harmful_size=8",
            "eval.task_size=4", "eval.max_new_tokens=3", f"paths.artifacts={tmp_path / 'a'}"])
    results = execute(cfg, tmp_path / "run")
    assert results["status"] == "ok"
    assert results["timings"]["base"]["seconds"] < 5  # a hub model is loaded, not trained
    assert results["metrics"]["data"]["n_user"] == 20
    manifest = (tmp_path / "a" / "base").glob("*/manifest.json")
    assert '"format": "hub"' in next(manifest).read_text()
