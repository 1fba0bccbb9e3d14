"""The input of resa_jax: datasets, views and batches, behind one front door.

The trainer and the evaluators call only what this module defines:

    source = data.open_source(config)            # once per run, handed to the rest
    info = data.dataset_info(config, source)     # sizes, classes, statistics
    data.steps_per_epoch(config, source)         # the schedule's epoch (order.py's rule)
    data.placement(config, source, mesh)         # 'host', 'held' or 'streamed'
    data.train_iterator(config, mesh, start_step=k, source=source)
    data.eval_iterator(config, mesh, split, source=source)
    data.linear_probe_iterator(config, mesh, source=source)
    data.subset_train_iterator(config, mesh, source, fraction, batch_size=...)

A training batch is {'views': (x_0, ..., x_{V-1})}, x_k a global array (B, S_k, S_k, C)
in config.dtype sharded along the batch over the mesh's data axis, V = 1 +
sum(config.crops_nmb) (view 0 weak, the others strong).  Where its views are made
(`placement`, from `config.augment_on` and the split's decoded size):

* 'host': tf.data decodes and augments on the CPU cores (`host.py`, `views_tf.py`); each
  process's rows are assembled into global arrays.  Every dataset.  The default on CPUs.
* 'held': the decoded train split is held on the devices, split over them, and each
  step gathers and augments its batch there in one program (`device.py`, `views_jax.py`).
  A split of one image size whose share per device is within
  `config.device_memory_budget_mb`.  The default on GPUs and TPUs where that holds.
* 'streamed': the host decodes, crops, resizes and flips (uint8), the devices add the
  colour (`host.py` + `device.py`).  The other splits, on GPUs and TPUs.

An evaluation batch is {'image', 'label', 'mask' (+ 'coarse_label' on CIFAR-100)}: one
pass over a split without augmentation, padded (mask False) so that every example
appears once.  A source that needs no TensorFlow (the CIFAR-10 JPEG snapshot) is
evaluated from memory: its uint8 rows are put on the mesh and normalised there.

What is deterministic and resumable, and how, is `order.py`'s contract.  Importing this
package does not import TensorFlow: only the host streams and the TFDS sources do.
"""

from __future__ import annotations

import collections
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from resa_jax import sharding
from resa_jax.data import device
from resa_jax.data import local_files
from resa_jax.data import order
from resa_jax.data import sources
from resa_jax.data import subsets
from resa_jax.data import views_jax
# The names the rest of the project uses, defined in the package's modules.
from resa_jax.data.order import epoch_steps, eval_num_batches  # noqa: F401
from resa_jax.data.sources import (  # noqa: F401
    CIFAR_DATASETS, DATASETS, DatasetInfo, DatasetNotFoundError, Source, array_source,
    used_words)
from resa_jax.data.subsets import balanced_subset, imagenet_subset_file_names  # noqa: F401
from resa_jax.data.views import ViewSpec, view_specs  # noqa: F401
from resa_jax.data.views_jax import colour_views, device_views  # noqa: F401

PLACEMENTS = ('host', 'held', 'streamed')
AUGMENT_ON = ('auto', 'host', 'device')


def open_source(config) -> Source:
  """The Source of `config.dataset`.  Opening lists or reads files (an image folder's
  tree, the JPEG snapshot): open it once per run and hand it down."""
  if config.dataset not in DATASETS:
    raise ValueError(f'unknown dataset {config.dataset!r}; known: {", ".join(DATASETS)}')
  if config.dataset == 'cifar10_jpeg':
    return local_files.cifar10_jpeg_source(config)
  # pylint: disable=g-import-not-at-top  (these import TensorFlow)
  if config.dataset == 'image_folder':
    from resa_jax.data import image_folder
    return image_folder.open_image_folder(config)
  from resa_jax.data import tfds_sources
  return tfds_sources.open_tfds_source(config)


def dataset_info(config, source: Source | None = None) -> DatasetInfo:
  """Sizes, classes and statistics of `config.dataset` (`source`: it, already open)."""
  return sources.dataset_info(config, source or open_source(config))


def steps_per_epoch(config, source: Source | None = None) -> int:
  """Training steps per epoch (`order.steps_per_epoch`): config.steps_per_epoch if > 0,
  else N // batch_size; a train split of fewer than one batch is refused."""
  source = source or open_source(config)
  return order.steps_per_epoch(config, sources.num_examples(source, config.train_split),
                               f'{source.name} split {config.train_split!r}'
                               + used_words(source, config.train_split))


def placement(config, source: Source, mesh=None) -> str:
  """Where the training views of `config` are made: 'host', 'held' or 'streamed' (the
  module docstring).  ValueError, before any device memory is touched, where the
  placement cannot work: TensorFlow missing for a host stream, or a held share that
  the devices' own memory cannot hold."""
  augment_on = config.get('augment_on', 'auto')
  if augment_on == 'auto':
    augment_on = 'device' if jax.default_backend() != 'cpu' else 'host'
  num_devices = mesh.size if mesh is not None else jax.device_count()
  budget = float(config.get('device_memory_budget_mb', 4096))
  share = sources.share_bytes(source, config.train_split, num_devices)
  kind = 'host' if augment_on == 'host' else (
      'held' if sources.share_fits(source, config.train_split, num_devices, budget)
      else 'streamed')
  if kind != 'held' and not _tensorflow_installed():
    held = (f'{share / 2 ** 20:.1f} MiB a device, over device_memory_budget_mb={budget:g}: '
            'raise it to hold the split on the devices' if share is not None else
            'its images vary in size')
    raise ValueError(f'{source.name}: the {kind} input needs TensorFlow (pip install '
                     f'tensorflow-cpu); the train split is {held}')
  limit = _device_memory_limit(mesh)
  if kind == 'held' and limit and share > limit // 2:
    raise ValueError(f'{source.name}: the train split needs {share / 2 ** 30:.2f} GiB a '
                     f'device, over half of its {limit / 2 ** 30:.1f} GiB: lower '
                     f'device_memory_budget_mb below {share / 2 ** 20:.0f} to stream it')
  return kind


