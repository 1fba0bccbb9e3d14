#!/usr/bin/env bash
# One-shot GPU check: the ReSA train step of configs/fake_data_benchmark.py
# (ResNet-50, bfloat16, global batch 256, two 224 views) on one lent GPU.
#
# Run from the repository root on the device machine, carrying the wheels folder:
#   device run, carry ["tmp/wheels"], timeout_s 590:
#     bash experiments/gpu_check.sh
# Prepare the wheels once, here (tmp/ is git-ignored):
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d tmp/wheels \
#     ml-collections==1.1.0 flax==0.12.8 optax==0.2.8
#
# The device machine cannot reach PyPI.  Its image already has jax with the CUDA
# 13 plugin, flax, optax and absl; ml-collections is missing and is installed from
# tmp/wheels, as are flax / optax when the image's cannot be imported.  Only when
# jax sees no GPU does it try `pip install jax[cuda13]`, then `jax[cuda12]`
# (which works only where the machine has network access).
#
# Writes into $OUT: env.txt (versions, nvidia-smi), bench_b256.log (and
# bench_b128.log if batch 256 ran out of memory), bench_vit_small_b256.log, bench_step_results.json and
# RESULTS.md (the "Train step throughput" section rendered with the new row).
# Back here: copy $OUT/bench_step_results.json over experiments/ and run
#   python experiments/bench_step.py --rerender
# Budget: about 9 minutes in all (each benchmark run is capped by `timeout`).
# For a dry run of the script's logic on a CPU (in a copy of the repository, since
# it writes the results files): GPU_CHECK_CPU=1 BENCH_EXTRA='--config.arch=resnet18 ...'.

set -u
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
PY=${PYTHON:-python3}
SITE=/tmp/site
PIP_OPTS=(-q --no-cache-dir --disable-pip-version-check)

has() { PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} "$PY" -c "$1" >/dev/null 2>&1; }
install_wheels() {  # install_wheels PATTERN...: carried wheels into $SITE (no network)
  local files=()
  for pattern in "$@"; do files+=(tmp/wheels/$pattern); done
  "$PY" -m pip install "${PIP_OPTS[@]}" --no-index --no-deps --no-compile --upgrade \
      --target "$SITE" "${files[@]}"
}

{
  echo "== $(date -u +%FT%TZ) $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" --version
} >"$OUT/env.txt" 2>&1

# 1. Packages: a GPU jax first, then the pure-Python ones.
if [ -z "${GPU_CHECK_CPU:-}" ] && ! "$PY" -c "import jax; assert jax.devices('gpu')" >/dev/null 2>&1; then
  echo "jax sees no GPU: trying jax[cuda13], then jax[cuda12]" | tee -a "$OUT/env.txt"
  "$PY" -m pip install "${PIP_OPTS[@]}" --retries 0 --timeout 10 -U "jax[cuda13]" \
    || "$PY" -m pip install "${PIP_OPTS[@]}" --retries 0 --timeout 10 -U "jax[cuda12]" \
    || { echo "no GPU jax could be installed" | tee -a "$OUT/env.txt"; exit 1; }
fi
has "import ml_collections" || install_wheels 'ml_collections-*.whl' || exit 1
has "import flax.linen, optax; optax.tree.norm" \
  || install_wheels 'flax-*.whl' 'optax-*.whl' || exit 1
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
"$PY" - >>"$OUT/env.txt" 2>&1 <<'EOF'
import jax, flax, optax, ml_collections
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__,
      'ml_collections', getattr(ml_collections, '__version__', '?'))
print('devices', jax.devices())
EOF
cat "$OUT/env.txt"

# 2. The benchmark: batch 256, then 128 only if 256 ran out of memory.
run_bench() {  # run_bench BATCH SECONDS
  local log="$OUT/bench_b$1.log"
  set -o pipefail
  timeout "$2" "$PY" experiments/bench_step.py --config=configs/fake_data_benchmark.py \
      --config.batch_size="$1" --steps=20 --warmup=3 --write ${BENCH_EXTRA:-} 2>&1 | tee "$log"
  local rc=$?
  set +o pipefail
  return $rc
}
run_bench 256 330
rc=$?
if [ $rc -ne 0 ] && grep -q -E 'RESOURCE_EXHAUSTED|[Oo]ut of memory|OOM' "$OUT/bench_b256.log"; then
  echo "batch 256 ran out of memory: batch 128 instead"
  run_bench 128 200
  rc=$?
fi
# 3. ViT-S/16 (configs/imagenet_vit_small.py: AdamW, bfloat16), batch 256 on the one
# device, images/s and memory; --noparts: the supervised part is ResNet-only.
set -o pipefail
timeout 150 "$PY" experiments/bench_step.py --config=configs/imagenet_vit_small.py \
    --config.batch_size=256 --steps=10 --warmup=2 --noparts --write ${BENCH_EXTRA:-} 2>&1 \
    | tee "$OUT/bench_vit_small_b256.log" || echo "ViT-S/16 benchmark: exit $?"
set +o pipefail
cp experiments/bench_step_results.json experiments/RESULTS.md "$OUT/" 2>/dev/null || true
echo "gpu_check: exit $rc"
exit $rc
