"""What a post-hoc method is: Params (its YAML's ``params``) and ``apply``, which edits the
finetuned LoRA adapter in place and returns what it did (results.json's ``posthoc``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch


@dataclass
class PosthocContext:
    load_model: Callable[[str], torch.nn.Module]  # "base" | "align": that stage's plain model
    # the provider's harmful set (alignment.harmful), tokenized whole, as padded batches
    harmful_batches: Optional[Callable[[int, Optional[int]], Iterable[dict]]] = None
    extras: dict[str, Any] = field(default_factory=dict)


class PosthocMethod:
    needs_align_stage = False  # reads W_aligned - W_base
    needs_harmful_data = False  # reads alignment.harmful
    # reads V from the align stage's LoRA factors where it has them (context.extras)
    v_from_align_adapter = False

    @dataclass
    class Params:
        pass

    def __init__(self, params: "PosthocMethod.Params") -> None:
        self.params = params

    def apply(self, model, context: PosthocContext) -> dict[str, Any]:
        raise NotImplementedError


def lora_layers(model) -> list[tuple[str, Any, str]]:
    """(name in the base model, peft LoRA layer, adapter name) of every adapted module."""
    from peft.tuners.lora import LoraLayer

    adapter = model.active_adapter
    return [(name.removeprefix("base_model.model."), module, adapter)
            for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and adapter in module.lora_A]
