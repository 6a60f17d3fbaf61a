"""Where Ref-Teacher's filter scores fall on SmolLM2: cos(f_l, R_l) of the teacher's held
feature sets and of the user upload at p = 0.3, raw (the filter's score) and centred on the
held sets' mean. Reads the teacher from the artifact store (run the poison-ratio preset first).

    OMP_NUM_THREADS=1 PYTHONPATH=. python experiments/real_smollm2/filter_separation.py [artifacts]
"""
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from harness.analysis.refusal import cosine, features, load_refusal_feature
from harness.config import register, validate
from harness.pipeline import Pipeline
from harness.stages import ModelRef

torch.set_num_threads(1)
register()
artifacts = sys.argv[1] if len(sys.argv) > 1 else "artifacts"
conf = str(Path(__file__).resolve().parents[2] / "conf")
with initialize_config_dir(config_dir=conf, version_base="1.3"):
    cfg = compose("config", overrides=[f"paths.artifacts={artifacts}", "model=smollm2_135m",
                                       "defense=ref_teacher", "attack.p=0.3"])
pipe = Pipeline(validate(cfg), Path("/tmp/filter_separation"))
pipe.load_data()
align = pipe.keys()["align"]
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
for name, centre in (("raw (the filter's score)", 0), ("centred", (fh.mean(0) + fl.mean(0)) / 2)):
    def q(x):
        c = cosine(x - centre, direction)
        return " / ".join(f"{v:.3f}" for v in torch.quantile(c, torch.tensor([0.05, 0.5, 0.95])))
    print(f"{name}, 5% / median / 95%: held harmful {q(fh)}; held harmless {q(fl)}; "
          f"user harmful {q(fu[is_harmful])}; user task {q(fu[~is_harmful])}")
