"""Start-up validation: ``validate`` turns the composed config into the schema's objects
(which runs every ``__post_init__`` range check), then checks what needs the package: each
stage method's module and parameters against its LightningModule, the attack, the model,
files, devices and judges. A bad value raises ConfigError naming the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from harness.config.schema import (FAMILIES, ConfigError, RunConfig, StageMethodConfig,
                                   TaskConfig, TrainerConfig, _check, _one_of, parse_slice)


def _check_method(method: StageMethodConfig, key: str, stage: str,
                  run: Optional["RunConfig"] = None) -> None:
    if method.module is None:
        _check(not method.params, f"{key}.params", "given, but the stage has no module")
        return
    from harness.defenses.base import StageModule
    from harness.stages import method_class

    try:
        cls = method_class(method.module)
    except Exception as err:  # noqa: BLE001 - any import failure is a config error here
        raise ConfigError(f"{key}.module: cannot import {method.module!r} ({err})") from err
    _check(issubclass(cls, StageModule), f"{key}.module",
           f"{method.module} is not a harness StageModule")
    _check(stage in cls.stages, f"{key}.module",
           f"{cls.__name__} runs in stages {cls.stages}, not in '{stage}'")
    _check(not cls.needs_align_stage or run is None or not run.alignment.pretrained
           or run.model.base_id is not None, "model.base_id",
           f"{cls.__name__} compares the aligned model with its base, and alignment.pretrained "
           "gives only the aligned one; set model.base_id to the base it was aligned from")
    _check(not cls.needs_align_stage or run is None or run.alignment.pretrained
           or run.defense.align.module is not None,
           "defense.align.module", f"{cls.__name__} compares the aligned model with the base, so "
           "it needs an align stage; set defense.align.module (e.g. harness.defenses.sft.SFT)")
    _check(not cls.needs_lora or run is None or getattr(run.train, stage).lora is not None,
           f"train.{stage}.lora", f"{cls.__name__} acts on a LoRA update; set "
           f"train.{stage}.lora (e.g. train.{stage}.lora.r=8)")
    _check(not cls.needs_harmful_data or run is None or run.alignment.harmful is not None,
           "alignment.harmful", f"{cls.__name__} trains against harmful prompts with harmful "
           "answers at alignment time, from the provider's side; give a source disjoint from "
           "attack.harmful and eval.harmful (the toy world: alignment.harmful.source=toy, as "
           "alignment=toy sets; real data: a local or hf file with instruction and output)")
    processes = training_processes(run.trainer) if run is not None else None
    _check(not cls.single_process_only or not processes or processes == 1,
           "trainer.devices", f"{cls.__name__}'s batch-level terms are not reduced across "
           f"processes, so {processes} processes would not train what one does; run it on one "
           "device")
    try:
        cls.Params(**method.params)  # unknown names and out-of-range values fail here
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key}.params: {err}") from err


def _check_known_keys(node: DictConfig, path: str = "") -> None:
    """``+key=value`` bypasses Hydra's struct check; a misspelt key must still fail."""
    schema = OmegaConf.get_type(node)
    known = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in node.keys():
        full = f"{path}{key}"
        if known is not None and key not in known:
            raise ConfigError(f"{full}: unknown key; {path.rstrip('.') or 'the config'} takes "
                              f"{', '.join(sorted(known))}")
        if known is not None and isinstance(node._get_node(key), DictConfig):
            _check_known_keys(node._get_node(key), f"{full}.")


def validate(cfg: DictConfig) -> RunConfig:
    """Turn the composed config into checked objects, or raise ConfigError naming the key."""
    _check_known_keys(cfg)
    _check_renamed(cfg)
    _check_protocol(cfg)
    try:
        run: RunConfig = OmegaConf.to_object(cfg)  # runs every __post_init__
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from err
    _check_method(run.defense.align, "defense.align", "align", run)
    _check_method(run.defense.finetune, "defense.finetune", "finetune", run)
    _check(run.defense.finetune.module is not None, "defense.finetune.module",
           "every defense finetunes; give a module")
    _check_task_family(run)
    _check_layers(run)
    _check_world(run)
    _check_real_model(run)
    _check(run.template.name != "chat" or run.model.source == "hf", "template.name",
           "chat renders through the model's own chat template, and the toy tokenizer of a "
           "tiny model has none; use model.source=hf (a hub id or a local folder)")
    _merge_attack(run)
    _check_task_files(run.task)
    _check_judge(run)
    _check_llm_judge(run)
    _check_generation(run)
    _check_trainer(run.trainer)
    _check_global_batches(run)
    _check_posthoc(run)
    _check_pretrained(run)
    _check(run.defense.filter.tau_from != "provider_harmful" or run.alignment.harmful is not None,
           "alignment.harmful", "defense.filter.tau_from=provider_harmful sets the filter's tau "
           "from the provider's harmful set, and none is given; give alignment.harmful (the toy "
           "world: alignment.harmful.source=toy, as alignment=toy sets; real data: a local or hf "
           "file with instruction and output), or set defense.filter.tau_from=held")
    return run


