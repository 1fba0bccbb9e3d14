"""ReSA's multi-view training input and the evaluation inputs, as global sharded arrays.

One training step reads `config.batch_size` (B, global) images and makes
V = 1 + sum(config.crops_nmb) views of each (view 0 weak, the others strong):

    {'views': (x_0, ..., x_{V-1})}   # x_k: (B, crops_size[g_k], crops_size[g_k], C)

in `config.dtype`, each a global `jax.Array` sharded along the batch over the mesh's
data axis.  Where the views are made is `config.augment_on` (`placement`):

* 'device': the views are made on the devices (`device_input.py`).  The datasets of one
  image size (`datasets.DATASETS_HELD_ON_DEVICE`) are held there whole; of those
  streamed from files (ImageNet, image folders) the host decodes each image, crops,
  resizes and flips its views and ships them as uint8, and the devices add colour jitter,
  grayscale, blur, solarisation and normalisation.
* 'host': tf.data makes them on the CPU cores (`host_input.py`), each process its share
  of the batch, assembled with `jax.make_array_from_process_local_data`.
* 'auto' (the default): 'device' on GPUs and TPUs, 'host' on CPUs (docs/data.md).

Evaluation reads a split once without augmentation.  A source held in memory
(`Source.arrays`: the CIFAR-10 JPEG snapshot) is evaluated from its arrays, the others
through tf.data, so the snapshot trains and evaluates with no TensorFlow installed.

Callers open the dataset once (`datasets.open_source`) and pass it as `source`; without
it each function opens it again.
"""

from __future__ import annotations

import collections
import functools
import math
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from resa_jax import augment_device
from resa_jax import datasets
from resa_jax import device_input
from resa_jax import sharding


def placement(config) -> str:
  """Where the training views of `config` are made: 'host' or 'device'."""
  augment_on = config.get('augment_on', 'auto')
  if augment_on != 'auto':
    return augment_on
  return 'device' if jax.default_backend() != 'cpu' else 'host'


