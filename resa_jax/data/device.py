"""Training views made on the accelerators (`config.augment_on = 'device'`): from a train
split held on the devices, or from crops the host made of a split streamed from files.

The host path (`host.py`) makes every view with tf.data on the CPU cores; with a split
small enough to hold, an accelerator then waits on those cores.  Here each step is one
jit-compiled program that yields what the host path yields, so the train loop does not
know which one it reads:

    {'views': (x_0, ..., x_{V-1})}   # x_k: (B, S_k, S_k, C), config.dtype, sharded along B

The split held on the devices
-----------------------------
The decoded train split, uint8 (N, H, W, C), is split over the D devices of the mesh:
device d holds examples [d M, (d + 1) M) of the file order, M = ceil(N / D) (the last
block padded with zeros), about N / D of the split and never the whole.  Each process
decodes only the blocks of its own devices (`Source.rows`), one block at a time, so its
host memory holds one block, not the split.  A step gathers its batch across the
devices: the global batch's example ids are a slice of `order.epoch_order`, the same on
every device; each device takes, from its block, the rows of the batch that it holds
(zeros for the others), and one `psum_scatter` over the data axis sums these (every
row is non-zero on exactly one device, so the sum is that row, exactly) and leaves each
device its B / D rows.  The exchange moves about B H W C bytes per device and step (the
batch's pixels, as uint8 packed in int32 words); its cost is in experiments/RESULTS.md,
'Input on the devices'.  Then `views_jax.device_views` makes the V views of those rows,
keyed by (config.seed, step, global position), normalised with the training statistics.

Batch k is thus a function of (config.seed, k, the split's file order) only: neither the
number of devices nor of processes changes it (up to the float rounding of the
resampling sums, a few 1e-6), and `start_step=k` continues an interrupted run exactly.

Crops from the host
-------------------
For a split streamed from files (images of varying size, or a split over the devices'
memory budget) the host decodes each image once, crops, resizes and flips its views and
ships them as uint8 (`host.train_batches(cropped=True)`); `colour_iterator` adds colour
jitter, grayscale, blur, solarisation and normalisation here, keyed as above.

No TensorFlow here.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from resa_jax import sharding
from resa_jax.data import order
from resa_jax.data import views_jax
from resa_jax.data.sources import Source
from resa_jax.data.views import view_specs


def block_rows(num_examples: int, num_devices: int) -> int:
  """M: the examples one device holds (the last block padded)."""
  return math.ceil(num_examples / num_devices)


def hold_split(source: Source, split: str, num_examples: int, mesh) -> jax.Array:
  """uint8 (D M, H, W, C) on the mesh, device d holding examples [d M, (d + 1) M) of the
  split; each process decodes only its own devices' blocks, one at a time."""
  rows_per_device = block_rows(num_examples, mesh.size)
  shape = (rows_per_device * mesh.size,) + tuple(source.image_shape)

  def block(index):
    start, stop, _ = index[0].indices(shape[0])
    images = np.zeros((stop - start,) + shape[1:], np.uint8)
    if start < num_examples:
      decoded, _ = source.rows(split, start, min(stop, num_examples))
      images[:len(decoded)] = decoded
    return images

  data = NamedSharding(mesh, P(mesh.axis_names[0]))
  return jax.make_array_from_callback(shape, data, block)


def _packed(rows):
  """uint8 (B, H, W, C) -> int32 (B, ceil(H W C / 4)): four pixels a word, so that the
  exchange sums 32-bit integers, which every backend's collectives support."""
  flat = rows.reshape(rows.shape[0], -1)
  flat = jnp.pad(flat, ((0, 0), (0, -flat.shape[1] % 4)))
  return jax.lax.bitcast_convert_type(flat.reshape(rows.shape[0], -1, 4), jnp.int32)


def _unpacked(words, image_shape):
  flat = jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(words.shape[0], -1)
  return flat[:, :int(np.prod(image_shape))].reshape((words.shape[0],) + tuple(image_shape))


