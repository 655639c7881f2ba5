#!/usr/bin/env bash
# Every benchmark whose JSON the speed page (docs/speed.md) is made from, then the page itself. Run on a quiet machine
# from the repository root (estimated 9-11 minutes on 2 quiet cores of an AVX2 CPU, from a 1-round run on a loaded
# one; each step's seconds are printed; bf16 and int8 get a reduced run where the CPU lacks their instructions):
#     benchmarks/run_results.sh            # PYTHON=... to choose the interpreter, THREADS=... the threads (default: all)
# The figures go to benchmarks/results/*.json (with the command, machine and instruction sets in each) and
# docs/speed.md; commit both.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1
OUT=benchmarks/results
mkdir -p "$OUT"
threads=()
if [ -n "${THREADS:-}" ]; then threads=(--threads "$THREADS"); fi
# bf16: the full run where the CPU has bf16 matrix instructions; elsewhere PyTorch runs bf16 convs by a slow fallback
# (about 20x float32's time on AVX2) and bf16 matmuls about 100x slower (RepMLPNet's FC3s alone would take minutes),
# so Light only, one batch size, few rounds, no profile: a figure of that machine, not a race. int8 likewise: the
# three models where the CPU has VNNI or AMX, the two smaller ones elsewhere.
if grep -qE 'avx512_bf16|amx_bf16' /proc/cpuinfo; then
    bf16=(--models repmlp_res50_light_224 repmlpnet_t224 --batch-sizes 1 8 32 --rounds 7 --max-rounds 7 --profile
          --runtime eager openvino)
else
    bf16=(--models repmlp_res50_light_224 --batch-sizes 1 --rounds 3 --max-rounds 3 --warmup 1 --runtime eager)
fi
int8_models=(repmlp_fmnist_mlp.fmnist repmlpnet_t224)
if grep -qE 'avx512_vnni|avx_vnni|amx_int8' /proc/cpuinfo; then int8_models+=(repmlp_res50_light_224); fi
MODELS=(repmlp_res50_light_224 repmlp_res50_bottleneck_224 repmlpnet_t224)
bench() { echo "== $*" >&2; SECONDS=0; "$PYTHON" tools/benchmark.py --overwrite "${threads[@]}" "$@"; echo "   ${SECONDS} s" >&2; }
start=$(date +%s)

# float32, eager PyTorch: deploy forms vs resnet50 (channels_last), batch 1/8/32, where the time goes (--profile)
bench --models "${MODELS[@]}" --forms deploy --batch-sizes 1 8 32 --rounds 7 --max-rounds 7 --convert-rounds 0 \
    --profile --json "$OUT/cpu_fp32_eager.json"
# float32 in the graph runtimes users deploy with, batch 8
bench --models repmlp_res50_light_224 repmlpnet_t224 --forms deploy --runtime onnxruntime openvino --batch-sizes 8 \
    --rounds 7 --max-rounds 7 --convert-rounds 0 --no-memory --json "$OUT/cpu_fp32_graph_runtimes.json"
# bf16, eager PyTorch (and OpenVINO's bf16 hint where the CPU runs it)
bench --forms deploy --dtype bf16 "${bf16[@]}" --convert-rounds 0 --no-memory --json "$OUT/cpu_bf16.json"
# int8 against float32 in onnxruntime and PyTorch, batch 8 (the shipped model with its Fashion-MNIST images)
bench --int8 --models "${int8_models[@]}" --batch-sizes 8 --rounds 7 \
    --int8-forms "pytorch fp32" "onnxruntime fp32" "onnxruntime int8 dynamic" "onnxruntime int8 static" \
    --json "$OUT/cpu_int8.json"
# top-1 of the shipped model's deploy form in fp32, bf16 and fp16 (10,000 Fashion-MNIST test images)
echo "== accuracy by dtype" >&2
"$PYTHON" benchmarks/accuracy.py --json "$OUT/fmnist_top1_by_dtype.json"

"$PYTHON" benchmarks/speed_page.py
echo "all done in $(( $(date +%s) - start )) s" >&2
