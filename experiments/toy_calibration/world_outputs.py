"""Hashes of every output of the toy world (every field of every row of each dataset, the
disguised attack pool, the provider's harmful set, the vocabulary and the stage fingerprints),
for each world preset x seeds 0, 1, 7: a refactor of harness/data/toy.py that must leave the
generated data as it was shows the same file before and after.

    PYTHONPATH=. python experiments/toy_calibration/world_outputs.py before.json  # then diff
"""
import hashlib
import json
import sys
from dataclasses import asdict
from pathlib import Path

from hydra import compose, initialize_config_dir

from harness.config import register
from harness.data import toy
from harness.data.harmful import toy_alignment_harmful
from harness.validation import validate

register()
CONF = Path("conf").resolve()
out = {}
for preset in ("toy", "toy_echo", "faithful_v1", "faithful"):
    for seed in (0, 1, 7):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=[f"world={preset}", f"world.seed={seed}"])
        w = toy.ToyWorld(validate(cfg).world)
        parts = {
            "base": w.base_corpus(), "align": w.alignment_data(), "attack": w.attack_pool(),
            "attack_disguised": w.attack_pool(disguised=True), "eval": w.eval_harmful(),
            "eval_harmless": w.eval_harmless(), "eval_scary": w.eval_scary(),
            "benign": w.benign_pool(), "feature": [r for rs in w.feature_prompts() for r in rs],
            "corpus": w.corpus_examples(), "alignment_harmful": toy_alignment_harmful(w),
            **{f"task_{t}_{s}": w.task(t, s) for t in toy.GENERATORS for s in ("train", "test")},
        }
        row = {k: hashlib.sha256(json.dumps([asdict(r) for r in v], sort_keys=True).encode())
               .hexdigest()[:16] + f"/{len(v)}" for k, v in parts.items()}
        vocab = [w.categories, w.verbs, w.group_of, w.euphemism]
        row["vocab"] = hashlib.sha256(json.dumps(vocab, sort_keys=True).encode()).hexdigest()[:16]
        stages = ["base", "align", "tokenizer", "attack", "benign", "eval", "eval_harmless",
                  "eval_scary", "feature"]
        row["fingerprints"] = hashlib.sha256(json.dumps(
            [w.fingerprint(p) for p in stages]).encode()).hexdigest()[:16]
        out[f"{preset}/seed{seed}"] = row
json.dump(out, open(sys.argv[1], "w"), indent=1, sort_keys=True)
print(len(out), "worlds,", sum(len(r) for r in out.values()), "hashes")
