"""A stage's key holds the digests of the source files it runs (harness.code_digest): an edited
method moves its stage's key and every key downstream, a file no stage runs moves none, and the
original bytes give the original keys back."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import code_digest, keys
from harness.artifacts import artifact_key
from harness.pipeline import Pipeline
from harness.stages import ModelRef
from harness.validation import validate
from tests.test_cli import TINY

ROOT = Path(__file__).resolve().parents[1]


def chain_keys(pipe: Pipeline) -> dict[str, str]:
    """Every stage's key, each built on the keys of the stages it reads (as a run chains them)."""
    out = dict(keys.stage_keys(pipe.inputs))
    out["filter"] = artifact_key(keys.filter_payload(pipe.inputs, ModelRef("align", out["align"]),
                                                     []))
    out["eval_final"] = artifact_key(keys.eval_payload(pipe.inputs,
                                                       ModelRef("finetune", out["finetune"])))
    out["eval_align"] = artifact_key(keys.eval_payload(pipe.inputs, ModelRef("align", out["align"])))
    return out


@pytest.fixture
def edit(monkeypatch, tmp_path):
    """edit(module, text): the digests read ``module`` as its file with ``text`` appended."""
    real = code_digest.module_file
    copies: dict[str, Path] = {}

    def module_file(name):
        return copies.get(name) or real(name)

    def _edit(name: str, text: str) -> Path:
        copy = tmp_path / (name.replace(".", "_") + ".py")
        copy.write_bytes(real(name).read_bytes() + text.encode())
        copies[name] = copy
        return copy

    monkeypatch.setattr(code_digest, "module_file", module_file)
    return _edit


def test_each_stage_covers_its_method_and_runner_and_nothing_keyed_otherwise():
    trained = code_digest.code_modules(["harness.defenses.vaccine", "harness.models.loading"],
                                       ["harness.training"])
    assert trained == ["harness.config.template", "harness.data.collate", "harness.data.schema",
                       "harness.data.templates", "harness.defenses.base",
                       "harness.defenses.math", "harness.defenses.vaccine",
                       "harness.models.loading", "harness.training"]
    # the runner is taken alone: training.py imports the store, config and tracking
    assert "harness.models.store" not in trained
    eval_modules = code_digest.code_modules(["harness.evaluation.evaluate",
                                             "harness.evaluation.registry",
                                             "harness.evaluation.panel",
                                             "harness.analysis.refusal"],
                                            ["harness.evaluating"])
    assert {"harness.evaluation.judges", "harness.evaluation.scorers", "harness.stats",
            "harness.evaluation.generate", "harness.evaluating"} <= set(eval_modules)
    for modules in (trained, eval_modules):
        assert not set(modules) & {"harness.config.schema", "harness.data.toy", "harness.report",
                                   "harness.keys", "harness.pipeline"}


def test_the_payload_names_each_file_with_its_digest(make_cfg, tmp_path):
    pipe = Pipeline(validate(make_cfg("defense=vaccine")), tmp_path)
    payloads = keys.stage_payloads(pipe.inputs)
    code = payloads["align"]["code"]
    sha = code_digest.file_sha("harness.defenses.vaccine")
    assert code["harness.defenses.vaccine"] == sha and len(sha) == 16
    assert "harness.defenses.vaccine" not in payloads["finetune"]["code"]  # SFT finetunes
    assert payloads["tokenizer"]["code"] == {"harness.data.tokenizer":
                                             code_digest.file_sha("harness.data.tokenizer")}


