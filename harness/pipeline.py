"""The pipeline: base -> align -> finetune -> evaluate, with content-addressed stage outputs.

Every stage's key is a hash of everything that determines it (model, stage config, data config,
seed, and the keys of its inputs), so a p-sweep aligns once and finetunes once per p; a stage
whose artifact exists is not run again, and an interrupted stage resumes from its last
Lightning checkpoint.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from hydra.utils import get_class
from lightning.pytorch.callbacks import ModelCheckpoint

from harness.analysis.gradients import GradientConflict
from harness.analysis.refusal import (cosine, features, num_layers, refusal_direction,
                                      resolve_layer, separation)
from harness.artifacts import ArtifactStore, artifact_key, provenance, write_json_atomic
from harness.checkpoints import AtomicCheckpointIO, RngState, resumable_checkpoint
from harness.interrupts import RequeueAtStepEnd  # SLURM: a requeue stops at a step end
from harness.config import RunConfig, StageMethodConfig, TrainStageConfig, accelerator_kind
from harness.data import attacks
from harness.data.collate import PadCollator, StageData, TokenizedDataset
from harness.data.harmful import toy_alignment_harmful
from harness.data.schema import Example
from harness.data.sources import load_source, package_path, stable_payload
from harness.data.toy import WORLD_KNOBS_ADDED_LATER, ToyWorld
from harness.defenses.base import StageContext, StageModule
from harness.defenses.ref_teacher import load_refusal_feature
from harness.distributed import (broadcast_from_zero, eval_device, full_state_dict,
                                 gather_shards, global_rank, process_group, shard)
from harness.evaluation.evaluate import model_outputs, over_refusal, score
from harness.evaluation.judges import build_judge
from harness.evaluation.panel import base_name, build_panel, panel_metrics
from harness.models import gguf, loading
from harness.posthoc.base import PosthocContext

log = logging.getLogger("harness")

# bump when a change to the code invalidates stored artifacts. 2: the real path holds the
# feature sets out of the alignment data (eval.feature_set_size keyed), hf data_files hashed
KEY_VERSION = 2
TOKENIZER_KEY_VERSION = 1  # the tokenizer key's own; bump when the tokenizer's build changes
SFT_MODULE = "harness.defenses.sft.SFT"
STAGE_SEED_OFFSET = {"base": 0, "align": 1, "finetune": 2}


@dataclass(frozen=True)
class ModelRef:
    stage: str
    key: str


@dataclass
class Data:
    base_corpus: list[Example] = field(default_factory=list)
    alignment: list[Example] = field(default_factory=list)
    task_train: list[Example] = field(default_factory=list)
    task_test: list[Example] = field(default_factory=list)
    attack_pool: list[Example] = field(default_factory=list)
    eval_harmful: list[Example] = field(default_factory=list)
    user: list[Example] = field(default_factory=list)
    alignment_harmful: list[Example] = field(default_factory=list)  # alignment.harmful, if read


def _file_digest(path: Optional[str]) -> Optional[str]:
    if not path or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _files_digest(spec: Optional[str]) -> Optional[str]:
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


def _source_payload(src) -> dict[str, Any]:
    payload = stable_payload(asdict(src))
    if src.source == "local":
        payload["sha256"] = _file_digest(src.path)
    elif src.source == "package":  # the installed file's bytes, whichever version is installed
        payload["sha256"] = _file_digest(str(package_path(src.path)))
    elif src.source == "hf" and src.data_files:  # a downloaded copy: its content, not its name
        payload["data_files_sha256"] = _files_digest(src.data_files)
    return payload


def _train_payload(cfg: TrainStageConfig) -> dict[str, Any]:
    """A stage's optimisation settings; the checkpoint cadence is left out (a resumed stage
    trains what the uninterrupted one does)."""
    payload = asdict(cfg)
    payload.pop("checkpoint_every_n_steps")
    if cfg.loss_on == "all":  # whole-text stages keep the text's start (as before the option)
        payload.pop("truncation")
    return payload


class Pipeline:
    def __init__(self, run: RunConfig, run_dir: Path, tracker=None):
        self.run = run
        self.run_dir = Path(run_dir)
        self.tracker = tracker
        self.store = ArtifactStore(run.paths.artifacts, rank=global_rank())
        self.timings: dict[str, dict[str, Any]] = {}
        self.artifacts: dict[str, dict[str, Any]] = {}
        self._world: Optional[ToyWorld] = None
        self._tokenizer = None
        self.data: Optional[Data] = None
        self.filter_stats: Optional[dict[str, Any]] = None
        self._held: tuple[list[Example], list[Example]] = ([], [])  # real data: load_data
        self.analysis: dict[str, Any] = {}  # per-stage training analyses, for results.json
        self.posthoc_stats: Optional[dict[str, Any]] = None  # what posthoc= did, if on

    # ================================================================ data
    @property
    def world(self) -> ToyWorld:
        if self._world is None:
            self._world = ToyWorld(self.run.world)
        return self._world

    def _uses_world(self) -> bool:
        r = self.run
        benign = (r.attack.benign.source,) if "benign" in attacks.get(r.attack.name).uses else ()
        harmful = (r.alignment.harmful.source,) if self._reads_alignment_harmful() else ()
        return r.model.source == "tiny" or "toy" in (
            r.alignment.data.source, r.task.train.source, r.task.test.source,
            r.attack.harmful.source, r.eval.harmful.source, *benign, *harmful)

    def _world_payload(self, *parts: str) -> Optional[dict[str, Any]]:
        """The toy world's config plus fingerprints of the parts of it a stage consumes."""
        if not self._uses_world():
            return None
        world = asdict(self.run.world)
        for knob, off in WORLD_KNOBS_ADDED_LATER.items():  # off: keys made before them stay valid
            if world[knob] == off:
                world.pop(knob)
        return {**world, "data": {p: self.world.fingerprint(p) for p in parts}}

    def _task_source(self, src, split: str) -> list[Example]:
        if src.source == "toy":
            return self.world.task(self.run.task.toy_task, split)
        defaults = {"instruction": self.run.task.instruction} if self.run.task.instruction else {}
        # a task's answer is its label, unless the file holds both
        rows = load_source(src, required=("instruction", "output", "label"), defaults=defaults,
                           fill={"label": "output", "output": "label"})
        suffix = self.run.task.instruction_suffix  # a protocol's, e.g. Vaccine's GSM8K hint
        return [replace(ex, instruction=ex.instruction + suffix) for ex in rows] if suffix else rows

    def load_data(self) -> Data:
        """Load and check every dataset before any training, so bad data fails first."""
        r = self.run
        d = Data()
        if r.model.source == "tiny":
            d.base_corpus = self.world.base_corpus()
        d.alignment = (self.world.alignment_data() if r.alignment.data.source == "toy"
                       else load_source(r.alignment.data))[:r.alignment.size]
        if r.alignment.harmless is not None:
            d.alignment += load_source(r.alignment.harmless, required=("instruction", "output"),
                                       defaults={"kind": "harmless"})[:r.alignment.harmless_size]
        self._check_feature_sets(d.alignment)
        d.alignment = self._hold_out_feature_sets(d.alignment)
        d.task_train = self._task_source(r.task.train, "train")
        d.task_test = self._task_source(r.task.test, "test")[:r.eval.task_size]
        d.attack_pool = (self.world.attack_pool() if r.attack.harmful.source == "toy"
                         else [replace(e, kind="harmful") for e in load_source(r.attack.harmful)])
        attack = attacks.get(r.attack.name)
        d.eval_harmful = attack.eval_harmful(r.attack, (
            self.world.eval_harmful() if r.eval.harmful.source == "toy"
            else load_source(r.eval.harmful, required=("instruction",),
                             defaults={"kind": "harmful"}))[:r.eval.harmful_size])
        pools = {"task": lambda: d.task_train, "harmful": lambda: d.attack_pool,
                 "benign": self._benign_pool,
                 "disguised": lambda: self.world.attack_pool(disguised=True)}  # filter_evasion
        d.user = attacks.build_user(r.attack, lambda name: pools[name](), seed=r.seed)
        if self._reads_alignment_harmful():
            d.alignment_harmful = self.alignment_harmful()
            self._check_disjoint(d.alignment_harmful, d.attack_pool, d.eval_harmful)
        if self._posthoc_method() and self._posthoc_method().needs_harmful_data:
            self._check_disjoint(self.alignment_harmful(), d.attack_pool, d.eval_harmful)
        self.data = d
        return d

    def _reads_alignment_harmful(self) -> bool:
        module = self.run.defense.align.module
        return bool(module) and getattr(get_class(module), "needs_harmful_data", False)

    def alignment_harmful(self) -> list[Example]:
        """The provider's harmful (prompt, harmful answer) rows (alignment.harmful)."""
        r = self.run
        src = r.alignment.harmful
        rows = (toy_alignment_harmful(self.world) if src.source == "toy" else
                load_source(src, defaults={"kind": "harmful"}))[:r.alignment.harmful_size]
        if not rows:
            raise ValueError("alignment.harmful: no rows (alignment.harmful_size="
                             f"{r.alignment.harmful_size})")
        return rows

    @staticmethod
    def _check_disjoint(harmful: list[Example], attack: list[Example],
                        evaluation: list[Example]) -> None:
        """The provider's harmful set should share no prompt with the user's attack pool or
        the evaluation prompts. Real sets repeat prompts (BeaverTails has several answers per
        prompt, and an anchor's files may overlap), so an overlap is reported, not refused."""
        prompts = {(ex.instruction, ex.input) for ex in harmful}
        for name, rows in (("attack pool (attack.harmful)", attack),
                           ("evaluation prompts (eval.harmful)", evaluation)):
            shared = prompts & {(ex.instruction, ex.input) for ex in rows}
            if shared:
                log.warning("alignment.harmful shares %d of its %d prompts with the %s",
                            len(shared), len(prompts), name)

    def _benign_pool(self) -> list[Example]:
        src = self.run.attack.benign
        if src.source == "toy":
            return self.world.benign_pool()
        return load_source(src, defaults={"kind": "harmless"})

    def _needs_refusal_feature(self) -> list[str]:
        """The config keys whose methods measure R_l from held harmful and harmless prompts."""
        r = self.run
        keys = []
        if r.defense.align.module and getattr(get_class(r.defense.align.module),
                                              "needs_refusal_feature", False):
            keys.append(f"defense.align.module={r.defense.align.module}")
        if r.defense.filter.kind == "refusal_feature":
            keys.append("defense.filter.kind=refusal_feature")
        return keys

    def _check_feature_sets(self, alignment: list[Example]) -> None:
        if self.run.alignment.data.source == "toy":
            return
        kinds = {ex.kind == "harmful" for ex in alignment}
        if kinds == {True, False}:
            return
        needs = self._needs_refusal_feature()
        missing = "harmless" if True in kinds else "harmful"
        if needs:
            raise ValueError(
                f"alignment: {' and '.join(needs)} measure the refusal feature R_l, which "
                f"contrasts harmful with harmless prompts, and the alignment data "
                f"({self.run.alignment.name}) has no {missing} rows. Add some with "
                "alignment.harmless (alignment=beavertails_alpaca adds Alpaca, as Ref-Teacher "
                "does), or a local file with a kind column")
        if self.run.eval.refusal_separation:
            log.warning("alignment data %s has no %s rows: refusal separation is skipped "
                        "(alignment.harmless adds them)", self.run.alignment.name, missing)

    def _hold_out_feature_sets(self, alignment: list[Example]) -> list[Example]:
        """Real data: the first ``eval.feature_set_size`` rows of each kind become the held
        sets R_l (and the filter's tau) are measured on, and leave the alignment training data,
        so the teacher never trains on them. Data of one kind only holds nothing out (no R_l
        can be measured on it). The toy world has held sets of its own."""
        if self.run.alignment.data.source == "toy":
            return alignment
        k = self.run.eval.feature_set_size
        harmful = [i for i, ex in enumerate(alignment) if ex.kind == "harmful"]
        harmless = [i for i, ex in enumerate(alignment) if ex.kind != "harmful"]
        if not harmful or not harmless:
            return alignment
        for name, rows in (("harmful", harmful), ("harmless", harmless)):
            if len(rows) <= k:
                raise ValueError(
                    f"eval.feature_set_size={k}: the alignment data has {len(rows)} {name} rows, "
                    f"and the first {k} are held out of training to measure the refusal "
                    f"feature; none would be left to train on. Lower eval.feature_set_size or "
                    f"add {name} rows")
        held = set(harmful[:k]) | set(harmless[:k])
        self._held = ([alignment[i] for i in harmful[:k]], [alignment[i] for i in harmless[:k]])
        return [ex for i, ex in enumerate(alignment) if i not in held]

    def feature_sets(self) -> tuple[list[Example], list[Example]]:
        """Held harmful and harmless prompts for estimating R_l, apart from training data."""
        if self.run.alignment.data.source == "toy":
            return self.world.feature_prompts()
        return self._held

    def eval_harmless(self) -> list[Example]:
        """Held-out harmless prompts for the separation analysis."""
        if self.run.eval.harmful.source == "toy":
            return self.world.eval_harmless()
        return self.data.task_test

    def over_refusal_prompts(self) -> list[Example]:
        """Harmless prompts that look dangerous (the toy world's XSTest-like held set): the share
        a model refuses is its over-refusal rate. Empty off the toy world's eval prompts."""
        if self.run.eval.harmful.source == "toy":
            return self.world.eval_scary()
        return []

    def _render(self, examples: list[Example]) -> list[str]:
        return [self.run.template.render_prompt(ex) for ex in examples]

    # ================================================================ keys
    def _common_payload(self, *parts: str) -> dict[str, Any]:
        r = self.run
        model = asdict(r.model)
        if model["gguf"] is None:  # absent for other models: their keys stay as they were
            model.pop("gguf")
        if model["base_id"] is None:  # absent unless set: keys made before it stay valid
            model.pop("base_id")
        payload = {"version": KEY_VERSION, "seed": r.seed, "model": model,
                   "template": asdict(r.template), "world": self._world_payload(*parts),
                   "torch_threads": torch.get_num_threads(),  # CPU floats depend on it
                   "accelerator": accelerator_kind(r.trainer)}  # and CPU vs GPU kernels
        # bf16 training gives other weights than fp32; the process count does not (the global
        # batch and loss are the same), so it stays out. Absent at 32-true: older keys hold.
        if r.trainer.precision not in ("32-true", "32", 32):
            payload["precision"] = str(r.trainer.precision)
        return payload

    def keys(self) -> dict[str, str]:
        """Artifact keys of every stage, from the config alone (nothing is built)."""
        return {name: artifact_key(p) for name, p in self.payloads().items() if p is not None}

    def payloads(self) -> dict[str, Optional[dict[str, Any]]]:
        r = self.run
        # its own version: the tokenizer's build did not change with KEY_VERSION 2, so every
        # stored toy tokenizer stays valid
        tok = ({"version": TOKENIZER_KEY_VERSION, "world": self._world_payload("tokenizer"),
                "template": asdict(r.template),
                "vocab_size": r.model.tokenizer_vocab_size} if r.model.source == "tiny" else None)
        base = {**self._common_payload("base"), "stage": "base",
                "tokenizer": artifact_key(tok) if tok else None}
        if r.model.source == "tiny":
            base["train"] = _train_payload(r.train.base)
        else:  # a hub model: its identity is its id and revision
            base = {"stage": "base", "hf_id": r.model.hf_id, "revision": r.model.revision}
            if r.model.gguf:  # a local file: its bytes and the conversion code are its identity
                base["gguf"] = gguf.payload(r.model.gguf)
        align = None
        if r.alignment.pretrained:  # no align training: the hub model is the aligned one
            base, align = self._pretrained_payloads(base)
        base_key = artifact_key(base)
        align_key = base_key if align is None else artifact_key(align)
        if r.defense.align.module is not None and not r.alignment.pretrained:
            align = {**self._common_payload("align"), "stage": "align", "input": base_key,
                     "method": _method_payload(r.defense.align),
                     "train": _train_payload(r.train.align),
                     "data": _source_payload(r.alignment.data), "size": r.alignment.size}
            if r.alignment.harmless is not None:  # absent otherwise: older keys stay valid
                align["harmless"] = {**_source_payload(r.alignment.harmless),
                                     "size": r.alignment.harmless_size}
            if r.alignment.data.source != "toy":  # the held sets leave the training data
                align["feature_set_size"] = r.eval.feature_set_size
            if self._reads_alignment_harmful():  # absent otherwise: older keys stay valid
                align["harmful"] = self._alignment_harmful_payload()
            align_key = artifact_key(align)
        ft_cls = get_class(r.defense.finetune.module)
        ft_input = base_key if getattr(ft_cls, "starts_from", "align") == "base" else align_key
        task_part = f"task_{r.task.toy_task}_train"
        attack = attacks.get(r.attack.name)
        parts = ("attack", task_part) + (("benign",) if "benign" in attack.uses else ())
        finetune = {**self._common_payload(*parts), "stage": "finetune",
                    "input": ft_input, "align": align_key,
                    "method": _method_payload(r.defense.finetune),
                    "train": _train_payload(r.train.finetune),
                    "attack": attack.payload(r.attack, _source_payload),
                    "filter": self._filter_config_payload(),
                    "task": {"toy_task": r.task.toy_task, "instruction": r.task.instruction,
                             "instruction_suffix": r.task.instruction_suffix,
                             "train": _source_payload(r.task.train)}}
        out = {"tokenizer": tok, "base": base, "align": align, "finetune": finetune}
        if r.posthoc.module is not None:  # absent when off: no new stage, no key moves
            out["posthoc"] = self.posthoc_payload(artifact_key(finetune))
        return out

    def _pretrained_payloads(self, hub: dict) -> tuple[dict, Optional[dict]]:
        """alignment.pretrained: (base, align). Without model.base_id the hub model is base and
        aligned at once (no align stage, as with no align method); with it, base is base_id's
        model and align is the hub model, neither trained."""
        r = self.run
        if r.model.base_id is None:
            return hub, None
        base = {"stage": "base", "hf_id": r.model.base_id, "revision": None}
        return base, {**hub, "stage": "align", "pretrained": True}

    # ================================================================ models
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self._load_tokenizer()
            self.run.template.bind(self._tokenizer)  # template=chat renders through it
        return self._tokenizer

    def _hub_path(self) -> Optional[str]:
        """model.gguf: the converted HF folder (built once), which stands in for hf_id."""
        if not self.run.model.gguf:
            return None
        if getattr(self, "_gguf_folder", None) is None:
            self._gguf_folder = str(gguf.hf_folder(self.run.model.gguf, self.store))
        return self._gguf_folder

    def _load_tokenizer(self):
        if self.run.model.source == "hf":
            return loading.load_hf_tokenizer(self.run.model, self._hub_path())
        from transformers import PreTrainedTokenizerFast

        from harness.data.tokenizer import train_toy_tokenizer

        payload = self.payloads()["tokenizer"]
        key = artifact_key(payload)

        def build(tmp: Path, work: Path) -> dict:
            texts = ["".join(self.run.template.render(ex)) for ex in self.world.corpus_examples()]
            train_toy_tokenizer(texts,
                                self.run.model.tokenizer_vocab_size).save_pretrained(tmp / "tok")
            return {"payload": payload}

        path, _ = self.store.get_or_build("tokenizer", key, {"format": "tokenizer"}, build)
        return PreTrainedTokenizerFast.from_pretrained(path / "tok")

    def load_model(self, ref: ModelRef) -> torch.nn.Module:
        manifest = self.store.verified_manifest(ref.stage, ref.key)  # a damaged one raises
        path = self.store.path(ref.stage, ref.key)
        fmt = manifest["format"]
        if fmt == "hub":
            named = manifest.get("payload", {}).get("hf_id")
            if named and named != self.run.model.hf_id:  # alignment.pretrained's model.base_id
                model = loading.load_hf_model(replace(self.run.model, hf_id=named,
                                                      revision=None))
            else:
                model = loading.load_hf_model(self.run.model, self._hub_path())
            loading.resize_for_tokenizer(model, self.tokenizer)
        elif fmt == "full":
            model = loading.load_saved_model(path / "model", self.run.model)
        elif fmt == "adapter":
            parent = self.load_model(ModelRef(**manifest["parent"]))
            model = loading.merge_adapter(parent, path / "adapter")
        else:
            raise ValueError(f"artifact {ref.stage}/{ref.key}: unknown format {fmt!r}")
        return model

    # ================================================================ training
    def _fit(self, module: StageModule, dataset, train_cfg: TrainStageConfig, stage: str,
             work: Path, callbacks: tuple = ()) -> tuple[L.Trainer, dict[str, Any]]:
        r = self.run
        seed = r.seed * 1000 + STAGE_SEED_OFFSET[stage]
        # train.<stage>.batch_size is the global batch: k processes split each step's rows
        data = StageData(dataset, train_cfg.batch_size, seed,
                         PadCollator(self.tokenizer.pad_token_id), f"train.{stage}.batch_size")
        ckpt_dir = work / "checkpoints"
        checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                                     every_n_train_steps=train_cfg.checkpoint_every_n_steps)
        logger = self.tracker.stage_logger(stage) if self.tracker else False
        trainer_args = asdict(r.trainer)
        if r.trainer.strategy == "fsdp":  # layer-wise units, LoRA-safe (distributed.fsdp_strategy)
            from harness.distributed import fsdp_strategy

            trainer_args["strategy"] = fsdp_strategy(module.model)
        # written atomically; a resume restores the data position (StageData) and the random
        # states (RngState), so it trains on what the uninterrupted run would have
        trainer = L.Trainer(
            **trainer_args, max_steps=module.total_steps, max_epochs=-1, logger=logger,
            callbacks=[checkpoint, RngState(), RequeueAtStepEnd(), *callbacks],
            enable_model_summary=False,
            default_root_dir=str(work), plugins=[AtomicCheckpointIO()],
            gradient_clip_val=train_cfg.grad_clip if module.automatic_optimization else None,
            num_sanity_val_steps=0, use_distributed_sampler=False)
        # a damaged checkpoint is set aside (rank 0) for an older one or a fresh start
        last = resumable_checkpoint(ckpt_dir, stage, set_aside=self.store.rank == 0)
        if last is not None:
            log.info("[%s] resuming from %s", stage, last)
        with warnings.catch_warnings():  # Lightning checks the loader; StageData holds the state
            warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before")
            trainer.fit(module, datamodule=data,
                        ckpt_path=str(last) if last is not None else None)
        loss = trainer.callback_metrics.get("train/loss")
        return trainer, {"steps": trainer.global_step,
                         "final_train_loss": float(loss) if loss is not None else None}

    def _context(self) -> StageContext:
        r = self.run
        align_ds = TokenizedDataset(self.data.alignment, self.tokenizer, self.run.template,
                                    r.train.align.max_length,
                                    max_length_key="train.align.max_length",
                                    truncation=r.train.align.truncation)
        refs = {"base": self.refs.get("base"), "align": self.refs.get("align")}
        harmful, harmless = self.feature_sets()
        extras = {"feature_prompts": (self._render(harmful), self._render(harmless))}
        if self.data.alignment_harmful:
            extras["harmful_data"] = TokenizedDataset(
                self.data.alignment_harmful, self.tokenizer, self.run.template,
                r.train.align.max_length, max_length_key="train.align.max_length",
                truncation=r.train.align.truncation)
        adapter = self._align_adapter(refs["align"], refs["base"])
        if adapter is not None:  # AsFT: V is exactly this LoRA's B A
            extras["align_adapter"] = adapter
        return StageContext(tokenizer=self.tokenizer,
                            collate=PadCollator(self.tokenizer.pad_token_id),
                            alignment_data=align_ds,
                            load_model=lambda name: self.load_model(refs[name]),
                            extras=extras)

    def _align_adapter(self, align: Optional[ModelRef],
                       base: Optional[ModelRef]) -> Optional[Path]:
        """The align stage's LoRA folder when that stage is one adapter on the base model."""
        if align is None or base is None or align == base:
            return None
        manifest = self.store.manifest(align.stage, align.key)  # load_model verifies it
        if manifest["format"] != "adapter" or manifest.get("parent") != asdict(base):
            return None
        return self.store.path(align.stage, align.key) / "adapter"

    def _train_stage(self, stage: str, payload: dict, input_ref: Optional[ModelRef],
                     method: StageMethodConfig, train_cfg: TrainStageConfig,
                     examples: list[Example]) -> ModelRef:
        key = artifact_key(payload)
        cls = get_class(method.module)
        if method.lr_scale != 1.0:
            train_cfg = replace(train_cfg, lr=train_cfg.lr * method.lr_scale)

        def build(tmp: Path, work: Path) -> dict:
            L.seed_everything(self.run.seed * 1000 + STAGE_SEED_OFFSET[stage], verbose=False)
            if input_ref is None:
                model = loading.build_tiny(self.run.model, self.tokenizer, self.run.seed)
            else:
                model = self.load_model(input_ref)
            model.train()  # from_pretrained returns eval mode, which Lightning keeps
            if self.run.model.gradient_checkpointing:
                model.activation_checkpointing_enable()  # transformers 5 name
                model.config.use_cache = False
                if train_cfg.lora is not None:  # frozen embeddings: checkpointed inputs need grad
                    model.enable_input_require_grads()
            if train_cfg.lora is not None:
                model = loading.apply_lora(model, train_cfg.lora, self.run.model)
            dataset = TokenizedDataset(examples, self.tokenizer, self.run.template,
                                       train_cfg.max_length, train_cfg.loss_on,
                                       f"train.{stage}.max_length", train_cfg.truncation)
            steps = stage_steps(train_cfg, len(dataset), method.min_steps)
            if steps != stage_steps(train_cfg, len(dataset)):
                log.info("[%s] %s trains %d steps (defense.%s.min_steps); its data alone gives "
                         "%d", stage, cls.__name__, steps, stage,
                         stage_steps(train_cfg, len(dataset)))
            module = cls(model=model, train_cfg=train_cfg, total_steps=steps,
                         params=cls.Params(**method.params), context=self._context())
            log.info("[%s] training %s: %d examples, %d steps", stage, cls.__name__,
                     len(dataset), steps)
            callbacks = ((GradientConflict(method.gradient_conflict_every),)
                         if method.gradient_conflict_every else ())
            trainer, stats = self._fit(module, dataset, train_cfg, stage, work, callbacks)
            state = full_state_dict(trainer)  # collective under FSDP: every rank calls it
            if self.store.rank != 0:  # rank 0 alone writes the artifact
                return {}
            module.export(tmp)
            if callbacks:
                write_json_atomic(tmp / "gradient_conflict.json", callbacks[0].history)
            if train_cfg.lora is not None:
                module.model.save_pretrained(tmp / "adapter", state_dict=state)
                return {"format": "adapter", "parent": asdict(input_ref), **stats}
            module.model.save_pretrained(tmp / "model", state_dict=state)
            return {"format": "full", **stats}

        ref = self._stage(stage, key, payload, build, collective=True)
        history = self.store.path(stage, key) / "gradient_conflict.json"
        if history.is_file():
            self.analysis[f"gradient_conflict_{stage}"] = json.loads(history.read_text())
        return ref

    def _stage(self, stage: str, key: str, payload: dict, build,
               label: Optional[str] = None, collective: bool = False) -> ModelRef:
        label = label or stage
        t0 = time.perf_counter()
        manifest = {"payload": payload, "provenance": provenance()}
        _, reused = self.store.get_or_build(stage, key, manifest, build, collective)
        seconds = time.perf_counter() - t0
        self.timings[label] = {"seconds": round(seconds, 3), "reused": reused}
        self.artifacts[label] = {"key": key, "path": str(self.store.path(stage, key)),
                                 "reused": reused}
        verb = "reused" if reused else ("built" if self.store.rank == 0 else "joined the build of")
        log.info("[%s] %s artifact %s (%.1fs)", label, verb, key, seconds)
        return ModelRef(stage, key)

    def build_models(self) -> dict[str, ModelRef]:
        """Run (or reuse) base, align and finetune; return the model of each."""
        r = self.run
        payloads = self.payloads()
        self.refs: dict[str, ModelRef] = {}
        if r.model.source == "tiny":
            base = self._train_stage("base", payloads["base"], None,
                                     StageMethodConfig(module=SFT_MODULE), r.train.base,
                                     self.data.base_corpus)
        else:
            base = self._stage("base", artifact_key(payloads["base"]), payloads["base"],
                               lambda tmp, work: {"format": "hub"})
        self.refs["base"] = base
        align = base
        if payloads["align"] is not None and r.alignment.pretrained:  # already aligned
            align = self._stage("align", artifact_key(payloads["align"]), payloads["align"],
                                lambda tmp, work: {"format": "hub"})
        elif r.defense.align.module is not None and not r.alignment.pretrained:
            align = self._train_stage("align", payloads["align"], base, r.defense.align,
                                      r.train.align, self.data.alignment)
        self.refs["align"] = align
        user = self.data.user
        if r.defense.filter.kind != "none":
            user = self.filter_user_data(align)
        ft_cls = get_class(r.defense.finetune.module)
        start = base if getattr(ft_cls, "starts_from", "align") == "base" else align
        self.refs["final"] = self._train_stage("finetune", payloads["finetune"], start,
                                               r.defense.finetune, r.train.finetune, user)
        if r.posthoc.module is not None:  # evaluation reads the post-hoc model
            self.refs["final"] = self.posthoc(self.refs["final"], payloads["posthoc"])
        return self.refs

    # ================================================================ post-hoc
    def _posthoc_method(self):
        module = self.run.posthoc.module
        return get_class(module) if module else None

    def posthoc_payload(self, finetune_key: str) -> dict[str, Any]:
        """The finetuned model's key (it holds align's and base's), the method, and for the
        methods that read it the provider's harmful set and how it is tokenized."""
        r = self.run
        payload = {**self._common_payload(), "stage": "posthoc", "input": finetune_key,
                   "method": {"module": r.posthoc.module, "params": r.posthoc.params}}
        if self._posthoc_method().needs_harmful_data:
            payload["harmful"] = self._alignment_harmful_payload()
            payload["max_length"] = r.train.finetune.max_length
        return payload

    def posthoc(self, finetuned: ModelRef, payload: dict[str, Any]) -> ModelRef:
        """posthoc=<method>: edit the finetuned adapter (training-free); the result is an
        adapter on the finetune's parent, so load_model reads it as any adapter."""
        from peft import PeftModel

        r = self.run
        cls = self._posthoc_method()
        manifest = self.store.verified_manifest(finetuned.stage, finetuned.key)
        if manifest["format"] != "adapter":
            raise ValueError(f"posthoc={r.posthoc.name} edits a LoRA adapter; the finetune "
                             f"artifact is {manifest['format']!r} (set train.finetune.lora)")
        parent = ModelRef(**manifest["parent"])

        def batches(batch_size: int, limit: Optional[int]):
            rows = self.alignment_harmful()[:limit]
            data = TokenizedDataset(rows, self.tokenizer, r.template, r.train.finetune.max_length,
                                    "all", "train.finetune.max_length")
            return torch.utils.data.DataLoader(data, batch_size=batch_size,
                                               collate_fn=PadCollator(self.tokenizer.pad_token_id))

        def build(tmp: Path, work: Path) -> dict:  # rank 0 builds; the others wait for it
            t0 = time.perf_counter()
            model = PeftModel.from_pretrained(
                self.load_model(parent), self.store.path(finetuned.stage, finetuned.key) /
                "adapter").to(eval_device(r.trainer)).eval()
            context = PosthocContext(load_model=lambda name: self.load_model(self.refs[name]),
                                     harmful_batches=batches)
            stats = cls(cls.Params(**r.posthoc.params)).apply(model, context)
            stats["seconds"] = time.perf_counter() - t0
            model.save_pretrained(tmp / "adapter")
            write_json_atomic(tmp / "posthoc.json", stats)
            return {"format": "adapter", "parent": asdict(parent)}

        ref = self._stage("posthoc", artifact_key(payload), payload, build)
        self.posthoc_stats = json.loads(
            (self.store.path(ref.stage, ref.key) / "posthoc.json").read_text())
        s = self.posthoc_stats
        log.info("[posthoc] %s: %s", r.posthoc.name,
                 f"projected {s['n_projected']} of {s['n_modules']} LoRA modules"
                 if "n_projected" in s else f"pruned {s.get('weights_pruned')} of "
                 f"{s.get('adapter_weights')} adapter weights")
        return ref

    # ================================================================ filtering
    def refusal_feature(self, model, ref: ModelRef, layer_spec) -> tuple[int, torch.Tensor]:
        """The aligned model's own R_l if its stage saved one (Ref-Teacher), else R_l measured
        on it from the held sets at ``layer_spec``."""
        saved = load_refusal_feature(self.store.path(ref.stage, ref.key))
        if saved is not None:
            return int(saved["layer"]), saved["direction"]
        layer = resolve_layer(layer_spec, num_layers(model), "defense.filter.layer")
        harmful, harmless = self.feature_sets()
        bs = self.run.defense.filter.batch_size
        return layer, refusal_direction(
            features(model, self.tokenizer, self._render(harmful), layer, bs),
            features(model, self.tokenizer, self._render(harmless), layer, bs))

    def filter_payload(self, align: ModelRef, user: list[Example]) -> dict[str, Any]:
        r = self.run
        payload = {"version": KEY_VERSION, "stage": "filter",
                   # a judge reads the rows alone, so its filter is shared across align stages
                   "align": None if r.defense.filter.kind == "judge" else align.key,
                   "filter": self._filter_config_payload(), "template": asdict(r.template),
                   "user": artifact_key([ex.to_dict() for ex in user]),
                   "world": self._world_payload("feature"),
                   "torch_threads": torch.get_num_threads()}
        if r.alignment.data.source != "toy":  # R_l and tau come from the held alignment rows
            payload["feature_sets"] = self._feature_sets_payload()
        return payload

    def _alignment_harmful_payload(self) -> dict[str, Any]:
        r = self.run
        payload = {**_source_payload(r.alignment.harmful), "size": r.alignment.harmful_size}
        if r.alignment.harmful.source == "toy":  # derived rows: their content, as fingerprints
            payload["rows"] = artifact_key([ex.to_dict() for ex in
                                            toy_alignment_harmful(self.world)])
        return payload

    def _feature_sets_payload(self) -> dict[str, Any]:
        """Real data: what the held feature sets are drawn from (``_hold_out_feature_sets``)."""
        r = self.run
        return {"size": r.eval.feature_set_size, "data": _source_payload(r.alignment.data),
                "alignment_size": r.alignment.size,
                "harmless": (None if r.alignment.harmless is None else
                             {**_source_payload(r.alignment.harmless),
                              "size": r.alignment.harmless_size})}

    def filter_user_data(self, align: ModelRef) -> list[Example]:
        """Drop user prompts the aligned model scores above tau; record what was dropped."""
        r, f = self.run, self.run.defense.filter
        user = self.data.user
        payload = self.filter_payload(align, user)

        def build(tmp: Path, work: Path) -> dict:
            if f.kind == "judge":
                return self._judge_filter(user, tmp)
            model = self.eval_model(align)
            layer, direction = self.refusal_feature(model, align, f.layer)
            score = lambda exs: cosine(features(model, self.tokenizer, self._render(exs),  # noqa: E731
                                                layer, f.batch_size), direction)
            threshold = f.threshold
            if threshold is None:  # the held harmful prompts say where harm starts
                held = score(self.feature_sets()[0])
                threshold = float(torch.quantile(held, 1.0 - f.recall_target))
            t0 = time.perf_counter()
            scores = score(user).tolist()
            write_json_atomic(tmp / "filter.json", {
                "layer": layer, "threshold": threshold, "scores": scores,
                "prompts_per_second": len(user) / max(time.perf_counter() - t0, 1e-9)})
            return {"format": "filter"}

        ref = self._stage("filter", artifact_key(payload), payload, build)
        saved = json.loads((self.store.path(ref.stage, ref.key) / "filter.json").read_text())
        kept, self.filter_stats = apply_filter(user, saved["scores"], saved["threshold"],
                                               f.histogram_bins)
        self.filter_stats.update(layer=saved["layer"],
                                 prompts_per_second=saved["prompts_per_second"])
        if "judge" in saved:  # kind=judge: which judge, and its verdicts on the user rows
            self.filter_stats.update(judge=saved["judge"], verdicts=saved["verdicts"])
        s = self.filter_stats
        log.info("[filter] dropped %d of %d user rows (tau=%.3f, precision %.3f, recall %.3f)",
                 s["n_dropped"], s["n_in"], s["threshold"], s["precision"], s["recall"])
        if not kept and f.kind == "judge":
            raise ValueError(f"defense.filter.judge={s['judge']}: the judge called every one of "
                             f"the {len(user)} user rows' answers compliance ({s['verdicts']}), "
                             "so nothing is left to finetune on; a judge that only spots "
                             "refusals (keyword) cannot tell harmful answers from helpful ones")
        if not kept:
            raise ValueError(f"defense.filter: every one of the {len(user)} user rows scored above "
                            f"threshold {s['threshold']:.3f}; nothing is left to finetune on. "
                            "Raise defense.filter.threshold, or set it to null to derive it from "
                             "defense.filter.recall_target.")
        if s["n_dropped"] > len(user) / 2:
            log.warning("[filter] the filter removed %d of %d user rows (more than half); "
                        "check defense.filter.threshold", s["n_dropped"], len(user))
        return kept

    def _filter_judge(self):
        """defense.filter.judge with its built-in settings, else the run's judge node."""
        from harness.config import JudgeConfig

        f = self.run.defense.filter
        return JudgeConfig(name=f.judge) if f.judge else self.run.judge

    def _filter_config_payload(self) -> dict[str, Any]:
        """defense.filter as keyed: ``judge`` (and the judge's settings) only for kind=judge,
        so the keys of the other kinds stay as they were before it existed."""
        r = self.run
        payload = asdict(r.defense.filter)
        payload.pop("judge")
        if r.defense.filter.kind == "judge":
            judge = self._filter_judge()
            payload["judge"] = asdict(judge)
            if judge.name in ("beaver_dam", "llama_guard"):
                payload["moderation"] = {k: v for k, v in asdict(r.moderation).items()
                                         if k != "batch_size"}
            if judge.name == "llm_rubric":
                payload["llm_judge"] = {k: v for k, v in asdict(r.llm_judge).items()
                                        if k not in ("api_key_env", "cache_dir", "timeout_s",
                                                     "retries", "backoff_s")}
        return payload

    def _judge_filter(self, user: list[Example], tmp: Path) -> dict:
        """kind=judge: score 1 where the judge calls a row's answer compliance with a harmful
        request (its "comply"), else 0; the threshold 0.5 drops exactly the 1s."""
        r = self.run
        judge = build_judge(self._filter_judge(), r.llm_judge, r.moderation)
        t0 = time.perf_counter()
        verdicts = judge.classify_many([ex.instruction for ex in user],
                                       [ex.output for ex in user])
        write_json_atomic(tmp / "filter.json", {
            "layer": None, "threshold": 0.5, "judge": judge.name,
            "scores": [1.0 if v == "comply" else 0.0 for v in verdicts],
            "verdicts": {v: verdicts.count(v) for v in sorted(set(verdicts))},
            "prompts_per_second": len(user) / max(time.perf_counter() - t0, 1e-9)})
        return {"format": "filter"}

    # ================================================================ evaluation
    def eval_payload(self, ref: ModelRef) -> dict[str, Any]:
        r = self.run
        payload = {"version": KEY_VERSION, "model": asdict(ref), "eval": asdict(r.eval),
                   "judge": asdict(r.judge), "template": asdict(r.template),
                   "task": {"toy_task": r.task.toy_task, "test": _source_payload(r.task.test),
                            "instruction": r.task.instruction,
                            "instruction_suffix": r.task.instruction_suffix,
                            "scorer": asdict(r.task.scorer),
                            "max_new_tokens": r.task.max_new_tokens},
                   "harmful": _source_payload(r.eval.harmful),
                   "world": self._world_payload("eval", f"task_{r.task.toy_task}_test",
                                                "eval_harmless", "feature",
                                                *(("eval_scary",) if self.over_refusal_prompts()
                                                  else ())),
                   "seed": r.seed, "torch_threads": torch.get_num_threads(),
                   "accelerator": accelerator_kind(r.trainer)}
        payload["eval"].pop("stages")
        if not r.eval.judges:  # issue 21's judge panel: absent when off, old eval keys stay
            payload["eval"].pop("judges")
        payload["eval"]["harmful"] = stable_payload(payload["eval"]["harmful"])
        attack_eval = attacks.get(r.attack.name).eval_payload(r.attack)
        if attack_eval is not None:  # absent for the mix: its eval keys stay as they were
            payload["attack_eval"] = attack_eval
        panel = {base_name(n, r.judge.name) for n in r.eval.judges}  # issue 21: panel judges
        if panel & {"beaver_dam", "llama_guard"} or r.judge.name in ("beaver_dam", "llama_guard"):
            payload["moderation"] = {k: v for k, v in asdict(r.moderation).items()
                                     if k != "batch_size"}
        if r.judge.name == "llm_rubric" or "llm_rubric" in panel:
            payload["llm_judge"] = {k: v for k, v in asdict(r.llm_judge).items()
                                    if k not in ("api_key_env", "cache_dir", "timeout_s",
                                                 "retries", "backoff_s")}

        if r.generation.backend != "hf":  # absent for hf: its eval keys stay as they were
            payload["generation"] = asdict(r.generation)
        if r.eval.refusal_separation and r.alignment.data.source != "toy":
            payload["feature_sets"] = self._feature_sets_payload()  # the separation's R_l
        return payload

    def evaluate(self, name: str, ref: ModelRef) -> dict[str, Any]:
        r = self.run
        payload = self.eval_payload(ref)
        rank, world = process_group()
        if r.generation.backend == "vllm":
            world = 1  # one engine on rank 0 batches everything itself; the others wait

        def build(tmp: Path, work: Path) -> dict:
            t0 = time.perf_counter()
            model = self.eval_model(ref)
            judge, openings = self._judge_on_rank_zero(rank, world)
            harmful, task = self.data.eval_harmful, self.data.task_test
            generator = self._vllm_generator(model, work) if r.generation.backend == "vllm" \
                else None
            h_local, t_local = model_outputs(
                model, self.tokenizer, r.template, shard(harmful, rank, world),
                shard(task, rank, world), r.eval, r.task, openings, r.seed, generator)
            # every prompt's outputs exactly once, in input order (checked in gather_shards)
            h_records = gather_shards(h_local, len(harmful), rank, world)
            t_records = gather_shards(t_local, len(task), rank, world)
            scary = self.over_refusal_prompts()
            if scary:  # answered like the harmful prompts, greedily, under the plain template
                s_local, _ = model_outputs(
                    model, self.tokenizer, r.template, shard(scary, rank, world), [],
                    replace(r.eval, samples=0, opening_probability=False, system_prompt=""),
                    r.task, None, r.seed, generator)
                s_records = gather_shards(s_local, len(scary), rank, world)
            if rank != 0:
                return {}
            metrics, rows = score(harmful, h_records, task, t_records, judge, r.eval, r.task)
            if scary:
                metrics.update(over_refusal(scary, s_records, judge))
            if r.eval.judges:  # issue 21: the same answers under every judge of the panel
                metrics["panel"] = self.judge_panel(harmful, h_records)
            metrics["eval_processes"] = world
            metrics["eval_shard_sizes"] = [len(shard(harmful, k, world)) for k in range(world)]
            if r.eval.refusal_separation and all(self.feature_sets()):
                metrics["refusal_separation"] = self.separation(model)
            metrics["seconds"] = time.perf_counter() - t0
            write_json_atomic(tmp / "metrics.json", metrics)
            write_json_atomic(tmp / "generations.json", rows)
            return {"format": "eval"}

        key = artifact_key(payload)
        self._stage("eval", key, payload, build, label=f"eval_{name}", collective=world > 1)
        path = self.store.path("eval", key)
        result = json.loads((path / "metrics.json").read_text())
        rows = json.loads((path / "generations.json").read_text())
        if self.tracker:
            self.tracker.log_generations(name, rows)
        return result

    def judge_panel(self, harmful: list[Example], h_records: list[dict]) -> dict[str, Any]:
        """eval.judges on the harmful answers (rank 0): each one's HS and pairwise kappa."""
        r = self.run
        attack = attacks.get(r.attack.name)
        panel = build_panel(r.eval.judges, r.judge, r.llm_judge, r.moderation,
                            wrap=lambda j: attack.judge(r.attack, j))
        return panel_metrics(panel, [ex.instruction for ex in harmful],
                             [rec["answer"] for rec in h_records],
                             [ex.category for ex in harmful])

    def _judge_on_rank_zero(self, rank: int, world: int):
        """(the judge on rank 0, else None; its answer openings on every rank). Judges, moderation
        models among them, run once. A failure to build one reaches every rank, rather than
        leaving the others waiting in the gather."""
        r = self.run
        judge, failure = None, None
        if rank == 0:
            try:
                judge = attacks.get(r.attack.name).judge(
                    r.attack, build_judge(r.judge, r.llm_judge, r.moderation))
            except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
                failure = err
        openings, error = broadcast_from_zero(
            (judge.openings() if judge else None,
             f"{type(failure).__name__}: {failure}" if failure else None), world)
        if failure is not None:
            raise failure
        if error is not None:
            raise RuntimeError(f"rank 0 could not build judge={r.judge.name}: {error}")
        return judge, openings

    def eval_model(self, ref: ModelRef) -> torch.nn.Module:
        """A stage's model on this process's evaluation device (its GPU on a GPU run)."""
        return self.load_model(ref).to(eval_device(self.run.trainer)).eval()

    def _vllm_generator(self, model, work: Path):
        """vLLM reads weights from disk: the model (adapters merged) and tokenizer, saved once
        in the evaluation's work folder."""
        from harness.evaluation.vllm_backend import VLLMGenerator

        folder = work / "vllm_model"
        model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        return VLLMGenerator(folder, self.tokenizer, self.run.generation, self.run.seed)

    def separation(self, model) -> dict[str, float]:
        """R_l from the model's own features on the held sets; the cosines of held-out prompts."""
        layer = resolve_layer(self.run.eval.feature_layer, num_layers(model), "eval.feature_layer")
        bs = self.run.eval.batch_size
        feats = lambda exs: features(model, self.tokenizer, self._render(exs), layer, bs)  # noqa: E731
        harmful, harmless = self.feature_sets()
        direction = refusal_direction(feats(harmful), feats(harmless))
        out = separation(cosine(feats(self.data.eval_harmful), direction),
                         cosine(feats(self.eval_harmless()), direction))
        return {**out, "layer": layer}

    def run_all(self) -> dict[str, Any]:
        """The whole run; returns the metrics per evaluated stage."""
        self.load_data()
        _ = self.tokenizer
        refs = self.build_models()
        metrics: dict[str, Any] = {}
        for name in self.run.eval.stages:
            metrics[name] = self.evaluate(name, refs[name])
        n_harm = sum(ex.kind == "harmful" for ex in self.data.user)
        metrics["data"] = {"n_user": len(self.data.user), "n_harmful": n_harm,
                           "n_task": len(self.data.user) - n_harm}
        if self.filter_stats is not None:
            metrics["filter"] = self.filter_stats
        if self.analysis:
            metrics["analysis"] = self.analysis
        if self.posthoc_stats is not None:
            metrics["posthoc"] = self.posthoc_stats
        return metrics


