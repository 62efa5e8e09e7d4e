#!/usr/bin/env bash
# run.py end to end on one accelerator, against the pure train step, same machine, same run.
#
#   benchmarks/gpu_end_to_end.sh [OUT_DIR]          # the paper's setting, float32 then bfloat16
#
# For each dtype: `run.py` trains ResNet-50 KPN + CL at 320 px, 48 labelled + 48 unlabelled
# knees per step, on synthetic knees (built first, not timed), for STEPS steps; then
# benchmarks/train_step.py times the pure train step (ready-made device batches) at the same
# setting. Printed per dtype: run.py's images/s (median over its log windows after the
# first), the pure step's images/s, their ratio, run.py's input-wait fraction (the share of
# wall time the device waited for the host pipeline, and for host-to-device copies), the host
# cores run.py and its data workers used (CPU time / wall time) and their peak resident
# memory (all processes together), both sampled from /proc over the training loop only:
# from its first progress line to its last (not the dataset build, GMM fit, first
# compilation or final evaluation). Goal: ratio >= 0.95, input wait <= 2 %.
#
# Installs nothing: PYTHON (default python3) must have this project installed with jax for
# the accelerator. Settings (environment): STEPS (300), DTYPES ("float32 bfloat16"),
# IMAGE_SIZE (320), LABELED (48), UNLABELED (48), DEPTH (50), WIDTH (64), NUM_TRAIN (4800),
# NUM_EVAL (96), LOG_EVERY (50), PURE_STEPS (10), DATA_WORKERS (-1 = run.py's default: half
# the CPUs, at most 4 per accelerator), DATA_THREADS (0 = default).
# The test suite runs it on the CPU with tiny settings (tests/test_benchmark_cli.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
# The same compiler settings as gpu_paper_setting.sh, for run.py and the pure step alike:
# jaxlib 0.11.2 aborted in XLA's Triton GEMM tiling pass on an H100 (README, known
# limitations). Set XLA_FLAGS yourself to override.
export XLA_FLAGS="${XLA_FLAGS---xla_gpu_enable_triton_gemm=false}"
OUT="${1:-/tmp/kpn_gpu_end_to_end}"
STEPS="${STEPS:-300}"
DTYPES="${DTYPES:-float32 bfloat16}"
IMAGE_SIZE="${IMAGE_SIZE:-320}"
LABELED="${LABELED:-48}"
UNLABELED="${UNLABELED:-48}"
DEPTH="${DEPTH:-50}"
WIDTH="${WIDTH:-64}"
NUM_TRAIN="${NUM_TRAIN:-4800}"
NUM_EVAL="${NUM_EVAL:-96}"
LOG_EVERY="${LOG_EVERY:-50}"
PURE_STEPS="${PURE_STEPS:-10}"
DATA_WORKERS="${DATA_WORKERS:--1}"
DATA_THREADS="${DATA_THREADS:-0}"
mkdir -p "$OUT"

common=(--config=configs/default.py --config.data_dir="$OUT/data"
        --config.synthetic.image_size="$IMAGE_SIZE" --config.synthetic.num_train="$NUM_TRAIN"
        --config.synthetic.num_validation="$NUM_EVAL" --config.synthetic.num_test="$NUM_EVAL"
        --config.synthetic.num_unlabeled="$NUM_TRAIN"
        --config.model.depth="$DEPTH" --config.model.width="$WIDTH"
        --config.batch_size="$LABELED" --config.unlabeled_batch_size="$UNLABELED"
        --config.eval_batch_size="$NUM_EVAL" --config.max_steps="$STEPS"
        --config.log_every_steps="$LOG_EVERY" --config.checkpoint_every_steps=1000000
        --config.eval_every_epochs=1000 --config.num_data_threads="$DATA_THREADS"
        --config.num_data_workers="$DATA_WORKERS")

"$PY" - "$OUT" <<'EOF'
import jax, jaxlib, os, platform, sys
print(f"# {platform.node()}: {os.cpu_count()} CPUs, jax {jax.__version__}, jaxlib "
      f"{jaxlib.__version__}, devices {jax.devices()}", flush=True)
