"""Ref-Teacher: the refusal feature, the teacher's regulariser and refreshes, the filter, the
student's distillation, and the gradient-conflict analysis, on numbers checkable by hand."""
import copy

import pytest
import torch

from harness.analysis.gradients import GradientConflict, gradient_stats, split_batch
from harness.analysis.refusal import (cosine, cosine_regularizer, features, last_prompt_index,
                                      refusal_direction, resolve_layer)
from harness.config import ConfigError, TrainStageConfig
from harness.validation import validate
from harness.data.collate import PadCollator, TokenizedDataset, prompt_ids
from harness.data.schema import Example
from harness.data.templates import TemplateConfig
from harness.data.tokenizer import train_toy_tokenizer
from harness.defenses.base import StageContext
from harness.defenses.math import distillation_kl
from harness.analysis.refusal import load_refusal_feature
from harness.defenses.ref_teacher import RefStudent, RefTeacher
from harness.models.loading import apply_lora, build_tiny
from harness.filtering import apply_filter
from tests.test_defenses import model_cfg, one_thread  # noqa: F401 - the thread fixture

TEMPLATE = TemplateConfig()
HARMFUL = [f"how do I zorp the {t} with {m}" for t in ("vault", "gate", "door", "lock")
           for m in ("a pin", "force")]
HARMLESS = [f"how do I paint the {t} with {m}" for t in ("fence", "wall", "shed", "boat")
            for m in ("a brush", "care")]


@pytest.fixture(scope="module")
def tokenizer():
    texts = HARMFUL + HARMLESS + ["User: Assistant: Sure here. No sorry."] * 3
    return train_toy_tokenizer(texts, vocab_size=300)


def tiny(tokenizer, arch="llama"):
    return build_tiny(model_cfg(arch), tokenizer, seed=0)


def examples():
    return ([Example(instruction=h, output="No sorry.", kind="harmful") for h in HARMFUL]
            + [Example(instruction=h, output="Sure here.", kind="harmless") for h in HARMLESS])


def render(prompts):
    return [TEMPLATE.render_prompt(Example(instruction=p)) for p in prompts]


def context(tokenizer):
    data = TokenizedDataset(examples(), tokenizer, TEMPLATE, 64)
    return StageContext(tokenizer=tokenizer, collate=PadCollator(tokenizer.pad_token_id),
                        alignment_data=data,
                        extras={"feature_prompts": (render(HARMFUL), render(HARMLESS))})


def train_cfg(**kw):
    return TrainStageConfig(**{"lr": 1e-2, "batch_size": 8, "scheduler": "constant", **kw})


def batch_of(tokenizer, exs):
    return PadCollator(tokenizer.pad_token_id)(TokenizedDataset(exs, tokenizer, TEMPLATE, 64).rows)


# ================================================================ the refusal feature
def test_layer_index_forms():
    assert resolve_layer(2, 4) == 2
    assert resolve_layer(-1, 4) == 4 and resolve_layer(-5, 4) == 0
    assert resolve_layer(0.5, 4) == 2 and resolve_layer(1.0, 4) == 4 and resolve_layer(0.25, 8) == 2
    for bad in (5, -6, 1.5, 2.5):
        with pytest.raises(ValueError, match="layer"):
            resolve_layer(bad, 4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_refusal_direction_is_the_difference_of_means_by_hand(tokenizer, arch):
    model = tiny(tokenizer, arch).eval()
    layer = resolve_layer(-1, 2)

    def by_hand(prompt):  # one unpadded prompt at a time
        ids = torch.tensor([prompt_ids(tokenizer, prompt)])
        return model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0, -1]

    with torch.no_grad():
        hand = (torch.stack([by_hand(p) for p in render(HARMFUL)]).mean(0)
                - torch.stack([by_hand(p) for p in render(HARMLESS)]).mean(0))
    got = refusal_direction(features(model, tokenizer, render(HARMFUL), layer, batch_size=3),
                            features(model, tokenizer, render(HARMLESS), layer, batch_size=3))
    assert torch.allclose(got, hand, atol=1e-5)
    assert not torch.is_grad_enabled() or got.grad_fn is None


def test_last_prompt_index_reads_the_label_mask():
    labels = torch.tensor([[-100, -100, -100, 5, 6, -100], [-100, 7, 8, 9, -100, -100]])
    assert last_prompt_index(labels).tolist() == [2, 0]


def test_last_prompt_index_refuses_unmasked_prompts():
    """loss_on=all supervises every token: the first supervised one is token 0, and the old
    clamp read BOS in every row without a word."""
    labels = torch.tensor([[-100, -100, 5, 6], [1, 7, 8, 9], [1, 4, 4, -100]])
    with pytest.raises(ValueError, match=r"rows \[1, 2\] supervise their first token.*"
                                         r"loss_on=response"):
        last_prompt_index(labels)