def _tensorflow_installed() -> bool:
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def _device_memory_limit(mesh) -> int | None:
  """Bytes one device of the mesh has, where its backend says (GPUs, TPUs)."""
  first = (mesh.devices.flat[0] if mesh is not None else jax.local_devices()[0])
  try:
    stats = first.memory_stats()
  except (AttributeError, NotImplementedError, RuntimeError):
    return None
  return (stats or {}).get('bytes_limit')


def _to_mesh(mesh, host_batches: Iterator[dict], prefetch: int) -> Iterator[dict]:
  """Global arrays from host batches, `prefetch` batches transferred ahead."""
  queue = collections.deque()
  for batch in host_batches:
    queue.append(sharding.shard_host_batch(mesh, batch))
    if len(queue) > max(0, prefetch):
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def train_iterator(config, mesh, *, start_step: int = 0,
                   source: Source | None = None) -> Iterator[dict]:
  """Endless iterator of training batches; item i is global step start_step + i, made
  where `placement` says.  `config` is taken as valid (`validate_config`); only the
  batch is checked against this mesh."""
  sharding.check_batch_size(config.batch_size, mesh.size)
  source = source or open_source(config)
  kind = placement(config, source, mesh)
  if kind == 'held':
    return device.held_iterator(config, mesh, source,
                                sources.num_examples(source, config.train_split),
                                start_step=start_step)
  from resa_jax.data import host  # pylint: disable=g-import-not-at-top  (TensorFlow)
  batches = _to_mesh(mesh, host.train_batches(config, source, start_step=start_step,
                                              cropped=kind == 'streamed'), config.prefetch)
  if kind == 'streamed':
    return device.colour_iterator(config, mesh, batches, source.mean, source.std,
                                  start_step=start_step)
  return batches


def linear_probe_iterator(config, mesh, *, batch_size: int | None = None,
                          source: Source | None = None) -> Iterator[dict]:
  """Endless iterator over config.eval_train_split for linear probes (tf.data):
  RandomResizedCrop(crops_size[0], scale 0.08-1, bilinear) + flip, normalised:
  {'image': (B, S, S, C) config.dtype, 'label': (B,) int32}, B = batch_size or
  config.batch_size; deterministic as the training stream."""
  batch_size = batch_size or config.batch_size
  sharding.check_batch_size(batch_size, mesh.size)
  source = source or open_source(config)
  from resa_jax.data import host  # pylint: disable=g-import-not-at-top  (TensorFlow)
  return _to_mesh(mesh, host.linear_probe_batches(config, source, batch_size=batch_size),
                  config.prefetch)


def subset_train_iterator(config, mesh, source: Source, fraction: float, *, batch_size: int,
                          seed: int = 0, cache_file: str = ''):
  """(endless iterator, subset size): augmented labelled batches of the semi-supervised
  protocol's subset of config.eval_train_split (`subsets.subset_train_batches`)."""
  return subsets.subset_train_batches(config, mesh, source, fraction, batch_size=batch_size,
                                      seed=seed, cache_file=cache_file)


def eval_iterator(config, mesh, split: str, *, batch_size: int | None = None,
                  resize_method: str = 'bilinear',
                  source: Source | None = None) -> Iterator[dict]:
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
  source = source or open_source(config)
  if not source.needs_tensorflow:
    return _memory_eval_batches(config, mesh, source, split, batch_size)
  from resa_jax.data import host  # pylint: disable=g-import-not-at-top  (TensorFlow)
  return _to_mesh(mesh, host.eval_batches(config, source, split, batch_size=batch_size,
                                          resize_method=resize_method), config.prefetch)


def _memory_eval_batches(config, mesh, source: Source, split: str,
                         batch_size: int) -> Iterator[dict]:
  """`eval_iterator` of a source read without TensorFlow: this process decodes its
  share, the contiguous block of ceil(N / P) examples at process_index; each batch is
  put on the mesh as uint8 and resized (if need be) and normalised there."""
  process_index, process_count = jax.process_index(), jax.process_count()
  num_examples = sources.num_examples(source, split)
  share = -(-num_examples // process_count)
  start, stop = min(num_examples, process_index * share), min(num_examples,
                                                             (process_index + 1) * share)
  images, labels = (source.rows(split, start, stop) if stop > start else
                    (np.zeros((0,) + tuple(source.image_shape), np.uint8), np.zeros(0, np.int32)))
  local_batch = batch_size // process_count
  mean, std = source.eval_mean_std
  size, dtype = int(config.crops_size[0]), jnp.dtype(config.dtype)
  normalised = jax.jit(
      lambda x, mask: jnp.where(mask[:, None, None, None], views_jax.normalize(
          views_jax.unaugmented(x, size), mean, std), 0).astype(dtype),
      out_shardings=sharding.batch_sharding(mesh))
  for b in range(order.eval_num_batches(num_examples, batch_size, process_count)):
    part = slice(b * local_batch, (b + 1) * local_batch)
    n = len(labels[part])
    pixels = np.zeros((local_batch,) + tuple(source.image_shape), np.uint8)
    pixels[:n] = images[part]
    label = np.zeros((local_batch,), np.int32)
    label[:n] = labels[part]
    batch = sharding.shard_host_batch(mesh, {'image': pixels, 'label': label,
                                             'mask': np.arange(local_batch) < n})
    batch['image'] = normalised(batch['image'], batch['mask'])
    yield batch
