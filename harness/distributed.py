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
