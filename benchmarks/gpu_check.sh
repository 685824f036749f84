#!/usr/bin/env bash
# Every GPU speed figure of the README in one command (one H200/H100), by value, each section under its own timeout.
# benchmarks/GPU_CHECK.md says what each section measures, what it serves, and what to carry to the device.
#
#   bash benchmarks/gpu_check.sh                        # all default sections (worst case about 560 s)
#   bash benchmarks/gpu_check.sh prune recover          # chosen sections, in the order given
#   COMMIT=<hash> bash benchmarks/gpu_check.sh          # where the working tree has no .git (the device's copy)
#   SMOKE=1 bash benchmarks/gpu_check.sh                # CPU: every section with tiny shapes (checks the harness)
#
# Sections (seconds = timeout; each script also gets a --budget_s a little under it and ends on its own):
#   env       10  commit, GPU, versions, measured matmul / copy ceilings               (issue 16: the table's header)
#   prune    185  Wanda + SparseGPT, both schedules, 7B shape resident, checks every block  (issue 16 targets 1, 2)
#   recover  120  lora / masked_lora / full throughput + MFU, micro-batch sweep          (issue 16 target 3)
#   sparse24  40  dense fp16 vs 2:4 semi-structured matmuls, layers and model            (issue 16 target 4)
#   stream    50  --compute_device cuda: model in CPU memory, 16 blocks, Wanda (+SparseGPT if time) (target 1)
#   tests     40  pytest -m gpu                                                          (CUDA tests other issues left waiting)
#   precision 15  masked_lora_precision.py --device cuda                                 (masked LoRA's fused forward)
#   full7b    35  full_7b_memory.py: 7B masked full fine-tuning memory (bnb setup skipped without bitsandbytes) (issue 15)
#   profile   25  torch.profiler of 2 pruned blocks and one training step: where the time goes
# Not in the default list: compile (lora with torch.compile'd blocks: its compilation alone can take a minute).
# Worst case of the default list: sum of timeouts 520 s + 3 s kill grace each (27 s) + bookkeeping: about 560 s.
#
# Writes benchmarks/results/<gpu>_<date>_<commit7>/ (RESULTS=... overrides): env.json, sections.tsv, one .log and
# .json per section, gpu_tests.xml, speed_tables.md (benchmarks/speed_tables.py) and gpu_check.log (everything).
# With $OUT set (the device tool), $OUT gets three files, refreshed after every section so a kill loses little:
# <name>.tar.gz (the whole folder), gpu_check.log and speed_tables.md.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 \
       HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
SMOKE=${SMOKE:-0}
DEFAULT_SECTIONS=(env prune recover sparse24 stream tests precision full7b profile)
declare -A LIMIT=([env]=10 [prune]=185 [recover]=120 [sparse24]=40 [stream]=50 [tests]=40 [precision]=15 [full7b]=35
                  [profile]=25 [compile]=150)
if [ "$SMOKE" = 1 ]; then  # CPU, tiny shapes: generous limits, the machine may be shared
  for key in "${!LIMIT[@]}"; do LIMIT[$key]=240; done
fi

commit=$(git rev-parse HEAD 2>/dev/null) || commit=${COMMIT:-unknown}
if [ -n "${COMMIT:-}" ] && [ "$commit" != "$COMMIT" ]; then
  echo "note: COMMIT=$COMMIT given, the working tree's .git says $commit; recording $commit" >&2
fi
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
label=$(echo "${gpu:-cpu}" | tr 'A-Z' 'a-z' | sed -e 's/^nvidia //' -e 's/[^a-z0-9].*//')
[ "$SMOKE" = 1 ] && label="${label}-smoke"
name="${label:-gpu}_$(date -u +%Y%m%d)_${commit:0:7}"
if [ -z "${RESULTS:-}" ]; then
  RESULTS=benchmarks/results/$name
  [ "$SMOKE" = 1 ] && RESULTS=/tmp/prunetune-gpu-check/$name
fi
mkdir -p "$RESULTS"
name=$(basename "$RESULTS")
LOG="$RESULTS/gpu_check.log"
LOGS=("$LOG")
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; LOGS+=("$OUT/gpu_check.log"); fi
[ -f "$RESULTS/sections.tsv" ] || printf 'section\trc\tseconds\ttimeout\n' > "$RESULTS/sections.tsv"

say() { echo "$*" | tee -a "${LOGS[@]}"; }

mirror() {  # the results folder into $OUT: one archive + the log + the tables (the device returns at most 8 files)
  "$PY" benchmarks/speed_tables.py "$RESULTS" > "$RESULTS/speed_tables.md" 2>> "$LOG" || true
  if [ -n "${OUT:-}" ]; then
    tar -czf "$OUT/$name.tar.gz" -C "$(dirname "$RESULTS")" "$name" 2>/dev/null
    cp "$RESULTS/speed_tables.md" "$OUT/speed_tables.md" 2>/dev/null
  fi
  return 0
}

smoke() { [ "$SMOKE" = 1 ]; }
device() { smoke && echo cpu || echo cuda; }

