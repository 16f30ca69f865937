#!/usr/bin/env bash
# STEGO's GPU session in one prepared script (issue 22 item 5): DINO pretraining of the in-domain ViT/2
# (mra_vit_t4_p2) for about MINUTES minutes in bf16 at batch BATCH on every volume of DATA_ROOT (labels never
# read), its teacher weights and curves written to $OUT, then the rotation of benchmarks/ablation_stego.py (each
# case held out once, STEGO trained on the others, clusters mapped by the Dice rule on them) on those weights
# beside the same ViT with random weights (and the baselines in ROT_BASELINES).
#
#   OUT=outputs/gpu_stego bash benchmarks/gpu_stego.sh ../shared/data    # a GPU: ~MINUTES min + the rotation
#   bash benchmarks/gpu_stego.sh --dry-run                               # CPU, tiny phantoms, ~1-2 min (CI)
#
# The number of steps is calibrated first (benchmarks/bench_pretrain.py at the same batch, bf16): max_steps is
# what fits in MINUTES at 85 % of the measured rate, so the learning-rate, temperature and EMA schedules end
# when the time does; max_minutes = MINUTES + 2 stops it regardless.
#
# Under $OUT (8 files at most, what the device tool returns): teacher_backbone.safetensors and spec.json (use as
# model.backbone=mra_vit_t4_p2 model.weights=<that file>), curves.csv and curves.png (pretrain/* against steps:
# loss, teacher entropy, lr, crops/s...), rotation.md and rotation.json (the table), summary.json (device, run
# ids, calibration, steps, seconds per phase) and log.txt (this script's whole output).
#
# Environment: OUT (default outputs/gpu_stego), WORK (scratch: the MLflow store unless MLFLOW_TRACKING_URI is
# set, feature cache, phantoms; default $OUT/../gpu_stego_work), MINUTES (10), BATCH (256), ROT_CASES (held-out
# cases, default every case of DATA_ROOT), ROT_VARIANTS ("dino random"), ROT_SAMPLINGS (none: uniform crops),
# ROT_BASELINES ("percentile gmm"; "" for none), ROT_ARGS (more ablation_stego.py arguments), PYTHON (python3).
# DRY_RUN=1 or --dry-run: CPU, tiny generated phantoms (unless a DATA_ROOT is given), a few steps of everything,
# the dino rows only (tests/test_benchmarks.py runs it).
# The device tool carries at most 64 MiB of data and runs a command for 10 min at most: carry a folder of two
# or three cases (e.g. mra_mni_0656 and 0590) and set MINUTES=4 ROT_BASELINES="".
set -euo pipefail
export PYTHONUNBUFFERED=1
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)  # the project (its code is imported from here)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
DRY=${DRY_RUN:-0}
ARGS=()
for a in "$@"; do
    if [ "$a" = --dry-run ]; then DRY=1; else ARGS+=("$a"); fi
done
DATA_ROOT=${ARGS[0]:-}
PY=${PYTHON:-python3}
OUT=${OUT:-outputs/gpu_stego}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=${WORK:-$OUT/../gpu_stego_work}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$WORK/mlflow.db}
exec > >(tee "$OUT/log.txt") 2>&1

if [ "$DRY" = 1 ]; then
    DEVICE=cpu; ACC=cpu; THREADS=${THREADS:-2}; MINUTES=${MINUTES:-0.05}; BATCH=${BATCH:-4}; CAL_STEPS=1
    PATCH=16; PRE=(augment.n_local=2 augment.global_size=16 augment.local_size=8 slicing.patch_size=16
                   warmup_steps=1 teacher_temp_warmup_steps=1 freeze_last_layer_steps=1 figure_every=0
                   out_dim=256 hidden_dim=64 bottleneck_dim=32 log_every=1)
    ROT=(--patch-size 16 --val-stride 8 --max-steps 4 --max-crops 60 --n-clusters 8)
    ROT_BASELINES=${ROT_BASELINES-percentile}; ROT_VARIANTS=${ROT_VARIANTS:-dino}
    if [ -z "$DATA_ROOT" ]; then  # three tiny phantoms in the layout of a folder of real cases
        DATA_ROOT=$WORK/phantoms
        "$PY" -c "import sys; from stego_core.data.cases import DataConfig, ensure_cases; from stego_core.data.phantom import PhantomConfig; ensure_cases(DataConfig(source='phantom', root=sys.argv[1], phantom=PhantomConfig(n_volumes=3, shape=(48, 48, 24))))" "$DATA_ROOT"
        ROT_CASES=${ROT_CASES-phantom_002}
    fi
