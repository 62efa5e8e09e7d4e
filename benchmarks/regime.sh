#!/usr/bin/env bash
# Coherence learning in a regime scaled toward the paper's Table 4 (configs/paper.py,
# setting=regime): a ResNet-18 backbone trained with every label on a disjoint synthetic
# population (setting=pretrain), exported, and the start of every row; then the rows
# (global 100 %; KPN 20/40/100 %; KPN + CL 20/40/100 %) over three seeds, and the report.
# Resumable: finished runs are skipped and an interrupted one resumes, so run it again
# until it ends with the report (ROOT/report/).
#
#   benchmarks/regime.sh [ROOT]          # default workdirs/regime
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-workdirs/regime}
PY=${PYTHON:-.venv/bin/python}
BACKBONE=$ROOT/pretrained_backbone.safetensors
if [ ! -f "$BACKBONE" ]; then
    $PY run.py --config=configs/paper.py:setting=pretrain,arch=resnet18,kpn=0,cl=0 \
        --workdir="$ROOT/pretrain"
    $PY benchmarks/export_backbone.py "$ROOT/pretrain" "$BACKBONE.tmp"
    mv "$BACKBONE.tmp" "$BACKBONE"   # complete or absent: a rerun never starts from half a file
fi
$PY benchmarks/sweep.py --table=regime --seeds=0,1,2 --root="$ROOT" \
    --common="setting=regime,arch=resnet18,init=$BACKBONE"
