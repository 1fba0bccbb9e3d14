"""The host's half of the input: tf.data streams that decode and augment on the CPU cores
(`config.augment_on = 'host'`), and the evaluation inputs of datasets read from files.
`input_pipeline.py` puts their numpy batches on the mesh; this module is the only one of
the input path that needs TensorFlow (kept off the accelerators).

Determinism and resuming
------------------------
A seed reproduces the same batches, and a run resumed at global step k
(`start_step=k`) sees exactly the batches an uninterrupted run sees from step k on,
whatever the number of tf.data threads:

* *Data order* is a function of (config.seed, epoch) only.  The data stream is cut
  into epochs of `E = num_train_examples // B` steps (the remainder is dropped);
  step k belongs to epoch k // E at position k % E.  Small datasets (decoded share of
  this process <= 512 MiB: Fashion-MNIST, CIFAR, small fake data) are decoded once
  into memory and each epoch is a stateless permutation of the indices, so resuming
  is a slice of it; one tf.data pipeline runs across the epochs, so the boundary does
  not drain the prefetched batches.  Larger ones (STL-10, ImageNet, image folders) are
  streamed: each epoch reads the files in an order shuffled with a seed of (seed,
  epoch), then a shuffle buffer (config.shuffle_buffer) seeded likewise; resuming inside
  an epoch skips the records already used, reading but not decoding them (image folders
  do decode them, so that undecodable images drop out the same way).  A new pipeline is
  built for each streamed epoch (a short stall at each boundary while the shuffle buffer
  fills).
* *Augmentation randomness* uses TF stateless ops whose seed is derived from
  (config.seed, global step, position of the example in the global batch, view).
* All maps are order-preserving (`deterministic=True`).

Each process reads only its share of the split (B / process_count examples per step,
`tfds.split_for_jax_process`), so the stream depends on the number of processes;
resuming on a different process count gives a different, equally valid, stream.
`config.steps_per_epoch` (the training schedule's epoch) does not change the data
stream.
"""


from __future__ import annotations

import math
from typing import Callable, Iterator

import jax
import numpy as np
import tensorflow as tf

from resa_jax import augment
from resa_jax import datasets
from resa_jax import device_input
from resa_jax import local_data

local_data.hide_accelerators_from_tf()


# Decoded splits up to this size (per process) are kept in memory (twice, briefly, while
# they become a TensorFlow constant): CIFAR-10's 150 MB and Fashion-MNIST's 47 MB are;
# 6,000 ImageNet-sized images (900 MB) are streamed.
_MAX_CACHE_BYTES = 512 << 20


# ---------------------------------------------------------------------------
# Seeds


def _python_seed(*parts: int) -> int:
  """A 31-bit int seed from a few ints (for TFDS / tf.data shuffles)."""
  return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0]
             & 0x7FFFFFFF)


# ---------------------------------------------------------------------------
# Augmented (training) streams


def _tf_options(num_parallel_calls) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  if num_parallel_calls == 1:
    options.threading.private_threadpool_size = 1
  return options


def _load_into_memory(source: datasets.Source, split: str, process_index: int,
                      process_count: int) -> dict[str, tf.Tensor] | None:
  """This process's share of `split`, decoded, if it is small enough; else None.

  {'image': uint8 (n_local, H, W, C), 'label': int32 (n_local,)}.
  """
  shape = source.image_shape
  if None in shape or source.may_fail_decoding:
    return None
  n_local = math.ceil(datasets.num_examples(source, split) / process_count)
  if n_local * int(np.prod(shape)) > _MAX_CACHE_BYTES:
    return None
  images, labels = datasets.split_arrays(source, split, process_index, process_count)
  return {'image': tf.constant(images), 'label': tf.constant(labels)}


