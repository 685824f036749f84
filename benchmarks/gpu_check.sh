#!/usr/bin/env bash
# The device checks in one run (one H100/H200). Sections, in order (default: prune stream tests):
#   prune    pruning speed on a Llama-2-7B-shaped model (fp16, 128 x 2048 tokens, 32 blocks), Wanda and
#            SparseGPT, both block schedules (the papers' parallel one and --true_sequential)
#   stream   the larger-than-GPU mode: model and activations in CPU memory, one block on the GPU at a
#            time (4 blocks, both schedules): peak GPU memory
#   recover  recovery throughput (7B-shaped LoRA, ~1.1B masked full fine-tuning)
#   tests    the CUDA tests
# Run from the repository root: bash benchmarks/gpu_check.sh [SECTION ...]   (logs + JSON go to $OUT when set)
# Expected on an H100: prune ~3 min, stream ~1-2 min, recover ~2 min, tests ~30 s. Worst case of the default
# sections (their timeouts): 330 + 200 + 60 s, under a 10-minute device call.
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/prunetune-gpu}; mkdir -p "$OUT"
sections=("$@"); [ ${#sections[@]} -eq 0 ] && sections=(prune stream tests)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)" | tee -a "$OUT/gpu.txt"
for section in "${sections[@]}"; do
  case "$section" in
    prune)   timeout 330 python3 benchmarks/prune_bench.py --device cuda --json "$OUT/prune_bench.json" 2>&1 | tee "$OUT/prune_bench.log" ;;
    stream)  timeout 200 python3 benchmarks/prune_bench.py --device cuda --stream_blocks --layers 4 \
               --json "$OUT/prune_bench_stream.json" 2>&1 | tee "$OUT/prune_bench_stream.log" ;;
    recover) timeout 200 python3 benchmarks/recover_bench.py --device cuda 2>&1 | tee "$OUT/recover_bench.log" ;;
    tests)   timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -15 | tee "$OUT/gpu_tests.log" ;;
    *)       echo "unknown section: $section (accepted: prune stream recover tests)" >&2; exit 2 ;;
  esac
done
