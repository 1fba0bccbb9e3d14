"""The host's half of the input: tf.data streams that decode and augment on the CPU cores
(`config.augment_on = 'host'`, and the crops of `'device'` for a split streamed from
files), and the evaluation inputs of datasets read through tf.data.  The front door
(`resa_jax/data/__init__.py`) puts their numpy batches on the mesh; of the input path
only this module, `views_tf.py`, `tfds_sources.py` and `subsets.py` need TensorFlow
(kept off the accelerators).

Determinism and resuming (the rules are `order.py`'s)
-----------------------------------------------------
A seed reproduces the same batches, and a run resumed at global step k
(`start_step=k`) sees exactly the batches an uninterrupted run sees from step k on,
whatever the number of tf.data threads:

* *Readers.*  The stream is cut into R = `order.num_input_shards` readers (one per
  process unless `config.input_shards` says otherwise); reader r reads shard r of R of
  the split (`Source.read`) and fills rows [r B / R, (r + 1) B / R) of every global
  batch; a process runs the readers of its own rows (`order.host_readers`).  So the
  stream is a function of (seed, step, R): with R fixed, any number of processes that
  divides it reads the same batches.
* *Data order* of a reader is a function of (config.seed, epoch) only.  A split whose
  decoded share per process is within `config.host_memory_budget_mb`
  (`sources.share_fits`: Fashion-MNIST, CIFAR, small fake data) is decoded once into
  memory and each epoch is a stateless permutation of a reader's indices, so resuming
  is a slice of it; one tf.data pipeline runs across the epochs, so the boundary does
  not drain the prefetched batches.  Larger ones (STL-10, ImageNet, image folders) are
  streamed: each epoch reads the files in an order shuffled with a seed of (seed,
  epoch), then a shuffle buffer (config.shuffle_buffer, split between a process's
  readers) seeded likewise; resuming inside an epoch skips the records already used,
  reading but not decoding them (an image folder's undecodable files were left out when
  it was opened).  A new pipeline is built for each streamed epoch (a
  short stall at each boundary while the shuffle buffer fills).
* *Augmentation randomness* uses TF stateless ops whose seed is derived from
  (config.seed, stream salt, global step, position of the example in the global batch,
  view).
* All maps are order-preserving (`deterministic=True`).
"""


from __future__ import annotations

from typing import Callable, Iterator

import jax
import numpy as np
import tensorflow as tf

from resa_jax.data import local_files
from resa_jax.data import order
from resa_jax.data import sources
from resa_jax.data import tfds_sources
from resa_jax.data import views_tf
from resa_jax.data.views import view_specs

local_files.hide_accelerators_from_tf()


def _tf_options(num_parallel_calls) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  if num_parallel_calls == 1:
    options.threading.private_threadpool_size = 1
  return options


