"""Vaccine and Ref-Teacher's teacher on 2 gloo CPU ranks train what one process trains, and
pinned one-process numbers that the DDP fixes must leave bit-identical.

Each run is a real Lightning fit (the pipeline's loader, ``StageData``, with the global batch
split across the ranks). The two-rank run is spawned as in tests/test_distributed.py (its
``_free_port``); every process pins one thread, so the pinned values hold on this machine's
kernels (a different CPU vector level may move the last bits: re-pin them there).
"""
import hashlib
import os

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp

from harness.config import TrainStageConfig
from harness.data.collate import IGNORE_INDEX, PadCollator, StageData
from harness.defenses.base import StageContext

from test_distributed import _free_port

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
    from transformers import LlamaConfig, LlamaForCausalLM

    from harness.defenses.ref_teacher import RefTeacher
    from harness.defenses.vaccine import Vaccine

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64))
    cfg = TrainStageConfig(lr=1e-2, batch_size=GLOBAL_BATCH, max_steps=STEPS, grad_clip=None)
    if name == "vaccine":
        return Vaccine(model=model, train_cfg=cfg, total_steps=STEPS,
                       params=Vaccine.Params(rho=2.0))
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
    mp.start_processes(_worker, args=(2, _free_port(), name, str(tmp_path)), nprocs=2,
                       start_method="spawn")
    return torch.load(tmp_path / "rank0.pt")


@pytest.mark.parametrize("name", ["vaccine", "ref_teacher"])
def test_two_ranks_train_what_one_process_trains(name, tmp_path):
    """Max |parameter difference| after 3 steps (lr 1e-2, global batch 4 split 2 + 2), 2 gloo
    ranks against one process, measured on this machine:
      vaccine:     before the fix (eps normalised per rank) 3.7e-3; after 4.5e-7
      ref_teacher: before the fix (per-rank class means)     1.4e-2; after 5.4e-7
    The remainder is float reordering (rows padded to other widths, sums split over ranks)."""
    one = _fit(name, 1)
    two = _two_ranks(name, tmp_path)
    diff = _max_diff(one["state"], two["state"])
    assert diff < 5e-6, diff


# one process, 1 thread: the per-step logged loss and a hash of every weight's bytes after 3 steps, pinned on
# the code before the DDP fixes (the fixes leave the one-process path untouched)
PINNED = {
    "vaccine": (["0x1.3184d40000000p+2", "0x1.2941620000000p+2", "0x1.1605260000000p+2"],
                "1cad5b721f2173ca"),
    "ref_teacher": (["0x1.9b6e980000000p+2", "0x1.9de6a20000000p+2", "0x1.1e7a5e0000000p+2"],
                    "f7e6efb7cd5026d7"),
}


@pytest.mark.parametrize("name", ["vaccine", "ref_teacher"])
def test_one_process_numbers_are_pinned(name):
    run = _fit(name, 1)
    digest = hashlib.sha256(b"".join(run["state"][k].numpy().tobytes()
                                     for k in sorted(run["state"]))).hexdigest()[:16]
    got = ([x.hex() for x in run["losses"]], digest)
    assert got == PINNED[name]
