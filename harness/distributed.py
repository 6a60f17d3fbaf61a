"""Multi-process runs: Lightning DDP under Hydra, and rank-aware side effects.

Lightning's subprocess launcher relaunches rank > 0 with the parent's argv. Under ``-m`` that
argv holds the whole sweep, so the child would run a second sweep of its own (ENV_NOTES: six
sweep dirs, and ranks training at different learning rates). ``patch_ddp_launch`` makes the child
run exactly the parent's job: its overrides, without ``-m``, in the parent's job folder. On
SLURM the ranks come from ``srun`` and nothing is relaunched.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Sequence, TypeVar

T = TypeVar("T")

_DIST_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def global_rank() -> int:
    from lightning.fabric.utilities.rank_zero import _get_rank

    return _get_rank() or 0


def is_rank_zero() -> bool:
    return global_rank() == 0


def process_group() -> tuple[int, int]:
    """(rank, world size) of the live process group; (0, 1) when there is none. A job's
    process group exists once its first distributed ``fit`` has launched the ranks."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Rank ``rank``'s strided share: items rank, rank + world, ... (sizes differ by <= 1)."""
    return list(items[rank::world])


def gather_shards(local: list[T], n: int, rank: int, world: int) -> list[T]:
    """Every rank's ``shard`` results, back in input order, on every rank.

    ``all_gather_object`` takes uneven shards as they are, so nothing is padded or duplicated
    (Lightning's validation sampler pads 101 prompts to 102); the check below makes a dropped or
    doubled item an error rather than a silently wrong metric."""
    if world == 1:
        return list(local)
    import torch.distributed as dist

    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, [(rank + world * j, item) for j, item in enumerate(local)])
    indexed = [pair for part in parts for pair in part]
    seen = sorted(i for i, _ in indexed)
    if seen != list(range(n)):
        missing = sorted(set(range(n)) - set(seen))
        extra = sorted(i for i in set(seen) if i >= n or seen.count(i) > 1)
        raise RuntimeError(f"gathered evaluation from {world} ranks has {len(seen)} outputs for "
                           f"{n} items; missing {missing[:10]}, extra or doubled {extra[:10]}")
    return [item for _, item in sorted(indexed, key=lambda pair: pair[0])]


def broadcast_from_zero(obj: T, world: int) -> T:
    """Rank 0's ``obj`` on every rank."""
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wants_gpu(accelerator: str) -> bool:
    """Whether ``trainer.accelerator`` trains on GPUs (auto: when torch sees one)."""
    import torch

    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def eval_device(trainer_cfg) -> "torch.device":
    """Where this process evaluates: its own GPU when training runs on GPUs, else the CPU.
    Stage outputs load on the CPU; without this a GPU run would generate on the CPU."""
    import torch

    accel = trainer_cfg.accelerator
    if not wants_gpu(accel):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"trainer.accelerator={accel}, but torch sees no CUDA device "
                           f"(torch {torch.__version__}); use trainer=cpu or a CUDA build")
    # Lightning's DDP setup set this process's device (rank by rank, also under srun)
    return torch.device("cuda", torch.cuda.current_device())


def child_command(local_rank: int) -> tuple[list[str], str]:
    """The command that starts rank ``local_rank`` of the current Hydra job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    hc = HydraConfig.get()
    overrides = [o for o in hc.overrides.task if not o.startswith("hydra.")]
    command = [sys.executable, "-m", "harness", *overrides,
               f"hydra.run.dir={hc.runtime.output_dir}",
               f"hydra.job.name=train_ddp_process_{local_rank}", "hydra.output_subdir=null"]
    return command, get_original_cwd()


def patch_ddp_launch() -> None:
    # Patch the pytorch-side module: it imported the function by name, so patching the fabric
    # copy has no effect (ENV_NOTES).
    from lightning.pytorch.strategies.launchers import subprocess_script

    subprocess_script._hydra_subprocess_cmd = child_command


def end_job() -> None:
    """Leave no process group or rank variables behind for the next job of a sweep."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    for key in _DIST_ENV:
        os.environ.pop(key, None)


def fsdp_strategy(model, sharding_strategy: str = "FULL_SHARD"):
    """Lightning FSDP, set up for a transformers model that may carry LoRA: each decoder layer
    (the model's ``_no_split_modules``) is its own FSDP unit, so parameters shard layer by layer;
    ``use_orig_params=True`` lets frozen base weights and trainable adapters share a unit (with
    flat parameters FSDP rejects mixed ``requires_grad``) and keeps the optimizer on the named
    LoRA parameters. Activation checkpointing stays with transformers
    (model.gradient_checkpointing), not FSDP's wrapper, so it is not applied twice."""
    from lightning.pytorch.strategies import FSDPStrategy

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = {type(m) for m in base.modules() if type(m).__name__ in names}
    if not layers:
        raise ValueError(f"trainer.strategy=fsdp: {type(base).__name__} names no decoder layer "
                         "class (_no_split_modules) to wrap")
    return FSDPStrategy(auto_wrap_policy=layers, use_orig_params=True,
                        sharding_strategy=sharding_strategy, state_dict_type="full")


def full_state_dict(trainer) -> "dict[str, Any] | None":
    """After an FSDP fit, the stage model's whole state dict, gathered on rank 0 (on CPU):
    its parameters are sharded flat views, so saving ``module.model`` as it is would write
    each rank's shard. Every rank must call this (it all-gathers). None for other strategies,
    whose model is whole on every rank."""
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(trainer.strategy, FSDPStrategy):
        return None
    full = trainer.strategy.lightning_module_state_dict()
    prefix = "model."  # StageModule.model
    return {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
