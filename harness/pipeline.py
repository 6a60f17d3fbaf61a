"""The pipeline: base -> align -> finetune -> evaluate, with content-addressed stage outputs.

Every stage's key is a hash of everything that determines it (model, stage config, data config,
seed, and the keys of its inputs), so a p-sweep aligns once and finetunes once per p; a stage
whose artifact exists is not run again, and an interrupted stage resumes from its last
Lightning checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from hydra.utils import get_class
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from harness.artifacts import ArtifactStore, artifact_key, provenance, write_json_atomic
from harness.config import RunConfig, StageMethodConfig, TrainStageConfig
from harness.data.collate import PadCollator, TokenizedDataset
from harness.data.mixing import build_user_data, harmful_count
from harness.data.schema import Example
from harness.data.sources import load_source
from harness.data.toy import ToyWorld
from harness.defenses.base import StageContext, StageModule
from harness.distributed import global_rank
from harness.evaluation.evaluate import evaluate_model
from harness.evaluation.judges import build_judge
from harness.models import loading

log = logging.getLogger("harness")

KEY_VERSION = 1  # bump when a change to the code invalidates stored artifacts
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


def _file_digest(path: Optional[str]) -> Optional[str]:
    if not path or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _source_payload(src) -> dict[str, Any]:
    payload = asdict(src)
    if src.source == "local":
        payload["sha256"] = _file_digest(src.path)
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

    # ================================================================ data
    @property
    def world(self) -> ToyWorld:
        if self._world is None:
            self._world = ToyWorld(self.run.world)
        return self._world

    def _uses_world(self) -> bool:
        r = self.run
        return r.model.source == "tiny" or "toy" in (
            r.alignment.data.source, r.task.train.source, r.task.test.source,
            r.attack.harmful.source, r.eval.harmful.source)

    def _world_payload(self, *parts: str) -> Optional[dict[str, Any]]:
        """The toy world's config plus fingerprints of the parts of it a stage consumes."""
        if not self._uses_world():
            return None
        return {**asdict(self.run.world),
                "data": {p: self.world.fingerprint(p) for p in parts}}

    def _task_source(self, src, split: str) -> list[Example]:
        if src.source == "toy":
            return self.world.task(self.run.task.toy_task, split)
        fields = dict(src.fields)
        fields.setdefault("label", fields.get("output", "output"))
        fields.setdefault("output", fields["label"])
        defaults = {"instruction": self.run.task.instruction} if self.run.task.instruction else {}
        return load_source(src.__class__(**{**asdict(src), "fields": fields}),
                           required=("instruction", "output", "label"), defaults=defaults)

    def load_data(self) -> Data:
        """Load and check every dataset before any training, so bad data fails first."""
        r = self.run
        d = Data()
        if r.model.source == "tiny":
            d.base_corpus = self.world.base_corpus()
        d.alignment = (self.world.alignment_data() if r.alignment.data.source == "toy"
                       else load_source(r.alignment.data))[:r.alignment.size]
        d.task_train = self._task_source(r.task.train, "train")
        d.task_test = self._task_source(r.task.test, "test")[:r.eval.task_size]
        d.attack_pool = (self.world.attack_pool() if r.attack.harmful.source == "toy"
                         else [Example(**{**e.to_dict(), "kind": "harmful"})
                               for e in load_source(r.attack.harmful)])
        d.eval_harmful = (self.world.eval_harmful() if r.eval.harmful.source == "toy"
                          else load_source(r.eval.harmful, required=("instruction",),
                                           defaults={"kind": "harmful"}))[:r.eval.harmful_size]
        d.user = build_user_data(d.task_train, d.attack_pool, r.attack.p, r.attack.n,
                                 r.attack.mode, seed=r.seed)
        self.data = d
        return d

    # ================================================================ keys
    def _common_payload(self, *parts: str) -> dict[str, Any]:
        r = self.run
        return {"version": KEY_VERSION, "seed": r.seed, "model": asdict(r.model),
                "template": asdict(r.template), "world": self._world_payload(*parts)}

    def keys(self) -> dict[str, str]:
        """Artifact keys of every stage, from the config alone (nothing is built)."""
        return {name: artifact_key(p) for name, p in self.payloads().items() if p is not None}

    def payloads(self) -> dict[str, Optional[dict[str, Any]]]:
        r = self.run
        tok = ({"version": KEY_VERSION, "world": self._world_payload("tokenizer"),
                "template": asdict(r.template),
                "vocab_size": r.model.tokenizer_vocab_size} if r.model.source == "tiny" else None)
        base = {**self._common_payload("base"), "stage": "base",
                "tokenizer": artifact_key(tok) if tok else None}
        if r.model.source == "tiny":
            base["train"] = asdict(r.train.base)
        else:  # a hub model: its identity is its id and revision
            base = {"stage": "base", "hf_id": r.model.hf_id, "revision": r.model.revision}
        base_key = artifact_key(base)
        align = None
        align_key = base_key
        if r.defense.align.module is not None:
            align = {**self._common_payload("align"), "stage": "align", "input": base_key,
                     "method": asdict(r.defense.align), "train": asdict(r.train.align),
                     "data": _source_payload(r.alignment.data), "size": r.alignment.size}
            align_key = artifact_key(align)
        ft_cls = get_class(r.defense.finetune.module)
        ft_input = base_key if getattr(ft_cls, "starts_from", "align") == "base" else align_key
        task_part = f"task_{r.task.toy_task}_train"
        finetune = {**self._common_payload("attack", task_part), "stage": "finetune",
                    "input": ft_input, "align": align_key,
                    "method": asdict(r.defense.finetune), "train": asdict(r.train.finetune),
                    "attack": {**asdict(r.attack), "harmful": _source_payload(r.attack.harmful)},
                    "task": {"toy_task": r.task.toy_task, "instruction": r.task.instruction,
                             "train": _source_payload(r.task.train)}}
        return {"tokenizer": tok, "base": base, "align": align, "finetune": finetune}

    # ================================================================ models
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self._load_tokenizer()
        return self._tokenizer

    def _load_tokenizer(self):
        if self.run.model.source == "hf":
            return loading.load_hf_tokenizer(self.run.model)
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
        manifest = self.store.manifest(ref.stage, ref.key)
        path = self.store.path(ref.stage, ref.key)
        fmt = manifest["format"]
        if fmt == "hub":
            model = loading.load_hf_model(self.run.model)
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
             work: Path) -> dict[str, Any]:
        r = self.run
        seed = r.seed * 1000 + STAGE_SEED_OFFSET[stage]
        loader = DataLoader(dataset, batch_size=train_cfg.batch_size, shuffle=True,
                            collate_fn=PadCollator(self.tokenizer.pad_token_id),
                            generator=torch.Generator().manual_seed(seed))
        ckpt_dir = work / "checkpoints"
        checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                                     every_n_train_steps=train_cfg.checkpoint_every_n_steps)
        logger = self.tracker.stage_logger(stage) if self.tracker else False
        trainer = L.Trainer(
            **asdict(r.trainer), max_steps=module.total_steps, max_epochs=-1, logger=logger,
            callbacks=[checkpoint], enable_model_summary=False, default_root_dir=str(work),
            gradient_clip_val=train_cfg.grad_clip if module.automatic_optimization else None,
            num_sanity_val_steps=0)
        last = ckpt_dir / "last.ckpt"
        if last.is_file():
            log.info("[%s] resuming from %s", stage, last)
        trainer.fit(module, loader, ckpt_path=str(last) if last.is_file() else None)
        loss = trainer.callback_metrics.get("train/loss")
        return {"steps": trainer.global_step,
                "final_train_loss": float(loss) if loss is not None else None}

    def _context(self) -> StageContext:
        r = self.run
        align_ds = TokenizedDataset(self.data.alignment, self.tokenizer, self.run.template,
                                    r.train.align.max_length)
        refs = {"base": self.refs.get("base"), "align": self.refs.get("align")}
        return StageContext(tokenizer=self.tokenizer,
                            collate=PadCollator(self.tokenizer.pad_token_id),
                            alignment_data=align_ds,
                            load_model=lambda name: self.load_model(refs[name]))

    def _train_stage(self, stage: str, payload: dict, input_ref: Optional[ModelRef],
                     method: StageMethodConfig, train_cfg: TrainStageConfig,
                     examples: list[Example]) -> ModelRef:
        key = artifact_key(payload)
        cls = get_class(method.module)

        def build(tmp: Path, work: Path) -> dict:
            L.seed_everything(self.run.seed * 1000 + STAGE_SEED_OFFSET[stage], verbose=False)
            if input_ref is None:
                model = loading.build_tiny(self.run.model, self.tokenizer, self.run.seed)
            else:
                model = self.load_model(input_ref)
            model.train()  # from_pretrained returns eval mode, which Lightning keeps
            if self.run.model.gradient_checkpointing:
                model.gradient_checkpointing_enable()
                model.config.use_cache = False
                if train_cfg.lora is not None:  # frozen embeddings: checkpointed inputs need grad
                    model.enable_input_require_grads()
            if train_cfg.lora is not None:
                model = loading.apply_lora(model, train_cfg.lora, self.run.model)
            dataset = TokenizedDataset(examples, self.tokenizer, self.run.template,
                                       train_cfg.max_length, train_cfg.loss_on)
            steps = train_cfg.max_steps or math.ceil(
                train_cfg.epochs * math.ceil(len(dataset) / train_cfg.batch_size))
            module = cls(model=model, train_cfg=train_cfg, total_steps=steps,
                         params=cls.Params(**method.params), context=self._context())
            log.info("[%s] training %s: %d examples, %d steps", stage, cls.__name__,
                     len(dataset), steps)
            stats = self._fit(module, dataset, train_cfg, stage, work)
            if train_cfg.lora is not None:
                module.model.save_pretrained(tmp / "adapter")
                return {"format": "adapter", "parent": asdict(input_ref), **stats}
            module.model.save_pretrained(tmp / "model")
            return {"format": "full", **stats}

        return self._stage(stage, key, payload, build, collective=True)

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
        log.info("[%s] %s artifact %s (%.1fs)", label, "reused" if reused else "built", key,
                 seconds)
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
        if r.defense.align.module is not None:
            align = self._train_stage("align", payloads["align"], base, r.defense.align,
                                      r.train.align, self.data.alignment)
        self.refs["align"] = align
        ft_cls = get_class(r.defense.finetune.module)
        start = base if getattr(ft_cls, "starts_from", "align") == "base" else align
        self.refs["final"] = self._train_stage("finetune", payloads["finetune"], start,
                                               r.defense.finetune, r.train.finetune,
                                               self.data.user)
        return self.refs

    # ================================================================ evaluation
    def evaluate(self, name: str, ref: ModelRef) -> dict[str, Any]:
        r = self.run
        payload = {"version": KEY_VERSION, "model": asdict(ref), "eval": asdict(r.eval),
                   "judge": asdict(r.judge), "template": asdict(r.template),
                   "task": {"toy_task": r.task.toy_task, "test": _source_payload(r.task.test),
                            "scorer": asdict(r.task.scorer),
                            "max_new_tokens": r.task.max_new_tokens},
                   "harmful": _source_payload(r.eval.harmful),
                   "world": self._world_payload("eval", f"task_{r.task.toy_task}_test"),
                   "seed": r.seed}
        payload["eval"].pop("stages")

        def build(tmp: Path, work: Path) -> dict:
            model = self.load_model(ref)
            metrics, rows = evaluate_model(model, self.tokenizer, r.template,
                                           self.data.eval_harmful, self.data.task_test,
                                           build_judge(r.judge), r.eval, r.task, seed=r.seed)
            write_json_atomic(tmp / "metrics.json", metrics)
            write_json_atomic(tmp / "generations.json", rows)
            return {"format": "eval"}

        key = artifact_key(payload)
        self._stage("eval", key, payload, build, label=f"eval_{name}")
        path = self.store.path("eval", key)
        result = json.loads((path / "metrics.json").read_text())
        rows = json.loads((path / "generations.json").read_text())
        if self.tracker:
            self.tracker.log_generations(name, rows)
        return result

    def run_all(self) -> dict[str, Any]:
        """The whole run; returns the metrics per evaluated stage."""
        self.load_data()
        _ = self.tokenizer
        refs = self.build_models()
        metrics: dict[str, Any] = {}
        for name in self.run.eval.stages:
            metrics[name] = self.evaluate(name, refs[name])
        n_harm = harmful_count(self.run.attack.p, self.run.attack.n)
        metrics["data"] = {"n_user": len(self.data.user), "n_harmful": n_harm,
                           "n_task": len(self.data.user) - n_harm}
        return metrics
