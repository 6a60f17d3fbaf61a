"""Several processes: the global-batch sampler, sharded evaluation gathered exactly once (on a
real two-process gloo group), the evaluation device, and the FSDP state-dict export."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from harness.data.collate import GlobalBatchSampler, global_batch_loader
from harness.distributed import (broadcast_from_zero, eval_device, full_state_dict,
                                 gather_shards, shard)
from tests.helpers import free_port, tiny_llama


def _rows(rows):
    return rows


@pytest.mark.parametrize("n,batch", [(103, 8), (96, 32), (1000, 32)])
def test_one_process_draws_what_a_shuffling_loader_draws(n, batch):
    """Artifacts built before the sampler existed stay reproducible: same rows, same steps,
    epoch after epoch."""
    data = list(range(n))
    plain = DataLoader(data, batch_size=batch, shuffle=True, collate_fn=_rows,
                       generator=torch.Generator().manual_seed(7))
    ours = global_batch_loader(data, batch, 7, _rows)
    assert [b for _ in range(3) for b in ours] == [b for _ in range(3) for b in plain]


def test_ranks_split_each_global_step_of_the_one_process_run():
    data = list(range(103))
    one = global_batch_loader(data, 8, 3, _rows)
    single = [b for _ in range(2) for b in one]
    r0, r1 = (global_batch_loader(data, 8, 3, _rows, rank, 2) for rank in (0, 1))
    steps = [(a, b) for _ in range(2) for a, b in zip(r0, r1)]
    assert len(r0) == len(r1) == 13
    for (a, b), whole in zip(steps, single):
        assert sorted(a + b) == sorted(whole) and not set(a) & set(b)
        assert len(a) == len(b) or len(whole) % 2  # halves of a step, the tail split 4/3
    assert len(steps) == len(single)


def test_a_tail_smaller_than_the_ranks_is_dropped_and_the_batch_must_divide():
    gen = torch.Generator().manual_seed(0)
    sampler = GlobalBatchSampler(9, 4, gen, rank=1, world=4)  # steps of 4, 4 and a tail of 1
    assert len(sampler) == 2 and [len(b) for b in sampler] == [1, 1]
    with pytest.raises(ValueError, match="batch_size=6 is the global batch; it must divide by "
                                         "the 4 training processes"):
        GlobalBatchSampler(10, 6, gen, rank=0, world=4)


def _gather_worker(rank: int, world: int, port: int, n: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        items = [f"prompt-{i}" for i in range(n)]
        mine = shard(items, rank, world)
        answers = [f"answer to {p} from rank {rank}" for p in mine]
        gathered = gather_shards(answers, n, rank, world)
        told = broadcast_from_zero({"openings": ["Sure"]} if rank == 0 else None, world)
        doubled = "no error"
        try:  # rank 0 sends its first item twice: the gather must refuse it
            gather_shards(answers + answers[:1] if rank == 0 else answers, n, rank, world)
        except RuntimeError as err:
            doubled = str(err)
        torch.save({"mine": len(mine), "gathered": gathered, "told": told, "doubled": doubled},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two gloo ranks (12 s)
def test_sharded_generation_is_gathered_in_order_each_prompt_exactly_once(tmp_path):
    """101 prompts on 2 ranks: 51 + 50, nothing padded (Lightning's validation sampler would
    show one prompt twice), back in input order on every rank."""
    n, world = 101, 2
    mp.start_processes(_gather_worker, args=(world, free_port(), n, str(tmp_path)),
                       nprocs=world, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert [r["mine"] for r in results] == [51, 50]
    expected = [f"answer to prompt-{i} from rank {i % 2}" for i in range(n)]
    for r in results:
        assert r["gathered"] == expected
        assert r["told"] == {"openings": ["Sure"]}
        assert r["doubled"] == ("gathered evaluation from 2 ranks has 102 outputs for 101 "
                                "items; missing [], extra or doubled [102]")


def test_one_process_gather_is_the_identity():
    assert gather_shards(["a", "b"], 2, 0, 1) == ["a", "b"]
    assert shard(list(range(7)), 1, 3) == [1, 4]
    assert broadcast_from_zero(5, 1) == 5


class _Trainer:
    def __init__(self, accelerator):
        self.accelerator = accelerator


def test_evaluation_runs_where_training_runs():
    assert eval_device(_Trainer("cpu")) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert eval_device(_Trainer("auto")) == torch.device("cpu")
        with pytest.raises(RuntimeError, match="trainer.accelerator=gpu, but torch sees no CUDA"):
            eval_device(_Trainer("gpu"))


def test_full_state_dict_only_gathers_under_fsdp():
    import lightning as L

    assert full_state_dict(L.Trainer(accelerator="cpu", devices=1, logger=False)) is None


def test_fsdp_export_hands_save_pretrained_the_peft_models_own_keys(tmp_path, monkeypatch):
    """Lightning gathers the whole LightningModule under FSDP (keys ``model.<...>``); the
    adapter saved from it must equal the adapter saved from the unsharded model. (FSDP itself
    needs a GPU: torch refuses a CPU-only device, so the gather is Lightning's, not run here.)"""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from harness.config import TrainStageConfig
    from harness.defenses.sft import SFT

    model = get_peft_model(tiny_llama(64, num_attention_heads=4, num_key_value_heads=4),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian"))
    module = SFT(model=model, train_cfg=TrainStageConfig(), total_steps=1)
    strategy = FSDPStrategy()
    monkeypatch.setattr(strategy, "lightning_module_state_dict", module.state_dict)
    state = full_state_dict(SimpleNamespace(strategy=strategy))
    assert set(state) == set(model.state_dict())
    model.save_pretrained(tmp_path / "gathered", state_dict=state)
    model.save_pretrained(tmp_path / "direct")
    gathered, direct = (load_file(tmp_path / d / "adapter_model.safetensors")
                        for d in ("gathered", "direct"))
    assert set(gathered) == set(direct) and len(direct) == 2 * 7 * 2  # A, B x 7 linears x 2 layers
    assert all(torch.equal(gathered[k], direct[k]) for k in direct)


def test_precision_is_in_the_training_keys_and_the_process_count_is_not(make_cfg):
    from harness.validation import validate
    from harness.keys import stage_keys
    from harness.pipeline import Pipeline

    def keys(*overrides):
        return stage_keys(Pipeline(validate(make_cfg(*overrides)), ".").inputs)

    fp32, ddp, bf16 = keys(), keys("trainer=ddp_cpu"), keys("trainer.precision=bf16-mixed")
    assert fp32 == ddp  # two processes train what one does (tests/test_end_to_end.py)
    for stage in ("base", "align", "finetune"):
        assert bf16[stage] != fp32[stage], stage
    assert bf16["tokenizer"] == fp32["tokenizer"]


def test_a_global_batch_that_does_not_split_across_the_devices_fails_at_start_up(make_cfg):
    from harness.config import ConfigError
    from harness.validation import training_processes, validate

    run = validate(make_cfg("trainer=ddp_cpu"))
    assert training_processes(run.trainer) == 2
    # Vaccine's batch of 5 on 2 processes: named before anything loads
    with pytest.raises(ConfigError, match=r"train.align.batch_size: 5 is the global batch, split "
                                          r"across the 2 training processes \(trainer.devices=2 "
                                          r"x trainer.num_nodes=1\); give a multiple of 2"):
        validate(make_cfg("trainer=ddp_cpu", "protocol=toy_vaccine", "train.align.batch_size=5"))
    assert training_processes(validate(make_cfg("trainer=ddp_cpu", "trainer.num_nodes=2"))
                              .trainer) == 4
    if not torch.cuda.is_available():  # every GPU of the node: counted where there are some
        assert training_processes(validate(make_cfg("trainer=ddp", "model=llama2_7b"))
                                  .trainer) is None
