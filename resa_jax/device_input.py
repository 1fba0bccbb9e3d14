"""Training views made on the accelerators from a train split held in device memory
(`config.augment_on = 'device'`).

The host path (`host_input.py`) makes every view with tf.data on the CPU cores and
transfers V float views of each example; with the small datasets of one image size
(Fashion-MNIST, CIFAR, STL-10, fake data) an accelerator then waits on those cores.  Here
the decoded train split, uint8 (N, H, W, C), is put on the devices once, and each step is
one jit-compiled program: take the step's B examples, make their V views with
`augment_device.device_views` (the authors' augmentations in JAX), normalise them with
the source's training mean and std, cast them to `config.dtype`.  It yields what the host
path yields, so the train loop does not know which one it reads:

    {'views': (x_0, ..., x_{V-1})}   # x_k: (B, S_k, S_k, C), config.dtype, sharded along B

Determinism and resuming
------------------------
The host path's contract, with JAX's RNG (threefry) in place of TensorFlow's: one seed
gives the two paths different streams, of the same distribution but for the blur
(a true Gaussian here, Pillow's box approximation there: `augment_device.py`).

* *Data order*: epochs of `E = N // B` steps, the remainder dropped (the host path's
  rule); step k is position p = k % E of epoch e = k // E, and takes the examples
  `epoch_order(seed, N, e)[p B : (p + 1) B]`, a permutation of range(N) drawn from
  (config.seed, e) with `jax.random.permutation`.
* *Views*: `device_views` with the key fold_in(views key of config.seed, k); it folds in
  each example's position in the global batch and the view's index.
* So batch k is a function of (config.seed, k, the split's file order) only:
  `start_step=k` continues an interrupted run exactly, and neither the number of devices
  nor of processes changes the stream (up to the float rounding of the resampling sums,
  a few 1e-6), where the host path's order depends on the process count.

Both keys fold a fixed 31-bit salt into key(config.seed) first, which keeps them apart from
the train step's drop-path keys, fold_in(key(seed), step), at any realistic step.

Memory
------
The split is replicated: every device holds all N H W C bytes (CIFAR-10 150 MB,
Fashion-MNIST 47 MB, STL-10 train+unlabelled 2.9 GB), and every process decodes the whole
split on its host first (`datasets.split_arrays`), though it computes only its own
devices' rows of each batch.  Sharding the split over the devices (each gathering its
batch rows from the others) is the next step, for splits larger than one device's memory.
A step's gathered uint8 images exist only inside its program; its V views are its
outputs, as large as the host path's transferred views.

No TensorFlow here: `input_pipeline` hands this module the split as numpy arrays
(`datasets.split_arrays`), or the host's uint8 crops for a streamed dataset.
"""

from __future__ import annotations

import zlib
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from resa_jax import augment_device
from resa_jax import sharding
from resa_jax.views import view_specs


def _salt(name: str) -> int:
  return zlib.crc32(name.encode()) & 0x7FFFFFFF


_ORDER_SALT = _salt('device_input/order')
_VIEWS_SALT = _salt('device_input/views')


def epoch_steps(num_examples: int, batch_size: int, what: str = 'the train split') -> int:
  """Steps per data epoch: N // B, the remainder dropped; the host path's rule too
  (host_input calls it).  `what` names the split in the error."""
  steps = num_examples // batch_size
  if steps < 1:
    raise ValueError(f'{what} has {num_examples} examples, fewer than one batch of '
                     f'{batch_size}')
  return steps


def epoch_order(seed: int, num_examples: int, epoch) -> jax.Array:
  """int (N,): the order in which epoch `epoch` visits the examples, a permutation of
  range(N) drawn from (seed, epoch)."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _ORDER_SALT), epoch)
  return jax.random.permutation(key, num_examples)


def _views_key(seed: int, step):
  """The key of global step `step`'s views."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _VIEWS_SALT), step)


