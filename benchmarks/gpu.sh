#!/usr/bin/env bash
# GPU checks of issue 5 in one call: JAX on the card, ResNet-18 throughput against
# PyTorch on the same card (benchmarks/cnn.py), the model and training tests
# (tests/jaxmodels and the CLI's train/predict/explain tests) with the card as JAX's
# default device, then the accuracy benchmark
# (benchmarks/cnn_accuracy.py) trained on the card on the README's `lcls` beamtime
# (4000 patterns of 512², seed 7, 20 % labelled) at each width in WIDTHS, with the
# README's training options otherwise. The `predict` stage (not run by default) times
# `airysort predict` over N_PREDICT patterns on each kind of local cluster.
#
#   bash benchmarks/gpu.sh                                   # on the GPU machine
#   N=200 EPOCHS=1 WIDTHS=8 STAGES=accuracy bash benchmarks/gpu.sh   # rehearsal on a CPU
#
# Stages run in order of priority and each writes its log to $OUT as it goes, so a run
# cut off by the lease keeps what finished. PYTHON picks the interpreter (default
# python3: on the lent GPU machines, the one that holds JAX with CUDA and PyTorch).
set -uo pipefail
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu-out}
N=${N:-4000}
WIDTHS=${WIDTHS:-64 16}
SEEDS=${SEEDS:-0}
EPOCHS=${EPOCHS:-25}
PATIENCE=${PATIENCE:-6}
FRACTION=${FRACTION:-0.2}
WORK=${WORK:-/tmp/airysort-gpu}
STAGES=${STAGES:-throughput tests accuracy}
TEST_SECONDS=${TEST_SECONDS:-240}
TEST_WORKERS=${TEST_WORKERS:-4}
N_PREDICT=${N_PREDICT:-40000}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
start=$(date +%s)
stamp() { echo "== $(( $(date +%s) - start )) s: $*"; }

stamp "devices"
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
$PYTHON -c "import jax, flax, flax.nnx, optax, zarr, dask, xarray, numpy; print('jax', jax.__version__, jax.devices(), '| flax', flax.__version__, '| optax', optax.__version__, '| zarr', zarr.__version__, '| dask', dask.__version__, '| numpy', numpy.__version__)" || exit 1

if [[ " $STAGES " == *" throughput "* ]]; then
  stamp "throughput: ResNet-18 width 64, 128x128, batch 32 and 256"
  $PYTHON benchmarks/cnn.py --batch 32 --steps 20 --rounds 3 2>&1 | tee "$OUT/cnn_b32.txt"
  $PYTHON benchmarks/cnn.py --batch 256 --steps 10 --rounds 3 2>&1 | tee "$OUT/cnn_b256.txt"
fi
if [[ " $STAGES " == *" tests "* ]]; then
  # Tests that force CPU devices (the mesh tests) still do so in their subprocesses.
  stamp "tests on the card (at most $TEST_SECONDS s)"
  # pytest-xdist, where installed, spreads them over TEST_WORKERS processes sharing the card.
  workers=()
  $PYTHON -c "import xdist" 2>/dev/null && workers=(-n "$TEST_WORKERS")
  timeout "$TEST_SECONDS" $PYTHON -m pytest -q -p no:cacheprovider "${workers[@]}" tests/jaxmodels \
    tests/pipeline/test_classify.py tests/pipeline/test_embed.py tests/pipeline/test_allocator.py \
    2>&1 | tee "$OUT/tests.txt" | tail -25
fi
if [[ " $STAGES " == *" predict "* ]]; then
  # What classifying a whole beamtime costs end to end on the card: read `image`
  # from the store, infer, write `prob` and `predicted`, once on each kind of local
  # cluster. The classifier is trained for one epoch only: the rate, not the
  # accuracy, is measured.
  stamp "predict: $N_PREDICT lcls patterns of 128², each local cluster"
  pstore=$WORK/predict.zarr
  if [ ! -d "$pstore" ]; then
    (export JAX_PLATFORMS=cpu
     $PYTHON -m pipeline.cli.main simulate "$WORK/predict.cxi" --n "$N_PREDICT" --profile lcls \
       --size 128 --seed 9 && $PYTHON -m pipeline.cli.main ingest "$pstore" "$WORK/predict.cxi" \
       && $PYTHON -m pipeline.cli.main preprocess "$pstore" --size 128) || exit 1
  fi
  stamp "predict: train a width-16 ResNet-18 for one epoch on the file's labels"
  $PYTHON -m pipeline.cli.main train "$pstore" "$WORK/predict-model" --model cnn --fresh \
    --depth 18 --width 16 --epochs 1 2>&1 | tail -3
  for cluster in local local-threads; do
    stamp "predict --cluster $cluster"
    t0=$(date +%s%N)
    $PYTHON -m pipeline.cli.main predict "$pstore" "$WORK/predict-model" --cluster "$cluster" \
      2>&1 | tail -2
    ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    echo "predict --cluster $cluster: $N_PREDICT patterns in $ms ms," \
      "$(( N_PREDICT * 1000 / ms )) patterns/s (start-up included)" | tee -a "$OUT/predict.txt"
  done
fi
[[ " $STAGES " == *" accuracy "* ]] || { stamp "done"; exit 0; }

stamp "simulate $N lcls patterns of 512², ingest, preprocess to 128² (CPU workers)"
store=$WORK/beam.zarr
if [ ! -d "$store" ]; then
  export JAX_PLATFORMS=cpu
  $PYTHON -m pipeline.cli.main simulate "$WORK/beam.cxi" --n "$N" --profile lcls --size 512 --seed 7 || exit 1
  $PYTHON -m pipeline.cli.main ingest "$store" "$WORK/beam.cxi" || exit 1
  $PYTHON -m pipeline.cli.main preprocess "$store" --size 128 || exit 1
  unset JAX_PLATFORMS
fi

for width in $WIDTHS; do
  for seed in $SEEDS; do
    stamp "accuracy: $FRACTION labelled, width $width, training seed $seed"
    work=$WORK/w${width}s$seed
    mkdir -p "$work"
    [ -f "$WORK/truth.csv" ] && cp "$WORK/truth.csv" "$work/truth.csv"
    $PYTHON benchmarks/cnn_accuracy.py "$store" --fraction "$FRACTION" --work "$work" \
      --cluster local-threads --train-option=--depth=18 --train-option=--width="$width" \
      --train-option=--batch-size=32 --train-option=--learning-rate=2e-3 \
      --train-option=--epochs="$EPOCHS" --train-option=--patience="$PATIENCE" \
      --train-option=--seed="$seed" 2>&1 | grep --line-buffered -v "^\s*$" \
      | tee "$OUT/accuracy_w${width}_s$seed.txt"
    cp "$work/truth.csv" "$WORK/truth.csv" 2>/dev/null
  done
done
stamp "done"