def _memory_records(in_memory: dict, *, first_epoch: int, skip: int, num_local: int,
                    order_seed: int) -> tf.data.Dataset:
  """Records (j, epoch, {'image', 'label'}) of epochs first_epoch, first_epoch + 1, ...
  of a split held in memory, j = skip .. num_local - 1 in the first epoch and from 0 in
  the next: one pipeline for every epoch.  If the share is shorter than num_local, it is
  cycled (mocked data)."""
  images, labels = in_memory['image'], in_memory['label']
  n = int(images.shape[0])

  def epoch_records(epoch):
    seed = tf.stack([tf.constant(order_seed, tf.int32), tf.cast(epoch, tf.int32)])
    perm = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int32), seed=seed)
    indices = tf.tile(perm, [math.ceil(num_local / n)])[:num_local]
    return tf.data.Dataset.from_tensor_slices(indices).enumerate().map(
        lambda j, i: (j, epoch, {'image': tf.gather(images, i), 'label': tf.gather(labels, i)}))

  epochs = tf.data.Dataset.range(first_epoch, np.iinfo(np.int32).max)
  return epochs.flat_map(epoch_records).skip(skip)


def _streamed_records(source: datasets.Source, split: str, *, epoch: int, order_seed: int,
                      num_local: int, skip: int, process_index: int, process_count: int,
                      shuffle_buffer: int) -> tf.data.Dataset:
  """Records (j, epoch, record) j = skip .. num_local - 1 of this process's epoch
  `epoch`, the image not yet decoded unless the source may fail decoding.  If the share
  is shorter than num_local, it is cycled (mocked data)."""
  seed = _python_seed(order_seed, epoch)
  ds = source.read(split, process_index, process_count, seed, False)
  ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=False)
  if source.may_fail_decoding:
    # Decode before counting, so skipping on resume drops the same bad images.
    ds = ds.map(lambda r: {**r, 'image': source.decode(r['image'])},
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
  ds = ds.repeat().take(num_local).skip(skip)
  return ds.enumerate(start=skip).map(
      lambda j, record: (j, tf.constant(epoch, tf.int64), record))


def _host_batches(config, source: datasets.Source, split: str, *, batch_size: int,
                  start_step: int, make_example: Callable, salt: str,
                  process_index: int, process_count: int,
                  num_parallel_calls=tf.data.AUTOTUNE) -> Iterator[dict]:
  """This process's batches (numpy) of global steps start_step, start_step + 1, ...

  make_example(image uint8 (H, W, C), label, seed (2,)) -> dict of tensors; the seed
  is a function of (config.seed, salt, global step, position in the global batch).
  """
  local_batch = batch_size // process_count
  num_examples = datasets.num_examples(source, split)
  epoch_steps = device_input.epoch_steps(num_examples, batch_size,
                                         f'{source.name} split {split!r}')
  in_memory = _load_into_memory(source, split, process_index, process_count)
  decoded = in_memory is not None or source.may_fail_decoding
  base_seed = tf.constant([int(config.seed), datasets.salt(salt)], tf.int64)
  order_seed = _python_seed(int(config.seed), datasets.salt(salt))
  options = _tf_options(num_parallel_calls)
  num_local = epoch_steps * local_batch

  def example(j, epoch, record):
    step = epoch * epoch_steps + j // local_batch
    slot = process_index * local_batch + j % local_batch
    seed = tf.random.experimental.stateless_fold_in(
        tf.random.experimental.stateless_fold_in(base_seed, step), slot)
    image = record['image'] if decoded else source.decode(record['image'])
    return make_example(image, record['label'], seed)

  def batches(records):
    ds = records.map(example, num_parallel_calls=num_parallel_calls, deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options).as_numpy_iterator()

  epoch, step_in_epoch = divmod(int(start_step), epoch_steps)
  if in_memory is not None:
    yield from batches(_memory_records(in_memory, first_epoch=epoch, order_seed=order_seed,
                                       skip=step_in_epoch * local_batch, num_local=num_local))
  while True:  # streamed: a pipeline per epoch (the files' shuffle is seeded per epoch)
    yield from batches(_streamed_records(
        source, split, epoch=epoch, order_seed=order_seed, num_local=num_local,
        skip=step_in_epoch * local_batch, process_index=process_index,
        process_count=process_count, shuffle_buffer=int(config.shuffle_buffer)))
    epoch, step_in_epoch = epoch + 1, 0


def _train_example_fn(config, source: datasets.Source):
  specs = augment.view_specs(config)
  dtype = tf.as_dtype(config.dtype)

  def make_example(image, label, seed):
    del label  # self-supervised
    view_seeds = augment.split_seed(seed, len(specs))
    views = tuple(
        tf.cast(augment.normalize(augment.make_view(image, s, spec), source.mean, source.std),
                dtype)
        for s, spec in zip(view_seeds, specs))
    return {'views': views}  # view k: (crops_size[g_k], crops_size[g_k], C)

  return make_example


def _cropped_example_fn(config, source: datasets.Source):
  specs = augment.view_specs(config)
  channels = source.image_shape[-1] or 3

  def make_example(image, label, seed):
    del label  # self-supervised
    view_seeds = augment.split_seed(seed, len(specs))
    return {'views': tuple(augment.cropped_view(image, s, spec, channels)
                           for s, spec in zip(view_seeds, specs))}

  return make_example


def _linear_probe_example_fn(config, source: datasets.Source):
  size, dtype = int(config.crops_size[0]), tf.as_dtype(config.dtype)

  def make_example(image, label, seed):
    view = augment.classifier_view(image, seed, size)
    return {'image': tf.cast(augment.normalize(view, *source.eval_mean_std), dtype),
            'label': label}

  return make_example


# ---------------------------------------------------------------------------
# Evaluation (no augmentation)


def _eval_dataset(config, source: datasets.Source, split: str, *, batch_size: int,
                  process_index: int, process_count: int,
                  resize_method: str = 'bilinear') -> tf.data.Dataset:
  """One pass over this process's share of `split`, padded to the same number of
  batches on every process; padding has mask False."""
  local_batch = batch_size // process_count
  size, dtype = int(config.crops_size[0]), tf.as_dtype(config.dtype)
  num_batches = math.ceil(math.ceil(datasets.num_examples(source, split) / process_count)
                          / local_batch)
  variable_size = None in source.image_shape

  def preprocess(record):
    image = source.decode(record['image'])
    if variable_size:  # ImageNet-like: resize the shorter side, centre crop
      image = augment.resize_shorter_and_center_crop(image, int(config.eval_resize), size,
                                                     method=resize_method)
    else:  # 28x28, 32x32, 96x96 data: the image itself
      image = augment.unaugmented(image, size)
    example = {'image': tf.cast(augment.normalize(image, *source.eval_mean_std), dtype),
               'label': record['label'], 'mask': tf.constant(True)}
    example.update({k: record[k] for k in source.extra_labels})
    return example

  ds = source.read(split, process_index, process_count, None, True)
  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if source.may_fail_decoding:
    ds = ds.ignore_errors()
  padding = {k: tf.zeros(spec.shape, spec.dtype) for k, spec in ds.element_spec.items()}
  ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat())
  ds = ds.take(num_batches * local_batch).batch(local_batch, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_tf_options(tf.data.AUTOTUNE))


