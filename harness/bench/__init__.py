"""``make bench``: what the harness and each defense cost, measured side by side in one process.

    python -m harness.bench [--repeats 5] [--steps 16] [--sizes tiny larger] [--out bench]
                            [--finetune-steps 96] [--posthoc-repeats 3]

Rows (each a ratio, so the noise of a shared machine mostly cancels):
  1. harness overhead: the pipeline's SFT step (LightningModule + the Trainer of
     ``training.build_trainer``) against a bare PyTorch loop and against ``transformers.Trainer``;
  2. defense step cost: each method's step against the SFT step with the same trainable weights;
  3. evaluation: batched vs one-prompt-at-a-time greedy generation, and the judge's throughput;
  4. sweep reuse: stage runs of a 5-defense x 5-p sweep, from the pipeline's artifact keys;
  5. peak memory of each training stage (peak RSS over the stage, CPU);
  6. post-hoc stage: each ``posthoc=`` method's wall time against the finetune stage it edits.

A step time is the wall time from the start of step ``warmup`` to the start of step
``warmup + steps``, read by a callback inside each engine, so per-fit set-up is excluded without
differencing two noisy fits. Within a repeat every compared variant runs once, interleaved; the
median over repeats is reported. Torch runs one intra-op thread (``--threads``): on a shared
2-core machine two threads make step times swing several-fold between fits. A missed row 1
target adds a sampled profile of each engine's step; a missed row 2 target adds a torch.profiler
comparison of the method's ops with the SFT step's. Writes ``results.md`` and ``results.json``
under ``--out``.

``--device cuda`` (``make bench-gpu``) or ``--device cpu --tiny`` runs the GPU bench instead
(``harness.bench.gpu``): the pipeline on ``trainer=gpu``, 7B and 1B LoRA step cost, MFU, each
method's step ratio and peak memory, and batched generation, each row capped and written as it
finishes (bench/gpu/README.md).
"""
from __future__ import annotations

import harness  # noqa: F401 - offline environment
from harness.bench.rows import main, run_bench, sweep_counts, to_markdown
from harness.bench.setup import METHOD_ROWS, POSTHOC_METHODS, SIZES, MethodRow

__all__ = ["main", "run_bench", "sweep_counts", "to_markdown", "METHOD_ROWS",
           "POSTHOC_METHODS", "SIZES", "MethodRow"]
