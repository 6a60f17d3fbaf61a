"""Every stage's artifact key: what it reads from the config, declared, and the payloads.

``stage_payloads`` (with ``upload_payload``), ``filter_payload`` and ``eval_payload`` build the
keys' payloads (a key is ``artifact_key(payload)``); ``STAGE_READS`` names, per stage, the
config paths (a path covers everything under it) those payloads hold. tests/test_keys.py walks
every leaf of the composed config and fails unless a stage reads it or the test's NOT_KEYED list
says why it cannot change a result, and checks by perturbation that a declared leaf does move
its stage's key.

Every stage that runs code the harness ships (or a user's plug-in method) also keys that code:
``code_payload`` (``harness.code_digest``) digests the source files that the ``*_code``
functions below list per stage, so an edited method rebuilds its stage and every stage
downstream of it, and a reverted one is served from its earlier artifact again.
"""
from __future__ import annotations

import glob
import hashlib
import typing
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch

from harness.artifacts import artifact_key
from harness.code_digest import code_payload
from harness.config.schema import StageMethodConfig, TrainStageConfig
from harness.validation import accelerator_kind
from harness.data import attacks, jailbreaks
from harness.data.assemble import RunInputs, defense_flag
from harness.data.sources import keyed_fields, package_path
from harness.data.toy import GENERATORS
from harness.evaluation import registry as judges
from harness.evaluation.panel import base_name
from harness.models import gguf
from harness.stages import ModelRef, method_class

# The payloads' layout. The code a stage runs is keyed by its digest (harness.code_digest);
# bump this only when a change outside those files, or to a payload's layout, moves artifacts.
KEY_VERSION = 3
SFT_MODULE = "harness.defenses.sft.SFT"  # the base stage's method

STAGE_READS: dict[str, tuple[str, ...]] = {
    "tokenizer": ("world", "template", "model.tokenizer_vocab_size"),
    "base": ("seed", "model", "template", "world", "trainer.precision", "trainer.accelerator",
             "train.base"),
    "align": ("seed", "model", "template", "world", "trainer.precision", "trainer.accelerator",
              "defense.align",
              "train.align", "alignment.data", "alignment.size", "alignment.harmless",
              "alignment.harmless_size", "alignment.harmful", "alignment.harmful_size",
              "eval.feature_set_size", "alignment.pretrained"),
    # the judge and the judges' settings nodes only for kind=judge (the judge node, or
    # defense.filter.judge, and its settings): filter_config_payload below
    "filter": ("defense.filter", "template", "world", "alignment.data", "alignment.size",
               "alignment.harmless", "alignment.harmless_size", "eval.feature_set_size",
               "judge", *judges.settings_nodes()),
    # present only for an attack that adapts its rows to the aligned model (filter_adaptive):
    # the rows, the aligned model (by its key) and how the filter scores a prompt
    "upload": ("seed", "model", "template", "world", "trainer.precision", "trainer.accelerator",
               "attack", "task.family", "task.instruction", "task.instruction_suffix",
               "task.train", "defense.filter.layer", "defense.filter.centre",
               "defense.filter.batch_size", "alignment.data", "alignment.size",
               "alignment.harmless", "alignment.harmless_size", "eval.feature_set_size"),
    # alignment.*: only where the finetune data holds refusal rows (uses_refusal_rows)
    "finetune": ("seed", "model", "template", "world", "trainer.precision",
                 "trainer.accelerator", "defense.finetune",
                 "defense.filter", "train.finetune", "attack", "task.family",
                 "task.instruction", "task.instruction_suffix", "task.train",
                 "alignment.data", "alignment.size", "eval.feature_set_size"),
    # present only with posthoc.module set; its input is the finetune key (which holds the rest)
    "posthoc": ("posthoc.module", "posthoc.params", "seed", "model", "template", "world",
                "trainer.precision", "trainer.accelerator", "alignment.harmful",
                "alignment.harmful_size", "train.finetune.max_length"),
    "eval": ("seed", "eval", "judge", "template", "world", "trainer.accelerator", "task.family",
             "task.test",
             "task.instruction", "task.instruction_suffix", "task.scorer",
             "task.max_new_tokens", *judges.settings_nodes(), "generation", "attack",
             "alignment.data", "alignment.size", "alignment.harmless",
             "alignment.harmless_size"),
}


def reading_stages(path: str) -> list[str]:
    """The stages whose key reads config ``path`` (or a node above it)."""
    return [stage for stage, reads in STAGE_READS.items()
            if any(path == r or path.startswith(r + ".") for r in reads)]


