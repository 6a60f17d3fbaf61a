"""The pipeline: base -> align -> [filter] -> finetune -> [posthoc] -> evaluate, in that order.

Each stage lives in a module of its own; this file only orders them:
- data: ``data/assemble.py`` (every dataset, loaded and checked before any training);
- keys: ``keys.py`` (every stage's payload, from the config alone);
- models: ``models/store.py`` (a stage's model and the tokenizer, from the artifact store);
- training: ``training.py`` (``build_trainer``, a stage's build);
- filtering: ``filtering.py`` (the refusal-feature or judge filter of the user data);
- post-hoc: ``posthoc/stage.py`` (a training-free edit of the finetuned adapter);
- evaluation: ``evaluation/stage.py`` (generations, judged once).
A stage whose artifact exists is not run again; an interrupted one resumes from its last
Lightning checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from hydra.utils import get_class

from harness import keys
from harness.artifacts import ArtifactStore, artifact_key
from harness.config.schema import RunConfig, StageMethodConfig
from harness.data.assemble import Data, RunInputs, defense_flag
from harness.data.harmful import toy_alignment_harmful
from harness.data.mixing import refusal_pool
from harness.data.schema import SAFETY
from harness.distributed import global_rank
from harness.evaluation.stage import StageEvaluator
from harness.filtering import apply_filter, check_filtered, filter_user_data  # noqa: F401
from harness.models.store import ModelStore
from harness.posthoc.stage import posthoc_stage
from harness.stages import ModelRef, StageRecorder
from harness.training import SFT_MODULE, StageTrainer, stage_steps  # noqa: F401 - API

__all__ = ["Pipeline", "ModelRef", "Data", "apply_filter", "stage_steps"]


class Pipeline:
    def __init__(self, run: RunConfig, run_dir: Path, tracker=None):
        self.run = run
        self.run_dir = Path(run_dir)
        self.tracker = tracker
        self.store = ArtifactStore(run.paths.artifacts, rank=global_rank())
        self.record = StageRecorder(self.store)
        # the toy world's derived harmful rows, looked up here so a test can replace them
        self.inputs = RunInputs(run, harmful_rows=toy_alignment_harmful)
        self.models = ModelStore(
            run, self.store, lambda: keys.stage_payloads(self.inputs)["tokenizer"],
            lambda: ["".join(run.template.render(ex))
                     for ex in self.inputs.world.corpus_examples()])
        self.trainer = StageTrainer(run, self.inputs, self.models, self.record, tracker)
        self.evaluator = StageEvaluator(run, self.inputs, self.models, self.record, tracker)
        self.filter_stats: Optional[dict[str, Any]] = None
        self.posthoc_stats: Optional[dict[str, Any]] = None  # what posthoc= did, if on
        self.safety_mixed: Optional[int] = None  # refusal rows a finetune method added

    # what a run records, and what tests read
    @property
    def timings(self) -> dict[str, dict[str, Any]]:
        return self.record.timings

    @property
    def artifacts(self) -> dict[str, dict[str, Any]]:
        return self.record.artifacts

    @property
    def data(self) -> Optional[Data]:
        return self.inputs.data

    @property
    def refs(self) -> dict[str, ModelRef]:
        return self.trainer.refs

    @refs.setter
    def refs(self, value: dict[str, ModelRef]) -> None:
        self.trainer.refs = value

    @property
    def tokenizer(self):
        return self.models.tokenizer

    def load_data(self) -> Data:
        return self.inputs.load()

    def feature_sets(self):
        return self.inputs.feature_sets()

    def load_model(self, ref: ModelRef) -> torch.nn.Module:
        return self.models.load(ref)

    # keys, from the config alone
    def payloads(self) -> dict[str, Optional[dict[str, Any]]]:
        return keys.stage_payloads(self.inputs)

    def keys(self) -> dict[str, str]:
        return keys.stage_keys(self.inputs)

    def filter_payload(self, align: ModelRef, user: list) -> dict[str, Any]:
        return keys.filter_payload(self.inputs, align, user)

    def eval_payload(self, ref: ModelRef) -> dict[str, Any]:
        return keys.eval_payload(self.inputs, ref)

    # the stage order
    def build_models(self) -> dict[str, ModelRef]:
        """Run (or reuse) base, align, the filter, finetune and post-hoc; the model of each."""
        r, data, train = self.run, self.inputs.data, self.trainer
        payloads = self.payloads()
        train.refs = refs = {}
        if r.model.source == "tiny":
            base = train.train("base", payloads["base"], None,
                               StageMethodConfig(module=SFT_MODULE), r.train.base,
                               data.base_corpus)
        else:
            base = self.record("base", artifact_key(payloads["base"]), payloads["base"],
                               lambda tmp, work: {"format": "hub"})
        refs["base"] = base
        align = base
        if payloads["align"] is not None and r.alignment.pretrained:  # already aligned
            align = self.record("align", artifact_key(payloads["align"]), payloads["align"],
                                lambda tmp, work: {"format": "hub"})
        elif r.defense.align.module is not None and not r.alignment.pretrained:
            align = train.train("align", payloads["align"], base, r.defense.align,
                                r.train.align, data.alignment)
        refs["align"] = align
        user = data.user
        if r.defense.filter.kind != "none":
            user = self.filter_user_data(align)
            if not user:  # nothing to finetune on: the provider serves its aligned model
                refs["final"] = align
                return refs
        user = self.mix_refusal_rows(user)
        start = base if keys.finetune_starts_from_base(r) else align
        refs["final"] = train.train("finetune", payloads["finetune"], start,
                                    r.defense.finetune, r.train.finetune, user)
        if r.posthoc.module is not None:  # evaluation reads the post-hoc model
            refs["final"], self.posthoc_stats = posthoc_stage(
                self.inputs, self.models, self.record, refs, refs["final"], payloads["posthoc"])
        return refs

    def mix_refusal_rows(self, user: list) -> list:
        """The finetune method's own rows added to the user's (safety_mix: the provider's
        refusal rows), after the filter, which reads the upload alone."""
        module = self.run.defense.finetune
        if not defense_flag(module.module, "mixes_refusal_rows"):
            return user
        cls = get_class(module.module)
        mixed = cls.mix_user_data(cls.Params(**module.params), user,
                                  refusal_pool(self.inputs.data.alignment), self.run.seed)
        self.safety_mixed = len(mixed) - len(user)
        return mixed

    def filter_user_data(self, align: ModelRef) -> list:
        """The user rows the filter keeps; its statistics are kept even when it refuses."""
        kept, self.filter_stats = filter_user_data(self.inputs, self.models, self.record, align)
        return kept if check_filtered(kept, self.filter_stats, self.run.defense.filter) else []

    def evaluate(self, name: str, ref: ModelRef) -> dict[str, Any]:
        return self.evaluator.evaluate(name, ref)

    def run_all(self) -> dict[str, Any]:
        """The whole run; returns the metrics per evaluated stage."""
        data = self.load_data()
        _ = self.models.tokenizer
        refs = self.build_models()
        metrics: dict[str, Any] = {}
        for name in self.run.eval.stages:
            metrics[name] = self.evaluate(name, refs[name])
        n_harm = sum(ex.kind == "harmful" for ex in data.user)
        n_safety = sum(ex.kind == SAFETY for ex in data.user)
        metrics["data"] = {"n_user": len(data.user), "n_harmful": n_harm,
                           "n_task": len(data.user) - n_harm - n_safety}
        if n_safety:  # the backdoor's refusal rows, in the upload without the trigger
            metrics["data"]["n_safety"] = n_safety
        if self.safety_mixed is not None:  # the provider's, added by the defense
            metrics["data"]["n_safety_mixed"] = self.safety_mixed
        if self.filter_stats is not None:
            metrics["filter"] = self.filter_stats
        if self.trainer.analysis:
            metrics["analysis"] = self.trainer.analysis
        if self.posthoc_stats is not None:
            metrics["posthoc"] = self.posthoc_stats
        return metrics
