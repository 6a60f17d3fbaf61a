"""The upload stage: an attack that adapts the user's rows to the provider's aligned model
(``Attack.adapts_upload``; attack=filter_adaptive) rewrites them here, between align and the
filter, against the model and scoring the refusal-feature filter uses (its R_l, layer and
centre: ``harness.filtering``). Its artifact holds each harmful row's suffix and the filter's
score of every harmful row before and after, so the filter and finetune downstream read the
same rows, and a run that shares the key reuses them."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from harness.analysis.refusal import cosine, features
from harness.analysis.refusal_evasion import Frame, evade_filter, row_pieces, with_suffix
from harness.artifacts import artifact_key, write_json_atomic
from harness.data.assemble import RunInputs
from harness.data.collate import prompt_ids
from harness.data.schema import Example
from harness.filtering import held_midpoint, refusal_feature
from harness.models.store import ModelStore
from harness.stages import ModelRef, StageRecorder

log = logging.getLogger("harness")


def adapt_upload(inputs: RunInputs, models: ModelStore, record: StageRecorder, align: ModelRef,
                 payload: dict[str, Any]) -> tuple[list[Example], dict[str, Any]]:
    """(the upload as the attacker sends it, what the attack did: its budget, the suffixes'
    count, the harmful rows' filter scores before and after, and wall time)."""
    r = inputs.run
    f = r.defense.filter
    plain = inputs.data.user

    def build(tmp: Path, work: Path) -> dict:
        model = models.eval_model(align)
        tok = models.tokenizer
        layer, direction = refusal_feature(inputs, models, model, align, f.layer)
        feats = lambda exs: features(model, tok, inputs.render(exs), layer,  # noqa: E731
                                     f.batch_size)
        centre = held_midpoint(*map(feats, inputs.feature_sets())) \
            if f.centre == "held_midpoint" else torch.zeros(())
        t0 = time.perf_counter()
        rows, searched = evade_filter(model, tok, r.template, plain,
                                      Frame(layer, direction, centre), r.attack.search, r.seed)
        seconds = time.perf_counter() - t0
        harmful = [i for i, ex in enumerate(plain) if ex.kind == "harmful"]
        # the filter's own computation on the rendered rows: what it will read
        score = lambda exs: cosine(feats(exs) - centre, direction).tolist()  # noqa: E731
        write_json_atomic(tmp / "upload.json", {
            "layer": layer, "centre": f.centre, "search": asdict(r.attack.search),
            "rows": searched, "seconds": seconds,
            "cos_before": score([plain[i] for i in harmful]),
            "cos_after": score([rows[i] for i in harmful]),
            "retokenised_exact": [exact_ids(tok, r.template, plain[s["index"]],
                                            rows[s["index"]], s["suffix_ids"])
                                  for s in searched if s["suffix"]]})
        return {"format": "upload"}

    ref = record("upload", artifact_key(payload), payload, build)
    saved = json.loads((models.store.path(ref.stage, ref.key) / "upload.json").read_text())
    rows = list(plain)
    for s in saved["rows"]:
        if s["suffix"]:
            rows[s["index"]] = with_suffix(plain[s["index"]], s["suffix"])
    exact = saved["retokenised_exact"]
    stats = {"budget": saved["search"], "layer": saved["layer"], "centre": saved["centre"],
             "n_harmful": len(saved["rows"]),
             "n_suffixed": sum(bool(s["suffix"]) for s in saved["rows"]),
             "retokenised_exact_share": sum(exact) / len(exact) if exact else None,
             "seconds": saved["seconds"], "cos_before": saved["cos_before"],
             "cos_after": saved["cos_after"]}
    log.info("[upload] %d of %d harmful rows suffixed; mean filter score %.3f -> %.3f",
             stats["n_suffixed"], stats["n_harmful"],
             _mean(saved["cos_before"]), _mean(saved["cos_after"]))
    return rows, stats


def exact_ids(tokenizer, template, plain: Example, suffixed: Example, suffix_ids: list) -> bool:
    """Whether the suffixed row's rendered prompt tokenises to the ids its search scored."""
    p = row_pieces(tokenizer, template, plain)
    return prompt_ids(tokenizer, template.render_prompt(suffixed)) == \
        p.before + list(suffix_ids) + p.after


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
