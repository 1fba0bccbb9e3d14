"""Test set-up: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

_flags = os.environ.get('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in _flags:
  os.environ['XLA_FLAGS'] = (_flags + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# Compile time dominates these tiny models; XLA's heavy optimisations do not pay off.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')

import pathlib  # noqa: E402

import pytest  # noqa: E402

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='session')
def reference_dir() -> pathlib.Path:
  """The folder of reference vectors: $RESA_REFERENCE_DIR or ../shared/reference."""
  path = os.environ.get('RESA_REFERENCE_DIR')
  path = pathlib.Path(path) if path else PROJECT_ROOT.parent / 'shared' / 'reference'
  if not path.is_dir():
    pytest.skip(f'reference vectors not found at {path}')
  return path
