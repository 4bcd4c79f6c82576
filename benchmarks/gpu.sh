#!/usr/bin/env bash
# GPU checks of issue 5 in one call: JAX on the card, ResNet-18 throughput against
# PyTorch on the same card (benchmarks/cnn.py), then the accuracy benchmark on a
# simulated lcls beamtime trained on the GPU (benchmarks/cnn_accuracy.py).
#
#   bash benchmarks/gpu.sh                       # N=8000 patterns, width 64
#   N=400 EPOCHS=2 WIDTH=8 STAGES=accuracy bash benchmarks/gpu.sh  # rehearsal on a CPU
#
# On an H200 the throughput stage takes about 1 minute; simulating, ingesting and
# preprocessing 6000 lcls frames of 512² took about 2.5 minutes on its 16 cores.
# PYTHON picks the interpreter (default python3: on the lent GPU machines, the one
# that holds JAX with CUDA and PyTorch). Logs go to $OUT (default ./gpu-out).
set -uo pipefail
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu-out}
N=${N:-8000}
WIDTH=${WIDTH:-64}
EPOCHS=${EPOCHS:-40}
BATCH=${BATCH:-128}
WORK=${WORK:-/tmp/airysort-gpu}
STAGES=${STAGES:-throughput accuracy}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
start=$(date +%s)
stamp() { echo "== $(( $(date +%s) - start )) s: $*"; }

stamp "devices"
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
$PYTHON -c "import jax, flax, flax.nnx, zarr, dask, xarray, numpy; print('jax', jax.__version__, jax.devices(), '| flax', flax.__version__, '| zarr', zarr.__version__, '| dask', dask.__version__, '| numpy', numpy.__version__)" || exit 1

if [[ " $STAGES " == *" throughput "* ]]; then
  stamp "throughput: ResNet-18 width 64, 128x128, batch 32 and 256"
  $PYTHON benchmarks/cnn.py --batch 32 --steps 20 --rounds 3 2>&1 | tee "$OUT/cnn_b32.txt"
  $PYTHON benchmarks/cnn.py --batch 256 --steps 10 --rounds 3 2>&1 | tee "$OUT/cnn_b256.txt"
fi
[[ " $STAGES " == *" accuracy "* ]] || { stamp "done"; exit 0; }

stamp "simulate $N lcls patterns, ingest, preprocess (CPU workers)"
store=$WORK/beam.zarr
if [ ! -d "$store" ]; then
  JAX_PLATFORMS=cpu $PYTHON -m pipeline.cli.main simulate "$WORK/beam.cxi" --n "$N" --profile lcls --size 512 --seed 7 || exit 1
  JAX_PLATFORMS=cpu $PYTHON -m pipeline.cli.main ingest "$store" "$WORK/beam.cxi" || exit 1
  JAX_PLATFORMS=cpu $PYTHON -m pipeline.cli.main preprocess "$store" --size 128 || exit 1
fi

for fraction in 0.2 0.05; do
  stamp "accuracy, $fraction labelled, width $WIDTH, batch $BATCH, <= $EPOCHS epochs"
  work=$WORK/acc$fraction
  mkdir -p "$work"
  [ -f "$WORK/truth.csv" ] && cp "$WORK/truth.csv" "$work/truth.csv"
  $PYTHON benchmarks/cnn_accuracy.py "$store" --fraction "$fraction" --work "$work" \
    --cluster local-threads --train-option=--width="$WIDTH" --train-option=--epochs="$EPOCHS" \
    --train-option=--batch-size="$BATCH" 2>&1 | grep --line-buffered -v "^\s*$" | tee "$OUT/accuracy_$fraction.txt"
  cp "$work/truth.csv" "$WORK/truth.csv" 2>/dev/null
  cp "$work/scores.json" "$OUT/scores_$fraction.json" 2>/dev/null
done
stamp "done"