def _check_pretrained(run: RunConfig) -> None:
    if not run.alignment.pretrained:
        _check(run.model.base_id is None, "model.base_id",
               "names the base of a pretrained aligned model; it needs alignment.pretrained=true")
        return
    _check(run.model.source == "hf", "alignment.pretrained",
           "takes model.hf_id as the aligned model; it needs model.source=hf (a hub id or a "
           "local folder)")
    align = run.defense.align.module
    _check(align in (None, "harness.defenses.sft.SFT"), "defense.align.module",
           f"{align} trains the align stage, and alignment.pretrained=true takes an aligned model "
           "instead; pick a defense without an alignment-stage method (sft, asft, lisa, none)")


def _check_posthoc(run: "RunConfig") -> None:
    p = run.posthoc
    if p.module is None:
        _check(not p.params, "posthoc.params", "given, but posthoc has no module")
        return
    from harness.posthoc.base import PosthocMethod
    from harness.stages import method_class

    try:
        cls = method_class(p.module)
    except Exception as err:  # noqa: BLE001 - any import failure is a config error here
        raise ConfigError(f"posthoc.module: cannot import {p.module!r} ({err})") from err
    _check(isinstance(cls, type) and issubclass(cls, PosthocMethod), "posthoc.module",
           f"{p.module} is not a harness.posthoc PosthocMethod")
    _check(run.train.finetune.lora is not None, "train.finetune.lora",
           f"posthoc={p.name} edits the finetuned LoRA adapter; set train.finetune.lora "
           "(e.g. train.finetune.lora.r=8)")
    _check(not cls.needs_align_stage or not run.alignment.pretrained
           or run.model.base_id is not None, "model.base_id",
           f"posthoc={p.name} reads W_aligned - W_base, and alignment.pretrained gives only the "
           "aligned model; set model.base_id to the base it was aligned from")
    _check(not cls.needs_align_stage or run.alignment.pretrained
           or run.defense.align.module is not None,
           "defense.align.module", f"posthoc={p.name} reads W_aligned - W_base, so it needs an "
           "align stage; set defense.align.module (e.g. harness.defenses.sft.SFT)")
    _check(not cls.needs_harmful_data or run.alignment.harmful is not None, "alignment.harmful",
           f"posthoc={p.name} scores weights on the provider's harmful set; give "
           "alignment.harmful (the toy world: alignment.harmful.source=toy)")
    try:
        cls.Params(**p.params)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"posthoc.params: {err}") from err


def accelerator_kind(trainer: TrainerConfig) -> str:
    """The accelerator a run trains on, ``auto`` resolved: CPU and GPU kernels give other
    floats, so it enters the training and evaluation keys."""
    return "gpu" if trainer.accelerator == "auto" and _wants_gpu(trainer) else (
        "cpu" if trainer.accelerator == "auto" else str(trainer.accelerator))


def _check_real_model(run: RunConfig) -> None:
    """A GGUF model is a pretrained model: with the toy world's harmful data or judge it would
    run and report numbers that mean nothing (invented verbs, toy openings), so that is refused
    at start-up. The toy tasks are plain English and render through any tokenizer, so they stay
    allowed. (A hub id may be a tiny random architecture on toy data, as the tests run them,
    so hub ids are not checked.)"""
    if not run.model.gguf:
        return
    from harness.models import gguf

    try:
        gguf.check_available(run.model.gguf)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    toy = {"alignment.data.source": run.alignment.data.source,
           "attack.harmful.source": run.attack.harmful.source,
           "eval.harmful.source": run.eval.harmful.source}
    for key, source in toy.items():
        _check(source != "toy", key,
               f"is the toy world's (invented harmful requests), and model {run.model.name} is a "
               "pretrained model; pick real data (e.g. model=smollm2_135m's defaults, "
               "alignment=smollm2_refusals, attack_pool=donotanswer, protocol=real_cpu)")
    _check(run.judge.name != "toy", "judge.name",
           f"toy knows only the toy world's answer openings; model {run.model.name} is a "
           "pretrained model: use judge=keyword (or a moderation judge)")