else
    DEVICE=cuda; ACC=cuda; THREADS=${THREADS:-8}; MINUTES=${MINUTES:-10}; BATCH=${BATCH:-256}; CAL_STEPS=20
    PATCH=32; PRE=(figure_every=500); ROT=()
    ROT_BASELINES=${ROT_BASELINES-percentile gmm}
    [ -n "$DATA_ROOT" ] || { echo "usage: bash benchmarks/gpu_stego.sh <folder of cases> (or --dry-run)"; exit 2; }
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
DATA_ROOT=$(cd "$DATA_ROOT" && pwd)
# Work from $WORK: MLflow puts a new experiment's artifacts under ./mlruns of the working directory, which must
# not be the project's (every path above is absolute now).
cd "$WORK"
echo "gpu_stego: device $DEVICE, data $DATA_ROOT, $MINUTES min at batch $BATCH, out $OUT, tracking $MLFLOW_TRACKING_URI"

# 1. calibration: crops/s of the pretraining step at this batch (bf16 on the GPU) -> max_steps for MINUTES
T0=$(date +%s)
AMP=(); [ "$DEVICE" = cuda ] && AMP=(--amp)
CAL=$("$PY" "$ROOT/benchmarks/bench_pretrain.py" --device "$DEVICE" "${AMP[@]}" --batch "$BATCH" --steps "$CAL_STEPS")
echo "$CAL"
RATE=$(echo "$CAL" | sed -n 's/^pretrain_crops_per_s=//p')
STEPS=$("$PY" -c "import sys; r, m, b = map(float, sys.argv[1:]); print(max(2, int(0.85 * r * 60 * m / b)))" \
        "$RATE" "$MINUTES" "$BATCH")
STOP=$("$PY" -c "import sys; print(float(sys.argv[1]) + 2)" "$MINUTES")
echo "calibration: $RATE crops/s at batch $BATCH -> max_steps $STEPS (max_minutes $STOP)"

# 2. DINO pretraining through the pretrain entry point (bf16 autocast on the GPU: trainer.precision)
T1=$(date +%s)
PRE_OUT=$("$PY" -m experiments.pretrain data.source=folder "data.root=$DATA_ROOT" backbone=mra_vit_t4_p2 \
          "batch_size=$BATCH" "max_steps=$STEPS" "max_minutes=$STOP" trainer.precision=bf16-mixed \
          "accelerator=$ACC" "slicing.patch_size=$PATCH" progress=false "output=$WORK/pretrain" \
          experiment=gpu-stego "${PRE[@]}")
echo "$PRE_OUT"
RUN=$(echo "$PRE_OUT" | sed -n 's/^run \([0-9a-f]\{32\}\).*/\1/p' | tail -1)
RUN_DIR=$(echo "$PRE_OUT" | sed -n 's/.*output_dir=\([^ ]*\).*/\1/p' | tail -1)
[ -n "$RUN" ] && [ -f "$RUN_DIR/backbone/teacher_backbone.safetensors" ] || { echo "pretraining failed"; exit 1; }
cp "$RUN_DIR/backbone/teacher_backbone.safetensors" "$RUN_DIR/backbone/spec.json" "$OUT/"

# 3. the curves: every pretrain/* metric against steps (CSV and one figure)
"$PY" - "$RUN" "$OUT" <<'PY'
import csv, sys
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

