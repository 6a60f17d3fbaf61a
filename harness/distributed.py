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

_DIST_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def global_rank() -> int:
    from lightning.fabric.utilities.rank_zero import _get_rank

    return _get_rank() or 0


def is_rank_zero() -> bool:
    return global_rank() == 0


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
