"""Typed configuration: the schema Hydra merges every YAML into, and start-up validation.

The dataclasses are registered in Hydra's ConfigStore as ``run_schema``; ``conf/config.yaml``
lists it first in its defaults, so a misspelt key or a wrongly typed value fails at composition.
``validate`` then converts to objects, which runs every ``__post_init__`` range check and binds
each stage method's parameters to its LightningModule's signature, before anything is built.
"""
from __future__ import annotations

import dataclasses

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from harness.data.templates import TemplateConfig
from harness.data.toy import TASKS, ToyWorldConfig


class ConfigError(ValueError):
    """A bad config value; the message names the key and what is allowed."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _one_of(value: Any, key: str, allowed: tuple) -> None:
    _check(value in allowed, key, f"got {value!r}, allowed: {', '.join(map(str, allowed))}")


@dataclass
class PathsConfig:
    artifacts: str = "artifacts"


@dataclass
class ModelConfig:
    name: str = "tiny_llama"
    source: str = "tiny"  # tiny: built from config and pretrained on the toy world; hf: hub id
    arch: str = "llama"  # transformers model_type, for tiny models
    hf_id: Optional[str] = None
    revision: Optional[str] = None
    dtype: str = "float32"
    attn_implementation: Optional[str] = "sdpa"
    gradient_checkpointing: bool = False
    tokenizer_vocab_size: int = 2048  # tiny models: whole words for every answer opening
    config_overrides: dict[str, Any] = field(default_factory=dict)
    lora_targets: list[str] = field(default_factory=lambda: ["all-linear"])

    def __post_init__(self) -> None:
        _one_of(self.source, "model.source", ("tiny", "hf"))
        _one_of(self.dtype, "model.dtype", ("float32", "bfloat16", "float16"))
        if self.source == "hf":
            _check(bool(self.hf_id), "model.hf_id", "is required when model.source=hf")


@dataclass
class DataSourceConfig:
    """Where a dataset comes from, and how its fields map into ``Example``."""

    source: str = "toy"  # toy | local | hf
    path: Optional[str] = None  # local file (jsonl, json, csv, parquet) or hf dataset id
    split: str = "train"
    fields: dict[str, str] = field(default_factory=dict)  # our field -> the file's column
    limit: Optional[int] = None

    def check(self, key: str) -> None:
        _one_of(self.source, f"{key}.source", ("toy", "local", "hf"))
        if self.source != "toy":
            _check(bool(self.path), f"{key}.path", f"is required when {key}.source={self.source}")


@dataclass
class ScorerConfig:
    mode: str = "exact"  # exact | substring | regex | number
    case_sensitive: bool = False
    patterns: dict[str, str] = field(default_factory=dict)  # label -> regex, for mode=regex
    answer_phrase: str = "The final answer is:"  # number mode: read the number after this

    def __post_init__(self) -> None:
        _one_of(self.mode, "task.scorer.mode", ("exact", "substring", "regex", "number"))


@dataclass
class TaskConfig:
    name: str = "toy_sentiment"
    toy_task: str = "sentiment"
    train: DataSourceConfig = field(default_factory=DataSourceConfig)
    test: DataSourceConfig = field(default_factory=lambda: DataSourceConfig(split="test"))
    instruction: Optional[str] = None  # set on every row, for sources that lack one
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    max_new_tokens: int = 16

    def __post_init__(self) -> None:
        _one_of(self.toy_task, "task.toy_task", TASKS)
        self.train.check("task.train")
        self.test.check("task.test")


@dataclass
class AlignmentConfig:
    name: str = "toy"
    data: DataSourceConfig = field(default_factory=DataSourceConfig)
    size: Optional[int] = None

    def __post_init__(self) -> None:
        self.data.check("alignment.data")


@dataclass
class AttackConfig:
    name: str = "harmful_mix"
    p: float = 0.1
    n: int = 1000
    mode: str = "replace"  # replace: p*n of n rows are harmful; add: p*n harmful rows on top of n
    harmful: DataSourceConfig = field(default_factory=DataSourceConfig)

    def __post_init__(self) -> None:
        _check(0.0 <= self.p <= 1.0, "attack.p", f"must lie in [0, 1], got {self.p}")
        _check(self.n >= 1, "attack.n", f"must be a positive number of samples, got {self.n}")
        _one_of(self.mode, "attack.mode", ("replace", "add"))
        self.harmful.check("attack.harmful")


@dataclass
class StageMethodConfig:
    """A stage's method: a LightningModule class and the parameters particular to it.

    ``module=null`` skips the stage (align: none).
    """

    module: Optional[str] = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class DefenseConfig:
    name: str = "sft"
    align: StageMethodConfig = field(default_factory=StageMethodConfig)
    finetune: StageMethodConfig = field(default_factory=StageMethodConfig)


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Optional[list[str]] = None  # null: the model's lora_targets

    def __post_init__(self) -> None:
        _check(self.r >= 1, "lora.r", f"must be >= 1, got {self.r}")


@dataclass
class TrainStageConfig:
    """Optimisation settings of one training stage (a protocol sets these per anchor)."""

    lr: float = 1e-3
    batch_size: int = 32
    max_steps: Optional[int] = None  # wins over epochs when set
    epochs: float = 1.0
    warmup_ratio: float = 0.0
    scheduler: str = "linear"  # any transformers.get_scheduler name
    weight_decay: float = 0.0
    max_length: int = 128
    loss_on: str = "response"  # response | all
    lora: Optional[LoraConfig] = None  # null: full finetuning
    grad_clip: Optional[float] = 1.0
    checkpoint_every_n_steps: int = 200

    def check(self, key: str) -> None:
        _check(self.lr > 0, f"{key}.lr", f"must be > 0, got {self.lr}")
        _check(self.batch_size >= 1, f"{key}.batch_size", "must be >= 1")
        _check(self.max_steps is None or self.max_steps >= 1, f"{key}.max_steps", "must be >= 1")
        _check(self.epochs > 0, f"{key}.epochs", f"must be > 0, got {self.epochs}")
        _check(0 <= self.warmup_ratio < 1, f"{key}.warmup_ratio", "must lie in [0, 1)")
        _one_of(self.loss_on, f"{key}.loss_on", ("response", "all"))


@dataclass
class TrainConfig:
    base: TrainStageConfig = field(default_factory=lambda: TrainStageConfig(loss_on="all"))
    align: TrainStageConfig = field(default_factory=TrainStageConfig)
    finetune: TrainStageConfig = field(default_factory=TrainStageConfig)

    def __post_init__(self) -> None:
        for name in ("base", "align", "finetune"):
            getattr(self, name).check(f"train.{name}")


@dataclass
class EvalConfig:
    stages: list[str] = field(default_factory=lambda: ["final"])
    harmful: DataSourceConfig = field(default_factory=lambda: DataSourceConfig(split="test"))
    harmful_size: Optional[int] = None  # null: the whole evaluation pool
    task_size: Optional[int] = None
    max_new_tokens: int = 24
    batch_size: int = 64
    samples: int = 0  # k sampled answers per harmful prompt for the continuous HS (0: off)
    temperature: float = 1.0
    opening_probability: bool = True  # P(compliance opening) vs P(refusal opening), if known
    system_prompt: str = ""  # prefixed to every harmful evaluation prompt
    n_logged_generations: int = 20

    def __post_init__(self) -> None:
        for s in self.stages:
            _one_of(s, "eval.stages[]", ("base", "align", "final"))
        _check(self.samples >= 0, "eval.samples", "must be >= 0")
        _check(self.temperature > 0, "eval.temperature", "must be > 0")


@dataclass
class JudgeConfig:
    name: str = "toy"  # toy | keyword
    refusal_phrases: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _one_of(self.name, "judge.name", ("toy", "keyword"))


@dataclass
class TrainerConfig:
    """Arguments of ``lightning.Trainer`` that the pipeline does not set itself."""

    accelerator: str = "cpu"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    enable_progress_bar: bool = True
    log_every_n_steps: int = 10


@dataclass
class LoggerConfig:
    kind: str = "wandb"  # wandb | csv | none
    project: str = "harmful-finetuning"
    entity: Optional[str] = None
    mode: str = "offline"  # offline | online | disabled
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _one_of(self.kind, "logger.kind", ("wandb", "csv", "none"))
        _one_of(self.mode, "logger.mode", ("offline", "online", "disabled"))


@dataclass
class RunConfig:
    seed: int = 0
    study: str = "default"
    paths: PathsConfig = field(default_factory=PathsConfig)
    world: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def register() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


def _check_method(method: StageMethodConfig, key: str, stage: str) -> None:
    if method.module is None:
        _check(not method.params, f"{key}.params", "given, but the stage has no module")
        return
    from hydra.utils import get_class

    from harness.defenses.base import StageModule

    try:
        cls = get_class(method.module)
    except Exception as err:  # noqa: BLE001 - any import failure is a config error here
        raise ConfigError(f"{key}.module: cannot import {method.module!r} ({err})") from err
    _check(issubclass(cls, StageModule), f"{key}.module",
           f"{method.module} is not a harness StageModule")
    _check(stage in cls.stages, f"{key}.module",
           f"{cls.__name__} runs in stages {cls.stages}, not in '{stage}'")
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
    try:
        run: RunConfig = OmegaConf.to_object(cfg)  # runs every __post_init__
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from err
    _check_method(run.defense.align, "defense.align", "align")
    _check_method(run.defense.finetune, "defense.finetune", "finetune")
    _check(run.defense.finetune.module is not None, "defense.finetune.module",
           "every defense finetunes; give a module")
    n_layers = run.model.config_overrides.get("num_hidden_layers")
    for stage in ("align", "finetune"):
        layer = getattr(run.defense, stage).params.get("layer")
        if layer is not None and n_layers is not None:
            _check(0 <= layer <= n_layers, f"defense.{stage}.params.layer",
                   f"must lie in [0, {n_layers}] for {run.model.name}, got {layer}")
    return run


__all__ = ["RunConfig", "ConfigError", "validate", "register", "MISSING"]
