"""What a CPU result depends on besides the seed: the torch thread count and the CPU's kernels.

Float reductions are split across threads, and torch picks its vector kernels (AVX2, AVX512,
AMX) from the CPU, so the same seed gives other numbers at another thread count or on another
instruction set; 800 base steps amplify the difference. A run pins its thread count
(``torch_threads``) and records both in its provenance, so a number can be traced to what made it.
"""
from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path


def pin_threads(threads: int) -> int:
    """Set torch's intra-op thread count (0: keep torch's default); return the count in force."""
    import torch

    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


@lru_cache(maxsize=1)
def cpu_info() -> dict[str, str]:
    """The CPU's model name and the vector-instruction level torch dispatches to on it."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_model": model, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