def gather_rows(mesh, rows_per_device: int):
  """f(held (D M, H, W, C) sharded, ids (B,) replicated) -> uint8 (B, H, W, C) sharded
  along the batch: row i is example ids[i], whichever device holds it."""
  axis = mesh.axis_names[0]

  def local(block, ids):  # block (M, H, W, C) of this device; ids (B,)
    owner = ids // rows_per_device
    mine = owner == jax.lax.axis_index(axis)
    rows = block[jnp.where(mine, ids - owner * rows_per_device, 0)]  # (B, H, W, C)
    words = jnp.where(mine[:, None], _packed(rows), 0)  # (B, ceil(H W C / 4))
    mine_only = jax.lax.psum_scatter(words, axis, scatter_dimension=0, tiled=True)
    return _unpacked(mine_only, block.shape[1:])  # (B / D, H, W, C)

  return jax.shard_map(local, mesh=mesh, in_specs=(P(axis), P()), out_specs=P(axis))


def held_iterator(config, mesh, source: Source, num_examples: int, *,
                  start_step: int = 0) -> Iterator[dict]:
  """Endless training batches from the train split held on the devices; item i is global
  step start_step + i.  The split is put on the devices here, before the first batch is
  asked for (`hold_split`)."""
  config = config.copy_and_resolve_references()  # the views are traced at the first batch
  batch_size, seed, dtype = int(config.batch_size), int(config.seed), jnp.dtype(config.dtype)
  steps = order.epoch_steps(num_examples, batch_size, f'{source.name} split '
                            f'{config.train_split!r}')
  held = hold_split(source, config.train_split, num_examples, mesh)
  gather = gather_rows(mesh, block_rows(num_examples, mesh.size))
  replicated = sharding.replicated_sharding(mesh)
  order_of_epoch = jax.jit(lambda epoch: order.epoch_order(seed, num_examples, epoch),
                           out_shardings=replicated)

  def views_of_step(held, epoch_order, step, position):
    ids = jax.lax.dynamic_slice_in_dim(epoch_order, position * batch_size, batch_size)
    views = views_jax.device_views(order.views_key(seed, step), gather(held, ids), config,
                                   mean=source.mean, std=source.std)
    return tuple(view.astype(dtype) for view in views)

  views_fn = jax.jit(views_of_step, out_shardings=(sharding.batch_sharding(mesh),)
                     * len(view_specs(config)))

  def batches():
    step = int(start_step)
    epoch, first = order.locate(step, steps)
    while True:
      epoch_order = order_of_epoch(epoch)
      for position in range(first, steps):
        yield {'views': views_fn(held, epoch_order, step, position)}
        step += 1
      epoch, first = epoch + 1, 0

  return batches()


def colour_iterator(config, mesh, cropped: Iterator[dict], mean: Sequence[float],
                    std: Sequence[float], *, start_step: int = 0) -> Iterator[dict]:
  """The device half of the views of a split streamed from files: `cropped` yields
  global steps start_step, start_step + 1, ... as {'views': V uint8 global arrays
  (B, S_k, S_k, C), sharded along the batch} whose crop, resize and flip the host made;
  each becomes the train step's view here (`views_jax.colour_views`, keyed by
  (config.seed, step, global position)), in config.dtype."""
  seed, dtype = int(config.seed), jnp.dtype(config.dtype)
  config = config.copy_and_resolve_references()  # traced at the first batch

  def finish(views, step):
    views = views_jax.colour_views(order.views_key(seed, step), views, config, mean=mean,
                                   std=std)
    return tuple(view.astype(dtype) for view in views)

  finish = jax.jit(finish, out_shardings=(sharding.batch_sharding(mesh),)
                   * len(view_specs(config)))
  for step, batch in enumerate(cropped, start=int(start_step)):
    yield {'views': finish(batch['views'], step)}