EOF

for dtype in $DTYPES; do
  workdir="$OUT/run_$dtype"
  rm -rf "$workdir"
  echo "=== $dtype: run.py, $STEPS steps" >&2
  # The first call builds the synthetic knees (reused afterwards) and trains; only the
  # training windows enter the images/s.
  "$PY" - "$OUT/usage_$dtype.json" "$PY" run.py "${common[@]}" --config.dtype="$dtype" \
      --workdir="$workdir" <<'EOF'
import json, os, re, subprocess, sys, threading, time
out, command = sys.argv[1], sys.argv[2:]
ticks = os.sysconf("SC_CLK_TCK")
page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20


def tree_usage(root):
    """(CPU seconds, resident MB) of root and its descendants, from /proc."""
    children, stats = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(pid))
        stats[int(pid)] = (int(fields[11]) + int(fields[12]), int(fields[21]))
    cpu, rss, todo = 0, 0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            cpu, rss = cpu + stats[pid][0], rss + stats[pid][1]
        todo += children.get(pid, [])
    return cpu / ticks, rss * page_mb


process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
samples, progress = [], []   # (time, cpu s, rss MB); times of progress lines
done = threading.Event()


def sample():
    while not done.is_set():
        samples.append((time.time(), *tree_usage(process.pid)))
        done.wait(0.5)


sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
for line in process.stdout:
    sys.stdout.write(line)
    if re.match(r"step \d+/\d+", line):
        progress.append(time.time())
process.wait()
done.set()
sampler.join()
loop = [s for s in samples if progress and progress[0] <= s[0] <= progress[-1]]
if len(loop) < 2:  # too short to sample: the whole run
    loop = samples
nan = float("nan")
json.dump({"returncode": process.returncode,
           "loop_wall_s": loop[-1][0] - loop[0][0] if len(loop) > 1 else nan,
           "loop_cpu_s": loop[-1][1] - loop[0][1] if len(loop) > 1 else nan,
           "loop_peak_rss_mb": max(s[2] for s in loop) if loop else nan},
          open(out, "w"))
sys.exit(process.returncode)
EOF
  echo "=== $dtype: pure train step" >&2
  "$PY" benchmarks/train_step.py --frameworks=jax --mode=train --dtype="$dtype" \
      --depth="$DEPTH" --width="$WIDTH" --image_size="$IMAGE_SIZE" \
      --batch_size=$((LABELED + UNLABELED)) --labeled="$LABELED" --warmup=2 \
      --steps="$PURE_STEPS" --json="$OUT/pure_$dtype.json" > "$OUT/pure_$dtype.log" 2>&1
done

"$PY" - "$OUT" $DTYPES <<'EOF'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
print("dtype      run.py img/s  pure step img/s  ratio  input wait  transfer  host cores  "
      "peak host MB")
for dtype in sys.argv[2:]:
    records = [json.loads(line) for line in
               (out / f"run_{dtype}" / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "train/images_per_sec" in r][1:]  # first: compilation
    if not windows:
        windows = [r for r in records if "train/images_per_sec" in r]
    run_rate = statistics.median(r["train/images_per_sec"] for r in windows)
    wait = statistics.mean(r.get("train/input_wait_fraction", float("nan")) for r in windows)
    copy = statistics.mean(r.get("train/transfer_wait_fraction", float("nan")) for r in windows)
    pure = [r for r in json.loads((out / f"pure_{dtype}.json").read_text())["results"]
            if "images_per_s" in r][0]["images_per_s"]
    usage = json.loads((out / f"usage_{dtype}.json").read_text())
    print(f"{dtype:9s} {run_rate:13.1f} {pure:16.1f} {run_rate / pure:6.2f} {100 * wait:10.1f}% "
          f"{100 * copy:8.1f}% {usage['loop_cpu_s'] / usage['loop_wall_s']:11.1f} "
          f"{usage['loop_peak_rss_mb']:13.0f}")
EOF