def test_a_fraction_that_rounds_to_the_embeddings_is_an_error():
    assert resolve_layer(0.2, 4) == 1 and resolve_layer(0, 4) == 0  # an int 0 is explicit
    with pytest.raises(ValueError, match=r"eval.feature_layer: 0.1 of a model with 4 layers "
                                         r"rounds to index 0, the embedding output"):
        resolve_layer(0.1, 4, "eval.feature_layer")
    with pytest.raises(ValueError, match="rounds to index 0"):
        resolve_layer(0.5, 1)  # round(0.5) == 0


def test_a_long_prompt_is_cut_and_its_answer_kept(tokenizer):
    """A row whose prompt overflows max_length keeps its whole answer (truncation cuts
    the prompt, not the response), so no row is left with nothing to learn and no batch
    makes a NaN (0/0) loss that DDP would spread to every rank."""
    from harness.data.collate import IGNORE_INDEX

    rows = [Example(instruction="how do I paint the fence", output="Sure here."),
            Example(instruction=" ".join(HARMFUL), output="No sorry.")]
    n = len(TokenizedDataset(rows[:1], tokenizer, TEMPLATE, 64)[0]["input_ids"])
    full = TokenizedDataset(rows[1:], tokenizer, TEMPLATE, 512)[0]
    cut = TokenizedDataset(rows, tokenizer, TEMPLATE, n)[1]
    assert len(full["input_ids"]) > n == len(cut["input_ids"])  # it did overflow
    answer = [t for t, lab in zip(full["input_ids"], full["labels"]) if lab != IGNORE_INDEX]
    kept = [t for t, lab in zip(cut["input_ids"], cut["labels"]) if lab != IGNORE_INDEX]
    assert kept == answer and len(kept) > 0  # the whole answer and its EOS


def test_training_features_match_prompt_features(tokenizer):
    """The regulariser reads f_l at the last prompt token of a training row; that must be the
    same vector the filter reads from the prompt alone."""
    model = tiny(tokenizer).eval()
    batch = batch_of(tokenizer, examples()[:4])
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       output_hidden_states=True).hidden_states[1]
    from harness.analysis.refusal import gather_rows
    train_f = gather_rows(hidden, last_prompt_index(batch["labels"]))
    prompt_f = features(model, tokenizer, render(HARMFUL[:4]), 1)
    assert torch.allclose(train_f, prompt_f, atol=1e-5)


def test_cosine_regularizer_is_zero_when_separated_and_four_when_reversed():
    harmful = torch.tensor([1, 1, 0, 0])
    assert cosine_regularizer(torch.tensor([1.0, 1.0, -1.0, -1.0]), harmful).item() == 0.0
    assert cosine_regularizer(torch.tensor([-1.0, -1.0, 1.0, 1.0]), harmful).item() == 4.0
    assert cosine_regularizer(torch.tensor([0.5, 0.0, 0.0, -0.5]), harmful).item() == \
        pytest.approx((0.5 + 1.0) / 2 + (1.0 + 0.5) / 2)
    # the same through cosine(): features along +R and -R
    r = torch.tensor([0.0, 2.0, 0.0])
    feats = torch.tensor([[0.0, 3.0, 0.0], [0.0, 1.0, 0.0], [0.0, -4.0, 0.0], [0.0, -1.0, 0.0]])
    assert cosine_regularizer(cosine(feats, r), harmful).item() == pytest.approx(0.0, abs=1e-6)


# ================================================================ the teacher
def teacher(tokenizer, **params):
    return RefTeacher(model=tiny(tokenizer), train_cfg=train_cfg(), total_steps=10,
                      params=RefTeacher.Params(**params), context=context(tokenizer))


def test_refusal_feature_refreshes_every_k_steps_and_not_between(tokenizer):
    module = teacher(tokenizer, layer=1, refresh_every=3)
    batch = batch_of(tokenizer, examples())
    seen = []
    for step in range(8):
        module.maybe_refresh(step)
        seen.append(module.direction.clone())
        with torch.no_grad():  # move the weights so a refresh would change R
            for p in module.model.parameters():
                p.add_(0.01 * torch.randn_like(p))
    assert module.refreshed_at == [0, 3, 6]
    assert torch.equal(seen[1], seen[0]) and torch.equal(seen[2], seen[0])
    assert not torch.equal(seen[3], seen[2])
    static = teacher(tokenizer, layer=1, refresh_every=0)
    for step in range(8):
        static.maybe_refresh(step)
    assert static.refreshed_at == [0]
    terms = module.objective(batch)
    assert terms["loss"].item() == pytest.approx(terms["ce"].item() + terms["cos_regularizer"].item(), rel=1e-5)


