"""Export a finished run's model as a folder that plain ``transformers`` loads anywhere:

    python -m harness.export <run dir> <out folder> [--stage final|align|base]

The folder holds the evaluated model with every LoRA adapter merged into full weights
(``save_pretrained``; no cache path, no peft needed), the tokenizer, the run's prompt format and
its greedy generation settings. The model is the one the run's evaluation of ``--stage`` read
(its eval artifact names it), so the export is exactly what the run scored.

The harness adds BOS to every prompt by hand (``harness.data.collate.prompt_ids``); the exported
tokenizer adds it itself (``add_bos_token``), so ``tok(prompt)`` gives the harness's ids. The
format is written three ways: ``prompt_format.json`` (the template strings, the system prompt
evaluation used, the task's token budget), the tokenizer's ``chat_template`` (for the plain
formats: the format as Jinja, BOS first; template=chat keeps the model's own), and
``generation_config.json`` (greedy, the evaluation's ``max_new_tokens``). Before it writes, the
export checks that the tokenizer and the chat template give the harness's ids for the run's
own logged prompts, and refuses otherwise.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

import harness  # noqa: F401 - offline defaults before HF imports
from harness.artifacts import MANIFEST
from harness.config import register
from harness.validation import validate
from harness.config.schema import RunConfig
from harness.config.template import CHAT
from harness.data.collate import prompt_ids
from harness.stages import ModelRef

FORMAT_FILE = "prompt_format.json"


def _jinja_literal(text: str) -> str:
    """``text`` as a Jinja string expression (json quoting is valid Jinja)."""
    return "{{ " + json.dumps(text) + " }}"


def plain_chat_template(template) -> str:
    """The run's plain format (toy, alpaca) as a chat template: BOS, then a system message's
    text as the prefix (as ``render_prompt`` puts it), then the user message in ``prompt``.
    A user turn with an input uses ``prompt_with_input`` only through prompt_format.json."""
    head, _, tail = template.prompt.partition("{instruction}")
    if "{input}" in head + tail:
        raise ValueError(f"template {template.name}: its prompt holds {{input}} outside "
                         "prompt_with_input; no chat template is written")
    return ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
            "{{ m['content'] }}{% endif %}{% endfor %}"
            "{% for m in messages %}{% if m['role'] == 'user' %}"
            + _jinja_literal(head) + "{{ m['content'] }}" + _jinja_literal(tail)
            + "{% endif %}{% endfor %}")


def read_results(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results.json; give the folder of a finished run "
                                "(the one its command printed as results: ...)")
    results = json.loads(path.read_text())
    if results.get("status") != "ok":
        raise ValueError(f"{path}: the run's status is {results.get('status')!r}, not ok; "
                         "rerun it to the end first (finished stages are reused)")
    return results


def run_config(results: dict[str, Any], artifacts_root: Path) -> RunConfig:
    register()
    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), results["config"])
    run = validate(cfg)
    run.paths.artifacts = str(artifacts_root)
    return run


def evaluated_model(results: dict[str, Any], stage: str) -> tuple[ModelRef, Path]:
    """(the model the run's evaluation of ``stage`` read, the eval artifact's folder)."""
    label = f"eval_{stage}"
    entry = results.get("artifacts", {}).get(label)
    if entry is None:
        done = sorted(k[5:] for k in results.get("artifacts", {}) if k.startswith("eval_"))
        raise ValueError(f"--stage {stage}: the run has no {label} artifact (it evaluated "
                         f"{done}); pick one of those, or add it to eval.stages and rerun")
    folder = Path(entry["path"])
    manifest = json.loads((folder / MANIFEST).read_text())
    return ModelRef(**manifest["payload"]["model"]), folder


def export(run_dir: Path, out: Path, stage: str = "final") -> dict[str, Any]:
    """Write the export folder; returns what prompt_format.json records."""
    from transformers import GenerationConfig

    from harness.pipeline import Pipeline

    results = read_results(run_dir)
    ref, eval_folder = evaluated_model(results, stage)
    run = run_config(results, eval_folder.parents[1])
    if run.generation.backend != "hf":
        print(f"note: the run generated with generation.backend={run.generation.backend}; the "
              "export reproduces the hf backend's greedy answers", file=sys.stderr)
    pipeline = Pipeline(run, run_dir)
    pipeline.inputs.load()  # the toy tokenizer's key reads the run's data
    tok = pipeline.models.tokenizer
    model = pipeline.models.load(ref)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    prompts = [row["prompt"] for row in
               json.loads((eval_folder / "generations.json").read_text())]

    chat = run.template.name == CHAT
    wanted = {p: prompt_ids(tok, p) for p in prompts}
    if not chat and tok.bos_token_id is not None and prompts and \
            tok(prompts[0])["input_ids"] != wanted[prompts[0]]:
        tok.add_bos_token = True  # as prompt_ids: BOS first, by the tokenizer itself
    if not chat:
        tok.chat_template = plain_chat_template(run.template)
        _check_chat_template(tok, run.template)
    _check_ids(tok, wanted, chat)

    fmt = {"template": run.template.name, "prompt": run.template.prompt,
           "prompt_with_input": run.template.prompt_with_input,
           "system": run.template.system, "eval_system_prompt": run.eval.system_prompt,
           "response_prefix": run.template.response_prefix,
           "add_bos": tok.bos_token_id is not None,
           "max_new_tokens": {"harmful": run.eval.max_new_tokens,
                              "task": run.task.max_new_tokens},
           "decoding": "greedy; decode the new tokens with skip_special_tokens=True",
           "source": {"run": str(run_dir.resolve()), "stage": stage, "model": ref.__dict__,
                      "git": results.get("git")}}
    gen = GenerationConfig(do_sample=False, max_new_tokens=run.eval.max_new_tokens,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    gen.save_pretrained(tmp)  # after the model's own, which it replaces
    tok.padding_side = "left"  # batched generation, as the harness pads
    tok.save_pretrained(tmp)
    (tmp / FORMAT_FILE).write_text(json.dumps(fmt, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return fmt


def _check_ids(tok, wanted: dict[str, list[int]], chat: bool) -> None:
    """The exported tokenizer must give the harness's prompt ids: ``tok(prompt)`` for a plain
    format, the chat template for a plain format's bare prompts (no input)."""
    for prompt, ids in wanted.items():
        got = tok(prompt, add_special_tokens=not chat)["input_ids"]
        if got != ids:
            raise ValueError(f"export: the tokenizer gives {got[:8]}... for the run's prompt "
                             f"{prompt[:60]!r}, the harness {ids[:8]}...; not exported")


def _check_chat_template(tok, template) -> None:
    """apply_chat_template on a bare instruction (and with a system prompt) must give the ids
    of the harness's own rendering."""
    from harness.data.schema import Example

    ex = Example(instruction="Name a colour.")
    for system in ("", "You are careful. "):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": ex.instruction}]
        got = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        got = list(got["input_ids"] if hasattr(got, "keys") else got)
        want = prompt_ids(tok, template.render_prompt(ex, system=system))
        if got != want:
            raise ValueError(f"export: the chat template gives {got} for {messages}, the "
                             f"harness {want}; not exported")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m harness.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished run's folder (its results.json)")
    parser.add_argument("out", type=Path, help="the folder to write (replaced if it exists)")
    parser.add_argument("--stage", default="final", choices=("final", "align", "base"),
                        help="which evaluated model (default: final)")
    args = parser.parse_args(argv)
    try:
        export(args.run_dir, args.out, args.stage)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"export failed: {err}") from None
    print(f"exported to {args.out}: load with AutoModelForCausalLM.from_pretrained and "
          f"AutoTokenizer.from_pretrained ({FORMAT_FILE} has the prompt format)")


if __name__ == "__main__":
    main()