from stego_core.platform import tracking
run_id, out = sys.argv[1], Path(sys.argv[2])
client = tracking.client()
keys = sorted(k for k in client.get_run(run_id).data.metrics if k.startswith(("pretrain/", "probe/")))
history = {k: {m.step: m.value for m in client.get_metric_history(run_id, k)} for k in keys}
steps = sorted({s for h in history.values() for s in h})
with open(out / "curves.csv", "w", newline="") as fh:
    writer = csv.writer(fh)
    writer.writerow(["step", *keys])
    writer.writerows([s, *(history[k].get(s, "") for k in keys)] for s in steps)
shown = [k for k in ("pretrain/loss", "pretrain/teacher_entropy", "pretrain/lr", "pretrain/crops_per_s") if k in history]
fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3), squeeze=False)
for ax, k in zip(axes[0], shown):
    xs = sorted(history[k])
    ax.plot(xs, [history[k][x] for x in xs])
    ax.set_title(k)
    ax.set_xlabel("step")
fig.tight_layout()
fig.savefig(out / "curves.png", dpi=90)
print(f"curves: {len(keys)} metrics over {len(steps)} logged steps -> {out / 'curves.csv'}")
PY

# 4. the rotation on those weights, beside random weights (ablation_stego.py's rotate protocol)
T2=$(date +%s)
CASES=(); [ -n "${ROT_CASES:-}" ] && read -r -a CASES <<< "$ROT_CASES"
read -r -a BASES <<< "${ROT_BASELINES:-}"
read -r -a VARS <<< "${ROT_VARIANTS:-dino random}"
read -r -a SAMP <<< "${ROT_SAMPLINGS:-none}"
read -r -a EXTRA <<< "${ROT_ARGS:-}"
ROT_OUT=$("$PY" "$ROOT/benchmarks/ablation_stego.py" --protocols rotate --real-root "$DATA_ROOT" \
          ${CASES[@]+--rotate-cases "${CASES[@]}"} --weights "$OUT/teacher_backbone.safetensors" \
          --variants "${VARS[@]}" --samplings "${SAMP[@]}" --baselines ${BASES[@]+"${BASES[@]}"} \
          --accelerator "$ACC" --threads "$THREADS" --cache-dir "$WORK/feature_cache" \
          --output "$WORK/ablation" --experiment gpu-stego --write "$WORK/rotation" "${ROT[@]}" \
          ${EXTRA[@]+"${EXTRA[@]}"})
echo "$ROT_OUT"
cp "$WORK/rotation/ablation.md" "$OUT/rotation.md"
cp "$WORK/rotation/ablation.json" "$OUT/rotation.json"
ROT_RUN=$(echo "$ROT_OUT" | sed -n 's/^parent run \([0-9a-f]\{32\}\)$/\1/p' | tail -1)
T3=$(date +%s)

"$PY" - "$OUT" "$RUN" "$ROT_RUN" "$DEVICE" "$RATE" "$STEPS" "$BATCH" "$MINUTES" "$T0" "$T1" "$T2" "$T3" <<'PY'
import json, sys
from pathlib import Path

import torch

from stego_core.platform import tracking
out, run, rot, device, rate, steps, batch, minutes = sys.argv[1:9]
t0, t1, t2, t3 = map(int, sys.argv[9:13])
metrics = tracking.client().get_run(run).data.metrics
summary = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "pretrain_run_id": run,
           "rotation_run_id": rot, "calibration_crops_per_s": float(rate), "batch": int(batch),
           "minutes": float(minutes), "max_steps": int(steps),
           "steps": metrics.get("final/steps"), "crops_per_s": metrics.get("final/crops_per_s"),
           "teacher_entropy_ratio": metrics.get("final/teacher_entropy_ratio"),
           "seconds": {"calibration": t1 - t0, "pretraining": t2 - t1, "rotation": t3 - t2}}
(Path(out) / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary))
PY
echo "gpu_stego: done; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