def apply_filter(examples: list[Example], scores: list[float], threshold: float,
                 bins: int = 20) -> tuple[list[Example], dict[str, Any]]:
    """Keep the rows scoring at most ``threshold``; precision and recall of the dropped rows
    against the harmful labels, the share of harmless rows lost, and per-kind histograms."""
    import numpy as np

    harmful = np.array([ex.kind == "harmful" for ex in examples], dtype=bool)
    values = np.asarray(scores, dtype=float)
    dropped = values > threshold
    n_drop, n_harm = int(dropped.sum()), int(harmful.sum())
    caught = int((dropped & harmful).sum())
    edges = np.linspace(-1.0, 1.0, bins + 1)
    stats = {
        "threshold": float(threshold), "n_in": len(examples), "n_dropped": n_drop,
        "n_kept": len(examples) - n_drop, "n_harmful_in": n_harm,
        "precision": caught / n_drop if n_drop else 1.0,
        "recall": caught / n_harm if n_harm else 1.0,
        "leakage": (n_harm - caught) / n_harm if n_harm else 0.0,  # harmful rows it keeps
        "harmless_dropped_share": (int((dropped & ~harmful).sum()) / int((~harmful).sum())
                                   if (~harmful).any() else 0.0),
        # what a real filter gets wrong: harmless rows that look dangerous, harmful in disguise
        **_flagged_counts(examples, dropped),
        "histogram": {"edges": edges.round(4).tolist(),
                      "harmful": np.histogram(values[harmful], edges)[0].tolist(),
                      "harmless": np.histogram(values[~harmful], edges)[0].tolist()},
    }
    return [ex for ex, d in zip(examples, dropped) if not d], stats


def _flagged_counts(examples: list[Example], dropped) -> dict[str, int]:
    scary = [ex.category == "scary" or bool(ex.meta.get("scary")) for ex in examples]
    disguised = [bool(ex.meta.get("disguised")) for ex in examples]
    if not any(scary) and not any(disguised):
        return {}
    return {"n_scary_in": sum(scary), "scary_dropped": sum(s and d for s, d in zip(scary, dropped)),
            "n_disguised_in": sum(disguised),
            "disguised_kept": sum(g and not d for g, d in zip(disguised, dropped))}


def stage_steps(train_cfg: TrainStageConfig, n_rows: int, min_steps: Optional[int] = None) -> int:
    """A stage's optimizer steps: max_steps, else epochs over the rows; at least min_steps."""
    steps = train_cfg.max_steps or math.ceil(
        train_cfg.epochs * math.ceil(n_rows / train_cfg.batch_size))
    return max(steps, min_steps or 0)


def _method_payload(method: StageMethodConfig) -> dict[str, Any]:
    out = asdict(method)
    if not out["min_steps"]:  # absent when off: keys made before the option stay valid
        out.pop("min_steps")
    return out
