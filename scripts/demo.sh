#!/usr/bin/env bash
# README Quick start, command 1: installs what is needed (.venv, pip packages, the Debian
# package dataset-fashion-mnist when apt is available) and runs the default demo:
# ReSA pre-training on Fashion-MNIST on the CPU, then the kNN top-1 of the learned
# encoder beside the raw-pixel and randomly initialised baselines.
# Extra arguments go to resa_jax.main, e.g. --config.num_epochs=20.
. "$(dirname "$0")/_setup.sh" requirements.txt
WORKDIR="${WORKDIR:-$ROOT/workdirs/fashion_mnist_demo}"
echo "[demo] training; workdir $WORKDIR (rerun to resume; delete it to start over)"
.venv/bin/python -m resa_jax.main --config=configs/fashion_mnist.py --workdir="$WORKDIR" "$@"
.venv/bin/python - "$WORKDIR/results.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"\nkNN top-1 on the Fashion-MNIST test set (weighted kNN, k={r['knn_k']}):")
print(f"  ReSA encoder after {r['epoch']:.1f} epochs : {r['knn_top1']:.2f}%")
print(f"  randomly initialised encoder    : {r['knn_top1_random_init']:.2f}%")
print(f"  raw pixels                      : {r['knn_top1_raw_pixels']:.2f}%")
print(f"  wall time {r['wall_time_sec'] / 60:.1f} min, {r['images_per_sec']:.0f} images/s; "
      f"plots: {sys.argv[1].rsplit('/', 1)[0]}/training_curves.png")
PY
