"""The user-data filter (defense.filter.kind=refusal_feature): score each user row by the
cosine of its prompt's feature with the aligned model's R_l (from the origin, or from the held
sets' midpoint), drop those above tau (given; or the quantile at the recall target of
the held harmful prompts or of the provider's harmful set; or the upload's own two-group
split where its scores form two groups, else the held quantile), and report what was dropped."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from harness.analysis.refusal import (cosine, features, load_refusal_feature,
                                      measure_refusal_direction, num_layers, resolve_layer)
from harness.artifacts import artifact_key, write_json_atomic
from harness.data.assemble import RunInputs
from harness.data.schema import SAFETY, Example
from harness.evaluation.registry import build_judge
from harness.keys import filter_judge, filter_payload
from harness.models.store import ModelStore
from harness.stages import ModelRef, StageRecorder

log = logging.getLogger("harness")


def refusal_feature(inputs: RunInputs, models: ModelStore, model, ref: ModelRef,
                    layer_spec) -> tuple[int, torch.Tensor]:
    """The aligned model's own R_l if its stage saved one (Ref-Teacher), else R_l measured
    on it from the held sets at ``layer_spec``."""
    saved = load_refusal_feature(models.store.path(ref.stage, ref.key))
    if saved is not None:
        return int(saved["layer"]), saved["direction"]
    layer = resolve_layer(layer_spec, num_layers(model), "defense.filter.layer")
    harmful, harmless = inputs.feature_sets()
    return layer, measure_refusal_direction(model, models.tokenizer, inputs.render(harmful),
                                            inputs.render(harmless), layer,
                                            inputs.run.defense.filter.batch_size)


def filter_user_data(inputs: RunInputs, models: ModelStore, record: StageRecorder,
                     align: ModelRef, user: list[Example]) -> tuple[list[Example], dict[str, Any]]:
    """Drop the ``user`` prompts (the upload as the provider receives it) that the aligned
    model (or a judge) flags; (kept rows, what was dropped). ``check_filtered`` then refuses an
    empty result."""
    f = inputs.run.defense.filter
    payload = filter_payload(inputs, align, user)

    def build(tmp: Path, work: Path) -> dict:
        if f.kind == "judge":
            return _judge_filter(inputs.run, user, tmp)
        model = models.eval_model(align)
        layer, direction = refusal_feature(inputs, models, model, align, f.layer)
        feats = lambda exs: features(model, models.tokenizer, inputs.render(exs),  # noqa: E731
                                     layer, f.batch_size)
        held_harmful, held_harmless = inputs.feature_sets()
        # upload_split falls back to the held quantile when the upload is one group
        tau_set = None if f.threshold is not None else \
            held_harmful if f.tau_from in ("held", "upload_split") else inputs.alignment_harmful()
        needs_held = f.centre == "held_midpoint" or tau_set is held_harmful
        held = feats(held_harmful) if needs_held else None
        centre = held_midpoint(held, feats(held_harmless)) \
            if f.centre == "held_midpoint" else torch.zeros(())
        threshold = f.threshold
        if tau_set is not None:  # harmful prompts the provider holds say where harm starts
            tau_feats = held if tau_set is held_harmful else feats(tau_set)
            tau_scores = cosine(tau_feats - centre, direction)
            threshold = float(torch.quantile(tau_scores, 1.0 - f.recall_target))
        t0 = time.perf_counter()
        scores = cosine(feats(user) - centre, direction).tolist()
        split = None
        if f.tau_from == "upload_split":
            threshold, split = upload_split_tau(scores, threshold, f.split_min_eta,
                                                f.split_max_share)
            log.info("[filter] upload split: %s", split["reason"])
        write_json_atomic(tmp / "filter.json", {"split": split,
            "layer": layer, "threshold": threshold, "scores": scores, "centre": f.centre,
            "tau_from": f.tau_from, "tau_set_size": None if tau_set is None else len(tau_set),
            "prompts_per_second": len(user) / max(time.perf_counter() - t0, 1e-9)})
        return {"format": "filter"}

    ref = record("filter", artifact_key(payload), payload, build)
    saved = json.loads((models.store.path(ref.stage, ref.key) / "filter.json").read_text())
    kept, stats = apply_filter(user, saved["scores"], saved["threshold"], f.histogram_bins)
    stats.update(layer=saved["layer"], prompts_per_second=saved["prompts_per_second"],
                 centre=saved.get("centre", "none"), tau_from=saved.get("tau_from", "held"),
                 tau_set_size=saved.get("tau_set_size"))
    if saved.get("split") is not None:  # tau_from=upload_split: two groups or one, and why
        stats["split"] = saved["split"]
    if "judge" in saved:  # kind=judge: which judge, and its verdicts on the user rows
        stats.update(judge=saved["judge"], verdicts=saved["verdicts"])
    log.info("[filter] dropped %d of %d user rows (tau=%.3f, precision %s, recall %s)",
             stats["n_dropped"], stats["n_in"], stats["threshold"],
             _rate(stats, "precision"), _rate(stats, "recall"))
    return kept, stats


def split_separation(scores: list[float], threshold: float) -> float:
    """eta = sigma_B^2 / sigma_T^2 of the scores cut at ``threshold``: the share of their variance
    that lies between the two groups' means, w_lo * w_hi * (m_hi - m_lo)^2 / var, in [0, 1].
    At Otsu's cut (which maximises it) a normal sample gives 2/pi = 0.637 and a uniform one
    0.75; two groups far apart give nearly 1. 0 when one side is empty or all scores are equal."""
    v = np.asarray(scores, dtype=float)
    hi = v > threshold
    total = v.var()
    if total == 0.0 or hi.all() or not hi.any():
        return 0.0
    w = hi.mean()
    return float(w * (1.0 - w) * (v[hi].mean() - v[~hi].mean()) ** 2 / total)


def upload_split_tau(scores: list[float], held_tau: float, min_eta: float,
                     max_share: float = 1.0) -> tuple[float, dict[str, Any]]:
    """tau_from=upload_split: Otsu's cut of the upload's scores when they form two groups
    (eta >= ``min_eta``) and the upper group is at most ``max_share`` of the upload, else
    ``held_tau``, the held harmful prompts' recall quantile. An upload with no harmful rows, or
    only harmful rows, is one group: a cut would drop the top of it. A cut that would drop most
    of the upload found another structure than harmful rows (the toy world's harmless rows are
    two groups). (tau, the decision with its numbers, for the filter's record)."""
    split = two_group_split(scores)
    eta = split_separation(scores, split)
    share = float(np.mean(np.asarray(scores, dtype=float) > split)) if len(scores) else 0.0
    if eta < min_eta:
        reason = f"eta {eta:.3f} < {min_eta}: one group, tau from the held harmful prompts"
    elif share > max_share:
        reason = (f"eta {eta:.3f} >= {min_eta}, but the upper group holds {share:.1%} of the "
                  f"upload (> {max_share:.0%}): not a harmful minority, tau from the held "
                  "harmful prompts")
    else:
        reason = f"eta {eta:.3f} >= {min_eta}, upper group {share:.1%}: two groups, tau at Otsu's cut"
    two = eta >= min_eta and share <= max_share
    return (split if two else held_tau), {
        "groups": 2 if two else 1, "eta": eta, "min_eta": min_eta, "upper_share": share,
        "max_share": max_share, "split_threshold": split, "held_threshold": held_tau,
        "reason": reason}


def two_group_split(scores: list[float]) -> float:
    """Otsu's threshold on 1-D scores: the midpoint of the adjacent sorted pair whose split
    leaves the least within-group sum of squares (exact, O(n log n)). With fewer than two
    distinct scores there is no split, and nothing is dropped."""
    v = np.sort(np.asarray(scores, dtype=float))
    if len(v) < 2 or v[0] == v[-1]:
        return float(v[-1]) if len(v) else 1.0
    k = np.arange(1, len(v))  # left group sizes
    c1, c2 = np.cumsum(v)[:-1], np.cumsum(v ** 2)[:-1]
    t1, t2 = v.sum(), (v ** 2).sum()
    within = (c2 - c1 ** 2 / k) + ((t2 - c2) - (t1 - c1) ** 2 / (len(v) - k))
    within[v[1:] == v[:-1]] = np.inf  # a split must fall between distinct scores
    i = int(np.argmin(within))
    return float((v[i] + v[i + 1]) / 2)


def held_midpoint(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """The point halfway between the held harmful and harmless mean features: R_l (their
    difference) does not move, and a component every prompt shares is subtracted out."""
    return (harmful.mean(0) + harmless.mean(0)) / 2


def check_filtered(kept: list[Example], stats: dict[str, Any], f) -> bool:
    """False when the filter left nothing to finetune on and ``f.on_empty`` serves the aligned
    model (recorded in ``stats``); raises for on_empty=error and for a judge that called every
    answer compliance, harmless ones too; warns when it dropped most rows."""
    n_in = stats["n_in"]
    if not kept and f.kind == "judge" and stats["n_harmful_in"] < n_in:
        raise ValueError(f"defense.filter.judge={stats['judge']}: the judge called every one of "
                         f"the {n_in} user rows' answers compliance ({stats['verdicts']}), "
                         "so nothing is left to finetune on; a judge that only spots "
                         "refusals (keyword) cannot tell harmful answers from helpful ones")
    if not kept and f.on_empty == "serve_aligned":
        stats["served_aligned"] = True
        log.warning("[filter] every one of the %d user rows was dropped: nothing is finetuned "
                    "and the aligned model is the result (defense.filter.on_empty=serve_aligned)",
                    n_in)
        return False
    if not kept:
        raise ValueError(f"defense.filter: every one of the {n_in} user rows scored above "
                         f"threshold {stats['threshold']:.3f}; nothing is left to finetune on. "
                         "Raise defense.filter.threshold, or set it to null to derive it from "
                         "defense.filter.recall_target, or set defense.filter.on_empty="
                         "serve_aligned to record the aligned model as the result.")
    if stats["n_dropped"] > n_in / 2:
        log.warning("[filter] the filter removed %d of %d user rows (more than half); "
                    "check defense.filter.threshold", stats["n_dropped"], n_in)
    return True


def _judge_filter(run, user: list[Example], tmp: Path) -> dict:
    """kind=judge: score 1 where the judge calls a row's answer compliance with a harmful
    request (its "comply"), else 0; the threshold 0.5 drops exactly the 1s."""
    judge = build_judge(run, filter_judge(run))
    t0 = time.perf_counter()
    verdicts = judge.classify_many([ex.instruction for ex in user], [ex.output for ex in user])
    write_json_atomic(tmp / "filter.json", {
        "layer": None, "threshold": 0.5, "judge": judge.name,
        "scores": [1.0 if v == "comply" else 0.0 for v in verdicts],
        "verdicts": {v: verdicts.count(v) for v in sorted(set(verdicts))},
        "prompts_per_second": len(user) / max(time.perf_counter() - t0, 1e-9)})
    return {"format": "filter"}


def ratio(num: int, den: int, why: str) -> tuple[Optional[float], Optional[str]]:
    """num/den, or (None, why) where den is 0: a rate with no cases is undefined, not perfect."""
    return (num / den, None) if den else (None, why)


def _rate(stats: dict[str, Any], name: str) -> str:
    value = stats[name]
    return f"{value:.3f}" if value is not None else f"undefined ({stats[name + '_undefined']})"


def apply_filter(examples: list[Example], scores: list[float], threshold: float,
                 bins: int = 20) -> tuple[list[Example], dict[str, Any]]:
    """Keep the rows scoring at most ``threshold``; precision and recall of the dropped rows
    against the harmful labels, the share of harmless rows lost, and per-kind histograms. A
    rate whose denominator is empty (precision when nothing is dropped; recall and leakage with
    no harmful row; the harmless share with no harmless row) is None, and ``<name>_undefined``
    says why."""
    harmful = np.array([ex.kind == "harmful" for ex in examples], dtype=bool)
    # the provider's refusal rows in the upload (a backdoor's): neither harmful demonstrations
    # nor the user's harmless data, so counted apart
    safety = np.array([ex.kind == SAFETY for ex in examples], dtype=bool)
    harmless = ~harmful & ~safety
    values = np.asarray(scores, dtype=float)
    dropped = values > threshold
    n_drop, n_harm = int(dropped.sum()), int(harmful.sum())
    caught = int((dropped & harmful).sum())
    n_harmless = int(harmless.sum())
    rates = {
        "precision": ratio(caught, n_drop, "nothing dropped"),
        "recall": ratio(caught, n_harm, "no harmful rows in the upload"),
        "leakage": ratio(n_harm - caught, n_harm, "no harmful rows in the upload"),  # kept
        "harmless_dropped_share": ratio(int((dropped & harmless).sum()), n_harmless,
                                        "no harmless rows in the upload"),
    }
    edges = np.linspace(-1.0, 1.0, bins + 1)
    stats = {
        "threshold": float(threshold), "n_in": len(examples), "n_dropped": n_drop,
        "n_kept": len(examples) - n_drop, "n_harmful_in": n_harm,
        **{name: value for name, (value, _) in rates.items()},
        **{f"{name}_undefined": why for name, (_, why) in rates.items() if why},
        **({"n_safety_in": int(safety.sum()), "safety_dropped": int((dropped & safety).sum())}
           if safety.any() else {}),
        # what a real filter gets wrong: harmless rows that look dangerous, harmful in disguise
        **_flagged_counts(examples, dropped),
        "histogram": {"edges": edges.round(4).tolist(),
                      "harmful": np.histogram(values[harmful], edges)[0].tolist(),
                      "harmless": np.histogram(values[harmless], edges)[0].tolist()},
    }
    return [ex for ex, d in zip(examples, dropped) if not d], stats


def _flagged_counts(examples: list[Example], dropped) -> dict[str, int]:
    scary = [ex.category == "scary" or bool(ex.meta.get("scary")) for ex in examples]
    disguised = [bool(ex.meta.get("disguised")) for ex in examples]
    if not any(scary) and not any(disguised):
        return {}
    return {"n_scary_in": sum(scary), "scary_dropped": sum(s and d for s, d in zip(scary, dropped)),
            "n_disguised_in": sum(disguised),
            "disguised_kept": sum(g and not d for g, d in zip(disguised, dropped))}
