#!/usr/bin/env bash
# The study's runs, one after another, seed 0 (about 30 minutes on one core). Then:
#   python experiments/toy_filter_adaptive/table.py multirun/toy_filter_adaptive > experiments/toy_filter_adaptive/table.md
#   python -m harness.report multirun/toy_filter_adaptive --axis attack --out experiments/toy_filter_adaptive/report
set -u
cd "$(git rev-parse --show-toplevel)"
export OMP_NUM_THREADS=1 PYTHONPATH=.
D=multirun/toy_filter_adaptive
mkdir -p "$D"
run() { dir=$1; shift
  .venv/bin/python -m harness seed=0 logger=none trainer.enable_progress_bar=false \
    hydra.run.dir=$D/$dir "$@" > "$D/$(echo $dir | tr / _).log" 2>&1
  echo "$(date -u +%FT%TZ) $dir rc=$?" >> "$D/done.log"; }
RT="defense=ref_teacher"
FA="attack=filter_adaptive"
run ref_teacher/p0.1/m0 $RT attack.p=0.1 $FA attack.search.suffix_tokens=0
run ref_teacher/p0.1/m1_steps0 $RT attack.p=0.1 $FA attack.search.suffix_tokens=1 attack.search.steps=0
run ref_teacher/p0.1/m1_steps5 $RT attack.p=0.1 $FA attack.search.suffix_tokens=1 attack.search.steps=5
run ref_teacher/p0.1/filter_evasion $RT attack.p=0.1 attack=filter_evasion
run ref_teacher/p0.1/m8_steps20 $RT attack.p=0.1 $FA
run ref_teacher/p0.3/m0 $RT attack.p=0.3 $FA attack.search.suffix_tokens=0
run ref_teacher/p0.3/m1_steps5 $RT attack.p=0.3 $FA attack.search.suffix_tokens=1 attack.search.steps=5
run ref_teacher/p0.3/filter_evasion $RT attack.p=0.3 attack=filter_evasion
# the same filter on an SFT-aligned model (its own R_l at the middle layer), where HS rests on it
SF="defense=sft defense.filter.kind=refusal_feature"
run sft_filter/p0.1/m0 $SF attack.p=0.1 $FA attack.search.suffix_tokens=0
run sft_filter/p0.1/m1_steps5 $SF attack.p=0.1 $FA attack.search.suffix_tokens=1 attack.search.steps=5
