"""A small greedy coordinate gradient (GCG) suffix search (Zou et al. 2023), for
``eval.jailbreak=gcg``: one universal suffix of ``suffix_tokens`` tokens, optimised against the
evaluated model on harmful requests of the attack pool (disjoint from the evaluation prompts)
so that the answer opens with ``target``; then appended to every evaluation request.

The search is ``harness.analysis.suffix_search`` (shared with the adaptive attack on the
filter); the loss here is the target's mean CE summed over the training requests. The budget is
``steps`` x (one forward-backward + ``candidates`` forwards) per training request.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch
import torch.nn.functional as F

from harness.analysis.suffix_search import greedy_coordinate_search, suffix_gradient
from harness.data.collate import prompt_ids

MARK = "<<GCG-SUFFIX>>"  # where the suffix goes in a rendered prompt, split out before tokenising


def _target_loss(logits: torch.Tensor, start: int, target: torch.Tensor) -> torch.Tensor:
    """Mean CE of ``target`` at positions start.. (logits: B x L x V) per row: B."""
    t = target.shape[0]
    pred = logits[:, start - 1:start - 1 + t]
    return F.cross_entropy(pred.transpose(1, 2), target.expand(pred.shape[0], t),
                           reduction="none").mean(1)


def optimise_suffix(model, pieces: Sequence[tuple[list[int], list[int]]], target: list[int],
                    allowed: torch.Tensor, init: list[int], cfg, seed: int
                    ) -> tuple[list[int], list[float]]:
    """(the best suffix ids found, the summed loss after each step). ``pieces``: each training
    prompt's ids before and after the suffix; ``allowed``: a V-long bool mask of usable ids."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    emb = model.get_input_embeddings().weight
    V = emb.shape[0]
    tgt = torch.tensor(target, device=device)
    gen = torch.Generator().manual_seed(seed)
    suffix = torch.tensor(init)
    blocked = torch.zeros(V, dtype=torch.bool)
    blocked[:allowed.shape[0]] = ~allowed
    blocked[allowed.shape[0]:] = True

    def seqs(s: torch.Tensor, before, after) -> torch.Tensor:
        return torch.cat([torch.tensor(before), s, torch.tensor(after), tgt.cpu()]).to(device)

    def loss_of(batch: torch.Tensor) -> torch.Tensor:  # B suffixes -> B summed losses
        total = torch.zeros(batch.shape[0], device=device)
        with torch.no_grad():
            for before, after in pieces:
                ids = torch.stack([seqs(s, before, after) for s in batch])
                start = len(before) + batch.shape[1] + len(after)
                total += _target_loss(model(input_ids=ids).logits.float(), start, tgt)
        return total

    def grad_of(s: torch.Tensor) -> torch.Tensor:  # summed over the training requests
        grad = torch.zeros(s.shape[0], V)
        for before, after in pieces:
            start = len(before) + s.shape[0] + len(after)
            grad += suffix_gradient(
                model, torch.tensor(before), s, torch.cat([torch.tensor(after), tgt.cpu()]),
                lambda out: _target_loss(out.logits.float(), start, tgt).sum())
        return grad

    best, _, history = greedy_coordinate_search(suffix, loss_of, grad_of, blocked, cfg.steps,
                                                cfg.top_k, cfg.candidates, gen)
    model.train(was_training)
    return best.tolist(), history


def search_suffix(model, tokenizer, template, rows, cfg, system, seed: int
                  ) -> tuple[str, list[float]]:
    """The suffix text for ``rows`` (the attacker's own harmful requests), and its loss
    history: each request rendered with the suffix's place marked, split there, and tokenised
    on either side (the evaluation re-tokenises the decoded suffix, as GCG's users do)."""
    pieces = []
    for ex in rows:
        text = template.render_prompt(replace(ex, instruction=f"{ex.instruction} {MARK}"),
                                      system=system)
        before, after = text.split(MARK, 1)
        pieces.append((prompt_ids(tokenizer, before),
                       tokenizer(after, add_special_tokens=False)["input_ids"]))
    target = tokenizer(template.response_prefix + cfg.target, add_special_tokens=False)["input_ids"]
    allowed = torch.ones(len(tokenizer), dtype=torch.bool)
    allowed[[i for i in tokenizer.all_special_ids if i < len(tokenizer)]] = False
    init = tokenizer("!", add_special_tokens=False)["input_ids"][:1] * cfg.suffix_tokens
    ids, history = optimise_suffix(model, pieces, target, allowed, init, cfg, seed)
    return tokenizer.decode(ids), history