def _wants_gpu(trainer: TrainerConfig) -> bool:
    from harness.distributed import wants_gpu

    return wants_gpu(trainer.accelerator)


def _check_trainer(trainer: TrainerConfig) -> None:
    if trainer.strategy != "fsdp":
        return
    _check(_wants_gpu(trainer), "trainer.strategy",
           f"fsdp shards on CUDA devices only (torch's FSDP and Lightning's strategy refuse "
           f"trainer.accelerator={trainer.accelerator}); use trainer=fsdp on GPUs, or "
           f"trainer=ddp_cpu for the multi-process path on CPUs")


def training_processes(trainer: TrainerConfig) -> Optional[int]:
    """How many processes will train, when the config says (None when Lightning decides later,
    e.g. devices=-1 without a visible GPU)."""
    devices = trainer.devices
    if isinstance(devices, str) and devices.lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        count = devices
    elif isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        count = len(devices)
    elif devices in (-1, "auto") and _wants_gpu(trainer):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else None
    else:
        count = None
    return count * trainer.num_nodes if count else None


def _check_global_batches(run: RunConfig) -> None:
    """Every step's rows are split across the processes (harness.data.collate), so a batch
    that does not divide would fail at the first fit, after the data has loaded."""
    world = training_processes(run.trainer)
    if not world or world == 1:
        return
    for stage in ("base", "align", "finetune"):
        size = getattr(run.train, stage).batch_size
        _check(size % world == 0, f"train.{stage}.batch_size",
               f"{size} is the global batch, split across the {world} training processes "
               f"(trainer.devices={run.trainer.devices} x trainer.num_nodes="
               f"{run.trainer.num_nodes}); give a multiple of {world}, or fewer devices")


def _check_generation(run: RunConfig) -> None:
    if run.generation.backend != "vllm":
        return
    import importlib.util

    _check(_wants_gpu(run.trainer), "generation.backend",
           "vllm generates on GPUs; use trainer=gpu (or ddp, fsdp), or generation.backend=hf")
    if importlib.util.find_spec("vllm") is None:
        from harness.evaluation.vllm_backend import INSTALL_HINT

        raise ConfigError(f"generation.backend: {INSTALL_HINT}")


def _merge_attack(run: RunConfig) -> None:
    """What the attack needs of the run; then its own finetune settings over the protocol's."""
    from harness.data import attacks

    _one_of(run.attack.name, "attack.name", tuple(attacks.ATTACKS))
    try:
        attacks.get(run.attack.name).check(run.attack, run.template, run.eval)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if run.attack.finetune:
        run.train.finetune = dataclasses.replace(run.train.finetune, **run.attack.finetune)
        run.train.finetune.check("attack.finetune")


def _check_task_files(task: TaskConfig) -> None:
    """One local file as train and test: split slices that plainly share rows fail here, before
    anything loads; RunInputs.load compares the rows themselves."""
    from pathlib import Path

    train, test = task.train, task.test
    if not (train.source == test.source and train.source in ("local", "package")
            and train.path and Path(str(train.path)).resolve() == Path(str(test.path)).resolve()):
        return
    if (train.where or {}) != (test.where or {}):
        return  # different rows by construction (where differs); not checked further
    a, b = parse_slice(train.split), parse_slice(test.split)
    fix = ("split the file, e.g. task.train.split='[:80%]' task.test.split='[80%:]' (quote "
           "the brackets in a shell)")
    _check(a is not None and b is not None, "task.test.split",
           f"task.train and task.test read the same file ({test.path}) and every row of it; "
           + fix)

    def span(bounds):
        lo, hi = bounds
        unit = {x[-1] == "%" for x in (lo, hi) if x}
        return (int((lo or "0").rstrip("%")), int(hi.rstrip("%")) if hi else None, unit)

    (lo1, hi1, u1), (lo2, hi2, u2) = span(a), span(b)
    if u1 and u2 and u1 != u2 or min(lo1, lo2) < 0 or (hi1 or 0) < 0 or (hi2 or 0) < 0:
        return  # rows against percents, or counts from the end: the rows' content is compared
        # once loaded (harness.data.checks), which also catches one file under two names
    overlap = (hi1 is None or lo2 < hi1) and (hi2 is None or lo1 < hi2)
    _check(not overlap, "task.test.split",
           f"{test.split} overlaps task.train.split {train.split} of the same file "
           f"({test.path}): the test would score rows the model trained on; {fix}")