@pytest.mark.parametrize("module, moved", [
    # the align method: align, and everything trained or measured on top of it
    ("harness.defenses.vaccine", {"align", "finetune", "filter", "eval_final", "eval_align"}),
    # SFT trains base and finetune here: every stage but the tokenizer
    ("harness.defenses.sft", {"base", "align", "finetune", "filter", "eval_final",
                              "eval_align"}),
    ("harness.defenses.base", {"base", "align", "finetune", "filter", "eval_final",
                               "eval_align"}),
    ("harness.data.tokenizer", {"tokenizer", "base", "align", "finetune", "filter",
                                "eval_final", "eval_align"}),
    ("harness.evaluation.judges", {"eval_final", "eval_align"}),
    ("harness.filtering", {"filter"}),
    # no stage runs these, or what they define is keyed by value
    ("harness.report", set()), ("harness.reporting.tables", set()),
    ("harness.config.schema", set()), ("harness.data.toy", set()), ("harness.keys", set()),
])
def test_an_edit_moves_the_stages_that_run_the_file_and_those_downstream(make_cfg, tmp_path,
                                                                         edit, module, moved):
    pipe = Pipeline(validate(make_cfg("defense=vaccine")), tmp_path)
    before = chain_keys(pipe)
    original = code_digest.module_file(module).read_bytes()
    copy = edit(module, "\n# an edit\n")
    after = chain_keys(pipe)
    assert {s for s in before if before[s] != after[s]} == moved
    copy.write_bytes(original)
    assert chain_keys(pipe) == before  # the original bytes: the original keys


def test_a_plug_in_method_is_followed_into_its_own_package(tmp_path, monkeypatch):
    pkg = tmp_path / "myplug"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "helpers.py").write_text("SCALE = 1.0\n")
    (pkg / "method.py").write_text("from harness.defenses.sft import SFT\n"
                                   "from myplug.helpers import SCALE\n\n\n"
                                   "class Mine(SFT):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code = keys.trained_code("myplug.method.Mine")
    assert {"myplug.method", "myplug.helpers", "harness.defenses.sft"} <= set(code)
    (pkg / "helpers.py").write_text("SCALE = 0.5\n")
    assert keys.trained_code("myplug.method.Mine")["myplug.helpers"] != code["myplug.helpers"]


# ------------------------------------------------------- an edited method, reverted, rerun
PLUGIN = ("from harness.defenses.sft import SFT\n\n\n"
          "class Edited(SFT):\n"
          "    stages = ('finetune',)\n")
EDIT = ("\n    def objective(self, batch):\n"
        "        return {'loss': 0.0 * self.lm_loss(batch)}  # the edit: learns nothing\n")


def _cli(args, tmp_path, out):
    env = {**os.environ, "HARNESS_ARTIFACTS": str(tmp_path / "artifacts"),
           "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    done = subprocess.run([sys.executable, "-m", "harness", *args, f"hydra.run.dir={out}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow  # three tiny runs in subprocesses
def test_a_reverted_method_is_not_served_the_edited_methods_artifact(tmp_path):
    """Edit the finetune method, run with a new lr, revert it, rerun the same command: the
    rerun builds its finetune anew (base and align reused), and its numbers are those of the
    same config built fresh, not the edited code's."""
    (tmp_path / "plug").mkdir()
    (tmp_path / "plug" / "__init__.py").write_text("")
    method = tmp_path / "plug" / "method.py"
    args = [*TINY, "defense.finetune.module=plug.method.Edited", "train.finetune.lr=3e-3",
            "train.finetune.max_steps=6"]
    method.write_text(PLUGIN + EDIT)
    edited = _cli(args, tmp_path, tmp_path / "edited")
    method.write_text(PLUGIN)
    rerun = _cli(args, tmp_path, tmp_path / "rerun")
    assert rerun["artifacts"]["base"]["reused"] and rerun["artifacts"]["align"]["reused"]
    assert not rerun["artifacts"]["finetune"]["reused"]
    assert rerun["artifacts"]["finetune"]["key"] != edited["artifacts"]["finetune"]["key"]
    fresh_root = tmp_path / "fresh"
    fresh_root.mkdir()
    (fresh_root / "plug").symlink_to(tmp_path / "plug")
    fresh = _cli(args, fresh_root, fresh_root / "run")
    assert fresh["artifacts"]["finetune"]["key"] == rerun["artifacts"]["finetune"]["key"]
    assert fresh["metrics"]["final"]["hs"] == rerun["metrics"]["final"]["hs"]
    assert edited["metrics"]["final"] != rerun["metrics"]["final"]
