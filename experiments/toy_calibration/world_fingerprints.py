"""Fingerprints of every part of a toy world (the hashes its stage keys hold), to show that a
code change left the generated data as it was:

    PYTHONPATH=. python experiments/toy_calibration/world_fingerprints.py conf/world/toy.yaml

Run it on two checkouts and compare the output; `${seed}` is read as seed 0.
"""
import json
import sys

import yaml

from harness.config.schema import ToyWorldConfig
from harness.data import toy

text = open(sys.argv[1]).read().replace("${seed}", "0")
knobs = {k: v for k, v in yaml.safe_load(text).items() if k in ToyWorldConfig.__dataclass_fields__}
world = toy.ToyWorld(ToyWorldConfig(**knobs))
parts = ["tokenizer", "base", "align", "attack", "feature", "eval", "eval_harmless"] + [
    f"task_{t}_{s}" for t in ("sentiment", "topic", "arith") for s in ("train", "test")]
print(json.dumps({p: world.fingerprint(p) for p in parts}, sort_keys=True, indent=1))
