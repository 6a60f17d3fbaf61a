"""RepNoise (Rosati et al. 2024): alignment that turns harmful representations into noise.

Minimises ``L = CE_safe + beta * MMD - alpha * log(1 + H)`` (METHODS.md, "### 2. RepNoise") on
*paired* batches: the same prompts with a harmful answer and with a refusal, padded to one width.

- m: the positions where the harmful and the refusal ids differ (the answer span, and any
  position padded in one sequence only).
- CE_safe: the refusal sequence's CE on m, padding excluded.
- H: the harmful sequence's CE on m (padding excluded), at the final logits and through the
  logit lens ``lm_head(norm(h_i))`` of every ``hidden_states`` entry (embeddings and each
  layer); as the anchor codes it, ``H = (CE_final + sum_{i=0..L} CE_i) / (L + 1)``, L + 2 terms
  over L + 1. (transformers' last entry is already normed, so it is normed twice, as there.)
- MMD: at every decoder layer's MLP output on the harmful pass, masked with m and flattened to
  (batch, T * d), against N(0, 1) noise under the same mask (``math.gaussian_mmd``), averaged
  over layers. The hooks live for the call only (the official code leaks one a step).

``pairing="prompt"`` (the official form) pairs each harmful row with the alignment row of the
same prompt tokens and draws a random paired batch each step; the stage's own alignment batch
then only counts the steps. ``pairing="independent"`` is Booster's RepNoise baseline: the
refusals are the stage's alignment batch and the harmful rows an independent draw, so m covers
almost every answer token.

One process only: MMD compares the batch's rows with each other and log(1 + H) is of the batch
mean, so per-rank values are not the global batch's (config.validate refuses more processes).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from harness.data.collate import IGNORE_INDEX
from harness.defenses.base import StageModule
from harness.defenses.math import differing_positions, gaussian_mmd, masked_ce, repnoise_loss

HARMFUL_SALT = 0x43
NOISE_SALT = 0x44


def prompt_key(row: dict[str, list[int]]) -> tuple[int, ...]:
    """A tokenised row's prompt: its ids up to the first supervised label."""
    labels = row["labels"]
    n = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))
    return tuple(row["input_ids"][:n])


def pair_by_prompt(harmful, refusals) -> list[tuple[int, int]]:
    """(harmful row, refusal row) index pairs of equal prompt tokens and differing answers;
    the first refusal row of each prompt is taken."""
    by_prompt: dict[tuple[int, ...], int] = {}
    for j in range(len(refusals)):
        by_prompt.setdefault(prompt_key(refusals[j]), j)
    pairs = []
    for i in range(len(harmful)):
        j = by_prompt.get(prompt_key(harmful[i]))
        if j is not None and harmful[i]["input_ids"] != refusals[j]["input_ids"]:
            pairs.append((i, j))
    return pairs