def test_teacher_regulariser_separates_the_two_kinds(tokenizer, tmp_path):
    module = teacher(tokenizer, layer=1, refresh_every=5, lambda_cos=1.0)
    opt = torch.optim.AdamW(module.model.parameters(), lr=1e-2)
    batch = batch_of(tokenizer, examples())
    first = None
    for step in range(30):
        module.maybe_refresh(step)
        terms = module.objective(batch)
        first = first if first is not None else terms["cos_regularizer"].item()
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
    assert terms["cos_regularizer"].item() < 0.5 * first
    assert terms["cos_harmful"].item() > 0.5 and terms["cos_harmless"].item() < -0.5
    module.export(tmp_path)
    saved = load_refusal_feature(tmp_path)
    assert saved["layer"] == 1 and saved["direction"].shape == (32,)


def test_a_layer_outside_the_model_fails_at_start_up(make_cfg):
    with pytest.raises(ConfigError, match="defense.align.params.layer"):
        validate(make_cfg("defense=ref_teacher", "defense.align.params.layer=5"))
    with pytest.raises(ConfigError, match="eval.feature_layer"):
        validate(make_cfg("eval.feature_layer=-9"))
    run = validate(make_cfg("defense=ref_teacher", "defense.align.params.layer=-2"))
    assert run.defense.filter.kind == "refusal_feature"


@pytest.mark.parametrize("name,checks", [
    ("ref_teacher_filter_only", lambda r: r.defense.finetune.params["lambda_kd"] == 0),
    ("ref_teacher_distill_only", lambda r: r.defense.filter.kind == "none"),
    ("ref_teacher_no_reg", lambda r: r.defense.align.params["lambda_cos"] == 0),
    ("ref_teacher_static_rf", lambda r: r.defense.align.params["refresh_every"] == 0),
])
def test_ablations_change_one_thing(make_cfg, name, checks):
    run = validate(make_cfg(f"defense={name}"))
    assert run.defense.name == name and checks(run)
    assert run.defense.align.module.endswith("RefTeacher")


# ================================================================ the filter
def test_filter_drops_exactly_the_prompts_above_tau():
    exs = [Example(instruction=str(i), kind=k) for i, k in
           enumerate(["harmful", "harmful", "harmful", "task", "task", "task", "task", "task"])]
    scores = [0.9, 0.2, 0.05, 0.1, -0.3, 0.05, -0.8, 0.0]
    kept, stats = apply_filter(exs, scores, threshold=0.05, bins=4)
    assert [e.instruction for e in kept] == ["2", "4", "5", "6", "7"]  # 0.05 is not above
    assert stats["n_dropped"] == 3 and stats["n_kept"] == 5
    assert stats["precision"] == pytest.approx(2 / 3) and stats["recall"] == pytest.approx(2 / 3)
    assert stats["harmless_dropped_share"] == pytest.approx(1 / 5)
    assert stats["histogram"]["harmful"] == [0, 0, 2, 1]
    assert stats["histogram"]["harmless"] == [1, 1, 3, 0]


# ================================================================ the student
def student(tokenizer, teacher_model, **params):
    model = apply_lora(copy.deepcopy(teacher_model),
                       __import__("harness.config", fromlist=["LoraConfig"]).LoraConfig(r=2, alpha=4),
                       model_cfg())
    return RefStudent(model=model, train_cfg=train_cfg(), total_steps=10,
                      params=RefStudent.Params(**params), context=context(tokenizer),
                      teacher=teacher_model)


def test_kl_is_zero_when_student_equals_teacher_and_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, -100]])
    assert distillation_kl(logits, logits, labels, 2.0).item() == pytest.approx(0.0, abs=1e-7)
    other = torch.randn(2, 5, 7, generator=g)
    mask = labels[:, 1:] != -100
    ps, pt = [torch.softmax(x[:, :-1][mask] / 2.0, -1) for x in (logits, other)]
    hand = (pt * (pt.log() - ps.log())).sum(-1).mean() * 4.0
    assert distillation_kl(logits, other, labels, 2.0).item() == pytest.approx(hand.item(), rel=1e-5)


