# Sourced by demo.sh and test.sh: Debian data package, virtual environment, pip packages.
# Usage: . scripts/_setup.sh REQUIREMENTS_FILE
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# Debian packages, skipped where apt is unavailable: Fashion-MNIST (offline-capable), and
# oneDNN, whose convolution kernels resa_jax/models/onednn.py compiles against for the
# CPU (without it the CPU convolutions are XLA's, several times slower).
PACKAGES=""
[ -d /usr/share/datasets/fashion-mnist ] || PACKAGES="$PACKAGES dataset-fashion-mnist"
[ -f /usr/include/oneapi/dnnl/dnnl.hpp ] || PACKAGES="$PACKAGES libdnnl-dev"
if [ -n "$PACKAGES" ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
  echo "[setup] installing the Debian packages$PACKAGES"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq $PACKAGES >/dev/null \
    || echo "[setup] could not install$PACKAGES: Fashion-MNIST from TFDS's download, XLA's CPU convolutions"
fi

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi
echo "[setup] pip install -r $1"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r "$1" -e .
