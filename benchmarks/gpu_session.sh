#!/usr/bin/env bash
# The one prepared command of a GPU session (the device tool allows 10 minutes per call, 15 per session):
#   bash benchmarks/gpu_session.sh            # results under $OUT (the device tool's folder) or runs/gpu
# In order of priority, each part under its own time limit so that the next one still runs:
#   1. bench_loop.py at notebook 06's real shapes: the cuDNN attention check, then online DPO, SAIL-PR and
#      SAIL-PP, 20 steps each, GPU memory capped at a T4's (skipped steps, compilations, peak memory, times);
#   2. bench_sail.py --model qwen2-0.5b: the step, memory and sampler microbenchmarks.
# bench_loop.py rewrites its JSON after every run, so a part cut short keeps what it measured; both logs are kept.
# Smoke test on a CPU: SIZE=tiny MODEL=tiny bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-runs/gpu}
SIZE=${SIZE:-real}
MODEL=${MODEL:-qwen2-0.5b}
LOOP_S=${LOOP_S:-380}
SAIL_S=${SAIL_S:-180}
mkdir -p "$OUT"
export PYTHONPATH=. HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn',
torch.backends.cudnn.version(), 'transformers', transformers.__version__, 'peft', peft.__version__)"; } 2>&1 | tee "$OUT/environment.txt"
timeout "$LOOP_S" python benchmarks/bench_loop.py --size "$SIZE" --t4-only --budget-s $((LOOP_S - 100)) \
    --out "$OUT/bench_loop.json" 2>&1 | tee "$OUT/bench_loop.log"
timeout "$SAIL_S" python benchmarks/bench_sail.py --model "$MODEL" --repeats 3 \
    --out "$OUT/bench_sail.json" 2>&1 | tee "$OUT/bench_sail.log"
