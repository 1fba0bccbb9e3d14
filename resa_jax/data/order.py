"""The data order: which examples, and which random draws, each global step reads.

Every placement (`resa_jax/data/__init__.py`) and the trainer take these rules from here:

* **Epochs.**  A data epoch is `E = N // B` steps (N examples, global batch B), the
  remainder dropped; fewer than one batch is refused (`epoch_steps`).  The training
  schedule's epoch is `config.steps_per_epoch` when set, else E (`steps_per_epoch`); it
  does not change the data stream.  Global step k reads position `k % E` of epoch
  `k // E` (`locate`), so a run resumed at step k continues the uninterrupted stream.
* **Which examples.**  With the split held on the devices, epoch e visits the examples
  in the order `epoch_order(seed, N, e)`, a permutation of the file order drawn with
  JAX's threefry from (seed, e); batch k is `order[p B : (p + 1) B]` at its position p,
  whatever the number of devices or processes.  On the host (tf.data) the stream is cut
  into `input_shards` readers (`host_readers`), each its own share of the split in its
  own order: a stateless TensorFlow shuffle seeded by (`stream_seed`, epoch) for a
  share held in memory, the files shuffled and a shuffle buffer seeded likewise for a
  streamed one; reader r fills rows [r B / R, (r + 1) B / R) of every batch.  The
  host stream is thus a function of (seed, step, R), R = the process count unless
  `config.input_shards` fixes it.
* **Random draws.**  The views of the example at position i of global batch k are drawn
  from (seed, k, i, view): `views_key(seed, k)` on the devices, a TensorFlow stateless
  seed of (seed, `salt(stream)`, k, i) on the host; never from a counter or a thread.
* **Salts.**  `salt(name)` turns a stream's name into the 31-bit integer folded into the
  seed, which keeps the streams (training order, training views, linear-probe views) and
  the train step's own keys, fold_in(key(seed), step), apart.
* **Evaluation.**  One pass over a split, each process its share, padded to
  `eval_num_batches` batches on every process (padding masked out).

No TensorFlow here; JAX only in `epoch_order` and `views_key`.
"""

from __future__ import annotations

import math
import zlib

import jax
import numpy as np


def salt(name: str) -> int:
  """A stable 31-bit integer for a name (a split, a stream), for seeds."""
  return zlib.crc32(name.encode()) & 0x7FFFFFFF


# Named after the module that introduced them; kept, so that the streams stay the same.
ORDER_SALT = salt('device_input/order')  # the held split's epoch permutation
VIEWS_SALT = salt('device_input/views')  # the views made on the devices
TRAIN_STREAM = 'train'  # the host's training stream (its order and its views)
LINEAR_PROBE_STREAM = 'linear_probe'


def epoch_steps(num_examples: int, batch_size: int, what: str = 'the train split',
                remedy: str = 'lower the batch size') -> int:
  """Steps per data epoch: N // B, the remainder dropped; ValueError (naming `what` and
  `remedy`) when the split holds fewer than one batch."""
  if num_examples < 1:
    raise ValueError(f'{what} has no examples')
  steps = num_examples // batch_size
  if steps < 1:
    raise ValueError(f'{what} has {num_examples} examples, fewer than one batch of '
                     f'{batch_size}: {remedy}')
  return steps


def steps_per_epoch(config, num_examples: int, what: str = 'the train split') -> int:
  """The training schedule's epoch: config.steps_per_epoch if > 0, else the data epoch.
  A split of fewer than one batch is refused either way (it yields no batch)."""
  data_epoch = epoch_steps(num_examples, int(config.batch_size), what)
  return int(config.steps_per_epoch) if config.steps_per_epoch > 0 else data_epoch


def locate(step: int, steps: int) -> tuple[int, int]:
  """(epoch, position in it) of global step `step` in epochs of `steps` steps."""
  return divmod(int(step), int(steps))


def epoch_order(seed: int, num_examples: int, epoch) -> jax.Array:
  """int (N,): the order in which epoch `epoch` visits a split held on the devices, a
  permutation of range(N) drawn from (seed, epoch)."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), ORDER_SALT), epoch)
  return jax.random.permutation(key, num_examples)


def views_key(seed: int, step) -> jax.Array:
  """The key of global step `step`'s views made on the devices."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), VIEWS_SALT), step)


def stream_seed(seed: int, stream: str) -> int:
  """A 31-bit seed for the shuffles of the host's stream `stream` (tf.data, TFDS)."""
  return python_seed(int(seed), salt(stream))


def python_seed(*parts: int) -> int:
  """A 31-bit int seed from a few ints (for TFDS / tf.data shuffles)."""
  return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0]
             & 0x7FFFFFFF)


def num_input_shards(config, process_count: int) -> int:
  """R, the readers the host's training stream is cut into: config.input_shards, or one
  per process (-1).  Checked: a multiple of the process count that divides the batch."""
  shards = int(config.get('input_shards', -1))
  shards = process_count if shards == -1 else shards
  if shards < 1 or shards % process_count or config.batch_size % shards:
    raise ValueError(f'input_shards {shards} must be a positive multiple of the number of '
                     f'processes ({process_count}) that divides the batch size '
                     f'{config.batch_size}')
  return shards


def host_readers(num_shards: int, process_index: int, process_count: int) -> range:
  """The readers this process runs: a contiguous run of R / P, so that their rows are
  this process's rows of the global batch."""
  per_process = num_shards // process_count
  return range(process_index * per_process, (process_index + 1) * per_process)


def eval_num_batches(num_examples: int, batch_size: int, process_count: int) -> int:
  """Batches of one evaluation pass: every process pads its share, ceil(N / P)
  examples at most, to the same number of batches of B / P."""
  share = math.ceil(num_examples / process_count)
  return math.ceil(share / (batch_size // process_count))
