"""Greedy coordinate gradient (GCG; Zou et al. 2023) over a token suffix: the search that the
evaluation's jailbreak suffix (``harness.evaluation.gcg``) and the adaptive attack on the
refusal-feature filter (``harness.analysis.refusal_evasion``) share. Only the loss differs.

Each step: the loss's gradient with respect to the one-hot suffix (``suffix_gradient``), the
``top_k`` tokens per position with the most negative gradient, ``candidates`` random
single-token swaps among them (``candidate_swaps``), and the swap with the lowest loss kept,
even when it is worse than the current suffix (GCG's own rule); the best suffix seen is
returned. The budget is ``steps`` x (one forward-backward + ``candidates`` forwards).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def candidate_swaps(suffix: torch.Tensor, grad: torch.Tensor, top_k: int, n: int,
                    generator: torch.Generator) -> torch.Tensor:
    """``n`` copies of ``suffix`` (m ids), each with one position set to one of that position's
    ``top_k`` tokens of most negative ``grad`` (m x V; disallowed tokens set to +inf)."""
    m = suffix.shape[0]
    top = (-grad).topk(top_k, dim=1).indices  # m x top_k
    pos = torch.randint(m, (n,), generator=generator)
    pick = torch.randint(top_k, (n,), generator=generator)
    out = suffix.repeat(n, 1)
    out[torch.arange(n), pos] = top[pos, pick]
    return out


def suffix_gradient(model, before: torch.Tensor, suffix: torch.Tensor, after: torch.Tensor,
                    objective: Callable, hidden_states: bool = False) -> torch.Tensor:
    """d objective / d one-hot(suffix), m x V on the CPU: ``before ⊕ suffix ⊕ after`` (1-D ids)
    run as embeddings, the suffix's as one-hot @ E, and ``objective(outputs)`` (a scalar) taken
    of the model's outputs. The weights get no gradient."""
    emb = model.get_input_embeddings().weight
    device = emb.device
    one_hot = F.one_hot(suffix.to(device), emb.shape[0]).to(emb.dtype).requires_grad_(True)
    parts = [emb[before.to(device)].detach(), one_hot @ emb.detach(),
             emb[after.to(device)].detach()]
    out = model(inputs_embeds=torch.cat(parts)[None], output_hidden_states=hidden_states)
    return torch.autograd.grad(objective(out), one_hot)[0].cpu().float()


def greedy_coordinate_search(init: torch.Tensor, loss_of: Callable[[torch.Tensor], torch.Tensor],
                             grad_of: Callable[[torch.Tensor], torch.Tensor],
                             blocked: torch.Tensor, steps: int, top_k: int, candidates: int,
                             generator: torch.Generator
                             ) -> tuple[torch.Tensor, float, list[float]]:
    """(the best suffix seen, its loss, the kept swap's loss after each step).

    ``loss_of``: B x m suffixes -> B losses; ``grad_of``: one suffix -> its m x V gradient;
    ``blocked``: a V-long bool mask of ids no candidate may hold."""
    suffix = init.clone()
    best, best_loss, history = suffix.clone(), float(loss_of(suffix[None])[0]), []
    k = min(top_k, int((~blocked).sum()))
    for _ in range(steps):
        grad = grad_of(suffix)
        grad[:, blocked] = float("inf")
        cands = candidate_swaps(suffix, grad, k, candidates, generator)
        losses = loss_of(cands).cpu()
        i = int(losses.argmin())
        suffix = cands[i]
        if float(losses[i]) < best_loss:
            best, best_loss = suffix.clone(), float(losses[i])
        history.append(float(losses[i]))
    return best, best_loss, history