# ==================================================================== payload parts
def file_digest(path: Optional[str]) -> Optional[str]:
    if not path or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def files_digest(spec: Optional[str]) -> Optional[str]:
    """A hash of the files an hf builder reads from ``data_files``: one file, every file under
    a folder, or a glob's matches (names and bytes); None when nothing matches."""
    if not spec:
        return None
    path = Path(spec)
    files = ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
             if path.is_dir() else sorted(Path(p) for p in glob.glob(spec) if Path(p).is_file()))
    if not files:
        return None
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:16]


def source_payload(src) -> dict[str, Any]:
    payload = keyed_fields(asdict(src))
    if src.source == "local":
        payload["sha256"] = file_digest(src.path)
    elif src.source == "package":  # the installed file's bytes, whichever version is installed
        payload["sha256"] = file_digest(str(package_path(src.path)))
    elif src.source == "hf" and src.data_files:  # a downloaded copy: its content, not its name
        payload["data_files_sha256"] = files_digest(src.data_files)
    return payload


def train_payload(cfg: TrainStageConfig) -> dict[str, Any]:
    """A stage's optimisation settings; the checkpoint cadence is left out (a resumed stage
    trains what the uninterrupted one does)."""
    payload = asdict(cfg)
    payload.pop("checkpoint_every_n_steps")
    if cfg.loss_on == "all":  # whole-text stages keep the text's start: truncation is unused
        payload.pop("truncation")
    return payload


def typed_params(method: StageMethodConfig) -> dict[str, Any]:
    """The params as the method's ``Params`` reads them: an int given for a float field is
    that float, so ``lam=5`` and ``lam=5.0`` share a key (ints stay ints where the field is
    an int or an int-or-fraction, as a layer index)."""
    params = dict(method.params)
    if method.module is None:
        return params
    cls = method_class(method.module).Params
    hints = typing.get_type_hints(cls)
    floats = (float, Optional[float])
    for name, value in params.items():
        if hints.get(name) in floats and isinstance(value, int) and not isinstance(value, bool):
            params[name] = float(value)
    return params


def method_payload(method: StageMethodConfig) -> dict[str, Any]:
    # 0 and None both mean no floor on the step count: one key
    return {**asdict(method), "params": typed_params(method), "min_steps": method.min_steps or None}


def world_payload(inputs: RunInputs, *parts: str) -> Optional[dict[str, Any]]:
    """The toy world's config plus fingerprints of the parts of it a stage consumes."""
    if not inputs.uses_world():
        return None
    return {**asdict(inputs.run.world),
            "data": {p: inputs.world.fingerprint(p) for p in parts}}


def task_parts(run, split: str) -> tuple[str, ...]:
    """The toy world's task rows a stage's key fingerprints: those of the task's family whenever
    the family has a generator (the world's fingerprint of a family is cheap and fixes which
    rows a toy source would read), none for a family without one (validation keeps those off
    toy sources)."""
    return (f"task_{run.task.family}_{split}",) if run.task.family in GENERATORS else ()


def common_payload(inputs: RunInputs, *parts: str) -> dict[str, Any]:
    r = inputs.run
    payload = {"version": KEY_VERSION, "seed": r.seed, "model": asdict(r.model),
               "template": asdict(r.template), "world": world_payload(inputs, *parts),
               "torch_threads": torch.get_num_threads(),  # CPU floats depend on it
               "accelerator": accelerator_kind(r.trainer)}  # and CPU vs GPU kernels
    # bf16 training gives other weights than fp32; the process count does not (the global
    # batch and loss are the same), so it stays out
    precision = str(r.trainer.precision)
    payload["precision"] = "32-true" if precision == "32" else precision
    return payload


def alignment_harmful_payload(inputs: RunInputs) -> dict[str, Any]:
    r = inputs.run
    payload = {**source_payload(r.alignment.harmful), "size": r.alignment.harmful_size}
    if r.alignment.harmful.source == "toy":  # derived rows: their content, as fingerprints
        payload["rows"] = artifact_key([ex.to_dict() for ex in inputs.harmful_rows(inputs.world)])
    return payload


def feature_sets_payload(run) -> dict[str, Any]:
    """Real data: what the held feature sets are drawn from (see
    ``RunInputs._hold_out_feature_sets``)."""
    r = run
    return {"size": r.eval.feature_set_size, "data": source_payload(r.alignment.data),
            "alignment_size": r.alignment.size,
            "harmless": (None if r.alignment.harmless is None else
                         {**source_payload(r.alignment.harmless),
                          "size": r.alignment.harmless_size})}


