"""TFDS -> tf.data -> global sharded arrays: ReSA's multi-view training input and the
evaluation inputs.

One training step reads `config.batch_size` (B, global) images and makes
V = 1 + sum(config.crops_nmb) views of each (augment.py: view 0 weak, the others strong):

    {'views': (x_0, ..., x_{V-1})}   # x_k: (B, crops_size[g_k], crops_size[g_k], C)

in `config.dtype`, each a global `jax.Array` sharded along the batch over the mesh's
data axis.  Each process reads only its share of the split (B / process_count
examples per step, `tfds.split_for_jax_process`) and the global arrays are assembled
with `jax.make_array_from_process_local_data` (sharding.shard_host_batch).  TensorFlow
is kept off the accelerators.

Determinism and resuming
------------------------
A seed reproduces the same batches, and a run resumed at global step k
(`start_step=k`) sees exactly the batches an uninterrupted run sees from step k on,
whatever the number of tf.data threads:

* *Data order* is a function of (config.seed, epoch) only.  The data stream is cut
  into epochs of `E = num_train_examples // B` steps (the remainder is dropped);
  step k belongs to epoch k // E at position k % E.  Small datasets (decoded split
  of this process <= 1 GiB: Fashion-MNIST, CIFAR, small fake data) are decoded once
  into memory and each epoch is a stateless permutation of the indices, so resuming
  is a slice of it.  Larger ones (STL-10, ImageNet, image folders) are streamed:
  each epoch reads the files in an order shuffled with a seed of (seed, epoch), then
  a shuffle buffer (config.shuffle_buffer) seeded likewise; resuming inside an
  epoch skips the records already used, reading but not decoding them (image
  folders do decode them, so that undecodable images drop out the same way).  A new
  tf.data pipeline is built for each epoch (a short stall at each boundary while
  the shuffle buffer fills).
* *Augmentation randomness* uses TF stateless ops whose seed is derived from
  (config.seed, global step, position of the example in the global batch, view).
* All maps are order-preserving (`deterministic=True`).

The stream depends on the number of processes (each one always reads its own share);
resuming on a different process count gives a different, equally valid, stream.
`config.steps_per_epoch` (the training schedule's epoch) does not change the data
stream.

Where the examples come from (TFDS, local files, image folders, fake data) is
`datasets.py`; this module turns a `datasets.Source` into streams (or, with
`config.augment_on='device'`, into the arrays that `device_input.py` augments on the devices).
"""

from __future__ import annotations

import collections
import functools
import math
from typing import Callable, Iterator

import jax
import numpy as np
import tensorflow as tf

from resa_jax import augment
from resa_jax import datasets
from resa_jax import device_input
from resa_jax import sharding


# Decoded splits up to this size (per process) are kept in memory (twice, briefly, while
# they become a TensorFlow constant): CIFAR-10's 150 MB and Fashion-MNIST's 47 MB are;
# 6,000 ImageNet-sized images (900 MB) are streamed.
_MAX_CACHE_BYTES = 512 << 20


