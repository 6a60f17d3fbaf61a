"""``generation.backend=vllm``: evaluation answers from a vLLM engine, for large evaluations on
GPU. vLLM is an optional extra, imported only here, only when selected."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from harness.data.collate import prompt_ids
from harness.evaluation.generate import Generator

INSTALL_HINT = ("generation.backend=vllm needs the vllm package, which is not installed. Install "
                "the build that matches your torch and CUDA (pip install -e '.[vllm]', or see "
                "vLLM's installation page), or use generation.backend=hf")


def require_vllm():
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from err
    return vllm


class VLLMGenerator(Generator):
    """One engine over a saved model folder (weights with any adapter merged, and tokenizer).

    Prompts go in as token ids built exactly as the HF path builds them (BOS added by hand), so
    both backends see the same prompt; greedy is temperature 0."""

    def __init__(self, model_dir: Path, tokenizer, cfg, seed: int = 0):
        vllm = require_vllm()
        self.vllm, self.tokenizer = vllm, tokenizer
        self.llm = vllm.LLM(model=str(model_dir), tokenizer=str(model_dir), seed=seed,
                            dtype=cfg.dtype, gpu_memory_utilization=cfg.gpu_memory_utilization,
                            tensor_parallel_size=cfg.tensor_parallel_size,
                            max_model_len=cfg.max_model_len, enforce_eager=cfg.enforce_eager)

    def generate(self, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 64,
                 num_samples: int = 1, temperature: float = 1.0,
                 seed: int = 0) -> list[list[str]]:
        # vLLM schedules its own batches; batch_size is the HF path's knob
        params = self.vllm.SamplingParams(
            n=num_samples, temperature=temperature if num_samples > 1 else 0.0, top_p=1.0,
            max_tokens=max_new_tokens, seed=seed if num_samples > 1 else None,
            skip_special_tokens=True)
        requests = [{"prompt_token_ids": prompt_ids(self.tokenizer, p)} for p in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        return [[c.text for c in out.outputs] for out in outputs]