def steps_per_epoch(config, source: datasets.Source | None = None) -> int:
  """Training steps per epoch: config.steps_per_epoch if > 0, else N // batch_size."""
  if config.steps_per_epoch > 0:
    return int(config.steps_per_epoch)
  source = source or datasets.open_source(config)
  return max(1, datasets.num_examples(source, config.train_split) // config.batch_size)


def _to_mesh(mesh, host_batches: Iterator[dict], prefetch: int) -> Iterator[dict]:
  """Global arrays from host batches, `prefetch` batches transferred ahead."""
  queue = collections.deque()
  for batch in host_batches:
    queue.append(sharding.shard_host_batch(mesh, batch))
    if len(queue) > max(0, prefetch):
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def create_train_iterator(config, mesh, *, start_step: int = 0,
                          source: datasets.Source | None = None) -> Iterator[dict]:
  """Endless iterator of training batches; item i is global step start_step + i.

  Yields {'views': (x_0, ..., x_{V-1})}, x_k a global array of shape
  (batch_size, crops_size[g_k], crops_size[g_k], C) in config.dtype, sharded along the
  batch over the mesh's data axis, made where `placement(config)` says.  `config` is
  taken as valid (`validate_config`); only the batch is checked against this mesh.
  """
  sharding.check_batch_size(config.batch_size, mesh.size)
  source = source or datasets.open_source(config)
  device = placement(config) == 'device'
  if device and config.dataset in datasets.DATASETS_HELD_ON_DEVICE:
    images, _ = datasets.split_arrays(source, config.train_split)  # every process: all
    return device_input.create_device_train_iterator(
        config, mesh, images, source.mean, source.std, start_step=start_step)
  from resa_jax import host_input  # pylint: disable=g-import-not-at-top  (TensorFlow)
  if device:  # streamed from files: crops on the host, the rest on the devices
    cropped = _to_mesh(mesh, host_input.train_batches(config, source,
                                                      start_step=start_step, cropped=True),
                       config.prefetch)
    return device_input.create_colour_iterator(config, mesh, cropped, source.mean, source.std,
                                               start_step=start_step)
  return _to_mesh(mesh, host_input.train_batches(config, source, start_step=start_step),
                  config.prefetch)


def create_linear_probe_train_iterator(config, mesh, *, batch_size: int | None = None,
                                       source: datasets.Source | None = None
                                       ) -> Iterator[dict]:
  """Endless iterator over config.eval_train_split for linear probes (tf.data).

  RandomResizedCrop(crops_size[0], scale 0.08-1, bilinear) + flip, normalised:
  {'image': (B, S, S, C) config.dtype, 'label': (B,) int32}, B = batch_size or
  config.batch_size; deterministic as the training stream.
  """
  batch_size = batch_size or config.batch_size
  sharding.check_batch_size(batch_size, mesh.size)
  source = source or datasets.open_source(config)
  from resa_jax import host_input  # pylint: disable=g-import-not-at-top  (TensorFlow)
  return _to_mesh(mesh, host_input.linear_probe_batches(config, source, batch_size=batch_size),
                  config.prefetch)


def create_eval_iterator(config, mesh, split: str, *, batch_size: int | None = None,
                         resize_method: str = 'bilinear',
                         source: datasets.Source | None = None) -> Iterator[dict]:
  """One pass over `split` without augmentation.

  Yields {'image': (B, S, S, C) config.dtype, 'label': (B,) int32, 'mask': (B,) bool}
  (+ 'coarse_label' for CIFAR-100), S = crops_size[0]: ImageNet-sized images are
  resized (shorter side config.eval_resize, `resize_method`: the authors' kNN uses
  'bicubic', their linear evaluation 'bilinear') and centre-cropped, small fixed-size
  ones are used as they are (resized, bilinear and antialiased, only if their side is
  not S).  Normalised with the source's evaluation statistics (`Source.eval_mean_std`).
  B = batch_size or config.batch_size; the last batches are padded (mask False) so
  that every example appears exactly once with mask True.
  """
  batch_size = batch_size or config.batch_size
  sharding.check_batch_size(batch_size, mesh.size)
  source = source or datasets.open_source(config)
  if source.arrays is not None and not source.extra_labels:
    return _to_mesh(mesh, _memory_eval_batches(config, source, split, batch_size),
                    config.prefetch)
  from resa_jax import host_input  # pylint: disable=g-import-not-at-top  (TensorFlow)
  return _to_mesh(mesh, host_input.eval_batches(config, source, split, batch_size=batch_size,
                                                resize_method=resize_method),
                  config.prefetch)


@functools.partial(jax.jit, static_argnames=('size', 'dtype'))
def _unaugmented(images, mean, std, *, size: int, dtype: str):
  """uint8 (n, H, W, C) -> (n, size, size, C) normalised: host_input's eval image (the
  image itself, resized bilinear and antialiased only when its side is not `size`)."""
  if images.shape[1:3] == (size, size):
    x = images.astype(jnp.float32) / 255.0
  else:
    box = jnp.asarray([0.0, 0.0, images.shape[1], images.shape[2]], jnp.float32)
    x = jax.vmap(lambda image: augment_device.resized_crop(image, box, size))(images)
  return ((x - mean) / std).astype(dtype)


def _memory_eval_batches(config, source: datasets.Source, split: str,
                         batch_size: int) -> Iterator[dict]:
  """This process's evaluation batches of a split held in memory (numpy): its share
  i = process_index, process_index + P, ... (the tf.data path's), padded with zeros to
  the same number of batches on every process."""
  process_index, process_count = jax.process_index(), jax.process_count()
  images, labels = datasets.split_arrays(source, split, process_index, process_count)
  local_batch = batch_size // process_count
  num_batches = math.ceil(math.ceil(datasets.num_examples(source, split) / process_count)
                          / local_batch)
  mean, std = (np.asarray(v, np.float32) for v in source.eval_mean_std)
  size = int(config.crops_size[0])
  for b in range(num_batches):
    part = slice(b * local_batch, (b + 1) * local_batch)
    n = len(labels[part])
    pixels = np.zeros((local_batch,) + images.shape[1:], np.uint8)
    pixels[:n] = images[part]
    image = np.array(_unaugmented(pixels, mean, std, size=size, dtype=config.dtype))
    image[n:] = 0
    label = np.zeros((local_batch,), np.int32)
    label[:n] = labels[part]
    yield {'image': image, 'label': label, 'mask': np.arange(local_batch) < n}
