"""alignment.pretrained: the align stage is an already-aligned hub model (here a tiny saved
one); nothing trains before the finetune, and AsFT reads model.base_id as its base."""
import json
from pathlib import Path

import pytest

from harness.config import ConfigError, ModelConfig

from harness.validation import validate
from harness.keys import stage_keys, stage_payloads
from harness.pipeline import Pipeline
from tests.helpers import SMALL

HUB_RUN = ("model=llama2_7b", "model.dtype=float32", "logger=none",
         "trainer.enable_progress_bar=false", "train.finetune.max_steps=2", "attack.n=20",
         "train.finetune.batch_size=4", "train.finetune.max_length=96", "alignment.size=20",
         "eval.stages=[align,final]", "eval.harmful_size=4", "eval.task_size=4",
         "eval.max_new_tokens=2", "alignment.pretrained=true")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two tiny Llamas with one toy tokenizer, saved as hub folders: 'chat' (the aligned
    model) and its 'base' (other weights)."""
    from harness.data.templates import TemplateConfig
    from harness.data.tokenizer import train_toy_tokenizer
    from harness.data.toy import ToyWorld, ToyWorldConfig
    from harness.models.loading import build_tiny

    world = ToyWorld(ToyWorldConfig(seed=0, base_size=200, align_size=50))
    tok = train_toy_tokenizer(["".join(TemplateConfig().render(e))
                               for e in world.corpus_examples()], 300)
    cfg = ModelConfig(arch="llama", config_overrides={**SMALL, "num_attention_heads": 4})
    out = {}
    for name, seed in (("chat", 0), ("base", 1)):
        out[name] = tmp_path_factory.mktemp("hf") / name
        build_tiny(cfg, tok, seed=seed).save_pretrained(out[name])
        tok.save_pretrained(out[name])
    return out


def test_pretrained_keys_show_no_align_training(make_cfg, tmp_path, folders):
    def inputs(*o):
        return Pipeline(validate(make_cfg(*HUB_RUN, f"model.hf_id={folders['chat']}", *o)),
                        tmp_path).inputs

    plain = stage_payloads(inputs())
    assert plain["align"] is None  # the hub model is base and aligned at once
    assert plain["base"] == {"stage": "base", "hf_id": str(folders["chat"]), "revision": None}
    assert plain["finetune"]["input"] == plain["finetune"]["align"] == stage_keys(inputs())["base"]
    based = stage_payloads(inputs(f"model.base_id={folders['base']}", "defense=asft"))
    assert based["base"]["hf_id"] == str(folders["base"])
    assert based["align"] == {"stage": "align", "hf_id": str(folders["chat"]), "revision": None,
                              "pretrained": True}  # no method, no train, no data
    # the same hub model without alignment.pretrained: the default SFT trains an align stage
    trained = stage_payloads(Pipeline(validate(make_cfg(
        *HUB_RUN[:-1], f"model.hf_id={folders['chat']}")), tmp_path).inputs)
    assert {"method", "train", "data"} <= set(trained["align"])


def test_pretrained_config_errors_name_the_key(make_cfg, folders):
    chat = f"model.hf_id={folders['chat']}"
    for overrides, key in [((chat, "defense=asft"), "model.base_id"),
                           ((chat, "posthoc=safelora"), "model.base_id"),
                           ((chat, "defense=vaccine"), "defense.align.module"),
                           (("alignment.pretrained=true",), "alignment.pretrained")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate(make_cfg(*HUB_RUN[1:], *overrides) if key == "alignment.pretrained"
                     else make_cfg(*HUB_RUN, *overrides))
    with pytest.raises(ConfigError, match=r"model\.base_id"):
        validate(make_cfg(chat, "model=llama2_7b", f"model.base_id={folders['base']}"))


@pytest.mark.slow
def test_asft_from_a_pretrained_model_trains_only_the_finetune(make_cfg, tmp_path, folders):
    from harness.run import execute

    cfg = make_cfg(*HUB_RUN, f"model.hf_id={folders['chat']}", f"model.base_id={folders['base']}",
                   "defense=asft")
    results = execute(cfg, tmp_path / "run")
    assert results["status"] == "ok", results.get("error")
    arts = results["artifacts"]
    manifests = {s: json.loads((Path(arts[s]["path"]) / "manifest.json").read_text())
                 for s in ("base", "align", "finetune")}
    assert manifests["base"]["format"] == manifests["align"]["format"] == "hub"
    assert "steps" not in manifests["align"] and manifests["finetune"]["steps"] == 2
    assert manifests["base"]["payload"]["hf_id"] == str(folders["base"])
    # AsFT's V = W_aligned - W_base is non-zero (two models), so its penalty acted
    assert set(results["metrics"]) >= {"align", "final"}
