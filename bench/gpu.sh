#!/usr/bin/env bash
# The latency issue's GPU figures in one run on a lent GPU machine (about 6-8 minutes on one
# H200 with 16 CPU cores): time per 512-px frame along a register job's path (multi-start,
# refinement, gate) and time per tracked cine frame. Phantoms are built on the machine's
# CPUs, so nothing but the repository and the carried wheels travels. From the repository
# root, through the device tool (docs/benchmarks.md, "Figures on a GPU"):
#
#   run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=560)
#
# .whl holds the wheels that machine lacks and .whl/stubs two stand-ins (SimpleITK,
# kornia_rs) that the registration path imports but never calls. Figures and logs land in
# $OUT (the device tool's folder) or bench/results/gpu. A smoke run on a CPU machine:
#
#   DEVICE=cpu SIZE=96 SEEDS=1 FRAMES=2 PYTHON=.venv/bin/python bash bench/gpu.sh
set -euo pipefail

DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-512}
SEEDS=${SEEDS:-2}
FRAMES=${FRAMES:-5}
CINE_FRAMES=${CINE_FRAMES:-8}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-bench/results/gpu}
WORK=${WORK:-$(mktemp -d -t xvr-gpu-XXXXXX)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if [ "$DEVICE" != cpu ] && [ -d .whl ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD/.whl/stubs:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

"$PYTHON" - <<'EOF' | tee "$OUT/device.txt"
import os, torch
device = os.environ.get("DEVICE", "cuda")
name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
print(f"torch {torch.__version__} on {name}, {os.cpu_count()} CPUs")
EOF

# Single frames: SEEDS realistic patients x FRAMES frames, one frame at a time on the device.
"$PYTHON" bench/robustness.py --seeds "$SEEDS" --frames "$FRAMES" --size "$SIZE" --large-frames 0 \
    --workers "$(( $(nproc) > 8 ? 8 : $(nproc) ))" --register-workers 1 --device "$DEVICE" \
    --out "$WORK/robustness" 2>&1 | tee "$OUT/robustness.log"
cp "$WORK"/robustness/robustness*.json "$OUT/"

# Cine runs: SEEDS rotating runs of CINE_FRAMES frames, every frame after the first tracked.
"$PYTHON" bench/tracking.py --seeds "$SEEDS" --frames "$CINE_FRAMES" --size "$SIZE" \
    --device "$DEVICE" --out "$WORK/tracking" 2>&1 | tee "$OUT/tracking.log"
cp "$WORK/tracking/tracking.json" "$OUT/"
echo "figures in $OUT"
