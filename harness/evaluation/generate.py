"""Batched generation with left padding and a KV cache, and teacher-forced opening probabilities."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from harness.data.collate import left_pad, prompt_ids, right_pad


def _length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches of similar length waste less compute on padding."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 64,
             num_samples: int = 1, temperature: float = 1.0, seed: int = 0) -> list[list[str]]:
    """Answers for each prompt: greedy when ``num_samples == 1``, else that many samples.

    Returns one list of answers per prompt, in input order.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    outputs: list[list[str]] = [[] for _ in prompts]
    sampling = num_samples > 1
    if sampling:
        torch.manual_seed(seed)
    per_batch = max(1, batch_size // num_samples)
    for idx in _length_sorted_batches([len(e) for e in encoded], per_batch):
        ids, mask = left_pad([encoded[i] for i in idx], tokenizer.pad_token_id)
        kwargs = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                      num_return_sequences=num_samples) if sampling else dict(do_sample=False)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, use_cache=True, **kwargs)
        texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        for j, i in enumerate(idx):
            outputs[i] = texts[j * num_samples:(j + 1) * num_samples]
    model.train(was_training)
    return outputs


class Generator:
    """Answers for prompts: ``generate(prompts, max_new_tokens, batch_size, num_samples=1,
    temperature=1.0, seed=0)`` returns one list of answers per prompt, in input order."""

    def generate(self, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 64,
                 num_samples: int = 1, temperature: float = 1.0,
                 seed: int = 0) -> list[list[str]]:
        raise NotImplementedError


class HFGenerator(Generator):
    """transformers' ``generate`` on the model in memory (``generation.backend=hf``)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def generate(self, prompts, max_new_tokens, batch_size=64, num_samples=1, temperature=1.0,
                 seed=0):
        return generate(self.model, self.tokenizer, prompts, max_new_tokens, batch_size,
                        num_samples, temperature, seed)


@torch.no_grad()
def opening_probability(model, tokenizer, prompts: Sequence[str], comply: Sequence[str],
                        refuse: Sequence[str], response_prefix: str = " ",
                        batch_size: int = 256) -> list[float]:
    """P(a compliance opening) / P(any listed opening), teacher-forced, per prompt.

    A smooth companion to greedy HS: it moves with a defense even where greedy HS saturates.
    """
    model.eval()
    device = next(model.parameters()).device
    openings = list(comply) + list(refuse)
    open_ids = [tokenizer(response_prefix + o, add_special_tokens=False)["input_ids"]
                for o in openings]
    p_ids = [prompt_ids(tokenizer, p) for p in prompts]
    pairs = [(i, j) for i in range(len(prompts)) for j in range(len(openings))]
    logp = torch.empty(len(prompts), len(openings))
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        seqs = [p_ids[i] + open_ids[j] for i, j in chunk]
        ids, mask = right_pad(seqs, tokenizer.pad_token_id)
        target = torch.zeros_like(ids, dtype=torch.bool)
        for r, ((i, j), s) in enumerate(zip(chunk, seqs)):
            target[r, len(p_ids[i]):len(s)] = True
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        lp = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device))[..., 0]
        lp = (lp * target[:, 1:].to(device)).sum(-1).cpu()
        for r, (i, j) in enumerate(chunk):
            logp[i, j] = lp[r]
    n_comply = len(comply)
    total = torch.logsumexp(logp, dim=1)
    p_comply = torch.exp(torch.logsumexp(logp[:, :n_comply], dim=1) - total)
    return p_comply.tolist()
