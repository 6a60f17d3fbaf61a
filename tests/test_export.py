"""``python -m harness.export``: a finished run's model, loaded in a fresh Python process with
plain transformers (no harness import, no peft), gives the harness's greedy answers exactly."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_cli import TINY

# a fresh process: transformers alone, as a user elsewhere would load the folder
LOAD = r"""
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
out, rows = sys.argv[1], json.load(open(sys.argv[2]))
fmt = json.load(open(out + "/prompt_format.json"))
tok = AutoTokenizer.from_pretrained(out)
model = AutoModelForCausalLM.from_pretrained(out).eval()
answers, bos = [], []
for row in rows:
    enc = tok(row["prompt"], return_tensors="pt")
    bos.append(int(enc["input_ids"][0, 0]) == tok.bos_token_id)
    new = model.generate(**enc, max_new_tokens=fmt["max_new_tokens"][row["kind"]])
    answers.append(tok.decode(new[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
chat = tok.apply_chat_template([{"role": "user", "content": "Name a colour."}],
                               add_generation_prompt=True, tokenize=False)
assert "harness" not in sys.modules and "peft" not in sys.modules
print(json.dumps({"answers": answers, "bos": bos, "chat": chat}))
"""


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The cheapest full run (tests.test_cli.TINY) with longer answers, in this process."""
    from hydra import compose, initialize_config_dir

    from harness import run as cli
    from tests.conftest import CONF

    tmp = tmp_path_factory.mktemp("export")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.artifacts={tmp / 'artifacts'}", *TINY,
                                           "eval.max_new_tokens=12", "task.max_new_tokens=6"])
    results = cli.execute(cfg, tmp / "run")
    assert results["status"] == "ok"
    return tmp / "run", results


def test_export_loads_with_plain_transformers_and_generates_as_the_harness(finished_run,
                                                                         tmp_path):
    from harness.export import FORMAT_FILE, evaluated_model, main

    run_dir, results = finished_run
    out = tmp_path / "exported"
    main([str(run_dir), str(out)])
    ref, eval_folder = evaluated_model(results, "final")
    finetune = json.loads((eval_folder.parents[1] / ref.stage / ref.key / "manifest.json")
                          .read_text())
    assert finetune["format"] == "adapter"  # a LoRA on its parent: the export merges it
    rows = json.loads((eval_folder / "generations.json").read_text())
    assert {r["kind"] for r in rows} == {"harmful", "task"}
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", LOAD, str(out), str(tmp_path / "rows.json")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    equal = sum(a == r["answer"] for a, r in zip(got["answers"], rows))
    print(f"export: {equal} of {len(rows)} greedy answers equal the harness's")
    assert equal == len(rows), [(a, r["answer"]) for a, r in zip(got["answers"], rows)
                                if a != r["answer"]][:5]
    assert sum(bool(a.strip()) for a in got["answers"]) >= len(rows) // 2  # not vacuous
    assert all(got["bos"])  # the tokenizer adds BOS itself, as the harness does by hand
    fmt = json.loads((out / FORMAT_FILE).read_text())
    assert got["chat"] == "<bos>" + fmt["prompt"].format(instruction="Name a colour.")
    assert fmt["max_new_tokens"] == {"harmful": 12, "task": 6}
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["do_sample"] is False and gen["max_new_tokens"] == 12
    # self-contained: no adapter, nothing pointing back into the artifact store
    assert not (out / "adapter_config.json").exists()
    store = str(Path(results["artifacts"]["eval_final"]["path"]).parents[1])
    for f in out.iterdir():
        if f.suffix == ".json":
            assert store not in f.read_text() or f.name == FORMAT_FILE, f.name


def test_export_refuses_a_run_that_did_not_finish(tmp_path):
    from harness.export import main

    (tmp_path / "results.json").write_text(json.dumps({"status": "failed"}))
    with pytest.raises(SystemExit, match="status is 'failed', not ok"):
        main([str(tmp_path), str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="no results.json"):
        main([str(tmp_path / "none"), str(tmp_path / "out")])
