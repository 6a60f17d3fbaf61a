"""The pipeline: base -> align -> [filter] -> finetune -> [posthoc] -> evaluate, in that order.

Each stage lives in a module of its own; this file only orders them:
- data: ``data/assemble.py`` (every dataset, loaded and checked before any training);
- keys: ``keys.py`` (every stage's payload, from the config alone);
- models: ``models/store.py`` (a stage's model and the tokenizer, from the artifact store);
- training: ``training.py`` (``build_trainer``, a stage's build);
- the upload: ``adapting.py`` (an attack that adapts the user's rows to the aligned model);
- filtering: ``filtering.py`` (the refusal-feature or judge filter of the user data);
- post-hoc: ``editing.py`` (a training-free edit of the finetuned adapter);
- evaluation: ``evaluating.py`` (generations, judged once).
A stage whose artifact exists is not run again; an interrupted one resumes from its last
Lightning checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from harness import keys
from harness.adapting import adapt_upload
from harness.analysis.refusal_evasion import summarise
from harness.artifacts import ArtifactStore, artifact_key
from harness.config.schema import RunConfig, StageMethodConfig
from harness.data import attacks
from harness.data.assemble import RunInputs, defense_flag
from harness.data.harmful import toy_alignment_harmful
from harness.data.mixing import refusal_pool
from harness.data.schema import SAFETY
from harness.distributed import global_rank
from harness.editing import posthoc_stage
from harness.evaluating import StageEvaluator
from harness.filtering import check_filtered, filter_user_data
from harness.guards import alignment
from harness.models.store import ModelStore
from harness.stages import ModelRef, StageRecorder, method_class
from harness.training import SFT_MODULE, StageTrainer


class Pipeline:
    """The stage order. The parts it wires are public, for a caller that needs one stage's
    view: ``inputs`` (the data), ``models`` (loading a stage's model), ``record`` (what was
    built or reused), ``trainer`` and ``evaluator``; keys come from ``harness.keys`` with
    ``inputs``."""

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
        self.upload_stats: Optional[dict[str, Any]] = None  # what an adaptive attack did
        self.posthoc_stats: Optional[dict[str, Any]] = None  # what posthoc= did, if on
        self.safety_mixed: Optional[int] = None  # refusal rows a finetune method added

    # the stage order
    def build_models(self) -> dict[str, ModelRef]:
        """Run (or reuse) base, align, the filter, finetune and post-hoc; the model of each."""
        r, data, train = self.run, self.inputs.data, self.trainer
        payloads = keys.stage_payloads(self.inputs)
        refs = self.build_aligned()
        base, align = refs["base"], refs["align"]
        user = data.user
        if "upload" in payloads:  # the attacker adapts its rows to the aligned model
            user, self.upload_stats = adapt_upload(self.inputs, self.models, self.record, align,
                                                   payloads["upload"])
        if r.defense.filter.kind != "none":
            user = self.filter_user_data(align, user)
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

    def build_aligned(self) -> dict[str, ModelRef]:
        """Run (or reuse) the base and align stages; the model of each (align is the base
        when the defense aligns nothing). Also the trainer's refs, which later stages read."""
        r, data, train = self.run, self.inputs.data, self.trainer
        payloads = keys.stage_payloads(self.inputs)
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
        return refs

    def mix_refusal_rows(self, user: list) -> list:
        """The finetune method's own rows added to the user's (safety_mix: the provider's
        refusal rows), after the filter, which reads the upload alone."""
        module = self.run.defense.finetune
        if not defense_flag(module.module, "mixes_refusal_rows"):
            return user
        cls = method_class(module.module)
        mixed = cls.mix_user_data(cls.Params(**module.params), user,
                                  refusal_pool(self.inputs.data.alignment), self.run.seed)
        self.safety_mixed = len(mixed) - len(user)
        return mixed

    def filter_user_data(self, align: ModelRef, user: Optional[list] = None) -> list:
        """The rows of ``user`` (default: the run's upload as loaded) the filter keeps; its
        statistics are kept even when it refuses."""
        user = self.inputs.data.user if user is None else user
        kept, self.filter_stats = filter_user_data(self.inputs, self.models, self.record, align,
                                                   user)
        return kept if check_filtered(kept, self.filter_stats, self.run.defense.filter) else []

    def attack_metrics(self) -> dict[str, Any]:
        """The adaptive attack's record: its budget, and the harmful rows' filter scores
        before and after it, with the share at or below the filter's τ where a refusal-feature
        filter ran (the rows it keeps)."""
        stats = dict(self.upload_stats)
        before, after = stats.pop("cos_before"), stats.pop("cos_after")
        f = self.filter_stats or {}
        tau = f.get("threshold") if self.run.defense.filter.kind == "refusal_feature" else None
        return {**stats, **summarise(before, after, tau)}

    def prepare(self):
        """Everything before the first training step: every dataset loaded and checked, and
        the tokenizer built or loaded (a bad input fails here, before any stage trains)."""
        data = self.inputs.load()
        _ = self.models.tokenizer
        return data

    def run_all(self) -> dict[str, Any]:
        """The whole run; returns the metrics per evaluated stage."""
        data = self.prepare()
        refs = self.build_models()
        metrics: dict[str, Any] = {}
        for name in self.run.eval.stages:
            metrics[name] = self.evaluator.evaluate(name, refs[name])
        if "base" in metrics and "align" in metrics:  # an alignment that aligned nothing
            metrics["guards"] = {"alignment": alignment(metrics["base"], metrics["align"]).to_dict()}
        n_harm = sum(ex.kind == "harmful" for ex in data.user)
        n_safety = sum(ex.kind == SAFETY for ex in data.user)
        metrics["data"] = {"n_user": len(data.user), "n_harmful": n_harm,
                           "n_task": len(data.user) - n_harm - n_safety,
                           **attacks.get(self.run.attack.name).realised(self.run.attack,
                                                                        data.user)}
        if n_safety:  # the backdoor's refusal rows, in the upload without the trigger
            metrics["data"]["n_safety"] = n_safety
        if self.safety_mixed is not None:  # the provider's, added by the defense
            metrics["data"]["n_safety_mixed"] = self.safety_mixed
        if self.inputs.overlaps:  # data.allow_overlap: the leaks the run was let through
            metrics["data"]["overlaps"] = [
                {"trained": o.trained, "scored": o.scored, "n_shared": o.n_shared,
                 "n_scored": o.n_scored} for o in self.inputs.overlaps]
        if self.filter_stats is not None:
            metrics["filter"] = self.filter_stats
        if self.upload_stats is not None:
            metrics["attack"] = self.attack_metrics()
        if self.trainer.analysis:
            metrics["analysis"] = self.trainer.analysis
        if self.posthoc_stats is not None:
            metrics["posthoc"] = self.posthoc_stats
        return metrics
