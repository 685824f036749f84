#!/usr/bin/env bash
# The device checks in one run (one H100/H200): pruning speed on a Llama-2-7B-shaped model,
# recovery throughput (7B-shaped LoRA, ~1.1B masked full fine-tuning), and the CUDA tests.
# Run from the repository root: bash benchmarks/gpu_check.sh   (logs + JSON go to $OUT when set)
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/prunetune-gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)" | tee -a "$OUT/gpu.txt"
timeout 280 python3 benchmarks/prune_bench.py --device cuda --json "$OUT/prune_bench.json" 2>&1 | tee "$OUT/prune_bench.log"
timeout 200 python3 benchmarks/recover_bench.py --device cuda 2>&1 | tee "$OUT/recover_bench.log"
timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