def method_module(dotted_class: str) -> str:
    """``harness.defenses.sft.SFT`` -> ``harness.defenses.sft``."""
    return dotted_class.rpartition(".")[0]


def trained_code(method_class: str) -> dict[str, str]:
    """A trained stage's code: its method (with what the method imports: the base module, the
    method math, batching and tokenization), the model builder and LoRA, and the runner
    ``training.py`` (the trainer, the step count, the export)."""
    return code_payload([method_module(method_class), "harness.models.loading"],
                        ["harness.training"])


def tokenizer_code() -> dict[str, str]:
    return code_payload(["harness.data.tokenizer"])


def posthoc_code(method_class: str) -> dict[str, str]:
    """A post-hoc edit's code: its method (with its math), the model builder, and the runner
    that applies it."""
    return code_payload([method_module(method_class), "harness.models.loading"],
                        ["harness.editing"])


def filter_code(run) -> dict[str, str]:
    """The user-data filter's code: the refusal feature (and for kind=judge the judges), and
    the runner ``filtering.py``."""
    follow = ["harness.analysis.refusal"]
    if run.defense.filter.kind == "judge":
        follow.append("harness.evaluation.registry")
    return code_payload(follow, ["harness.filtering"])


def upload_code() -> dict[str, str]:
    """An adapted upload's code: the attack's search (with the refusal feature and the suffix
    search), the runner ``adapting.py``, and ``filtering.py``, whose R_l and centre it scores
    against."""
    return code_payload(["harness.analysis.refusal_evasion"],
                        ["harness.adapting", "harness.filtering"])


def eval_code(run) -> dict[str, str]:
    """An evaluation's code: generation, the judges and the panel, the scorers and statistics,
    the refusal-separation measure, the vLLM backend when it generates, the suffix search under
    eval.jailbreak=gcg, and the runner ``evaluating.py``."""
    follow = ["harness.evaluation.evaluate", "harness.evaluation.registry",
              "harness.evaluation.panel", "harness.analysis.refusal"]
    if run.generation.backend == "vllm":
        follow.append("harness.evaluation.vllm_backend")
    if run.eval.jailbreak == "gcg":
        follow.append("harness.evaluation.gcg")
    return code_payload(follow, ["harness.evaluating"])


def uses_refusal_rows(run) -> bool:
    """Whether the finetune's data holds the alignment data's refusal rows: the attack draws
    them (backdoor's safety rows) or the finetune method mixes them in (safety_mix)."""
    return "safety" in attacks.get(run.attack.name).uses or \
        defense_flag(run.defense.finetune.module, "mixes_refusal_rows")


def refusal_pool_payload(run) -> dict[str, Any]:
    """Where those refusal rows are drawn from: the alignment data, less (on real data) the
    held feature sets that leave it (``RunInputs._hold_out_feature_sets``). The toy world's
    rows enter through the "align" fingerprint."""
    r = run
    payload = {"data": source_payload(r.alignment.data), "size": r.alignment.size}
    if r.alignment.data.source != "toy":
        payload["feature_set_size"] = r.eval.feature_set_size
    return payload


def finetune_starts_from_base(run) -> bool:
    """A finetune method that declares ``starts_from = "base"`` trains on the base model."""
    return method_class(run.defense.finetune.module).starts_from == "base"