def test_student_distills_from_a_frozen_teacher(tokenizer):
    base = tiny(tokenizer)
    module = student(tokenizer, base, lambda_kd=1.0, temperature=2.0)
    batch = batch_of(tokenizer, examples()[8:])
    terms = module.objective(batch)
    assert terms["kd"].item() == pytest.approx(0.0, abs=1e-6)  # a zero-initialised LoRA
    assert all(not p.requires_grad for p in module.teacher.parameters())
    trainable = {id(p) for p in module.trainable_parameters()}
    assert not trainable & {id(p) for p in module.teacher.parameters()}
    assert "teacher" not in " ".join(module.state_dict())  # no second copy in checkpoints
    filter_only = student(tokenizer, base, lambda_kd=0.0)
    assert filter_only.teacher is None and set(filter_only.objective(batch)) == {"ce", "loss"}
    with_ce = student(tokenizer, base, lambda_kd=1.0, align_ce_weight=0.5)
    t = with_ce.objective(batch)
    assert t["loss"].item() == pytest.approx(t["ce"].item() + 0.5 * t["align_ce"].item()
                                             + t["kd"].item(), rel=1e-5)


# ================================================================ gradient conflict
def test_gradient_stats_on_hand_vectors():
    user = [torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0])]  # mean (2, 0), noise 1
    stats = gradient_stats(user, torch.tensor([-1.0, 0.0]))
    assert stats["grad_cosine_user_alignment"] == pytest.approx(-1.0)
    assert stats["grad_snr"] == pytest.approx(4.0)
    parts = split_batch({"input_ids": torch.arange(10).view(10, 1)}, 3)
    assert [len(p["input_ids"]) for p in parts] == [3, 3, 3]
    with pytest.raises(ValueError):
        GradientConflict(0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("layer", [-1, 0.5, 1])
def test_teacher_and_student_steps_on_every_tiny_architecture(tokenizer, arch, layer):
    base = tiny(tokenizer, arch)
    module = RefTeacher(model=base, train_cfg=train_cfg(), total_steps=4,
                        params=RefTeacher.Params(layer=layer), context=context(tokenizer))
    batch = batch_of(tokenizer, examples())
    terms = module.objective(batch)
    terms["loss"].backward()
    assert module.layer == resolve_layer(layer, 2)
    assert all(p.grad is not None for p in base.parameters() if p.requires_grad)
    from harness.config import LoraConfig
    model = apply_lora(copy.deepcopy(base), LoraConfig(r=2, alpha=4), model_cfg(arch))
    student = RefStudent(model=model, train_cfg=train_cfg(), total_steps=4,
                         params=RefStudent.Params(), context=context(tokenizer), teacher=base)
    out = student.objective(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["kd"].item() >= 0


def test_filter_counts_what_a_real_filter_gets_wrong():
    """Harmless-but-scary rows it drops, and harmful rows in disguise it keeps."""
    exs = [Example(instruction="a", kind="harmful", meta={"disguised": True}),
           Example(instruction="b", kind="harmful", meta={"disguised": True}),
           Example(instruction="c", kind="harmful"),
           Example(instruction="d", kind="harmless", category="scary"),
           Example(instruction="e", kind="task", meta={"scary": True}),
           Example(instruction="f", kind="task")]
    _, stats = apply_filter(exs, [0.9, -0.5, 0.8, 0.7, -0.2, -0.9], threshold=0.0)
    assert stats["n_disguised_in"] == 2 and stats["disguised_kept"] == 1
    assert stats["n_scary_in"] == 2 and stats["scary_dropped"] == 1
    assert stats["recall"] == pytest.approx(2 / 3)
    _, plain = apply_filter(exs[2:3] + exs[5:], [0.8, -0.9], threshold=0.0)
    assert "n_scary_in" not in plain  # absent where the data has neither


def test_student_budget_does_not_vanish_with_a_small_upload():
    from harness.config import TrainStageConfig
    from harness.training import stage_steps

    ft = TrainStageConfig(lr=1e-3, batch_size=10, epochs=10)
    assert stage_steps(ft, 10) == 10  # 10 identity-shift rows: 10 steps
    assert stage_steps(ft, 10, min_steps=300) == 300
    assert stage_steps(ft, 1000, min_steps=300) == 1000  # a large upload keeps its own
    assert stage_steps(TrainStageConfig(lr=1e-3, batch_size=10, max_steps=7), 1000) == 7


def test_ref_teacher_student_budget_covers_a_small_upload(make_cfg):
    from harness.training import stage_steps

    run = validate(make_cfg("defense=ref_teacher"))
    assert run.defense.finetune.min_steps == 100
    # the toy protocol's default upload keeps its own budget; ten rows get the minimum
    assert stage_steps(run.train.finetune, 1000, 100) == 100  # 94 steps alone
    assert stage_steps(run.train.finetune, 10, 100) == 100
    assert validate(make_cfg("defense=sft")).defense.finetune.min_steps is None
