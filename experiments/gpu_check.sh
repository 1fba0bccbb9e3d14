#!/usr/bin/env bash
# The one prepared GPU run: at most about 9 minutes on one H100/H200
# whose Python has jax with CUDA, flax, optax, orbax, absl, Pillow, scikit-learn (and
# maybe PyTorch with CUDA), but no TensorFlow, ml-collections or clu, and no network.
#
# Parts, in this order, each capped by `timeout` (a hang costs its cap, not the run):
#   (b) experiments/bench_step.py, configs/fake_data_benchmark.py: ResNet-50, bfloat16,
#       batch 256, two 224 px views; the step alone and with its views made on the device
#       inside the timed step (--device_views): images/s, peak memory;
#   (d) the authors' PyTorch step (experiments/torch_reference_step.py: ResNet-50 +
#       predictor, batch 256, two 224 px views, their fp16 autocast) on the same GPU, when
#       torch with CUDA imports (else skipped), for the ratio ours / theirs;
#   (c) the same as (b) for ViT-S/16 (configs/imagenet_vit_small.py at batch 256);
#   (a) the library's own training command on the CIFAR-10 JPEG snapshot with the views
#       made on the device and the authors' CIFAR recipe (configs/cifar10_jpeg.py:
#       ResNet-18, their CIFAR stem, batch 256), in bfloat16 (GPU_CHECK_DTYPE=float32 for
#       theirs) and with its schedule (num_epochs, warm-up) scaled to the time left:
#       first a calibration, bench_step.py on that config's step with device views, gives
#       its images/s; its results.json holds the momentum encoder's 5-NN Euclidean (the
#       authors' CIFAR metric) and weighted kNN beside raw pixels and the random encoder;
#       then `python -m resa_jax.evaluate --eval=clustering` on its checkpoint (encoding
#       vs projector layers vs embedding).  Stopped by its time limit, the command saves
#       a checkpoint (SIGTERM) and the evaluation adds the kNN of that checkpoint.
# Then one summary table (experiments/gpu_check_report.py).
#
# Prepare once, here, in the checkout that the device tool sends (tmp/ is git-ignored):
#   bash experiments/gpu_check.sh --prepare
# which copies ../shared/datasets/cifar10_jpeg.tar.gz (19 MB; $GPU_CHECK_SNAPSHOT names
# another copy) into tmp/gpu_check/ and downloads the pure-Python wheels the machine lacks
# into tmp/gpu_check/wheels (about 1.1 MB; clu needs absl-py, etils[epath], flax, jax,
# ml-collections, numpy, packaging, typing-extensions and wrapt, ml-collections absl-py
# and PyYAML: all in the machine's image but these two):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d tmp/gpu_check/wheels \
#     ml-collections==1.1.0 clu==0.0.12 flax==0.12.8 optax==0.2.8 filelock==4.3.2
# (flax and optax are installed there only if the image's do not import.)  Then:
#   device run: command "GPU_CHECK_COMMIT=<git rev-parse --short HEAD> bash
#   experiments/gpu_check.sh", carry ["tmp/gpu_check"], timeout_s 600.
# $OUT gets 4 files: gpu_check.log (everything printed), RESULTS_gpu_check.md (the
# RESULTS.md section: `python experiments/gpu_check_report.py record FILE` puts it into
# experiments/RESULTS.md), gpu_check.json (every part's numbers) and gpu_check_files.tar.gz
# (each part's log and JSON, the run's results/history/config and curves, clustering.json
# and clustering.png).
#
# Budget: GPU_CHECK_BUDGET_S (default 525 s) for the whole script; the caps below.
# CPU dry run (tests/test_gpu_check.py): GPU_CHECK_TINY=1 (tiny widths, a few steps, the
# CPU, PyTorch on the CPU), GPU_CHECK_DATA=a small snapshot, OUT and GPU_CHECK_WORK
# outside the repository, GPU_CHECK_BUDGET_S and the GPU_CHECK_T_* caps small.

set -u
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
CARRY=${GPU_CHECK_DIR:-tmp/gpu_check}
DATA=${GPU_CHECK_DATA:-$CARRY/cifar10_jpeg.tar.gz}
WHEELS=$CARRY/wheels

prepare() {
  local snapshot=${GPU_CHECK_SNAPSHOT:-../shared/datasets/cifar10_jpeg.tar.gz}
  mkdir -p "$WHEELS" && install -m 644 "$snapshot" "$CARRY/cifar10_jpeg.tar.gz" || return 1
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHEELS" \
    ml-collections==1.1.0 clu==0.0.12 flax==0.12.8 optax==0.2.8 filelock==4.3.2 || return 1
  du -sh "$CARRY"
}
if [ "${1:-}" = --prepare ]; then prepare; exit $?; fi

