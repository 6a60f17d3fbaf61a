"""Model loading: tiny models built from config, HF models by id, LoRA, and saved stages."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelNotAvailable(RuntimeError):
    """A hub model that is neither cached nor reachable."""


def build_tiny(model_cfg, tokenizer, seed: int) -> PreTrainedModel:
    """A randomly initialised model of the configured architecture, sized by config_overrides."""
    config = AutoConfig.for_model(
        model_cfg.arch, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        **dict(model_cfg.config_overrides))
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(
        config, attn_implementation=model_cfg.attn_implementation,
        dtype=DTYPES[model_cfg.dtype])


def hub_call(fn, what: str, model_id: str, key: str = "model.hf_id", **kwargs):
    """``fn(model_id, **kwargs)``, or a ModelNotAvailable naming the config ``key`` to fix."""
    try:
        return fn(model_id, **kwargs)
    except OSError as err:
        raise ModelNotAvailable(
            f"{what} '{model_id}' is not in the local HF cache and the hub is offline "
            f"(HF_HUB_OFFLINE=1). Set {key} to a local folder, or run with HARNESS_ONLINE=1 "
            f"where the hub is reachable. ({type(err).__name__}: {err})") from err


def load_hf_model(model_cfg, path: str | None = None) -> PreTrainedModel:
    model_id = path or model_cfg.hf_id
    model = hub_call(AutoModelForCausalLM.from_pretrained, "model", model_id,
                      revision=None if path else model_cfg.revision,
                      dtype=DTYPES[model_cfg.dtype],
                      attn_implementation=model_cfg.attn_implementation)
    return model


def load_hf_tokenizer(model_cfg, path: str | None = None):
    tok = hub_call(AutoTokenizer.from_pretrained, "tokenizer", path or model_cfg.hf_id,
                    revision=None if path else model_cfg.revision)
    if tok.pad_token_id is None:  # Llama-2 and Mistral ship none; a dedicated pad keeps EOS clean
        tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def load_saved_model(path: Path, model_cfg) -> PreTrainedModel:
    """A full model saved by a stage (save_pretrained layout)."""
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[model_cfg.dtype], attn_implementation=model_cfg.attn_implementation)


def apply_lora(model: PreTrainedModel, lora_cfg, model_cfg):
    """A fresh LoRA adapter on top of ``model``; only the adapter trains."""
    from peft import LoraConfig, get_peft_model

    targets = list(lora_cfg.targets or model_cfg.lora_targets)
    config = LoraConfig(
        r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def merge_adapter(model_or_peft, adapter_path: Path | None = None):
    """Merge a LoRA adapter into the weights, so the next stage starts from plain weights."""
    from peft import PeftModel

    if adapter_path is not None:
        model_or_peft = PeftModel.from_pretrained(model_or_peft, adapter_path)
    if isinstance(model_or_peft, PeftModel):
        return model_or_peft.merge_and_unload()
    return model_or_peft


def resize_for_tokenizer(model: PreTrainedModel, tokenizer) -> None:
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))


PEFT_PREFIX = "base_model.model."


def adapter_factors(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A saved LoRA adapter's update per module, as float32 factors ``(scaling * B, A)`` whose
    product is exactly the update merging adds (d_out x r, r x d_in), keyed by the module's
    name in the plain model. The exact alignment direction V of an align stage that trained
    this adapter: a difference of merged low-precision weights adds rounding noise of full
    rank."""
    import json

    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{folder}: the adapter sets per-layer ranks or alphas; reading V "
                         "from its factors assumes one r and lora_alpha")
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / r ** 0.5 if config.get("use_rslora") else alpha / r
    tensors = load_file(folder / "adapter_model.safetensors")
    factors = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removesuffix(".lora_A.weight").removeprefix(PEFT_PREFIX)
        b = tensors[key.replace(".lora_A.weight", ".lora_B.weight")]
        factors[name] = (b.float() * scaling, a.float())
    return factors
