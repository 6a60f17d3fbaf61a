"""The post-hoc stage (posthoc=<method>): a training-free edit of the finetuned LoRA adapter,
stored as an adapter on the finetune's parent, so it loads as any adapter."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch

from harness.artifacts import artifact_key, write_json_atomic
from harness.data.assemble import RunInputs
from harness.data.collate import PadCollator, TokenizedDataset
from harness.distributed import eval_device
from harness.models.store import ModelStore
from harness.posthoc.base import PosthocContext
from harness.stages import ModelRef, StageRecorder, method_class

log = logging.getLogger("harness")


def posthoc_stage(inputs: RunInputs, models: ModelStore, record: StageRecorder,
                  refs: dict[str, ModelRef], finetuned: ModelRef,
                  payload: dict[str, Any]) -> tuple[ModelRef, dict[str, Any]]:
    """(the edited model, what the method did)."""
    from peft import PeftModel

    r = inputs.run
    cls = method_class(r.posthoc.module)
    store = models.store
    manifest = store.verified_manifest(finetuned.stage, finetuned.key)
    if manifest["format"] != "adapter":
        raise ValueError(f"posthoc={r.posthoc.name} edits a LoRA adapter; the finetune "
                         f"artifact is {manifest['format']!r} (set train.finetune.lora)")
    parent = ModelRef(**manifest["parent"])

    def batches(batch_size: int, limit: Optional[int]):
        tok = models.tokenizer
        rows = inputs.alignment_harmful()[:limit]
        data = TokenizedDataset(rows, tok, r.template, r.train.finetune.max_length,
                                "all", "train.finetune.max_length")
        return torch.utils.data.DataLoader(data, batch_size=batch_size,
                                           collate_fn=PadCollator(tok.pad_token_id))

    def build(tmp: Path, work: Path) -> dict:  # rank 0 builds; the others wait for it
        t0 = time.perf_counter()
        model = PeftModel.from_pretrained(
            models.load(parent), store.path(finetuned.stage, finetuned.key) /
            "adapter").to(eval_device(r.trainer)).eval()
        adapter = models.align_adapter(refs.get("align"), refs.get("base"))
        context = PosthocContext(load_model=lambda name: models.load(refs[name]),
                                 harmful_batches=batches,
                                 # a LoRA align stage: its factors give V exactly
                                 extras={} if adapter is None else {"align_adapter": adapter})
        stats = cls(cls.Params(**r.posthoc.params)).apply(model, context)
        stats["seconds"] = time.perf_counter() - t0
        model.save_pretrained(tmp / "adapter")
        write_json_atomic(tmp / "posthoc.json", stats)
        return {"format": "adapter", "parent": asdict(parent)}

    ref = record("posthoc", artifact_key(payload), payload, build)
    s = json.loads((store.path(ref.stage, ref.key) / "posthoc.json").read_text())
    log.info("[posthoc] %s: %s", r.posthoc.name,
             f"projected {s['n_projected']} of {s['n_modules']} LoRA modules"
             if "n_projected" in s else f"pruned {s.get('weights_pruned')} of "
             f"{s.get('adapter_weights')} adapter weights")
    return ref, s
