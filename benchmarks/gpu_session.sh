#!/usr/bin/env bash
# The one prepared command of a GPU session (the device tool allows 10 minutes per call, 15 per session,
# start-up included: call it with a timeout of ~560 s):
#   bash benchmarks/gpu_session.sh            # results under $OUT (the device tool's folder) or runs/gpu
# In order of priority, each part under its own time limit so that the next one still runs:
#   1. bench_loop.py at notebook 06's real shapes, bf16, GPU memory capped at a T4's: online DPO, SAIL-PP and
#      SAIL-PR, STEPS steps each (skipped steps, torch.compile graphs per run and after which step, peak
#      memory, seconds per step); dynamo's recompilations and graph breaks are logged (TORCH_LOGS);
#   2. the same loop on the T4 precision path (fp32 weights, fp16 autocast with loss scaling), capped at
#      15 GiB: FP16_METHODS, FP16_STEPS steps;
#   3. (optional, SAIL_S > 0) bench_sail.py --model qwen2-0.5b: the step, memory and sampler microbenchmarks;
#   4. (optional, ATTENTION_CHECK=1) the cuDNN attention check, as part 1's first act.
# bench_loop.py rewrites its JSON after every run and starts no run that would end after its part's limit, so
# a part cut short keeps what it measured; every log is kept. Measured on 2026-12-04 (results/gpu/2026-12-04/):
# a run at these shapes takes ~60 s plus ~70 s of compilation when inductor's cache is cold (~25 s warm).
# Smoke test on a CPU (~1 min): SIZE=tiny MODEL=tiny VARIANT=generation_compile=eager-backend bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-runs/gpu}
SIZE=${SIZE:-real}
MODEL=${MODEL:-qwen2-0.5b}
STEPS=${STEPS:-12}                 # evaluations after steps 10 and 12
METHODS=${METHODS:-online-dpo,sail-pp,sail-pr}
VARIANT=${VARIANT:-}               # SAILConfig overrides of every loop run, e.g. generation_compile=eager-backend
                                   # (the CPU smoke test: compiles, and so counts graphs, without a GPU)
LOOP_S=${LOOP_S:-300}
FP16_METHODS=${FP16_METHODS:-online-dpo}
FP16_STEPS=${FP16_STEPS:-12}
FP16_S=${FP16_S:-180}
SAIL_S=${SAIL_S:-0}                # measured on 2026-11-30 (results/gpu/bench_sail.log); 0 = not run
ATTENTION_CHECK=${ATTENTION_CHECK:-0}   # measured on 2026-11-30 (results/gpu/bench_loop.log)
PARALLEL=${PARALLEL:-0}            # 1: part 2 beside part 1, for short device time: graphs, skips and peak memory
                                   # stay per process, seconds (compile and step) are then contended
mkdir -p "$OUT"
export PYTHONPATH=. HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_LOGS=${TORCH_LOGS:-recompiles,graph_breaks}   # each recompilation (the guard that failed), each break
started=$(date +%s)
part() { echo "== $1 ($(( $(date +%s) - started )) s into the session)" | tee -a "$OUT/session.log"; }
check=$([ "$ATTENTION_CHECK" = 1 ] || echo --no-attention-check)

part environment
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn',
torch.backends.cudnn.version(), 'transformers', transformers.__version__, 'peft', peft.__version__)"; } 2>&1 | tee "$OUT/environment.txt"

loop_fp16() {
  part "2. loop, fp16 autocast + fp32 weights (a T4's path), T4 cap: $FP16_METHODS x $FP16_STEPS steps (limit $FP16_S s)"
  timeout "$FP16_S" python benchmarks/bench_loop.py --size "$SIZE" --t4-only --precision fp16 --methods "$FP16_METHODS" \
      --variant "$VARIANT" --steps "$FP16_STEPS" --budget-s $((FP16_S - 15)) --no-attention-check \
      --out "$OUT/bench_loop_fp16.json" > "$OUT/bench_loop_fp16.log" 2>&1
  echo "exit of part 2: $?" | tee -a "$OUT/session.log"
}
if [ "$PARALLEL" = 1 ]; then loop_fp16 & fi

part "1. loop, precision auto (bf16 on a GPU), T4 cap: $METHODS x $STEPS steps (limit $LOOP_S s)"
timeout "$LOOP_S" python benchmarks/bench_loop.py --size "$SIZE" --t4-only --precision auto --methods "$METHODS" \
    --variant "$VARIANT" --steps "$STEPS" --budget-s $((LOOP_S - 15)) $check --out "$OUT/bench_loop.json" \
    > "$OUT/bench_loop.log" 2>&1
echo "exit of part 1: $?" | tee -a "$OUT/session.log"
grep -E "^(method|online-dpo|sail-p|not run|graphs after)" "$OUT/bench_loop.log"

if [ "$PARALLEL" = 1 ]; then wait; else loop_fp16; fi
grep -E "^(method|online-dpo|sail-p|not run|graphs after)" "$OUT/bench_loop_fp16.log"

if [ "$SAIL_S" -gt 0 ]; then
  part "3. bench_sail.py --model $MODEL (limit $SAIL_S s)"
  timeout "$SAIL_S" python benchmarks/bench_sail.py --model "$MODEL" --repeats 3 \
      --out "$OUT/bench_sail.json" 2>&1 | tee "$OUT/bench_sail.log"
  echo "exit ${PIPESTATUS[0]}" | tee -a "$OUT/session.log"
fi
part done
