"""Tokenisation with loss masking, and padding collators for training and generation."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from harness.data.schema import Example
from harness.data.templates import TemplateConfig

IGNORE_INDEX = -100


def prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt, BOS added by hand so every model family is treated alike."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is None or (ids and ids[0] == bos):  # a chat template writes its own BOS
        return ids
    return [bos] + ids


def encode_example(tokenizer, template: TemplateConfig, ex: Example, max_length: int,
                   loss_on: str = "response") -> dict[str, list[int]]:
    """Prompt and response are tokenised apart, so generation sees exactly the training prompt.

    ``loss_on="response"`` masks the prompt with IGNORE_INDEX; ``"all"`` trains on every token
    (base pretraining). Every response ends with EOS; truncation keeps the prompt's start.
    """
    prompt, response = template.render(ex)
    p_ids = prompt_ids(tokenizer, prompt)
    r_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if not r_ids or r_ids[-1] != tokenizer.eos_token_id:  # a chat turn may end in EOS already
        r_ids = r_ids + [tokenizer.eos_token_id]
    ids = (p_ids + r_ids)[:max_length]
    if loss_on == "all":
        labels = list(ids)
    elif loss_on == "response":
        labels = ([IGNORE_INDEX] * len(p_ids) + r_ids)[:max_length]
    else:
        raise ValueError(f"loss_on must be 'response' or 'all', got {loss_on!r}")
    return {"input_ids": ids, "labels": labels}


class TokenizedDataset(Dataset):
    """Tokenised once up front: the rows are short and reused for every epoch."""

    def __init__(self, examples: list[Example], tokenizer, template: TemplateConfig,
                 max_length: int, loss_on: str = "response"):
        self.examples = examples
        # "harmful" rides along for methods that treat the two kinds differently (Ref-Teacher)
        self.rows = [{**encode_example(tokenizer, template, ex, max_length, loss_on),
                      "harmful": int(ex.kind == "harmful")} for ex in examples]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.rows[i]


@dataclass
class PadCollator:
    pad_token_id: int

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if "harmful" in rows[0]:
            batch["harmful"] = torch.tensor([r["harmful"] for r in rows], dtype=torch.long)
        return batch


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding for generation: every prompt ends at the same column."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask
