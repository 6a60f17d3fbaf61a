"""The upload-split guard's statistic on the toy world: for each seed and harmful share p, the
Ref-Teacher teacher (the default toy world and protocol) scores the upload, and this prints
Otsu's cut, eta = sigma_B^2 / sigma_T^2 at that cut, and what the cut alone would drop, with
the labels (the toy world's own; the real model's uploads are never read here). Builds only
the base and align stages (cached in the artifact store) and the filter.

    OMP_NUM_THREADS=1 PYTHONPATH=. python experiments/toy_filter_guard/guard_stat.py \
        [artifacts] [seeds, e.g. 0,1,2] [override ...]
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from harness.config import register
from harness.validation import validate
from harness.config.schema import StageMethodConfig
from harness import keys
from harness.artifacts import artifact_key
from harness.filtering import apply_filter, filter_user_data
from harness.pipeline import Pipeline
from harness.training import SFT_MODULE

torch.set_num_threads(1)
register()
artifacts = sys.argv[1] if len(sys.argv) > 1 else "artifacts"
seeds = [int(s) for s in sys.argv[2].split(",")] if len(sys.argv) > 2 else [0]
extra = sys.argv[3:]
conf = str(Path(__file__).resolve().parents[2] / "conf")

def _round(x):
    """Four decimals; None stays None (a rate with no cases is undefined)."""
    return None if x is None else round(x, 4)

for seed in seeds:
    for p in (0.0, 0.1, 0.3):
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            cfg = compose("config", overrides=[
                f"paths.artifacts={artifacts}", "defense=ref_teacher", f"attack.p={p}",
                f"seed={seed}", "defense.filter.tau_from=upload_split", "logger=none",
                "trainer.enable_progress_bar=false", *extra])
        pipe = Pipeline(validate(cfg), Path(f"/tmp/toy_filter_guard/{seed}_{p}"))
        r, data, train = pipe.run, pipe.inputs.load(), pipe.trainer
        payloads = keys.stage_payloads(pipe.inputs)
        train.refs = refs = {}
        refs["base"] = train.train("base", payloads["base"], None,
                                   StageMethodConfig(module=SFT_MODULE), r.train.base,
                                   data.base_corpus)
        refs["align"] = train.train("align", payloads["align"], refs["base"], r.defense.align,
                                    r.train.align, data.alignment)
        _, stats = filter_user_data(pipe.inputs, pipe.models, pipe.record, refs["align"])
        key = artifact_key(keys.filter_payload(pipe.inputs, refs["align"], data.user))
        saved = json.loads((pipe.models.store.path("filter", key) / "filter.json").read_text())
        _, cut = apply_filter(data.user, saved["scores"], saved["split"]["split_threshold"])
        split = stats["split"]
        out = Path(__file__).parent / f"scores_seed{seed}_p{p}.json"  # to recompute eta from
        out.write_text(json.dumps({"scores": [round(x, 6) for x in saved["scores"]],
                                   "harmful": [ex.kind == "harmful" for ex in data.user]}))
        print(json.dumps({"seed": seed, "p": p, "n": len(data.user),
                          "eta": round(split["eta"], 4), "groups": split["groups"],
                          "split_threshold": round(split["split_threshold"], 4),
                          "held_threshold": round(split["held_threshold"], 4),
                          "threshold_used": round(stats["threshold"], 4),
                          "n_dropped": stats["n_dropped"], "recall": stats["recall"],
                          "precision": _round(stats["precision"]),
                          "harmless_dropped_share": _round(stats["harmless_dropped_share"]),
                          "cut_alone": {k: _round(cut[k]) for k in (
                              "n_dropped", "recall", "precision", "harmless_dropped_share")},
                          "scores_5_50_95": {kind: np.quantile(
                              [s for s, ex in zip(saved["scores"], data.user)
                               if (ex.kind == "harmful") == is_h], [0.05, 0.5, 0.95]
                          ).round(4).tolist() for kind, is_h in (("harmful", True),
                                                                 ("harmless", False))
                              if any((ex.kind == "harmful") == is_h for ex in data.user)}}),
              flush=True)