def decoder_submodules(model: torch.nn.Module, suffix: str) -> list[torch.nn.Module]:
    """Each decoder layer's ``<layer>.<suffix>`` module, in layer order."""
    return [m for name, m in model.named_modules() if name.endswith(f".{suffix}")
            and ".layers." in f".{name}"]


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The norm before the LM head: the ``norm`` module outside the decoder layers."""
    found = [m for name, m in model.named_modules()
             if name.split(".")[-1] == "norm" and ".layers." not in f".{name}."]
    if len(found) != 1:
        raise ValueError(f"RepNoise's logit lens needs the final norm; found {len(found)} "
                         "'norm' modules outside the decoder layers")
    return found[0]


class RepNoise(StageModule):
    stages = ("align",)
    needs_harmful_data = True
    single_process_only = True  # batch-level MMD and log(1 + H): see the module docstring

    @dataclass
    class Params:  # the official loss.py:76-77; Booster's and T-Vaccine's baselines: alpha 0.1
        alpha: float = 1.0  # weight of the bounded ascent -log(1 + H)
        beta: float = 0.001  # weight of the MMD to noise
        pairing: str = "prompt"  # prompt (official) | independent (Booster's baseline)

        def __post_init__(self) -> None:
            for name in ("alpha", "beta"):
                if getattr(self, name) < 0:
                    raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
            if self.pairing not in ("prompt", "independent"):
                raise ValueError(f"pairing must be 'prompt' or 'independent', got {self.pairing!r}")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.harmful_data = self.require_harmful_data()
        self.mlps = decoder_submodules(self.model, "mlp")
        if not self.mlps:
            raise ValueError("RepNoise found no '*.layers.*.mlp' modules for its MMD")
        self.norm = final_norm(self.model)
        self.pairs: list[tuple[int, int]] = []
        if self.params.pairing == "prompt":
            self.require_alignment_data()
            self.pairs = pair_by_prompt(self.harmful_data, self.context.alignment_data)
            if not self.pairs:
                raise ValueError(
                    "RepNoise (defense.align.params.pairing=prompt): no harmful row shares its "
                    "prompt with an alignment row, so there are no (harmful answer, refusal) "
                    "pairs; give alignment.harmful the alignment data's prompts, or set "
                    "pairing=independent")

    # ---------------------------------------------------------------- batches
    def _rows_batch(self, rows: list[dict]) -> dict[str, Tensor]:
        batch = self.context.collate(rows)
        return {k: v.to(self.device) for k, v in batch.items()}

    def paired_batches(self, step: int, batch: dict[str, Tensor]
                       ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(harmful, refusal) batches of one width; row i of each shares its prompt under
        pairing=prompt."""
        if self.params.pairing == "prompt":
            seed = np.random.SeedSequence([self.stage_seed, self.global_rank, step, HARMFUL_SALT])
            g = torch.Generator().manual_seed(int(seed.generate_state(1, dtype=np.uint64)[0]))
            size = max(1, self.train_cfg.batch_size // self.world_size)
            idx = torch.randint(len(self.pairs), (size,), generator=g).tolist()
            harmful = [self.harmful_data[self.pairs[k][0]] for k in idx]
            refusal = [self.context.alignment_data[self.pairs[k][1]] for k in idx]
        else:
            n = batch["input_ids"].shape[0]
            refusal = [{"input_ids": ids[mask.bool()].tolist(), "labels": lab[mask.bool()].tolist()}
                       for ids, lab, mask in zip(batch["input_ids"].cpu(), batch["labels"].cpu(),
                                                 batch["attention_mask"].cpu())]
            seed = np.random.SeedSequence([self.stage_seed, self.global_rank, step, HARMFUL_SALT])
            g = torch.Generator().manual_seed(int(seed.generate_state(1, dtype=np.uint64)[0]))
            harmful = [self.harmful_data[int(i)]
                       for i in torch.randint(len(self.harmful_data), (n,), generator=g)]
        both = self._rows_batch(harmful + refusal)  # one collate: one width
        k = len(harmful)
        return ({key: v[:k] for key, v in both.items()}, {key: v[k:] for key, v in both.items()})

    def noise_like(self, x: Tensor, step: int, layer: int) -> Tensor:
        """N(0, 1) noise, a function of (seed, rank, step, layer): reproducible on resume."""
        seed = np.random.SeedSequence([self.stage_seed, self.global_rank, step, NOISE_SALT, layer])
        g = torch.Generator().manual_seed(int(seed.generate_state(1, dtype=np.uint64)[0]))
        return torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.device, x.dtype)

    @contextmanager
    def _mlp_outputs(self) -> Iterator[dict[int, Tensor]]:
        outputs: dict[int, Tensor] = {}
        handles = [m.register_forward_hook(
            lambda module, args, out, i=i: outputs.__setitem__(i, out)) for i, m in
            enumerate(self.mlps)]
        try:
            yield outputs
        finally:
            for handle in handles:
                handle.remove()

    # ---------------------------------------------------------------- the objective
    def terms(self, harmful: dict[str, Tensor], refusal: dict[str, Tensor], step: int
              ) -> dict[str, Tensor]:
        m = differing_positions(harmful["input_ids"], refusal["input_ids"])
        refusal_out = self.model(input_ids=refusal["input_ids"],
                                 attention_mask=refusal["attention_mask"])
        ce_safe = masked_ce(refusal_out.logits, refusal["input_ids"],
                            m & refusal["attention_mask"].bool())
        with self._mlp_outputs() as mlp:
            harmful_out = self.model(input_ids=harmful["input_ids"],
                                     attention_mask=harmful["attention_mask"],
                                     output_hidden_states=True)
        harm_mask = m & harmful["attention_mask"].bool()
        head = self.model.get_output_embeddings()
        ces = [masked_ce(harmful_out.logits, harmful["input_ids"], harm_mask)]
        ces += [masked_ce(head(self.norm(h)), harmful["input_ids"], harm_mask)
                for h in harmful_out.hidden_states]
        harmful_ce = torch.stack(ces).sum() / (len(harmful_out.hidden_states))
        keep = m.unsqueeze(-1).to(harmful_out.logits.dtype)
        mmds = []
        for i in range(len(self.mlps)):
            x = mlp[i] * keep.to(mlp[i].dtype)
            y = self.noise_like(mlp[i], step, i) * keep.to(mlp[i].dtype)
            mmds.append(gaussian_mmd(x.flatten(1), y.flatten(1)))
        mmd = torch.stack(mmds).mean()
        loss = repnoise_loss(ce_safe, harmful_ce, mmd, self.params.alpha, self.params.beta)
        return {"loss": loss, "ce_safe": ce_safe, "harmful_ce": harmful_ce, "mmd": mmd}

    def objective(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        harmful, refusal = self.paired_batches(self.global_step, batch)
        return self.terms(harmful, refusal, self.global_step)
