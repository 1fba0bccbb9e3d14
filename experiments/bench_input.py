"""Throughput of the training input pipeline of a config, on this machine.

    python experiments/bench_input.py --config=configs/fashion_mnist.py \
        [--steps=50] [--warmup=5] [--host_only] [--png=/tmp/batch.png] [--noresults] \
        [--config.augment_on=device] [--config.batch_size=256 ...]

Builds `resa_jax.data.train_iterator` over all local devices, discards
`warmup` batches (the first one includes loading/decoding the split and tracing the
augmentation graph, reported separately), then times `steps` batches, each blocked
on until its global arrays exist.  Prints examples/s (each example is one source
image turned into V views), per CPU core of the machine, and views/s, and writes them
with the command and the hardware to experiments/RESULTS.md ("Input pipeline
throughput").  --host_only times the host's numpy batches alone (no transfer, no device
work): with augment_on=host the whole tf.data pipeline; with augment_on=device the
host's half of a streamed dataset (`data.host.train_batches(cropped=True)`: the image
decoded, each view cropped, resized and flipped), whatever the dataset.  With --png, also saves a grid of the first
batch (up to 8 examples as rows, their V views as columns, de-normalised) to check the
augmentations by eye.
"""

from __future__ import annotations

import os
import pathlib
import shlex
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import results_md  # noqa: E402
from resa_jax import data, sharding  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 50, 'Timed batches.')
_WARMUP = flags.DEFINE_integer('warmup', 5, 'Untimed batches first (the first loads data).')
_PNG = flags.DEFINE_string('png', None, 'Write a grid of the first batch to this PNG.')
_RESULTS = flags.DEFINE_bool('results', True, 'Record the numbers in experiments/RESULTS.md.')
_HOST_ONLY = flags.DEFINE_bool('host_only', False, "Time only the host's batches (numpy).")


def _iterator(config, mesh, source, placement):
  """The batches to time: the global ones, or (--host_only) the host's numpy ones."""
  if not _HOST_ONLY.value:
    return data.train_iterator(config, mesh, source=source)
  from resa_jax.data import host  # pylint: disable=g-import-not-at-top
  return host.train_batches(config, source, start_step=0, cropped=placement != 'host')


def batch_grid(views, mean, std, max_rows: int = 8, gap: int = 2) -> np.ndarray:
  """uint8 (rows * (S + gap), V * (S + gap), 3): example i's views in row i.

  views: V arrays (B, S_k, S_k, C), normalised; S = max S_k, smaller views are
  top-left aligned on a white cell.
  """
  views = [np.asarray(v, np.float32) * np.asarray(std) + np.asarray(mean) for v in views]
  rows = min(max_rows, views[0].shape[0])
  cell = max(v.shape[1] for v in views) + gap
  grid = np.ones((rows * cell, len(views) * cell, 3), np.float32)
  for col, view in enumerate(views):
    size = view.shape[1]
    for row in range(rows):
      grid[row * cell:row * cell + size, col * cell:col * cell + size] = view[row]  # C=1 broadcasts
  return (np.clip(grid, 0.0, 1.0) * 255).round().astype(np.uint8)


def write_png(path: str, image: np.ndarray) -> None:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.io.write_file(path, tf.io.encode_png(image))


def main(argv):
  del argv
  config = _CONFIG.value
  load_before = os.getloadavg()[0]  # other jobs on the machine slow tf.data down
  mesh = sharding.create_mesh()
  source = data.open_source(config)
  info = data.dataset_info(config, source)
  placement = data.placement(config, source, mesh)

  start = time.perf_counter()
  iterator = _iterator(config, mesh, source, placement)
  batch = jax.block_until_ready(next(iterator))
  first_batch_s = time.perf_counter() - start
  if _PNG.value and not _HOST_ONLY.value:
    write_png(_PNG.value, batch_grid(batch['views'], info.mean, info.std))
    print(f'wrote {_PNG.value}')
  for _ in range(max(0, _WARMUP.value - 1)):
    jax.block_until_ready(next(iterator))

  start = time.perf_counter()
  for _ in range(_STEPS.value):
    batch = jax.block_until_ready(next(iterator))
  elapsed = time.perf_counter() - start

  num_views = len(batch['views'])
  examples_per_s = _STEPS.value * config.batch_size / elapsed
  per_core = examples_per_s / os.cpu_count()
  shapes = ', '.join(f'{v.shape[1]}x{v.shape[2]}x{v.shape[3]}' for v in batch['views'])
  what = placement + (', host part' if _HOST_ONLY.value else '')
  print(f'{examples_per_s:,.1f} examples/s ({per_core:,.1f} per core), '
        f'{examples_per_s * num_views:,.0f} views/s ({what}; {_STEPS.value} batches of '
        f'{config.batch_size}, {num_views} views: {shapes}, {batch["views"][0].dtype}); '
        f'first batch after {first_batch_s:.1f} s')
  if _RESULTS.value:
    command = 'python experiments/bench_input.py ' + shlex.join(
        a for a in sys.argv[1:] if not a.startswith('--png'))
    row = (f'| `{command}` | {results_md.hardware()}, {jax.device_count()} JAX '
           f'{jax.devices()[0].platform} device(s), load average {load_before:.1f} '
           f'at start | {what} | {config.batch_size} | '
           f'{num_views} ({shapes}), {batch["views"][0].dtype} | {examples_per_s:,.1f} | '
           f'{per_core:,.1f} | {examples_per_s * num_views:,.0f} | {first_batch_s:.1f} |')
    record(command, row)


_TITLE = 'Input pipeline throughput'
_INTRO = """Training input (`resa_jax/data/`), measured by
`experiments/bench_input.py`: examples/s counts source images, each turned into all
V views, per core divides by the machine's CPU cores.  The placement (`data.placement`):
'host': tf.data makes every view on the CPU cores; 'held' (rows before 2026-12-06 say
'device'): the views are made by the JAX devices (here the same CPU cores) from the split
held there; 'streamed': the host crops, the devices add the colour; 'host part': only
the host's numpy batches are timed (with 'held' or 'streamed', the image decoded, each
view cropped, resized and flipped, as for a dataset streamed from files).  The first
batch includes loading and decoding the split and tracing the augmentation graph."""
_HEADER = """| command | machine | placement | global batch | views | examples/s | per core | views/s | first batch (s) |
|---|---|---|---|---|---|---|---|---|"""


def record(command: str, row: str) -> None:
  """Adds `row` to the table of the RESULTS.md section, replacing the same command's; the
  section's text above the table is kept."""
  rows, text_above = [], _INTRO
  if results_md.RESULTS.exists():
    text = results_md.RESULTS.read_text()
    marker = f'## {_TITLE}\n'
    if marker in text:
      section = text.split(marker, 1)[1].split('\n## ', 1)[0]
      text_above = section.split(_HEADER.splitlines()[0], 1)[0].strip() or _INTRO
      rows = [line for line in section.splitlines()
              if line.startswith('| `') and f'`{command}`' not in line]
  results_md.write_section(_TITLE, '\n'.join([text_above, '', _HEADER, *rows, row]))


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
