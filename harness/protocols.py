"""Anchor protocols: the hash that results.json records, and a side-by-side table of presets.

    python -m harness.protocols                       # every preset in conf/protocol/, Markdown
    python -m harness.protocols vaccine booster       # just these
    python -m harness.protocols --task toy_topic      # resolve task.* for another task family

A preset (conf/protocol/<name>.yaml) sets every detail in which the anchors' evaluations differ.
Two runs are comparable when the resolved values at ``protocol.hash_keys`` agree; their hash is
what the sweep report compares before it puts runs in one cell.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Optional

from harness.config.schema import FAMILIES

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
ANCHORS = ("vaccine", "lisa", "booster", "asft", "qi2024")  # column order: the METHODS table's


def _at(config: dict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"protocol.hash_keys: {dotted!r} is not in the config")
        node = node[part]
    return node


def protocol_values(config: dict) -> dict[str, Any]:
    """The resolved values that define the protocol, by dotted key."""
    return {key: _at(config, key) for key in config["protocol"]["hash_keys"]}


def protocol_hash(config: dict) -> str:
    blob = json.dumps(protocol_values(config), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def protocol_record(config: dict) -> Optional[dict[str, Any]]:
    """``{name, hash}`` for results.json; None for a config that predates protocols."""
    if "protocol" not in config:
        return None
    try:
        digest: Optional[str] = protocol_hash(config)
    except KeyError:  # a failed run's config may be broken; its record must still be written
        digest = None
    return {"name": config["protocol"]["name"], "hash": digest,
            "keys": list(config["protocol"]["hash_keys"])}


# ==================================================================== side-by-side table
def presets() -> list[str]:
    """The anchors first, in the METHODS table's order, then any other preset by name."""
    found = sorted(p.stem for p in (CONF_DIR / "protocol").glob("*.yaml"))
    return [a for a in ANCHORS if a in found] + [p for p in found if p not in ANCHORS]


def compose_preset(name: str, overrides: tuple[str, ...] = ()) -> dict:
    """The resolved config of ``protocol=name`` (validated, nothing built)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from harness.config import register

    from harness.validation import validate

    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"protocol={name}", *overrides])
    validate(cfg)
    return OmegaConf.to_container(cfg, resolve=True)


def _text(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, list):
        return ",".join(v.removesuffix("_proj") for v in map(str, value))
    if isinstance(value, str):
        return f'"{value}"' if value else '""'
    return str(value)


def _scoring(cfg: dict, family: str) -> str:
    entry = cfg["protocol"]["tasks"].get(family)
    if entry is None:
        return "task's own"
    s = entry["scorer"]
    text = s["mode"] + (" (case-sensitive)" if s["case_sensitive"] else "")
    extra = [f"{k}~/{v}/" for k, v in s["patterns"].items()] if s["mode"] == "regex" else []
    extra += [f"{k} also {'/'.join(v)}" for k, v in s["aliases"].items()]
    return text + (f"; {'; '.join(extra)}" if extra else "")


def _instruction(cfg: dict, family: str) -> str:
    entry = cfg["protocol"]["tasks"].get(family)
    if entry is None:
        return "task's own"
    benchmark = cfg["protocol"]["benchmarks"].get(family) or {}  # bind/benchmarks.yaml
    text = benchmark.get("instruction") or "(the question)"
    if entry["instruction_suffix"]:
        text += f" + {_text(entry['instruction_suffix'])}"
    return text if text.startswith(("(", '"')) else f'"{text}"'


def _harmful(cfg: dict) -> str:
    src = cfg["eval"]["harmful"]
    if src["source"] == "toy":
        return "toy world"
    return f"{src['path']} [{src['split']}]"


def _filter(cfg: dict) -> str:
    where = cfg["eval"]["harmful"].get("where") or {}
    return ", ".join(f"{k}={v}" for k, v in where.items()) or "none"


def _stage_rows(stage: str) -> list[tuple[str, Any]]:
    return [
        (f"{stage}: max train length", lambda c: c["train"][stage]["max_length"]),
        (f"{stage}: LoRA r", lambda c: (c["train"][stage]["lora"] or {}).get("r", "full")),
        (f"{stage}: LoRA alpha", lambda c: (c["train"][stage]["lora"] or {}).get("alpha", "—")),
        (f"{stage}: LoRA targets",
         lambda c: (c["train"][stage]["lora"] or {}).get("targets", "—") or "model's"),
        (f"{stage}: LoRA dropout",
         lambda c: (c["train"][stage]["lora"] or {}).get("dropout", "—")),
        (f"{stage}: lr", lambda c: c["train"][stage]["lr"]),
        (f"{stage}: batch", lambda c: c["train"][stage]["batch_size"]),
        (f"{stage}: epochs (or steps)", lambda c: (f"{c['train'][stage]['max_steps']} steps"
                                                   if c["train"][stage]["max_steps"]
                                                   else c["train"][stage]["epochs"])),
        (f"{stage}: schedule", lambda c: c["train"][stage]["scheduler"]),
        (f"{stage}: warm-up ratio", lambda c: c["train"][stage]["warmup_ratio"]),
        (f"{stage}: weight decay", lambda c: c["train"][stage]["weight_decay"]),
    ]


ROWS: list[tuple[str, Any]] = [
    ("harmful eval prompts", _harmful),
    ("is_safe / row filter", _filter),
    ("harmful eval rows", lambda c: c["eval"]["harmful_size"] or "all"),
    ("task test rows", lambda c: c["eval"]["task_size"] or "all"),
    ("eval max_new_tokens", lambda c: c["eval"]["max_new_tokens"]),
    ("task max_new_tokens", lambda c: c["task"]["max_new_tokens"]),
    ("eval system prompt", lambda c: _text(c["eval"]["system_prompt"])),
    ("HS judge", lambda c: c["judge"]["name"]),
    *[(f"{FAMILIES[f]} scoring", lambda c, f=f: _scoring(c, f)) for f in FAMILIES],
    *[(f"{FAMILIES[f]} instruction", lambda c, f=f: _instruction(c, f)) for f in FAMILIES],
    ("attack p / n", lambda c: f"{c['attack']['p']} / {c['attack']['n']}"),
    *_stage_rows("align"),
    *_stage_rows("finetune"),
    ("protocol hash", protocol_hash),
]


def _cell(value: Any) -> str:
    """Strings arrive formatted by their row; newlines and pipes are escaped for Markdown."""
    text = value if isinstance(value, str) else _text(value)
    return text.replace("\n", "\\n").replace("|", "\\|")


def side_by_side(names: list[str], overrides: tuple[str, ...] = ()) -> str:
    """Markdown: rows are protocol details, columns are presets; differing rows are bold."""
    configs = {n: compose_preset(n, overrides) for n in names}
    lines = ["| detail | " + " | ".join(f"`{n}`" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for label, get in ROWS:
        cells = [_cell(get(configs[n])) for n in names]
        differs = len(set(cells)) > 1
        lines.append(f"| {'**' + label + '**' if differs else label} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m harness.protocols", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="presets (default: all in conf/protocol/)")
    parser.add_argument("--task", default="toy_sentiment",
                        help="task config that task.* resolves for (default: toy_sentiment)")
    args = parser.parse_args(argv)
    names = args.names or presets()
    unknown = sorted(set(names) - set(presets()))
    if unknown:
        raise SystemExit(f"unknown protocol(s) {', '.join(unknown)}; "
                         f"conf/protocol/ has {', '.join(presets())}")
    print(side_by_side(names, (f"task={args.task}",)))


if __name__ == "__main__":
    main(sys.argv[1:])