def _check_judge(run: RunConfig) -> None:
    from harness.evaluation.registry import JUDGES

    _one_of(run.judge.name, "judge.name", tuple(JUDGES))
    if run.eval.judges:  # the judge panel: its names
        from harness.evaluation.panel import check_names

        try:
            check_names(run.eval.judges)
        except ValueError as err:
            raise ConfigError(str(err)) from err
    if run.defense.filter.judge is not None:
        _one_of(run.defense.filter.judge, "defense.filter.judge", tuple(JUDGES))


def _check_llm_judge(run: RunConfig) -> None:
    if run.judge.name != "llm_rubric":
        return
    from harness.evaluation.llm_judge import resolve_endpoint

    try:
        resolve_endpoint(run.llm_judge)
    except ValueError as err:
        raise ConfigError(str(err)) from err


_ABSENT = object()
# old key -> new key: the schema keeps the old one as an inert field, so setting it fails here
RENAMED = {"task.toy_task": "task.family"}


def _check_renamed(cfg: DictConfig) -> None:
    for old, new in RENAMED.items():
        value = OmegaConf.select(cfg, old, default=None, throw_on_resolution_failure=False)
        _check(value is None, old, f"was renamed to {new} (the task family: "
               f"{', '.join(FAMILIES)}); set {new}={value} instead")


def _check_task_family(run: RunConfig) -> None:
    """A toy source draws the task's rows from the toy world's generator for its family; a real
    task's family needs none (it is only what a protocol binds the scorer by)."""
    from harness.data.toy import GENERATORS

    toy = [f"task.{s}" for s in ("train", "test") if getattr(run.task, s).source == "toy"]
    _check(not toy or run.task.family in GENERATORS, "task.family",
           f"{run.task.family!r} has no toy generator, and {' and '.join(toy)} read the toy "
           f"world; toy families: {', '.join(GENERATORS)} (or give the task real sources)")


def _check_protocol(cfg: DictConfig) -> None:
    """Before resolving: a preset's task binding would otherwise fail as a bare interpolation
    error, and a misspelt hash key would silently hash nothing."""
    tasks = cfg.protocol.tasks
    family = cfg.task.family
    _check(not tasks or family in tasks, "protocol.tasks",
           f"protocol {cfg.protocol.name!r} has no entry for task family {family!r} "
           f"(task {cfg.task.name}); it has {', '.join(tasks)}")
    for key in cfg.protocol.hash_keys:
        _check(OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT,
               "protocol.hash_keys", f"{key!r} is not a config key")


def _check_layers(run: RunConfig) -> None:
    """Layer indices must exist in the model; hub models are checked once their config loads."""
    from harness.analysis.refusal import resolve_layer

    n_layers = run.model.config_overrides.get("num_hidden_layers")
    if n_layers is None:
        return
    specs = {f"defense.{s}.params.layer": getattr(run.defense, s).params.get("layer")
             for s in ("align", "finetune")}
    specs["defense.filter.layer"] = run.defense.filter.layer
    specs["eval.feature_layer"] = run.eval.feature_layer
    for key, spec in specs.items():
        if spec is None:
            continue
        try:
            resolve_layer(spec, n_layers, key)
        except ValueError as err:
            raise ConfigError(f"{err} ({run.model.name})") from err




def _check_world(run: RunConfig) -> None:
    """The toy world's own tables bound its size."""
    from harness.data.toy import check_world_tables

    try:
        check_world_tables(run.world)
    except ValueError as err:
        raise ConfigError(str(err)) from err
