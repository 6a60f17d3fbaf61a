"""generation.backend=vllm: refused at start-up where it cannot run, and, with a stand-in module
of vLLM's shape, given the prompts exactly as the HF path builds them."""
import sys
import types
from pathlib import Path

import pytest

from harness.config import ConfigError, GenerationConfig

from harness.validation import validate


def test_vllm_missing_is_a_start_up_error_naming_the_key(make_cfg, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec  # whether or not this machine has vllm, it has none here
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ConfigError, match=r"generation.backend: generation.backend=vllm needs "
                                          r"the vllm package.*pip install -e '.\[vllm\]'"):
        validate(make_cfg("generation.backend=vllm", "trainer=gpu"))


def test_vllm_on_cpu_and_bad_values_are_refused(make_cfg):
    with pytest.raises(ConfigError, match="generation.backend: vllm generates on GPUs"):
        validate(make_cfg("generation.backend=vllm"))
    with pytest.raises(ConfigError, match="generation.backend: got 'tgi', allowed: hf, vllm"):
        validate(make_cfg("generation.backend=tgi"))
    with pytest.raises(ConfigError, match="generation.gpu_memory_utilization"):
        validate(make_cfg("generation.gpu_memory_utilization=1.5"))


def test_fsdp_on_cpu_is_refused_at_start_up(make_cfg):
    with pytest.raises(ConfigError, match="trainer.strategy: fsdp shards on CUDA devices only"):
        validate(make_cfg("trainer.strategy=fsdp", "trainer.accelerator=cpu",
                          "trainer.devices=2"))


class _FakeVLLM(types.ModuleType):
    """vLLM's public surface as the backend uses it: LLM(...).generate(requests, params)
    returning one RequestOutput per request, each with ``outputs[i].text``."""

    def __init__(self):
        super().__init__("vllm")
        self.engines = []
        fake = self

        class SamplingParams:
            def __init__(self, **kw):
                self.kw = kw

        class LLM:
            def __init__(self, **kw):
                self.kw, self.calls = kw, []
                fake.engines.append(self)

            def generate(self, requests, params, use_tqdm=True):
                self.calls.append((requests, params.kw))
                n = params.kw["n"]
                return [types.SimpleNamespace(outputs=[
                    types.SimpleNamespace(text=f"ans{len(r['prompt_token_ids'])}.{k}")
                    for k in range(n)]) for r in requests]

        self.LLM, self.SamplingParams = LLM, SamplingParams


def test_vllm_generator_sends_token_ids_and_reads_outputs_in_order(monkeypatch, tmp_path):
    from transformers import PreTrainedTokenizerFast

    from harness.data.collate import prompt_ids
    from harness.data.tokenizer import train_toy_tokenizer
    from harness.evaluation.vllm_backend import VLLMGenerator

    fake = _FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    train_toy_tokenizer(["User: a b c\nAssistant: d e"] * 20, 300).save_pretrained(tmp_path)
    tok = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    gen = VLLMGenerator(tmp_path, tok, GenerationConfig(backend="vllm"), seed=3)
    engine = fake.engines[0]
    assert engine.kw["model"] == str(tmp_path) and engine.kw["seed"] == 3
    assert engine.kw["gpu_memory_utilization"] == 0.5 and engine.kw["tensor_parallel_size"] == 1

    prompts = ["User: a\nAssistant:", "User: a b c\nAssistant:"]
    greedy = gen.generate(prompts, max_new_tokens=7)
    requests, params = engine.calls[0]
    assert [r["prompt_token_ids"] for r in requests] == [prompt_ids(tok, p) for p in prompts]
    assert requests[0]["prompt_token_ids"][0] == tok.bos_token_id  # BOS by hand, as the HF path
    assert params == {"n": 1, "temperature": 0.0, "top_p": 1.0, "max_tokens": 7, "seed": None,
                      "skip_special_tokens": True}
    lengths = [len(prompt_ids(tok, p)) for p in prompts]
    assert greedy == [[f"ans{lengths[0]}.0"], [f"ans{lengths[1]}.0"]]

    sampled = gen.generate(prompts, max_new_tokens=5, num_samples=3, temperature=0.7, seed=9)
    assert engine.calls[1][1]["n"] == 3 and engine.calls[1][1]["temperature"] == 0.7
    assert engine.calls[1][1]["seed"] == 9
    assert [len(s) for s in sampled] == [3, 3] and sampled[1][2] == f"ans{lengths[1]}.2"


def test_vllm_import_error_says_how_to_install(monkeypatch):
    from harness.evaluation import vllm_backend

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(ImportError, match="generation.backend=vllm needs the vllm package"):
        vllm_backend.require_vllm()


@pytest.mark.slow  # a whole pipeline run (8 s)
def test_pipeline_evaluates_through_the_vllm_engine(make_cfg, monkeypatch, tmp_path):
    """backend=vllm end to end on a tiny model with the stand-in engine: the engine is pointed
    at a saved folder holding the weights and the tokenizer, its answers are what is judged,
    and the evaluation key differs from the HF backend's. The engine complies with every other
    request and refuses the rest, so the HS of 50 and refusal rate of 50 are its answers, judged
    one for one (the tiny model's own generations would be neither)."""
    from harness.data.toy import COMPLIANCE_STYLES, REFUSALS
    from harness.pipeline import Pipeline
    from tests.helpers import TINY

    fake = _FakeVLLM()
    opening = COMPLIANCE_STYLES[0][0]
    calls = []

    def comply(requests, params, use_tqdm=True):
        calls.append(len(requests))
        return [types.SimpleNamespace(outputs=[types.SimpleNamespace(
            text=f" {opening} x" if i % 2 == 0 else f" {REFUSALS[0]}")])
            for i in range(len(requests))]

    monkeypatch.setitem(sys.modules, "vllm", fake)
    run = validate(make_cfg(*TINY, "eval.stages=[final]", "eval.samples=0"))
    run.generation.backend = "vllm"  # validation refuses vllm on a CPU trainer
    pipe = Pipeline(run, tmp_path)
    pipe.inputs.load()
    refs = pipe.build_models()
    real_llm = fake.LLM

    def llm(**kw):
        engine = real_llm(**kw)
        engine.generate = comply
        engine.files = {p.name for p in Path(kw["model"]).iterdir()}  # a work folder: gone after
        return engine

    fake.LLM = llm
    metrics = pipe.evaluator.evaluate("final", refs["final"])
    engine = fake.engines[0]
    assert engine.kw["model"].endswith("vllm_model") and engine.kw["tokenizer"] == engine.kw["model"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= engine.files
    assert metrics["n_harmful"] == 16 and 16 in calls  # the harmful prompts, in one call
    assert (metrics["hs"], metrics["refusal_rate"], metrics["other_rate"]) == (50.0, 50.0, 0.0)
    assert metrics["eval_processes"] == 1
    hf_run = validate(make_cfg(*TINY, "eval.stages=[final]", "eval.samples=0"))
    assert pipe.record.artifacts["eval_final"]["key"] != \
        artifact_key_of_hf_eval(hf_run, refs, tmp_path)


def artifact_key_of_hf_eval(run, refs, tmp_path):
    """The HF backend's evaluation key for the same model (evaluated, cached, keyed)."""
    from harness.pipeline import Pipeline

    pipe = Pipeline(run, tmp_path)
    pipe.inputs.load()
    pipe.trainer.refs = refs
    pipe.evaluator.evaluate("final", refs["final"])
    return pipe.record.artifacts["eval_final"]["key"]