# ==================================================================== stage payloads
def stage_payloads(inputs: RunInputs) -> dict[str, Optional[dict[str, Any]]]:
    """The payloads of tokenizer, base, align, finetune and, where on, upload and posthoc,
    from the config alone."""
    r = inputs.run
    tok = ({"version": KEY_VERSION, "world": world_payload(inputs, "tokenizer"),
            "template": asdict(r.template), "vocab_size": r.model.tokenizer_vocab_size,
            "code": tokenizer_code()}
           if r.model.source == "tiny" else None)
    base = {**common_payload(inputs, "base"), "stage": "base",
            "tokenizer": artifact_key(tok) if tok else None}
    if r.model.source == "tiny":
        base["train"] = train_payload(r.train.base)
        base["code"] = trained_code(SFT_MODULE)
    else:  # a hub model: its identity is its id and revision
        base = {"stage": "base", "hf_id": r.model.hf_id, "revision": r.model.revision}
        if r.model.gguf:  # a local file: its bytes and the conversion code are its identity
            base["gguf"] = gguf.payload(r.model.gguf)
    align = None
    if r.alignment.pretrained:  # no align training: the hub model is the aligned one
        base, align = _pretrained_payloads(r, base)
    base_key = artifact_key(base)
    align_key = base_key if align is None else artifact_key(align)
    if r.defense.align.module is not None and not r.alignment.pretrained:
        align = {**common_payload(inputs, "align"), "stage": "align", "input": base_key,
                 "method": method_payload(r.defense.align),
                 "train": train_payload(r.train.align),
                 "data": source_payload(r.alignment.data), "size": r.alignment.size,
                 "harmless": (None if r.alignment.harmless is None else
                              {**source_payload(r.alignment.harmless),
                               "size": r.alignment.harmless_size}),
                 "code": trained_code(r.defense.align.module)}
        if r.alignment.data.source != "toy":  # the held sets leave the training data
            align["feature_set_size"] = r.eval.feature_set_size
        if defense_flag(r.defense.align.module, "needs_harmful_data"):  # absent otherwise
            align["harmful"] = alignment_harmful_payload(inputs)
        align_key = artifact_key(align)
    ft_input = base_key if finetune_starts_from_base(r) else align_key
    attack = attacks.get(r.attack.name)
    # absent unless the attack adapts its rows: no new stage, no key moves
    upload = upload_payload(inputs, align_key) if attack.adapts_upload(r.attack) else None
    refusals = uses_refusal_rows(r)
    parts = ("attack", *task_parts(r, "train")) + (("benign",) if "benign" in attack.uses else ()) \
        + (("align",) if refusals else ())
    finetune = {**common_payload(inputs, *parts), "stage": "finetune",
                "input": ft_input, "align": align_key,
                "method": method_payload(r.defense.finetune),
                "train": train_payload(r.train.finetune),
                "attack": attack.payload(r.attack, source_payload),
                "filter": filter_config_payload(r),
                "task": task_payload(r),
                "code": trained_code(r.defense.finetune.module)}
    if refusals:  # only where the finetune data holds refusal rows
        finetune["refusals"] = refusal_pool_payload(r)
    out = {"tokenizer": tok, "base": base, "align": align, "finetune": finetune}
    if upload is not None:  # the rows it trains on were searched against the aligned model
        finetune["upload"] = artifact_key(upload)
        out["upload"] = upload
    if r.posthoc.module is not None:  # absent when off: no new stage, no key moves
        out["posthoc"] = posthoc_payload(inputs, artifact_key(out["finetune"]))
    return out


def task_payload(run) -> dict[str, Any]:
    return {"family": run.task.family, "instruction": run.task.instruction,
            "instruction_suffix": run.task.instruction_suffix,
            "train": source_payload(run.task.train)}


def upload_payload(inputs: RunInputs, align_key: str) -> dict[str, Any]:
    """The adapted upload (``Attack.adapts_upload``): the plain rows (the attack and task
    sources, as the finetune keys them), the aligned model searched against, the attack's
    budget, and how the filter scores a prompt: its layer where the model saves no R_l of its
    own, its centre, and on real data the held sets R_l and the centre are measured on."""
    r = inputs.run
    f = r.defense.filter
    payload = {**common_payload(inputs, "attack", *task_parts(r, "train"), "feature"),
               "stage": "upload", "align": align_key,
               "attack": attacks.get(r.attack.name).payload(r.attack, source_payload),
               "task": task_payload(r),
               "scorer": {"layer": f.layer, "centre": f.centre, "batch_size": f.batch_size},
               "code": upload_code()}
    if r.alignment.data.source != "toy":
        payload["feature_sets"] = feature_sets_payload(r)
    return payload


def _pretrained_payloads(run, hub: dict) -> tuple[dict, Optional[dict]]:
    """alignment.pretrained: (base, align). Without model.base_id the hub model is base and
    aligned at once (no align stage, as with no align method); with it, base is base_id's
    model and align is the hub model, neither trained."""
    if run.model.base_id is None:
        return hub, None
    base = {"stage": "base", "hf_id": run.model.base_id, "revision": None}
    return base, {**hub, "stage": "align", "pretrained": True}


def posthoc_payload(inputs: RunInputs, finetune_key: str) -> dict[str, Any]:
    """The finetuned model's key (it holds align's and base's), the method, and for the
    methods that read it the provider's harmful set and how it is tokenized."""
    r = inputs.run
    payload = {**common_payload(inputs), "stage": "posthoc", "input": finetune_key,
               "method": {"module": r.posthoc.module, "params": r.posthoc.params},
               "code": posthoc_code(r.posthoc.module)}
    if defense_flag(r.posthoc.module, "v_from_align_adapter"):  # V from a LoRA align's factors
        payload["v_from_align_adapter"] = True
    if defense_flag(r.posthoc.module, "needs_harmful_data"):
        payload["harmful"] = alignment_harmful_payload(inputs)
        payload["max_length"] = r.train.finetune.max_length
    return payload


