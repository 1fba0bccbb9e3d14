# Sourced by demo.sh and test.sh: Debian data package, virtual environment, pip packages.
# Usage: . scripts/_setup.sh REQUIREMENTS_FILE
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# Fashion-MNIST from Debian (offline-capable); skipped where apt is unavailable.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
  echo "[setup] installing the Debian package dataset-fashion-mnist"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
    || echo "[setup] could not install dataset-fashion-mnist; TFDS will try to download it"
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
