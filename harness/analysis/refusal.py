"""The refusal feature: the last prompt token's hidden state at a layer, and its mean difference.

``R_l = mean f_l(harmful) - mean f_l(harmless)``; a prompt scores ``cos(f_l(x), R_l)``. Features
come from ``output_hidden_states``, which every HF causal LM supports, so no per-architecture
hook is needed. ``hidden_states[0]`` is the embedding output and ``hidden_states[l]`` the output of
decoder layer ``l``, so a model with L layers has valid indices 0..L. Index L is the last layer's
output *after the final norm* (transformers appends the normed state last), not the raw residual
stream that indices 1..L-1 hold.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.data.collate import prompt_ids, right_pad

LayerSpec = Union[int, float]


def num_layers(model: torch.nn.Module) -> int:
    config = model.config
    text = getattr(config, "text_config", None) or config
    return int(text.num_hidden_layers)


def resolve_layer(spec: LayerSpec, n_layers: int, key: str = "layer") -> int:
    """An index into ``hidden_states``: an int (negative counts from the top, -1 is the last
    layer, after the final norm) or a fraction of depth in (0, 1] (0.5 is the middle layer).
    A fraction names a decoder layer: one that rounds to 0, the embeddings, is an error (an
    int 0 asks for them explicitly)."""
    if isinstance(spec, bool):
        raise ValueError(f"{key}: expected an int or a fraction of depth, got {spec!r}")
    if isinstance(spec, float) and not spec.is_integer():
        if not 0.0 < spec <= 1.0:
            raise ValueError(f"{key}: a fractional layer must lie in (0, 1], got {spec}")
        index = round(spec * n_layers)
        if index == 0:
            raise ValueError(f"{key}: {spec} of a model with {n_layers} layers rounds to index "
                             f"0, the embedding output, not a decoder layer; give a larger "
                             f"fraction, or an int (1..{n_layers})")
        return index
    if isinstance(spec, float) and spec == 1.0:
        return n_layers
    index = int(spec)
    resolved = index + n_layers + 1 if index < 0 else index
    if not 0 <= resolved <= n_layers:
        raise ValueError(f"{key}: layer {spec} is outside a model with {n_layers} layers "
                         f"(valid: {-(n_layers + 1)}..{n_layers}, or a fraction in (0, 1])")
    return resolved


def last_prompt_index(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Per row, the position of the last prompt token in a right-padded training batch whose
    labels mask the prompt: one before the first supervised (response) token."""
    supervised = labels != ignore_index
    first = supervised.float().argmax(dim=1)
    if not bool(supervised.any(dim=1).all()):
        raise ValueError("a row has no response tokens; the refusal feature needs the prompt "
                         "masked (train.*.loss_on=response)")
    unmasked = torch.nonzero(supervised[:, 0]).flatten().tolist()
    if unmasked:  # loss_on=all: the "last prompt token" would be BOS in every row
        raise ValueError(f"rows {unmasked[:10]} supervise their first token, so no prompt is "
                         "masked and the last prompt token cannot be found (it would read BOS); "
                         "the refusal feature needs train.<stage>.loss_on=response")
    return first - 1


def gather_rows(hidden: Tensor, index: Tensor) -> Tensor:
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index.to(hidden.device)]


def features(model, tokenizer, prompts: Sequence[str], layer: int,
             batch_size: int = 64) -> Tensor:
    """f_l of each rendered prompt (float32, on the CPU), batched and without gradients.

    Right padding, read at each row's last real token, keeps positions identical to training.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            encoded = [prompt_ids(tokenizer, p) for p in prompts[i:i + batch_size]]
            ids, mask = right_pad(encoded, pad)
            hidden = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           output_hidden_states=True).hidden_states[layer]
            out.append(gather_rows(hidden, mask.sum(1) - 1).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def refusal_direction(harmful: Tensor, harmless: Tensor) -> Tensor:
    if len(harmful) == 0 or len(harmless) == 0:
        raise ValueError("the refusal feature needs at least one harmful and one harmless prompt")
    return harmful.mean(0) - harmless.mean(0)


def measure_refusal_direction(model, tokenizer, harmful: Sequence[str], harmless: Sequence[str],
                              layer: int, batch_size: int) -> Tensor:
    """R_l of ``model`` at ``layer``: the mean feature of the harmful prompts less that of the
    harmless ones (the one measurement Ref-Teacher, the filter and the separation share)."""
    return refusal_direction(features(model, tokenizer, harmful, layer, batch_size),
                             features(model, tokenizer, harmless, layer, batch_size))


def cosine(feats: Tensor, direction: Tensor) -> Tensor:
    return F.cosine_similarity(feats, direction.to(feats).unsqueeze(0), dim=-1)


def separation(harmful_scores: Tensor, harmless_scores: Tensor) -> dict[str, float]:
    h, s = float(harmful_scores.mean()), float(harmless_scores.mean())
    return {"cos_harmful": h, "cos_harmless": s, "gap": h - s}


def cosine_regularizer(cos: Tensor, harmful: Tensor,
                       global_counts: Optional[tuple[Tensor, Tensor]] = None,
                       world: int = 1) -> Tensor:
    """``mean_harmful(1 - cos) + mean_harmless(1 + cos)``: 0 when harmful prompts align with R
    and harmless ones anti-align, 4 when both are reversed. A class absent from the batch adds 0.

    Under DDP, ``global_counts`` holds (harmful, harmless) rows of the whole global batch:
    each class's sum is divided by its global count and multiplied by ``world``, so DDP's
    gradient average over the ranks is the one-process class mean (as ``global_token_mean``
    does for CE; a per-rank mean would weigh a rank's rows by its own class counts)."""
    harmful = harmful.bool()
    zero = cos.new_zeros(())
    if global_counts is not None:
        n_pos, n_neg = (c.to(cos).clamp(min=1) for c in global_counts)
        return world * ((1 - cos[harmful]).sum() / n_pos + (1 + cos[~harmful]).sum() / n_neg)
    pos = (1 - cos[harmful]).mean() if harmful.any() else zero
    neg = (1 + cos[~harmful]).mean() if (~harmful).any() else zero
    return pos + neg


# The saved R_l of a stage (Ref-Teacher's align stage writes one; the filter reads it): a file
# format of this module, so the filter needs no defense's import.
REFUSAL_FEATURE_FILE = "refusal_feature.pt"


def save_refusal_feature(directory: Path, layer: int, direction: Tensor, **extra: Any) -> None:
    torch.save({"layer": layer, "direction": direction.detach().float().cpu(), **extra},
               Path(directory) / REFUSAL_FEATURE_FILE)


def load_refusal_feature(directory: Path) -> Optional[dict[str, Any]]:
    path = Path(directory) / REFUSAL_FEATURE_FILE
    return torch.load(path, weights_only=True) if path.is_file() else None