def filter_judge(run):
    """defense.filter.judge with its built-in settings, else the run's judge node."""
    from harness.config.schema import JudgeConfig

    f = run.defense.filter
    return JudgeConfig(name=f.judge) if f.judge else run.judge


def filter_config_payload(run) -> dict[str, Any]:
    """defense.filter as keyed: ``judge`` (and the judge's settings) only for kind=judge:
    the other kinds never read it, so it must not split their keys."""
    payload = asdict(run.defense.filter)
    payload.pop("judge")
    payload.pop("on_empty")  # builds nothing: an empty upload reuses the aligned model's eval
    if run.defense.filter.tau_from != "upload_split":  # read by the upload split alone
        payload.pop("split_min_eta")
        payload.pop("split_max_share")
    if run.defense.filter.kind == "judge":
        judge = filter_judge(run)
        payload["judge"] = asdict(judge)
        entry = judges.entry(judge.name)
        if entry.settings:
            payload[entry.settings] = entry.key_fields(entry.settings_in(run))
    return payload


def stage_keys(inputs: RunInputs) -> dict[str, str]:
    """Artifact keys of every training stage, from the config alone (nothing is built)."""
    return {name: artifact_key(p) for name, p in stage_payloads(inputs).items() if p is not None}


def filter_payload(inputs: RunInputs, align: ModelRef, user: list) -> dict[str, Any]:
    r = inputs.run
    payload = {"version": KEY_VERSION, "stage": "filter",
               # a judge reads the rows alone, so its filter is shared across align stages
               "align": None if r.defense.filter.kind == "judge" else align.key,
               "filter": filter_config_payload(r), "template": asdict(r.template),
               "user": artifact_key([ex.to_dict() for ex in user]),
               "world": world_payload(inputs, "feature"),
               "torch_threads": torch.get_num_threads(), "code": filter_code(r)}
    if r.alignment.data.source != "toy":  # R_l and tau come from the held alignment rows
        payload["feature_sets"] = feature_sets_payload(r)
    if r.defense.filter.tau_from == "provider_harmful":  # tau comes from alignment.harmful
        payload["tau_set"] = alignment_harmful_payload(inputs)
    return payload


def eval_payload(inputs: RunInputs, ref: ModelRef) -> dict[str, Any]:
    r = inputs.run
    payload = {"version": KEY_VERSION, "model": asdict(ref), "eval": jailbreaks.payload(r.eval),
               "judge": asdict(r.judge), "template": asdict(r.template),
               "task": {"family": r.task.family, "test": source_payload(r.task.test),
                        "instruction": r.task.instruction,
                        "instruction_suffix": r.task.instruction_suffix,
                        "scorer": asdict(r.task.scorer),
                        "max_new_tokens": r.task.max_new_tokens},
               "harmful": source_payload(r.eval.harmful),
               "world": world_payload(inputs, "eval", *task_parts(r, "test"),
                                      "eval_harmless", "feature",
                                      *(("eval_scary",) if inputs.over_refusal_prompts()
                                        else ())),
               "seed": r.seed, "torch_threads": torch.get_num_threads(),
               "accelerator": accelerator_kind(r.trainer), "code": eval_code(r)}
    payload["eval"].pop("stages")  # which stages are evaluated, not how
    if r.eval.harmful_size is None and r.eval.task_size is None:
        payload["eval"].pop("sample_seed")  # no cap, no sample: the seed chooses nothing
    payload["eval"]["harmful"] = keyed_fields(payload["eval"]["harmful"])
    payload["attack_eval"] = attacks.get(r.attack.name).eval_payload(r.attack)
    # the run's judge and the panel's (eval.judges): each one's settings node, less what
    # cannot change a verdict
    for name in [r.judge.name] + [base_name(n, r.judge.name) for n in r.eval.judges]:
        judge = judges.entry(name)
        if judge.settings:
            payload[judge.settings] = judge.key_fields(judge.settings_in(r))
    if r.generation.backend != "hf":  # every generation field but backend is vLLM's alone
        payload["generation"] = asdict(r.generation)
    if r.eval.refusal_separation and r.alignment.data.source != "toy":
        payload["feature_sets"] = feature_sets_payload(r)  # the separation's R_l
    return payload
