"""Vaccine and Ref-Teacher's teacher on 2 gloo CPU ranks train what one process trains, and
pinned one-process numbers that the DDP fixes must leave bit-identical.

Each run is a real Lightning fit (the pipeline's loader, ``StageData``, with the global batch
split across the ranks). The two-rank run is spawned as in tests/test_distributed.py (its
``free_port``); every process pins one thread, so the pinned values hold on this machine's
kernels (a different CPU vector level may move the last bits: re-pin them there).
"""
import os

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp

from harness.config import TrainStageConfig
from harness.data.collate import IGNORE_INDEX, PadCollator, StageData
from harness.defenses.base import StageContext

from tests.helpers import free_port, tiny_llama

VOCAB, STEPS, GLOBAL_BATCH = 64, 3, 4


class _CharTok:
    """Enough of a tokenizer for ``features``: one id per character, BOS added by hand."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % (VOCAB - 3) for c in text]}

    def __len__(self) -> int:
        return VOCAB


HELD = (["how to hurt", "make a weapon", "steal the car"], ["bake bread", "sing a song"])


def _rows(n: int = 8):
    """Rows of varying length, a 2-token masked prompt, every other row harmful: shuffled
    into global batches of 4, the ranks see unequal token and class counts."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (int(torch.randint(5, 12, (1,), generator=g)),),
                            generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 2 + ids[2:],
                    "harmful": int(i % 3 == 0)})
    return out


def _module(name: str):
    from harness.defenses.ref_teacher import RefTeacher
    from harness.defenses.vaccine import Vaccine

    model = tiny_llama(VOCAB, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=64)
    cfg = TrainStageConfig(lr=1e-2, batch_size=GLOBAL_BATCH, max_steps=STEPS, grad_clip=None)
    if name == "sft":  # the control: CE alone, whose DDP equivalence global_token_mean holds
        from harness.defenses.sft import SFT

        return SFT(model=model, train_cfg=cfg, total_steps=STEPS)
    if name == "vaccine":
        return Vaccine(model=model, train_cfg=cfg, total_steps=STEPS,
                       params=Vaccine.Params(rho=2.0))
    harmful = StageContext(collate=PadCollator(0), extras={"harmful_data": _rows(6)[::-1]})
    if name == "booster":
        from harness.defenses.booster import Booster

        return Booster(model=model, train_cfg=cfg, total_steps=STEPS, context=harmful,
                       params=Booster.Params(lam=5.0, alpha=0.1, harmful_batch_size=4))
    if name == "t_vaccine":  # one of the two layers, resampled every step, probed every 2
        from harness.defenses.t_vaccine import TVaccine

        return TVaccine(model=model, train_cfg=cfg, total_steps=STEPS, context=harmful,
                        params=TVaccine.Params(rho=2.0, sampled_layers=1, resample_every=1,
                                               probe_every=2))
    ctx = StageContext(tokenizer=_CharTok(), extras={"feature_prompts": HELD})
    return RefTeacher(model=model, train_cfg=cfg, total_steps=STEPS, context=ctx,
                      params=RefTeacher.Params(layer=1, lambda_cos=1.0, refresh_every=2))


def _fit(name: str, world: int) -> dict:
    torch.set_num_threads(1)
    module = _module(name)
    losses = []

    class _Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(trainer.callback_metrics["train/loss"]))

    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto",
        max_steps=STEPS, max_epochs=-1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        use_distributed_sampler=False, callbacks=[_Losses()])
    trainer.fit(module, datamodule=StageData(_rows(), GLOBAL_BATCH, 7, PadCollator(0)))
    return {"state": {k: v.detach().clone() for k, v in module.model.state_dict().items()},
            "losses": losses}


def _worker(rank: int, world: int, port: int, name: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      NODE_RANK="0", LOCAL_RANK=str(rank), RANK=str(rank), OMP_NUM_THREADS="1")
    result = _fit(name, world)
    if rank == 0:
        torch.save(result, os.path.join(out_dir, "rank0.pt"))


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _two_ranks(name: str, tmp_path) -> dict:
    mp.start_processes(_worker, args=(2, free_port(), name, str(tmp_path)), nprocs=2,
                       start_method="spawn")
    return torch.load(tmp_path / "rank0.pt")


# max |parameter difference|, 2 ranks against one process, with room over what was measured
TOLERANCE = {"sft": 5e-6, "vaccine": 5e-5, "ref_teacher": 5e-6, "booster": 1.5e-4,
             "t_vaccine": 5e-5}


@pytest.mark.parametrize("name", ["sft", "vaccine", "ref_teacher",
                                  pytest.param("booster", marks=pytest.mark.slow),
                                  pytest.param("t_vaccine", marks=pytest.mark.slow)])
