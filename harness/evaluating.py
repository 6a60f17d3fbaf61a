"""The eval stage: one model's generations on the harmful and task prompts (sharded across
processes), judged once on rank 0, with the over-refusal and refusal-separation measures;
content-addressed like every other stage (``keys.eval_payload``)."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from harness.analysis.refusal import (cosine, features, measure_refusal_direction, num_layers,
                                      resolve_layer, separation)
from harness.artifacts import artifact_key, write_json_atomic
from harness.data import attacks, jailbreaks
from harness.data.assemble import RunInputs
from harness.distributed import broadcast_from_zero, gather_shards, process_group, shard
from harness.evaluation.evaluate import (merge_variant, model_outputs, over_refusal, score,
                                         variant_metrics)
from harness.evaluation.gcg import search_suffix
from harness.evaluation.judges import AfterOpening
from harness.evaluation.panel import build_panel, panel_metrics
from harness.evaluation.registry import build_judge
from harness.keys import eval_payload
from harness.models.store import ModelStore
from harness.stages import ModelRef, StageRecorder


class StageEvaluator:
    def __init__(self, run, inputs: RunInputs, models: ModelStore, record: StageRecorder,
                 tracker=None):
        self.run = run
        self.inputs = inputs
        self.models = models
        self.record = record
        self.tracker = tracker

    def evaluate(self, name: str, ref: ModelRef) -> dict[str, Any]:
        r, inputs, models = self.run, self.inputs, self.models
        payload = eval_payload(inputs, ref)
        rank, world = process_group()
        if r.generation.backend == "vllm":
            world = 1  # one engine on rank 0 batches everything itself; the others wait

        def build(tmp: Path, work: Path) -> dict:
            t0 = time.perf_counter()
            model = models.eval_model(ref)
            judge, openings = self._judge_on_rank_zero(rank, world)
            harmful, task = inputs.data.eval_harmful, inputs.data.task_test
            eval_variants = inputs.data.eval_variants
            gcg = None
            if r.eval.jailbreak == "gcg":  # every rank searches alike (seeded, same model)
                gcg = self.gcg_suffix(model)
                harmful = jailbreaks.with_suffix(harmful, gcg["suffix"])
                eval_variants = {k: jailbreaks.with_suffix(v, gcg["suffix"])
                                 for k, v in eval_variants.items()}
            generator = self._vllm_generator(model, work) if r.generation.backend == "vllm" \
                else None
            h_local, t_local = model_outputs(
                model, models.tokenizer, r.template, shard(harmful, rank, world),
                shard(task, rank, world), r.eval, r.task, openings, r.seed, generator)
            # every prompt's outputs exactly once, in input order (checked in gather_shards)
            h_records = gather_shards(h_local, len(harmful), rank, world)
            t_records = gather_shards(t_local, len(task), rank, world)
            # the attack's other copies of the harmful prompts (the backdoor's triggered ones),
            # answered greedily like the plain ones
            variants = {}
            for vname, vrows in eval_variants.items():
                v_local, _ = model_outputs(
                    model, models.tokenizer, r.template, shard(vrows, rank, world), [],
                    replace(r.eval, samples=0, opening_probability=False), r.task, None,
                    r.seed, generator)
                variants[vname] = gather_shards(v_local, len(vrows), rank, world)
            scary = inputs.over_refusal_prompts()
            if scary:  # answered like the harmful prompts, greedily, under the plain template
                s_local, _ = model_outputs(
                    model, models.tokenizer, r.template, shard(scary, rank, world), [],
                    replace(r.eval, samples=0, opening_probability=False, system_prompt=""),
                    r.task, None, r.seed, generator)
                s_records = gather_shards(s_local, len(scary), rank, world)
            if rank != 0:
                return {}
            metrics, rows = score(harmful, h_records, task, t_records, judge, r.eval, r.task)
            for vname, records in variants.items():
                variant, vlogged = variant_metrics(vname, eval_variants[vname],
                                                   records, judge, r.eval.n_logged_generations)
                merge_variant(metrics, vname, variant)
                rows += vlogged
            if scary:
                metrics.update(over_refusal(scary, s_records, judge))
            if gcg is not None:
                metrics["gcg"] = gcg
            if r.eval.judges:  # the same answers under every judge of the panel
                metrics["panel"] = self.judge_panel(harmful, h_records)
            metrics["eval_processes"] = world
            metrics["eval_shard_sizes"] = [len(shard(harmful, k, world)) for k in range(world)]
            if r.eval.refusal_separation and all(inputs.feature_sets()):
                metrics["refusal_separation"] = self.separation(model)
            metrics["seconds"] = time.perf_counter() - t0
            write_json_atomic(tmp / "metrics.json", metrics)
            write_json_atomic(tmp / "generations.json", rows)
            return {"format": "eval"}

        key = artifact_key(payload)
        self.record("eval", key, payload, build, label=f"eval_{name}", collective=world > 1)
        path = models.store.path("eval", key)
        result = json.loads((path / "metrics.json").read_text())
        rows = json.loads((path / "generations.json").read_text())
        if self.tracker:
            self.tracker.log_generations(name, rows)
        return result

    def gcg_suffix(self, model) -> dict[str, Any]:
        """eval.jailbreak=gcg: a universal suffix searched against this model on the attack
        pool's first eval.gcg.train_prompts requests (posed as the attack poses them)."""
        r = self.run
        cfg = r.eval.gcg
        rows = attacks.get(r.attack.name).eval_harmful(
            r.attack, self.inputs.data.attack_pool[:cfg.train_prompts])
        t0 = time.perf_counter()
        suffix, history = search_suffix(model, self.models.tokenizer, r.template, rows, cfg,
                                        r.eval.system_prompt or None, r.seed)
        return {"suffix": suffix, "loss": history, "train_prompts": len(rows),
                "budget": asdict(cfg), "seconds": time.perf_counter() - t0}

    def judge_panel(self, harmful, h_records: list[dict]) -> dict[str, Any]:
        """eval.judges on the harmful answers (rank 0): each one's HS and pairwise kappa."""
        r = self.run
        opening = attacks.get(r.attack.name).eval_opening(r.attack)
        panel = build_panel(r.eval.judges, r,
                            wrap=lambda j: AfterOpening(j, opening) if opening else j)
        return panel_metrics(panel, [jailbreaks.request(ex) for ex in harmful],
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
                judge = build_judge(r)
                opening = attacks.get(r.attack.name).eval_opening(r.attack)
                if opening:  # the attack's answers start with it: judge what follows
                    judge = AfterOpening(judge, opening)
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

    def _vllm_generator(self, model, work: Path):
        """vLLM reads weights from disk: the model (adapters merged) and tokenizer, saved once
        in the evaluation's work folder."""
        from harness.evaluation.vllm_backend import VLLMGenerator

        folder = work / "vllm_model"
        model.save_pretrained(folder)
        self.models.tokenizer.save_pretrained(folder)
        return VLLMGenerator(folder, self.models.tokenizer, self.run.generation, self.run.seed)

    def separation(self, model) -> dict[str, float]:
        """R_l from the model's own features on the held sets; the cosines of held-out prompts."""
        inputs, tok = self.inputs, self.models.tokenizer
        layer = resolve_layer(self.run.eval.feature_layer, num_layers(model), "eval.feature_layer")
        bs = self.run.eval.batch_size
        feats = lambda exs: features(model, tok, inputs.render(exs), layer, bs)  # noqa: E731
        harmful, harmless = inputs.feature_sets()
        direction = measure_refusal_direction(model, tok, inputs.render(harmful),
                                              inputs.render(harmless), layer, bs)
        out = separation(cosine(feats(inputs.data.eval_harmful), direction),
                         cosine(feats(inputs.eval_harmless()), direction))
        return {**out, "layer": layer}
