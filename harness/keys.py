"""What each stage's artifact key reads from the config, declared in one place.

``Pipeline.payloads``, ``Pipeline.filter_payload`` and ``Pipeline.eval_payload`` build the keys;
``STAGE_READS`` names, per stage, the config paths (a path covers everything under it) those
payloads hold. tests/test_keys.py walks every leaf of the composed config and fails unless a
stage reads it or the test's NOT_KEYED list says why it cannot change a result, and checks by
perturbation that a declared leaf does move its stage's key.
"""
from __future__ import annotations

STAGE_READS: dict[str, tuple[str, ...]] = {
    "tokenizer": ("world", "template", "model.tokenizer_vocab_size"),
    "base": ("seed", "model", "template", "world", "trainer.precision", "trainer.accelerator",
             "train.base"),
    "align": ("seed", "model", "template", "world", "trainer.precision", "trainer.accelerator",
              "defense.align",
              "train.align", "alignment.data", "alignment.size", "alignment.harmless",
              "alignment.harmless_size", "alignment.harmful", "alignment.harmful_size",
              "eval.feature_set_size", "alignment.pretrained"),
    # kind=judge also reads the judge node (or defense.filter.judge) and that judge's settings
    # (moderation, llm_judge): harness.pipeline._filter_config_payload
    "filter": ("defense.filter", "template", "world", "alignment.data", "alignment.size",
               "alignment.harmless", "alignment.harmless_size", "eval.feature_set_size"),
    "finetune": ("seed", "model", "template", "world", "trainer.precision",
                 "trainer.accelerator", "defense.finetune",
                 "defense.filter", "train.finetune", "attack", "task.toy_task",
                 "task.instruction", "task.instruction_suffix", "task.train"),
    # present only with posthoc.module set; its input is the finetune key (which holds the rest)
    "posthoc": ("posthoc.module", "posthoc.params", "seed", "model", "template", "world",
                "trainer.precision", "trainer.accelerator", "alignment.harmful",
                "alignment.harmful_size", "train.finetune.max_length"),
    "eval": ("seed", "eval", "judge", "template", "world", "trainer.accelerator", "task.toy_task",
             "task.test",
             "task.instruction", "task.instruction_suffix", "task.scorer",
             "task.max_new_tokens", "moderation", "llm_judge", "generation", "attack",
             "alignment.data", "alignment.size", "alignment.harmless",
             "alignment.harmless_size"),
}


def reading_stages(path: str) -> list[str]:
    """The stages whose key reads config ``path`` (or a node above it)."""
    return [stage for stage, reads in STAGE_READS.items()
            if any(path == r or path.startswith(r + ".") for r in reads)]