def train_batches(config, source: datasets.Source, *, start_step: int,
                  cropped: bool = False) -> Iterator[dict]:
  """This process's training batches {'views': (V arrays (B / P, S_k, S_k, C))}, numpy,
  of global steps start_step, start_step + 1, ...: the finished views, or with `cropped`
  (the host half of `augment_on='device'` for a dataset streamed from files) each view's
  crop, resize and flip as uint8 (each image decoded once for its views), to which the
  devices add the rest (`device_input.create_colour_iterator`)."""
  make_example = (_cropped_example_fn if cropped else _train_example_fn)(config, source)
  return _host_batches(
      config, source, config.train_split, batch_size=config.batch_size,
      start_step=start_step, make_example=make_example, salt='train',
      process_index=jax.process_index(), process_count=jax.process_count())


def linear_probe_batches(config, source: datasets.Source, *,
                         batch_size: int) -> Iterator[dict]:
  """This process's endless linear-probe batches {'image', 'label'} of
  config.eval_train_split."""
  return _host_batches(
      config, source, config.eval_train_split, batch_size=batch_size,
      start_step=0, make_example=_linear_probe_example_fn(config, source),
      salt='linear_probe', process_index=jax.process_index(),
      process_count=jax.process_count())


def eval_batches(config, source: datasets.Source, split: str, *, batch_size: int,
                 resize_method: str) -> Iterator[dict]:
  """This process's evaluation batches of `split` (`input_pipeline.create_eval_iterator`)."""
  return _eval_dataset(config, source, split, batch_size=batch_size,
                       process_index=jax.process_index(), process_count=jax.process_count(),
                       resize_method=resize_method).as_numpy_iterator()