OUT=${OUT:-/tmp/gpu_check_out}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check_work}
SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
TINY=${GPU_CHECK_TINY:-}
BUDGET=${GPU_CHECK_BUDGET_S:-525}
DTYPE=${GPU_CHECK_DTYPE:-bfloat16}
COMMIT=${GPU_CHECK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
T_BENCH=${GPU_CHECK_T_BENCH:-140}  # each of (b) and (c)
T_TORCH=${GPU_CHECK_T_TORCH:-60}
T_CALIB=${GPU_CHECK_T_CALIB:-70}
T_TRAIN_MIN=${GPU_CHECK_T_TRAIN_MIN:-120}  # kept for (a) whatever the benchmarks take
T_EVAL=${GPU_CHECK_T_EVAL:-90}
T_END=${GPU_CHECK_T_END:-20}  # the summary and the packing
STEPS=15 WARMUP=3
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3

R50=(--config=configs/fake_data_benchmark.py --config.batch_size=256)
VIT=(--config=configs/imagenet_vit_small.py --config.batch_size=256)
CALIB=(--config=configs/cifar10_jpeg.py --config.dataset=fake --config.fake_image_size=32
       --config.fake_num_classes=10 "--config.dtype=$DTYPE")
TORCH=(--arch resnet50 --predictor --batch 256 --image-size 224 --device cuda --amp float16)
TRAIN=()
BATCH=256 MAX_EPOCHS=1000 FIXED_OVERHEAD=60  # s: start, decoding, baselines, final kNN, results
if [ -n "$TINY" ]; then  # the CPU dry run: the same commands on tiny models
  SMALL=(--config.width_per_group=4 --config.mlp_dim=32 --config.emb_dim=16)
  # ResNet-50 at width 16: its bottlenecks are 16 x 16 / 64 = 4 channels wide.
  R50+=(--config.width_per_group=16 --config.mlp_dim=32 --config.emb_dim=16
        --config.fake_image_size=32 '--config.crops_size=(32,)' --config.batch_size=8)
  VIT+=(--config.arch=vit_mini --config.mlp_dim=32 --config.emb_dim=16
        --config.fake_image_size=32 '--config.crops_size=(32,)' --config.batch_size=8)
  CALIB+=("${SMALL[@]}" --config.batch_size=16)
  TORCH=(--arch resnet50 --predictor --width 4 --batch 8 --image-size 32 --device cpu)
  TRAIN=("${SMALL[@]}" --config.batch_size=16 --config.knn_k=5 --config.log_every_steps=5)
  BATCH=16 MAX_EPOCHS=${GPU_CHECK_MAX_EPOCHS:-2} FIXED_OVERHEAD=5 STEPS=2 WARMUP=1
  export JAX_PLATFORMS=cpu
fi

T0=$SECONDS
left() { echo $((BUDGET - (SECONDS - T0))); }
cap() {  # cap WANT RESERVE: WANT seconds, or what is left after RESERVE if less
  local room=$(($(left) - $2))
  echo $((room < $1 ? room : $1))
}
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$WORK/parts.tsv"; }
run_part() {  # run_part NAME SECONDS COMMAND...: capped by timeout, logged to logs/NAME.log
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  if [ "$limit" -lt 5 ]; then
    record "$name" skipped 0 "$limit" "no time left"
    echo "== $name: skipped, no time left"
    return 1
  fi
  echo "== $name (at most $limit s, $(left) s left): $*"
  timeout -k 15 "$limit" "$@" >"$WORK/logs/$name.log" 2>&1
  rc=$?
  tail -n 3 "$WORK/logs/$name.log" | cut -c1-300 | sed 's/^/   | /'
  record "$name" "$rc" $((SECONDS - start)) "$limit" "$*"
  echo "   $name: exit $rc after $((SECONDS - start)) s"
  return $rc
}
has() { "$PY" -c "$1" >/dev/null 2>&1; }

install_wheels() {  # the carried wheels of what the image lacks, into $SITE (no network)
  local need=()
  has "import ml_collections" || need+=("$WHEELS"/ml_collections-*.whl)
  has "import clu" || need+=("$WHEELS"/clu-*.whl)
  has "import filelock; assert tuple(map(int, filelock.__version__.split('.')[:2])) >= (4, 3)" || need+=("$WHEELS"/filelock-*.whl)
  has "import flax.linen, optax; optax.tree.norm" || need+=("$WHEELS"/flax-*.whl "$WHEELS"/optax-*.whl)
  [ ${#need[@]} -eq 0 ] && return 0
  echo "installing ${need[*]##*/}"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --disable-pip-version-check --target "$SITE" "${need[@]}"
}

benchmarks() {  # (b), (d), (c): the PyTorch step right after ours, the ViT last
  local reserve=$((T_CALIB + T_TRAIN_MIN + T_EVAL + T_END))
  local bench=(experiments/bench_step.py --noparts --device_views --steps=$STEPS
               --warmup=$WARMUP)
  run_part r50 "$(cap "$T_BENCH" "$reserve")" "$PY" "${bench[@]}" "${R50[@]}" \
    "--report=$WORK/r50.json"
  if [ -n "$TINY" ] || has "import torch; assert torch.cuda.is_available()"; then
    run_part torch "$(cap "$T_TORCH" "$reserve")" "$PY" experiments/torch_reference_step.py \
      "${TORCH[@]}" --steps $STEPS --warmup $((WARMUP + 2)) --json "$WORK/torch_r50.json"
  else
    record torch skipped 0 0 "no PyTorch with CUDA on this machine"
    echo "== torch: skipped, no PyTorch with CUDA"
  fi
  run_part vit_s "$(cap "$T_BENCH" "$reserve")" "$PY" "${bench[@]}" "${VIT[@]}" \
    "--report=$WORK/vit_s.json"
}

training() {  # (a): calibration, the training command, the clustering analysis
  run_part calib "$(cap "$T_CALIB" $((T_TRAIN_MIN + T_EVAL + T_END)))" "$PY" \
    experiments/bench_step.py --noparts --device_views --steps=$STEPS --warmup=$WARMUP \
    "${CALIB[@]}" "--report=$WORK/calib.json"
  local limit epochs warmup
  limit=$(cap 100000 $((T_EVAL + T_END)))
  read -r epochs warmup < <("$PY" experiments/gpu_check_report.py epochs \
    --calibration="$WORK/calib.json" --seconds="$limit" --data="$DATA" \
    --schedule="$WORK/schedule.json" --batch_size=$BATCH --max_epochs="$MAX_EPOCHS" \
    --fixed_overhead_s=$FIXED_OVERHEAD)
  echo "   schedule: ${epochs:-?} epochs (warm-up ${warmup:-?}) in at most $limit s"
  [ -n "${epochs:-}" ] || { record train 1 0 0 "no schedule"; return 1; }
  run_part train "$limit" "$PY" -m resa_jax.main --config=configs/cifar10_jpeg.py \
    "--workdir=$WORK/train" --config.augment_on=device "--config.data_dir=$DATA" \
    "--config.dtype=$DTYPE" "--config.num_epochs=$epochs" "--config.warmup_epochs=$warmup" \
    "${TRAIN[@]}"
  local evals=clustering
  [ -f "$WORK/train/results.json" ] || evals=knn,clustering  # stopped early: its checkpoint
  if ls "$WORK/train/checkpoints" 2>/dev/null | grep -q '[0-9]'; then
    run_part clustering "$(cap "$T_EVAL" "$T_END")" "$PY" -m resa_jax.evaluate \
      "--checkpoint=$WORK/train" "--eval=$evals" "--output=$WORK/eval"
  else
    record clustering skipped 0 0 "no checkpoint to evaluate"
  fi
}

check() {
  echo "gpu_check at $COMMIT: budget $BUDGET s${TINY:+ (CPU dry run, tiny widths)}"
  install_wheels || echo "warning: installing the wheels failed"
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  run_part env 60 "$PY" experiments/gpu_check_report.py env "$WORK/env.json" \
    ${TINY:+--dry_run}
  if [ -z "$TINY" ] && ! has "import jax; assert jax.default_backend() == 'gpu'"; then
    record gpu 1 0 0 "jax sees no GPU"
    echo "jax sees no GPU: nothing measured"
  else
    benchmarks
    training
  fi
  echo "== summary ($(left) s of the budget left)"
  "$PY" experiments/gpu_check_report.py summary "--work=$WORK" "--out=$OUT" \
    "--commit=$COMMIT"
  tar -czf "$OUT/gpu_check_files.tar.gz" -C "$WORK" --exclude=checkpoints \
    --exclude='events.out.*' .
  echo "gpu_check: done in $((SECONDS - T0)) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
  awk -F'\t' '$2 != "0" && $2 != "skipped" {bad = 1} END {exit bad}' "$WORK/parts.tsv"
}

mkdir -p "$OUT" || exit 1
[ -e "$DATA" ] && DATA=$(cd "$(dirname "$DATA")" && pwd)/$(basename "$DATA")
rm -rf "$WORK" && mkdir -p "$WORK/logs" || exit 1
set -o pipefail
check 2>&1 | tee "$OUT/gpu_check.log"