def steps_per_epoch(config) -> int:
  """Training steps per epoch: config.steps_per_epoch if > 0, else N // batch_size."""
  if config.steps_per_epoch > 0:
    return int(config.steps_per_epoch)
  source = datasets.open_source(config)
  return max(1, datasets.num_examples(source, config.train_split) // config.batch_size)


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
  images, labels = split_arrays(source, split, process_index, process_count)
  return {'image': tf.constant(images), 'label': tf.constant(labels)}


def split_arrays(source: datasets.Source, split: str, process_index: int = 0,
                 process_count: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """A process's share of `split` decoded, in file order: uint8 (n, H, W, C) and int32
  (n,).  The defaults read the whole split (what `augment_on='device'` holds).  Filled
  into arrays of the expected size batch by batch, so that reading holds the split once,
  not also as a list of batches and their concatenation."""
  ds = source.read(split, process_index, process_count, None, False)
  ds = ds.map(lambda r: {'image': source.decode(r['image']), 'label': r['label']},
              num_parallel_calls=tf.data.AUTOTUNE)
  expected = math.ceil(datasets.num_examples(source, split) / process_count)
  images = labels = None
  n = 0
  for part in ds.batch(1024).as_numpy_iterator():
    k = len(part['label'])
    if images is None:
      images = np.empty((expected,) + part['image'].shape[1:], part['image'].dtype)
      labels = np.empty((expected,), part['label'].dtype)
    if n + k > len(images):  # more than counted (a source whose count is a guess): grow
      images = np.concatenate([images[:n], part['image']])
      labels = np.concatenate([labels[:n], part['label']])
    else:
      images[n:n + k], labels[n:n + k] = part['image'], part['label']
    n += k
  if not n:
    raise ValueError(f'{source.name} split {split!r} is empty')
  return images[:n], labels[:n]


def _epoch_records(source: datasets.Source, split: str, *, epoch: int, order_seed: int,
                   num_local: int, skip: int, process_index: int, process_count: int,
                   in_memory: dict | None, shuffle_buffer: int) -> tf.data.Dataset:
  """Records j = skip .. num_local - 1 of this process's epoch `epoch`, as
  (j, {'image': uint8 (H, W, C), 'label'}) or, streamed, with the image not yet
  decoded.  If the share is shorter than num_local, it is cycled (mocked data)."""
  if in_memory is not None:
    images, labels = in_memory['image'], in_memory['label']
    n = int(images.shape[0])
    perm = tf.random.experimental.stateless_shuffle(
        tf.range(n, dtype=tf.int32), seed=[order_seed, epoch])
    indices = tf.tile(perm, [math.ceil(num_local / n)])[skip:num_local]
    ds = tf.data.Dataset.from_tensor_slices(indices)
    ds = ds.map(lambda i: {'image': tf.gather(images, i), 'label': tf.gather(labels, i)})
    return ds.enumerate(start=skip)
  seed = _python_seed(order_seed, epoch)
  ds = source.read(split, process_index, process_count, seed, False)
  ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=False)
  if source.may_fail_decoding:
    # Decode before counting, so skipping on resume drops the same bad images.
    ds = ds.map(lambda r: {**r, 'image': source.decode(r['image'])},
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
  ds = ds.repeat().take(num_local).skip(skip)
  return ds.enumerate(start=skip)


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

  def example(j, record, epoch):
    step = epoch * epoch_steps + j // local_batch
    slot = process_index * local_batch + j % local_batch
    seed = tf.random.experimental.stateless_fold_in(
        tf.random.experimental.stateless_fold_in(base_seed, step), slot)
    image = record['image'] if decoded else source.decode(record['image'])
    return make_example(image, record['label'], seed)

  epoch, step_in_epoch = divmod(int(start_step), epoch_steps)
  while True:
    ds = _epoch_records(
        source, split, epoch=epoch, order_seed=order_seed,
        num_local=epoch_steps * local_batch, skip=step_in_epoch * local_batch,
        process_index=process_index, process_count=process_count, in_memory=in_memory,
        shuffle_buffer=int(config.shuffle_buffer))
    ds = ds.map(functools.partial(example, epoch=tf.constant(epoch, tf.int64)),
                num_parallel_calls=num_parallel_calls, deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True)
    ds = ds.prefetch(tf.data.AUTOTUNE).with_options(options)
    yield from ds.as_numpy_iterator()
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


def _linear_probe_example_fn(config, source: datasets.Source):
  size, dtype = int(config.crops_size[0]), tf.as_dtype(config.dtype)

  def make_example(image, label, seed):
    view = augment.classifier_view(image, seed, size)
    return {'image': tf.cast(augment.normalize(view, *source.eval_mean_std), dtype),
            'label': label}

  return make_example


def _to_mesh(mesh, host_batches: Iterator[dict], prefetch: int) -> Iterator[dict]:
  """Global arrays from host batches, `prefetch` batches transferred ahead."""
  queue = collections.deque()
  for batch in host_batches:
    queue.append(sharding.shard_host_batch(mesh, batch))
    if len(queue) > max(0, prefetch):
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def create_train_iterator(config, mesh, *, start_step: int = 0) -> Iterator[dict]:
  """Endless iterator of training batches; item i is global step start_step + i.

  Yields {'views': (x_0, ..., x_{V-1})}, x_k a global array of shape
  (batch_size, crops_size[g_k], crops_size[g_k], C) in config.dtype, sharded along the
  batch over the mesh's data axis.  `config` is taken as valid (`validate_config`);
  only the batch is checked against this mesh.  config.augment_on == 'device': the
  same structure from `device_input` (the whole split held on the devices).
  """
  sharding.check_batch_size(config.batch_size, mesh.size)
  source = datasets.open_source(config)
  if config.get('augment_on', 'host') == 'device':
    images, _ = split_arrays(source, config.train_split)  # every process: the whole split
    return device_input.create_device_train_iterator(
        config, mesh, images, source.mean, source.std, start_step=start_step)
  host = _host_batches(
      config, source, config.train_split, batch_size=config.batch_size,
      start_step=start_step, make_example=_train_example_fn(config, source), salt='train',
      process_index=jax.process_index(), process_count=jax.process_count())
  return _to_mesh(mesh, host, config.prefetch)


def create_linear_probe_train_iterator(config, mesh, *,
                                       batch_size: int | None = None) -> Iterator[dict]:
  """Endless iterator over config.eval_train_split for linear probes.

  RandomResizedCrop(crops_size[0], scale 0.08-1, bilinear) + flip, normalised:
  {'image': (B, S, S, C) config.dtype, 'label': (B,) int32}, B = batch_size or
  config.batch_size; deterministic as the training stream.
  """
  batch_size = batch_size or config.batch_size
  sharding.check_batch_size(batch_size, mesh.size)
  source = datasets.open_source(config)
  host = _host_batches(
      config, source, config.eval_train_split, batch_size=batch_size,
      start_step=0, make_example=_linear_probe_example_fn(config, source),
      salt='linear_probe', process_index=jax.process_index(),
      process_count=jax.process_count())
  return _to_mesh(mesh, host, config.prefetch)


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


def create_eval_iterator(config, mesh, split: str, *, batch_size: int | None = None,
                         resize_method: str = 'bilinear') -> Iterator[dict]:
  """One pass over `split` without augmentation.

  Yields {'image': (B, S, S, C) config.dtype, 'label': (B,) int32, 'mask': (B,) bool}
  (+ 'coarse_label' for CIFAR-100), S = crops_size[0]: ImageNet-sized images are
  resized (shorter side config.eval_resize, `resize_method`: the authors' kNN uses
  'bicubic', their linear evaluation 'bilinear') and centre-cropped, small fixed-size
  ones are used as they are.  Normalised with the source's evaluation statistics
  (`Source.eval_mean_std`).  B = batch_size or config.batch_size; the last batches are
  padded (mask False) so that every example appears exactly once with mask True.
  """
  batch_size = batch_size or config.batch_size
  sharding.check_batch_size(batch_size, mesh.size)
  source = datasets.open_source(config)
  ds = _eval_dataset(config, source, split, batch_size=batch_size,
                     process_index=jax.process_index(), process_count=jax.process_count(),
                     resize_method=resize_method)
  return _to_mesh(mesh, ds.as_numpy_iterator(), config.prefetch)