section_command() {  # the command of one section, budget $2 seconds
  local section=$1 budget=$2 R=$RESULTS
  case "$section" in
    env)       echo "$PY benchmarks/gpu_env.py --commit $commit --json $R/env.json" ;;
    prune)     if smoke; then echo "$PY benchmarks/prune_bench.py --smoke --budget_s $budget --json $R/prune_bench.json"
               else echo "$PY benchmarks/prune_bench.py --device cuda --budget_s $budget --json $R/prune_bench.json"; fi ;;
    stream)    if smoke; then echo "$PY benchmarks/prune_bench.py --smoke --stream_blocks --budget_s $budget --json $R/prune_bench_stream.json"
               else echo "$PY benchmarks/prune_bench.py --device cuda --stream_blocks --layers 16 --budget_s $budget --json $R/prune_bench_stream.json"; fi ;;
    recover)   if smoke; then echo "$PY benchmarks/recover_throughput.py --smoke --budget_s $budget --json $R/recover_throughput.json"
               else echo "$PY benchmarks/recover_throughput.py --device cuda --micro_batches 8,16 --steps 4 --skip compile --budget_s $budget --json $R/recover_throughput.json"; fi ;;
    compile)   if smoke; then echo "$PY benchmarks/recover_throughput.py --smoke --skip masked,peft_loop,all_linear,fused_ce,seed,full --budget_s $budget --json $R/recover_compile.json"
               else echo "$PY benchmarks/recover_throughput.py --device cuda --micro_batches ${COMPILE_BATCH:-8} --steps 4 --skip masked,peft_loop,all_linear,fused_ce,seed,full --budget_s $budget --json $R/recover_compile.json"; fi ;;
    sparse24)  if smoke; then echo "$PY benchmarks/semi_structured_bench.py --smoke --budget_s $budget --json $R/semi_structured_bench.json"
               else echo "$PY benchmarks/semi_structured_bench.py --device cuda --budget_s $budget --json $R/semi_structured_bench.json"; fi ;;
    tests)     echo "$PY -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors --junitxml $R/gpu_tests.xml tests" ;;
    precision) if smoke; then echo "$PY benchmarks/masked_lora_precision.py --size 256 --tokens 256 --repeats 1 --seeds 2 --settings fp32 --json $R/masked_lora_precision.json"
               else echo "$PY benchmarks/masked_lora_precision.py --device cuda --json $R/masked_lora_precision.json"; fi ;;
    full7b)    if smoke; then echo "$PY benchmarks/full_7b_memory.py --shape tiny --steps 2 --section_timeout $budget"
               else echo "$PY benchmarks/full_7b_memory.py --steps 4 --section_timeout $budget"; fi ;;
    profile)   if smoke; then echo "$PY benchmarks/profile_block.py --smoke --budget_s $budget --json $R/profile_block.json"
               else echo "$PY benchmarks/profile_block.py --device cuda --nsamples 64 --budget_s $budget --json $R/profile_block.json"; fi ;;
    *)         return 1 ;;
  esac
}

sections=("$@"); [ ${#sections[@]} -eq 0 ] && sections=("${DEFAULT_SECTIONS[@]}")
for section in "${sections[@]}"; do
  if [ -z "${LIMIT[$section]:-}" ]; then
    echo "unknown section: $section (accepted: ${DEFAULT_SECTIONS[*]} compile)" >&2; exit 2
  fi
done

say "gpu_check: commit $commit, ${gpu:-no GPU}, sections: ${sections[*]}, results: $RESULTS"
nvidia-smi > "$RESULTS/nvidia-smi.txt" 2>&1 || echo "nvidia-smi: not available" > "$RESULTS/nvidia-smi.txt"
if [ "$SMOKE" != 1 ] && ! "$PY" -c "import bitsandbytes" 2>/dev/null; then
  say "note: bitsandbytes is not importable: full7b's recommended setup (8-bit AdamW) will be skipped; the default setup still runs (GPU_CHECK.md: carry the wheel)"
fi
total_start=$SECONDS
for section in "${sections[@]}"; do
  limit=${LIMIT[$section]}
  budget=$((limit - 12)); [ $budget -lt 5 ] && budget=5   # the script's own end: imports and the final write fit in the rest
  command=$(section_command "$section" "$budget")
  say ""
  say "=== [$section] $(date -u +%H:%M:%S) timeout ${limit}s: $command"
  start=$SECONDS
  # OUT points at the results folder: scripts that write "$OUT/<name>.json" by themselves land there too
  OUT="$RESULTS" timeout -k 3 "$limit" $command 2>&1 | tee "$RESULTS/$section.log" | tee -a "${LOGS[@]}" > /dev/null
  rc=${PIPESTATUS[0]}
  seconds=$((SECONDS - start))
  printf '%s\t%s\t%s\t%s\n' "$section" "$rc" "$seconds" "$limit" >> "$RESULTS/sections.tsv"
  case $rc in
    0) say "=== [$section] done in ${seconds}s" ;;
    124|137) say "=== [$section] TIMED OUT after ${seconds}s (limit ${limit}s): partial results kept" ;;
    *) say "=== [$section] exit code $rc after ${seconds}s" ;;
  esac
  tail -n 25 "$RESULTS/$section.log"   # the device tool returns the end of the output: keep each section's summary there
  mirror
done
say ""
say "gpu_check: $((SECONDS - total_start)) s in all; results in $RESULTS"
cat "$RESULTS/speed_tables.md"