@pytest.mark.slow  # two gloo ranks spawned per method (13 s each)
def test_two_ranks_train_what_one_process_trains(name, tmp_path):
    """Max |parameter difference| after 3 steps (AdamW lr 1e-2, global batch 4 split 2 + 2),
    2 gloo ranks against one process, measured on this machine:
      sft (control, CE alone):                                  1.4e-6
      vaccine:     before the fix (eps normalised per rank) 3.9e-2; after 1.4e-5 to 1.9e-5
      ref_teacher: before the fix (per-rank class means)     3.9e-2; after 9.8e-7
      booster:     harmful rows drawn per rank              1.7e-2; one global draw split
                   over the ranks (global_random_batch)      6.3e-5 (g_h - g_h' is a small
                   difference of two gradients, scaled by lam = 5, before AdamW's first steps)
      t_vaccine:   (layers drawn from (seed, step), rank-independent)  1.6e-5
    The remainder is float reordering (rows padded to other widths, sums split over ranks),
    which Vaccine's second pass through a perturbation of norm 2 on a 32-wide model and
    AdamW's normalised first steps amplify; after one step it is already 1.3e-5, as it is
    after three, so nothing accumulates. test_vaccine_perturbation_of_two_ranks_is_one_process
    checks the perturbation itself to float precision."""
    one = _fit(name, 1)
    two = _two_ranks(name, tmp_path)
    diff = _max_diff(one["state"], two["state"])
    print(name, diff)
    assert diff < TOLERANCE[name], diff


def test_vaccine_perturbation_of_two_ranks_is_one_process():
    """The perturbation of a batch split over two (simulated) ranks, each normalised by the
    squared norms summed over both, is the one-process perturbation to float precision; per
    rank it would have norm sqrt(2) * rho."""
    from harness.defenses.math import vaccine_perturbation

    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, 6, 8, generator=g) for _ in range(3)]  # 3 layers, 4 rows
    one = vaccine_perturbation(grads, rho=2.0)
    halves = [[x[:2] for x in grads], [x[2:] for x in grads]]
    total = sum(sum(x.pow(2).sum() for x in h) for h in halves)
    ranks = [vaccine_perturbation(h, rho=2.0, all_reduce=lambda local: total) for h in halves]
    joined = [torch.cat([ranks[0][i], ranks[1][i]]) for i in range(3)]
    assert max(float((a - b).abs().max()) for a, b in zip(joined, one)) < 1e-7
    per_rank = [vaccine_perturbation(h, rho=2.0) for h in halves]
    norm = torch.sqrt(sum(e.pow(2).sum() for part in per_rank for e in part))
    assert float(norm) == pytest.approx(2.0 * 2 ** 0.5)
    assert float(torch.sqrt(sum(e.pow(2).sum() for e in one))) == pytest.approx(2.0)


def test_cosine_regularizer_of_two_ranks_is_the_one_process_class_mean():
    """Class counts 3/1 on one rank and 1/3 on the other: the average of the per-rank means
    is not the one-process objective; rescaled by the global counts it is."""
    from harness.analysis.refusal import cosine_regularizer

    cos = torch.tensor([0.9, 0.2, -0.4, 0.5, 0.1, -0.8, -0.3, 0.7])
    harmful = torch.tensor([1, 1, 1, 0, 1, 0, 0, 0])
    one = cosine_regularizer(cos, harmful)
    ranks = [(cos[:4], harmful[:4]), (cos[4:], harmful[4:])]
    plain = sum(cosine_regularizer(c, h) for c, h in ranks) / 2
    counts = (harmful.sum(), (1 - harmful).sum())
    fixed = sum(cosine_regularizer(c, h, counts, world=2) for c, h in ranks) / 2
    assert float(one) == pytest.approx(0.8 + 1.025) and float(plain) == pytest.approx(2.0166667)
    assert float(fixed) == pytest.approx(float(one), abs=1e-7)


# one process, 1 thread: the per-step logged loss (pinned on the code before the DDP fixes, on an
# Intel CPU with AMX) and the weights' squared norm after 3 steps (AMD EPYC, AVX-512). Bit-exact
# pins held on one CPU only (a weight hash and the third loss's last bits moved, 2.4e-7 relative),
# so they are compared at a tolerance 40x wider than that and far below a method change's effect
PINNED = {
    "vaccine": ([float.fromhex(x) for x in
                 ("0x1.3184d40000000p+2", "0x1.2941620000000p+2", "0x1.1605260000000p+2")],
                175.49867153692887),
    "ref_teacher": ([float.fromhex(x) for x in
                     ("0x1.9b6e980000000p+2", "0x1.9de6a20000000p+2", "0x1.1e7a5e0000000p+2")],
                    174.5825916055372),
}


@pytest.mark.parametrize("name", ["vaccine", "ref_teacher"])
def test_one_process_numbers_are_pinned(name):
    run = _fit(name, 1)
    losses, sq_norm = PINNED[name]
    assert [float(x) for x in run["losses"]] == pytest.approx(losses, rel=1e-5)
    assert sum(float(run["state"][k].double().pow(2).sum()) for k in run["state"]) == \
        pytest.approx(sq_norm, rel=1e-6)
