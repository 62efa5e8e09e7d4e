#!/usr/bin/env bash
# The train-step benchmark at the paper's setting on one GPU, kpn-jax vs PyTorch.
#
# ResNet-50 KPN + coherence learning, 320 px, the step of configs/default.py
# (48 labelled + 48 unlabelled images = 96 per step), float32 then bfloat16, train and
# eval steps, kpn-jax (jit) vs the PyTorch reference (eager; torch.compile too with
# WITH_TORCH_COMPILE=1). Prints images/s, the ratio, the step's FLOPs (counted from its
# jaxpr) and the model FLOP utilisation against the GPU's dense peak (TF32 for float32,
# bf16 for bfloat16; known H100/H200/A100 names, else set PEAK_TFLOPS_FLOAT32/_BFLOAT16).
#
# kpn-jax runs with config.model.kernels=auto (flax's nn.Conv on a GPU); KERNELS sets
# another comma list of kernels (kpn_jax/kernels.py), one runner each.
#
# Installs nothing: needs a Python (PYTHON, default python3) that already has jax with
# CUDA, flax, optax, ml_collections, scikit-learn, torch with CUDA and torchvision, and
# this repository importable (run from anywhere; it cds to the repository root).
# 3 min 40 s on an H100 (2026-11-26: compiling ~25-35 s per jax runner, then 3 warm-up +
# 10 timed steps per runner); torch.compile adds about a minute per dtype.
#
#   bash benchmarks/gpu_paper_setting.sh [OUT_DIR]         # results: OUT_DIR/*.json, *.log
set -euo pipefail

PY="${PYTHON:-python3}"
OUT="${1:-${OUT:-/tmp/kpn_gpu_paper_setting}}"
STEP_TIMEOUT="${STEP_TIMEOUT:-280}"   # seconds per dtype, so a hang cannot eat the budget
cd "$(dirname "$0")/.."
mkdir -p "$OUT"

# JAX and PyTorch share the GPU in one process: JAX must not grab 75 % of it up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# jax/jaxlib 0.11.2 on an H100 aborted while compiling a ResNet-18 eval step in XLA's Triton
# GEMM tiling pass ('triton_tiling_propagation.cc:703 Check failed', 2026-11-26; log in
# benchmarks/results/h100_2026-11-26/). With Triton GEMM fusion off, XLA calls cuBLAS for
# the products and every step compiles. Set XLA_FLAGS yourself to override.
export XLA_FLAGS="${XLA_FLAGS---xla_gpu_enable_triton_gemm=false}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{ date -Is; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv \
    || true; nproc; } | tee "$OUT/machine.txt"
"$PY" - <<'EOF' | tee -a "$OUT/machine.txt"
import sys
import jax, torch
gpus = [d for d in jax.devices() if d.platform == "gpu"]
if not gpus or not torch.cuda.is_available():
    sys.exit(f"no GPU for both frameworks: jax {jax.devices()}, torch cuda "
             f"{torch.cuda.is_available()}; this script is for a GPU machine")
print(f"jax {jax.__version__} {gpus[0].device_kind}; torch {torch.__version__} "
      f"{torch.cuda.get_device_name(0)}")
EOF

frameworks="jax,torch"
if [[ "${WITH_TORCH_COMPILE:-0}" == "1" ]]; then frameworks="jax,torch,torch_compile"; fi

for dtype in float32 bfloat16; do
  peak_var="PEAK_TFLOPS_${dtype^^}"
  peak_arg=()
  if [[ -n "${!peak_var:-}" ]]; then peak_arg=(--peak_tflops="${!peak_var}"); fi
  kernels="${KERNELS:-auto}"
  echo "=== $dtype ($frameworks; kpn-jax kernels $kernels)"
  timeout "$STEP_TIMEOUT" "$PY" benchmarks/train_step.py --depth=50 --image_size=320 \
      --batch_size=96 --labeled=48 --dtype="$dtype" --pooling=keypoints --kernels="$kernels" \
      --frameworks="$frameworks" --mode=both --warmup=3 --steps=10 ${peak_arg[@]+"${peak_arg[@]}"} \
      --json="$OUT/paper_${dtype}.json" 2>&1 | tee "$OUT/paper_${dtype}.log" \
    || echo "=== $dtype: failed or timed out (exit ${PIPESTATUS[0]}); see $OUT/paper_${dtype}.log"
done

"$PY" - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print("\nsummary: dtype  mode  runner  images/s  TFLOP/s  MFU")
for path in sorted(out.glob("paper_*.json")):
    report = json.loads(path.read_text())
    for r in report["results"]:
        if "images_per_s" in r:
            print(f"{report['settings']['dtype']:9} {r['mode']:5} {r['name']:16} "
                  f"{r['images_per_s']:9.1f} {r.get('achieved_tflops', float('nan')):8.1f} "
                  f"{r.get('mfu', float('nan')):6.3f}")
EOF