def _make_views_fn(config, mesh, mean: Sequence[float], std: Sequence[float]):
  """jit (images (N, H, W, C) uint8 replicated, order (N,), step, position) -> the V views
  of global step `step`, at `position` in its epoch, each sharded along the batch."""
  batch_size, seed = int(config.batch_size), int(config.seed)
  dtype = jnp.dtype(config.dtype)
  batch_sharding = sharding.batch_sharding(mesh)

  def views_of_step(images, order, step, position):
    indices = jax.lax.dynamic_slice_in_dim(order, position * batch_size, batch_size)  # (B,)
    # Sharding the indices makes each device gather only its own rows of the batch.
    indices = jax.lax.with_sharding_constraint(indices, batch_sharding)
    examples = images[indices]  # (B, H, W, C) uint8
    views = augment_device.device_views(_views_key(seed, step), examples, config, mean=mean,
                                        std=std)
    return tuple(view.astype(dtype) for view in views)

  num_views = len(view_specs(config))
  return jax.jit(views_of_step, out_shardings=(batch_sharding,) * num_views)


def create_device_train_iterator(config, mesh, images: np.ndarray, mean: Sequence[float],
                                 std: Sequence[float], *,
                                 start_step: int = 0) -> Iterator[dict]:
  """Endless iterator of training batches; item i is global step start_step + i.

  images: the whole train split, uint8 (N, H, W, C), C in {1, 3}, the same on every
  process (its file order); mean, std: per channel, of images in [0, 1] (the source's
  training statistics).  Yields {'views': (x_0, ..., x_{V-1})}, x_k a global array
  (config.batch_size, crops_size[g_k], crops_size[g_k], C) in config.dtype, sharded
  along the batch over the mesh (`input_pipeline.create_train_iterator`'s structure).
  The images are put on the devices here, before the first batch is asked for.
  """
  config = config.copy_and_resolve_references()  # the views are traced at the first batch
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f'device input needs uint8 images (N, H, W, C), got {images.dtype} '
                     f'{images.shape}')
  batch_size = int(config.batch_size)
  if batch_size % mesh.size:
    raise ValueError(f'batch size {batch_size} must be a multiple of the number of devices '
                     f'({mesh.size})')
  num_examples = images.shape[0]
  steps = epoch_steps(num_examples, batch_size)
  replicated = sharding.replicated_sharding(mesh)
  on_devices = sharding.place(images, mesh)  # replicated
  order_of_epoch = jax.jit(lambda epoch: epoch_order(int(config.seed), num_examples, epoch),
                           out_shardings=replicated)
  views_fn = _make_views_fn(config, mesh, mean, std)

  def batches():
    step = int(start_step)
    epoch, first = divmod(step, steps)
    while True:
      order = order_of_epoch(epoch)
      for position in range(first, steps):
        yield {'views': views_fn(on_devices, order, step, position)}
        step += 1
      epoch, first = epoch + 1, 0

  return batches()


def create_colour_iterator(config, mesh, cropped: Iterator[dict], mean: Sequence[float],
                           std: Sequence[float], *, start_step: int = 0) -> Iterator[dict]:
  """The device half of the views of a dataset streamed from files: `cropped` yields
  global steps start_step, start_step + 1, ... as {'views': V uint8 global arrays
  (B, S_k, S_k, C), sharded along the batch} whose crop, resize and flip the host made
  (`host_input.train_batches(cropped=True)`); each becomes the train step's view here
  (`augment_device.colour_views`, keyed by (config.seed, step, global index)), in
  config.dtype, with `create_device_train_iterator`'s structure."""
  seed, dtype = int(config.seed), jnp.dtype(config.dtype)
  config = config.copy_and_resolve_references()  # traced at the first batch
  batch_sharding = sharding.batch_sharding(mesh)

  def finish(views, step):
    views = augment_device.colour_views(_views_key(seed, step), views, config, mean=mean,
                                        std=std)
    return tuple(view.astype(dtype) for view in views)

  finish = jax.jit(finish, out_shardings=(batch_sharding,) * len(view_specs(config)))
  for step, batch in enumerate(cropped, start=int(start_step)):
    yield {'views': finish(batch['views'], step)}