def _load_into_memory(source: sources.Source, split: str, reader: int, num_readers: int,
                      holds: bool) -> dict[str, tf.Tensor] | None:
  """Reader `reader`'s share of `split`, decoded, if the split is `holds` (held in
  memory); else None.  {'image': uint8 (n, H, W, C), 'label': int32 (n,)}."""
  if not holds:
    return None
  records = source.read(split, reader, num_readers, None, False)
  images, labels = tfds_sources.decoded_arrays(
      records, source.decode, -(-sources.num_examples(source, split) // num_readers),
      f'{source.name} split {split!r}')
  return {'image': tf.constant(images), 'label': tf.constant(labels)}


def _memory_records(in_memory: dict, *, first_epoch: int, skip: int, num_local: int,
                    order_seed: int) -> tf.data.Dataset:
  """Records (j, epoch, {'image', 'label'}) of epochs first_epoch, first_epoch + 1, ...
  of a reader's share held in memory, j = skip .. num_local - 1 in the first epoch and
  from 0 in the next: one pipeline for every epoch.  If the share is shorter than
  num_local, it is cycled (mocked data)."""
  images, labels = in_memory['image'], in_memory['label']
  n = int(images.shape[0])

  def epoch_records(epoch):
    seed = tf.stack([tf.constant(order_seed, tf.int32), tf.cast(epoch, tf.int32)])
    perm = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int32), seed=seed)
    indices = tf.tile(perm, [-(-num_local // n)])[:num_local]
    return tf.data.Dataset.from_tensor_slices(indices).enumerate().map(
        lambda j, i: (j, epoch, {'image': tf.gather(images, i), 'label': tf.gather(labels, i)}))

  epochs = tf.data.Dataset.range(first_epoch, np.iinfo(np.int32).max)
  return epochs.flat_map(epoch_records).skip(skip)


def _streamed_records(source: sources.Source, split: str, *, epoch: int, order_seed: int,
                      num_local: int, skip: int, reader: int, num_readers: int,
                      shuffle_buffer: int) -> tf.data.Dataset:
  """Records (j, epoch, record) j = skip .. num_local - 1 of a reader's epoch `epoch`,
  the image not yet decoded.  If the share is shorter than num_local, it is cycled
  (mocked data)."""
  seed = order.python_seed(order_seed, epoch)
  ds = source.read(split, reader, num_readers, seed, False)
  ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=False)
  ds = ds.repeat().take(num_local).skip(skip)
  return ds.enumerate(start=skip).map(
      lambda j, record: (j, tf.constant(epoch, tf.int64), record))


def _host_batches(config, source: sources.Source, split: str, *, batch_size: int,
                  start_step: int, make_example: Callable, stream: str, num_readers: int,
                  num_parallel_calls=tf.data.AUTOTUNE) -> Iterator[dict]:
  """This process's batches (numpy) of global steps start_step, start_step + 1, ...: the
  rows of its readers (`order.host_readers`), each reader its 1 / num_readers share.

  make_example(image uint8 (H, W, C), label, seed (2,)) -> dict of tensors; the seed
  is a function of (config.seed, stream, global step, position in the global batch).
  """
  readers = order.host_readers(num_readers, jax.process_index(), jax.process_count())
  rows = batch_size // num_readers  # of each reader in every batch
  epoch_steps = order.epoch_steps(sources.num_examples(source, split), batch_size,
                                  f'{source.name} split {split!r}')
  holds = sources.share_fits(source, split, jax.process_count(),
                             config.get('host_memory_budget_mb', 512))
  base_seed = tf.constant([int(config.seed), order.salt(stream)], tf.int64)
  order_seed = order.stream_seed(config.seed, stream)
  options = _tf_options(num_parallel_calls)
  num_local = epoch_steps * rows
  epoch, position = order.locate(start_step, epoch_steps)

  def batched(reader, records):
    def example(j, epoch, record):
      step = epoch * epoch_steps + j // rows
      slot = reader * rows + j % rows
      seed = tf.random.experimental.stateless_fold_in(
          tf.random.experimental.stateless_fold_in(base_seed, step), slot)
      image = record['image'] if holds else source.decode(record['image'])
      return make_example(image, record['label'], seed)

    ds = records.map(example, num_parallel_calls=num_parallel_calls, deterministic=True)
    return ds.batch(rows, drop_remainder=True)

  def batches(per_reader):
    ds = per_reader[0] if len(per_reader) == 1 else tf.data.Dataset.zip(tuple(per_reader)).map(
        lambda *parts: tf.nest.map_structure(lambda *x: tf.concat(x, 0), *parts))
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options).as_numpy_iterator()

  if holds:
    yield from batches([batched(r, _memory_records(
        _load_into_memory(source, split, r, num_readers, holds), first_epoch=epoch,
        order_seed=order_seed, skip=position * rows, num_local=num_local)) for r in readers])
  buffer = max(1, int(config.shuffle_buffer) // len(readers))
  while True:  # streamed: a pipeline per epoch (the files' shuffle is seeded per epoch)
    yield from batches([batched(r, _streamed_records(
        source, split, epoch=epoch, order_seed=order_seed, num_local=num_local,
        skip=position * rows, reader=r, num_readers=num_readers, shuffle_buffer=buffer))
        for r in readers])
    epoch, position = epoch + 1, 0


def _train_example_fn(config, source: sources.Source):
  specs = view_specs(config)
  dtype = tf.as_dtype(config.dtype)

  def make_example(image, label, seed):
    del label  # self-supervised
    view_seeds = views_tf.split_seed(seed, len(specs))
    views = tuple(
        tf.cast(views_tf.normalize(views_tf.make_view(image, s, spec), source.mean, source.std),
                dtype)
        for s, spec in zip(view_seeds, specs))
    return {'views': views}  # view k: (crops_size[g_k], crops_size[g_k], C)

  return make_example


def _cropped_example_fn(config, source: sources.Source):
  specs = view_specs(config)
  channels = source.image_shape[-1] or 3

  def make_example(image, label, seed):
    del label  # self-supervised
    view_seeds = views_tf.split_seed(seed, len(specs))
    return {'views': tuple(views_tf.cropped_view(image, s, spec, channels)
                           for s, spec in zip(view_seeds, specs))}

  return make_example


def _linear_probe_example_fn(config, source: sources.Source):
  size, dtype = int(config.crops_size[0]), tf.as_dtype(config.dtype)

  def make_example(image, label, seed):
    view = views_tf.classifier_view(image, seed, size)
    return {'image': tf.cast(views_tf.normalize(view, *source.eval_mean_std), dtype),
            'label': label}

  return make_example


# ---------------------------------------------------------------------------
# Evaluation (no augmentation)


def _eval_dataset(config, source: sources.Source, split: str, *, batch_size: int,
                  process_index: int, process_count: int,
                  resize_method: str) -> tf.data.Dataset:
  """One pass over this process's share of `split`, padded to the same number of
  batches on every process; padding has mask False."""
  local_batch = batch_size // process_count
  size, dtype = int(config.crops_size[0]), tf.as_dtype(config.dtype)
  num_batches = order.eval_num_batches(sources.num_examples(source, split), batch_size,
                                       process_count)
  variable_size = None in source.image_shape

  def preprocess(record):
    image = source.decode(record['image'])
    if variable_size:  # ImageNet-like: resize the shorter side, centre crop
      image = views_tf.resize_shorter_and_center_crop(image, int(config.eval_resize), size,
                                                     method=resize_method)
    else:  # 28x28, 32x32, 96x96 data: the image itself
      image = views_tf.unaugmented(image, size)
    example = {'image': tf.cast(views_tf.normalize(image, *source.eval_mean_std), dtype),
               'label': record['label'], 'mask': tf.constant(True)}
    example.update({k: record[k] for k in source.extra_labels})
    return example

  ds = source.read(split, process_index, process_count, None, True)
  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  padding = {k: tf.zeros(spec.shape, spec.dtype) for k, spec in ds.element_spec.items()}
  ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat())
  ds = ds.take(num_batches * local_batch).batch(local_batch, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_tf_options(tf.data.AUTOTUNE))


def train_batches(config, source: sources.Source, *, start_step: int,
                  cropped: bool = False) -> Iterator[dict]:
  """This process's training batches {'views': (V arrays (B / P, S_k, S_k, C))}, numpy,
  of global steps start_step, start_step + 1, ...: the finished views, or with `cropped`
  (the host half of `augment_on='device'` for a dataset streamed from files) each view's
  crop, resize and flip as uint8 (each image decoded once for its views), to which the
  devices add the rest (`device.colour_iterator`)."""
  make_example = (_cropped_example_fn if cropped else _train_example_fn)(config, source)
  return _host_batches(
      config, source, config.train_split, batch_size=config.batch_size,
      start_step=start_step, make_example=make_example, stream=order.TRAIN_STREAM,
      num_readers=order.num_input_shards(config, jax.process_count()))


def linear_probe_batches(config, source: sources.Source, *,
                         batch_size: int) -> Iterator[dict]:
  """This process's endless linear-probe batches {'image', 'label'} of
  config.eval_train_split."""
  return _host_batches(
      config, source, config.eval_train_split, batch_size=batch_size,
      start_step=0, make_example=_linear_probe_example_fn(config, source),
      stream=order.LINEAR_PROBE_STREAM, num_readers=jax.process_count())


def eval_batches(config, source: sources.Source, split: str, *, batch_size: int,
                 resize_method: str) -> Iterator[dict]:
  """This process's evaluation batches of `split` (`resa_jax.data.eval_iterator`)."""
  return _eval_dataset(config, source, split, batch_size=batch_size,
                       process_index=jax.process_index(), process_count=jax.process_count(),
                       resize_method=resize_method).as_numpy_iterator()
