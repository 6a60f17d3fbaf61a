#!/usr/bin/env bash
# The GPU bench on a machine without network and without hydra: installs the wheels in .wheels/
# (bench/gpu/README.md says how to fetch them), records the versions, then runs every row
# within a 480 s budget. Results: $OUT (the device tool's folder) if set, else bench/gpu.
#   bash bench/gpu/run_on_device.sh            # the device tool: carry [".wheels"], timeout_s 600
#   PYTHON=.venv/bin/python bash bench/gpu/run_on_device.sh --device cpu --tiny   # a dry run here
# Extra arguments go to `python -m harness.bench` and win over the defaults below.
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-bench/gpu}"
budget="${BENCH_BUDGET:-480}"
py="${PYTHON:-python3}"
mkdir -p "$out"
if ! "$py" -c "import hydra, omegaconf" 2>/dev/null; then
    if ! ls .wheels/*.whl >/dev/null 2>&1; then
        echo "hydra-core is not installed and .wheels/ holds no wheels: see bench/gpu/README.md" >&2
        exit 2
    fi
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/bench-site .wheels/*.whl || exit 2
    export PYTHONPATH=/tmp/bench-site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
    WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
{
    "$py" -c "import sys, torch, transformers, lightning, peft, hydra, omegaconf, yaml;
print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda)
print('transformers', transformers.__version__, 'lightning', lightning.__version__, 'peft', peft.__version__)
print('hydra', hydra.__version__, 'omegaconf', omegaconf.__version__)
print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>&1
} > "$out/env.txt" 2>&1
cat "$out/env.txt"
# the bench stops itself at its budget; the outer timeout only catches a kernel that never returns
timeout --signal=INT $((budget + 60)) "$py" -m harness.bench --device cuda --budget "$budget" \
    --threads 8 --out "$out" "$@" 2>&1 | tee "$out/log.txt"
