"""The bad-input matrix: each bad input, given as a new user would (command-line overrides and
small files), must fail before the first training step, with one console line (no traceback)
that names the config key or the file to fix.

Every case runs the command line's own path in this process (``harness.run.execute``: compose,
validate, this machine's checks, every dataset and the tokenizer), with the first training
step replaced by a sentinel: a case that reaches it failed too late. Seconds for the whole
table, where a subprocess per case would cost minutes.

Adding a case: one ``Case`` row in CASES (or a ``BAD_FILES`` row in tests/test_data.py, which
joins as a task file). ``python tests/test_bad_inputs.py`` prints the table with each case's
time and message.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

if __name__ == "__main__":  # run as a script: the test setup (offline, temp caches) first
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import tests.conftest  # noqa: F401

from tests.test_cli import TINY  # noqa: E402
from tests.test_data import BAD_FILES  # noqa: E402

UTF16_ROWS = '{"instruction": "a", "output": "b"}\n' * 5


@dataclass
class Case:
    """``overrides`` may hold ``{tmp}`` (the case's folder, where ``files`` are written);
    ``expect``: parts the error message must hold (the key or the file, and the fix)."""

    name: str
    overrides: list[str]
    expect: list[str]
    files: dict[str, bytes] = field(default_factory=dict)


def _task_file(file: str, content: str, fields: dict, options: dict) -> list[str]:
    return ["task.train.source=local", f"task.train.path={{tmp}}/{file}",
            *[f"+task.train.fields.{k}={v}" for k, v in fields.items()],
            *[f"task.train.{k}='{v}'" for k, v in options.items()]]


CASES = [
    # models and devices the run needs, checked at start-up (not after training)
    Case("judge=llama_guard offline", ["judge=llama_guard"],
         ["moderation.model: judge=llama_guard loads 'meta-llama/Llama-Guard-3-8B'",
          "set moderation.model to a local folder"]),
    Case("judge=beaver_dam offline", ["judge=beaver_dam"],
         ["moderation.model: judge=beaver_dam", "HARNESS_ONLINE=1"]),
    Case("a panel's moderation judge offline", ["eval.judges=[keyword,beaver_dam]"],
         ["moderation.model: beaver_dam (in eval.judges) loads"]),
    Case("a panel's LLM judge without endpoint", ["eval.judges=[keyword,llm_rubric]"],
         ["llm_judge.url", "(asked for by eval.judges)"]),
    Case("the filter's judge offline",
         ["defense.filter.kind=judge", "defense.filter.judge=llama_guard"],
         ["moderation.model: llama_guard (in defense.filter.judge) loads"]),
    Case("a judge folder that does not exist",
         ["judge=beaver_dam", "moderation.model=/no/such/beaver-dam"],
         ["moderation.model: judge=beaver_dam loads the folder /no/such/beaver-dam, which "
          "does not exist"]),
    Case("trainer=gpu without a GPU", ["trainer=gpu"],
         ["trainer.accelerator: gpu, but torch sees no CUDA device", "use trainer=cpu"]),
    Case("trainer.devices=0", ["trainer.devices=0"],
         ["trainer.devices: 0 trains on no device", "give a count >= 1"]),
    Case("trainer.devices=[]", ["trainer.devices=[]"], ["trainer.devices: an empty list"]),
    Case("trainer.devices=-3", ["trainer.devices=-3"], ["trainer.devices: -3 trains on no"]),
    # values out of range
    Case("seed=-1", ["seed=-1"], ["seed: must lie in [0, 4294967]", "got -1"]),
    Case("seed too large for numpy", ["seed=5000000"], ["seed: must lie in [0, 4294967]"]),
    Case("tau from a harmful set that is not given",
         ["alignment.harmful=null", "defense=ref_teacher_filter_only",
          "defense.filter.tau_from=provider_harmful"],
         ["alignment.harmful: defense.filter.tau_from=provider_harmful", "give alignment.harmful",
          "or set defense.filter.tau_from=held"]),
    Case("attack.p > 1", ["attack.p=1.5"], ["attack.p: must lie in [0, 1], got 1.5"]),
    Case("negative lr", ["train.finetune.lr=-0.001"], ["train.finetune.lr: must be > 0"]),
    Case("eval.harmful_size=0", ["eval.harmful_size=0"], ["eval.harmful_size: must be >= 1"]),
    Case("eval stage misspelt", ["eval.stages=[finall]"], ["eval.stages[]: got 'finall'"]),
    Case("attack misspelt", ["attack.name=harmfull"], ["attack.name: got 'harmfull'"]),
    Case("unknown defense", ["defense=sftt"], ["defense/sftt", "Available options"]),
    Case("unknown judge", ["judge=gpt4"], ["judge/gpt4", "Available options"]),
    Case("unknown key", ["trainr.devices=2"], ["trainr"]),
    Case("unknown key, forced with +", ["+trainr.devices=2"], ["trainr: unknown key"]),
    Case("misspelt defense parameter",
         ["defense=ref_teacher", "+defense.finetune.params.lambda_kdd=1"],
         ["defense.finetune.params", "lambda_kdd"]),
    Case("hub model without an id", ["model.source=hf"], ["model.hf_id: is required"]),
    # files
    Case("task file not found", ["task.train.source=local", "task.train.path={tmp}/none.jsonl"],
         ["none.jsonl: file not found"]),
    Case("UTF-16 task file", ["task.train.source=local", "task.train.path={tmp}/excel.jsonl"],
         ["excel.jsonl, line 1: not UTF-8 text", "UTF-16 byte-order mark", "iconv -f UTF-16"],
         {"excel.jsonl": UTF16_ROWS.encode("utf-16")}),
    Case("latin-1 task file", ["task.train.source=local", "task.train.path={tmp}/old.jsonl"],
         ["old.jsonl, line 2: not UTF-8 text: byte 0xe9"],
         {"old.jsonl": ('{"instruction": "a", "output": "b"}\n'
                        '{"instruction": "caf\u00e9", "output": "b"}\n').encode("latin-1")}),
    *[Case(f"task file: {case}", _task_file(file, content, fields, options), [file, *parts],
           {file: content.encode("utf-8")})
      for case, (file, content, fields, options, parts) in BAD_FILES.items()],
]


class ReachedTraining(Exception):
    """The first training step was reached: the bad input was not caught at start-up."""


def first_error(case: Case, tmp: Path) -> tuple[str, str]:
    """(where it failed: compose | start-up | training, the console's message)."""
    from hydra import compose, initialize_config_dir

    from harness import run as cli
    from harness.outcomes import console_message
    from tests.conftest import CONF

    tmp.mkdir(parents=True, exist_ok=True)
    for name, content in case.files.items():
        (tmp / name).write_bytes(content)
    overrides = [o.replace("{tmp}", str(tmp)) for o in case.overrides]
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=[f"paths.artifacts={tmp / 'artifacts'}", *TINY,
                                               *overrides])
    except Exception as err:  # noqa: BLE001 - Hydra prints these as one line itself
        return "compose", str(err)
    try:
        cli.execute(cfg, tmp)
    except ReachedTraining:
        return "training", ""
    except Exception as err:  # noqa: BLE001 - the console's handling decides
        message = console_message(err, tmp)
        return ("start-up", message) if message is not None else (
            "traceback", f"{type(err).__name__}: {err}")
    return "training", ""


@pytest.fixture
def no_training(monkeypatch):
    """No CUDA device (the table's device cases hold on any machine) and no training."""
    import torch

    from harness.pipeline import Pipeline

    def reached(self):
        raise ReachedTraining

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(Pipeline, "build_models", reached)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_fails_at_start_up_naming_what_to_fix(case, tmp_path, no_training):
    where, message = first_error(case, tmp_path)
    assert where in ("compose", "start-up"), (where, message)
    assert "Traceback" not in message
    for part in case.expect:
        assert part in message, (part, message)


def test_a_good_input_reaches_training(tmp_path, no_training):
    """The sentinel works: the same path with nothing wrong gets to the first step."""
    assert first_error(Case("good", [], []), tmp_path)[0] == "training"


if __name__ == "__main__":
    import os
    import tempfile

    import torch

    from harness.pipeline import Pipeline

    torch.cuda.is_available = lambda: False
    Pipeline.build_models = lambda self: (_ for _ in ()).throw(ReachedTraining())
    named = 0
    with tempfile.TemporaryDirectory() as root:
        for i, case in enumerate(CASES):
            t0 = time.perf_counter()
            where, message = first_error(case, Path(root) / str(i))
            ok = where in ("compose", "start-up") and all(p in message for p in case.expect)
            named += ok
            line = " ".join(message.split())
            print(f"{'ok ' if ok else 'BAD'} {time.perf_counter() - t0:5.2f}s {where:9s} "
                  f"{case.name}: {line[:160]}", flush=True)
    print(f"{named} of {len(CASES)} fail before training naming the key or file"
          f" ({os.cpu_count()} CPUs)")
