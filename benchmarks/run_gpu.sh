#!/usr/bin/env bash
# The GPU table: the deploy forms of RepMLP-Res50 Light and Bottleneck and RepMLPNet-T224 against resnet50 (each in its
# fastest layout: channels_last), fp16 and bf16, batch 1/32/128, eager and torch.compile, each candidate's error in
# half precision against its float32 self in the JSON (dtype_max_rel_err). About 10 minutes on one H100. Writes
# benchmarks/results/gpu_{fp16,bf16}.json, then docs/speed.md:
#     benchmarks/run_gpu.sh            # PYTHON=... to choose the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export HF_HUB_OFFLINE=1
OUT=benchmarks/results
mkdir -p "$OUT"
for dtype in fp16 bf16; do
    "$PYTHON" tools/benchmark.py --device cuda --dtype "$dtype" \
        --models repmlp_res50_light_224 repmlp_res50_bottleneck_224 repmlpnet_t224 --forms deploy \
        --runtime eager compile --batch-sizes 1 32 128 --rounds 7 --max-rounds 14 --convert-rounds 0 \
        --overwrite --json "$OUT/gpu_$dtype.json"
done
"$PYTHON" benchmarks/speed_page.py
