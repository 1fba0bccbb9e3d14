"""The datasets read through TensorFlow Datasets: the TFDS catalogue (Fashion-MNIST,
CIFAR-10/100, STL-10, ImageNet), ImageNet-100 and fake data, as
`sources.Source`s whose `read` and `decode` are tf.data's.  `resa_jax.data.open_source`
calls `open_tfds_source`; importing this module starts TensorFlow (kept off the
accelerators).  `decoded_arrays` fills numpy arrays from a tf.data stream of records,
for the `rows` of the sources of one image size and the host's in-memory shares.
"""

from __future__ import annotations

import functools
import importlib.resources
import os

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from resa_jax import reporting
from resa_jax.data import local_files
from resa_jax.data.order import salt
from resa_jax.data.sources import (DatasetNotFoundError, IMAGENET_MEAN_STD, MEAN_STD,
                                   Source)

local_files.hide_accelerators_from_tf()

# Sizes of the ImageNet-100 subset listed in data/imagenet100_classes.txt.
_IMAGENET100_SIZES = {'train': 126_689, 'validation': 5_000}


def _prepare_hint(name: str, data_dir: str, manual_dir: str) -> str:
  if name == 'fashion_mnist':
    return ('install the Debian package dataset-fashion-mnist (files in '
            f'{local_files.DEBIAN_FASHION_MNIST_DIR}), or run `tfds build fashion_mnist '
            f'--data_dir={data_dir}` where there is internet access')
  if name == 'imagenet2012':
    return ('put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from image-net.org) '
            f'in {manual_dir} (config.manual_dir) and run `tfds build imagenet2012 '
            f'--data_dir={data_dir} --manual_dir={manual_dir}`')
  return (f'run `tfds build {name} --data_dir={data_dir}` where there is internet '
          'access, or copy a prepared data dir there')


def prepared_builder(name: str, config) -> tfds.core.DatasetBuilder:
  """The TFDS builder of `name`, prepared in config.data_dir (TFDS's default if None).

  An unprepared dataset is prepared here when this is the only process: Fashion-MNIST
  from local IDX files when they exist, others by TFDS as usual (download, or the
  manual dir for ImageNet) unless config.tfds_download is False.  Failures become
  DatasetNotFoundError.
  """
  builder = tfds.builder(name, data_dir=config.data_dir)
  if builder.is_prepared():
    return builder
  data_dir = str(builder.data_dir_root)
  manual_dir = config.manual_dir or os.path.join(data_dir, 'downloads', 'manual')
  hint = _prepare_hint(name, data_dir, manual_dir)
  if jax.process_count() > 1:  # Concurrent preparation would race: do it once, before.
    raise DatasetNotFoundError(f'{name} is not prepared in {data_dir}: {hint}')
  local_dir = local_files.fashion_mnist_dir(config.manual_dir) if name == 'fashion_mnist' else None
  if not local_dir and not config.get('tfds_download', True):
    raise DatasetNotFoundError(
        f'{name} is not prepared in {data_dir} (config.tfds_download is off): {hint}')
  try:
    if local_dir:
      local_files.prepare_fashion_mnist(local_dir, config.data_dir)
    else:
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          manual_dir=config.manual_dir, try_download_gcs=False))
  except Exception as e:  # pylint: disable=broad-except
    reason = reporting.one_line(f'{type(e).__name__}: {e}', 300)
    raise DatasetNotFoundError(
        f'{name} is not prepared in {data_dir} and could not be prepared ({reason}): '
        f'{hint}') from e
  return tfds.builder(name, data_dir=config.data_dir)


def _tfds_read(builder, *, label_keys=('label',), label_map=None):
  """A `read` for a TFDS builder; `label_map` (int64 -> int64 table, -1: drop)
  relabels and filters."""

  def relabel(ds):
    ds = ds.map(lambda ex: {'image': ex['image'],
                            **{k: tf.cast(ex[k], tf.int32) for k in label_keys}})
    if label_map is not None:
      ds = ds.map(lambda ex: {
          **ex, 'label': tf.cast(label_map.lookup(tf.cast(ex['label'], tf.int64)), tf.int32)})
      ds = ds.filter(lambda ex: ex['label'] >= 0)
    return ds

  def read(split, shard_index, shard_count, shuffle_seed, exact_shards):
    decoders = {'image': tfds.decode.SkipDecoding()}
    if label_map is not None and exact_shards and shard_count > 1:
      # Filtering after splitting would make the shares uneven: filter, then shard.
      ds = relabel(builder.as_dataset(split=split, decoders=decoders))
      return ds.shard(shard_count, shard_index)
    subsplit = tfds.split_for_jax_process(
        split, process_index=shard_index, process_count=shard_count)
    read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False)
    ds = builder.as_dataset(split=subsplit, shuffle_files=shuffle_seed is not None,
                            read_config=read_config, decoders=decoders)
    return relabel(ds)

  return read


def _split_sizes(builder, split):
  try:
    return builder.info.splits[split].num_examples
  except (KeyError, ValueError, TypeError, AssertionError):  # e.g. mocked data: unknown
    return None


def decode_image(channels: int):
  def decode(encoded):
    image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
    return tf.ensure_shape(image, [None, None, channels])
  return decode


def _tfds_source(config) -> Source:
  name = config.dataset
  builder = prepared_builder(name, config)
  features = builder.info.features
  shape = tuple(features['image'].shape)
  mean, std = MEAN_STD.get(name, IMAGENET_MEAN_STD)
  coarse = ('coarse_label',) if 'coarse_label' in features else ()
  read = _tfds_read(builder, label_keys=('label',) + coarse)
  decode = _fixed_shape(decode_image(shape[-1]), shape)
  return Source(
      name=name, read=read, decode=decode, rows=_rows(read, decode),
      known_num_examples=functools.partial(_split_sizes, builder),
      num_classes=features['label'].num_classes,
      image_shape=shape, mean=mean, std=std, extra_labels=coarse,
      eval_normalization=MEAN_STD['cifar10'] if name == 'cifar100' else None,
      num_coarse_classes=features['coarse_label'].num_classes if coarse else None)


def imagenet100_classes() -> list[str]:
  """The 100 synset ids of ImageNet-100, in the shipped file's order."""
  text = importlib.resources.files('resa_jax').joinpath(
      'data', 'imagenet100_classes.txt').read_text()
  return [line.strip() for line in text.splitlines() if line.strip()]


def _imagenet100_source(config) -> Source:
  builder = prepared_builder('imagenet2012', config)
  synsets = sorted(imagenet100_classes())
  names = builder.info.features['label'].names
  old_ids = tf.constant([names.index(s) for s in synsets], tf.int64)
  label_map = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(old_ids, tf.range(len(synsets), dtype=tf.int64)),
      default_value=-1)

  def known_num_examples(split):
    # The subset's sizes are known for the full splits of a prepared ImageNet only.
    if _split_sizes(builder, split) is None:
      return None
    return _IMAGENET100_SIZES.get(split)

  return Source(
      name='imagenet100', read=_tfds_read(builder, label_map=label_map),
      decode=decode_image(3), known_num_examples=known_num_examples,
      num_classes=len(synsets), image_shape=(None, None, 3),
      mean=IMAGENET_MEAN_STD[0], std=IMAGENET_MEAN_STD[1])


def _fake_source(config) -> Source:
  """Random uint8 images (size config.fake_image_size, 3 channels) and labels.

  Example i of split s is a stateless function of (s, i), like a real dataset it
  does not change with config.seed: records carry only (salt of s, i), the image
  is made by `decode`.
  """
  size, num_classes = int(config.fake_image_size), int(config.fake_num_classes)
  split_size = int(config.fake_num_examples)

  def read(split, shard_index, shard_count, shuffle_seed, exact_shards):
    del shuffle_seed, exact_shards
    split_salt = salt(split)
    label_seed = tf.constant([split_salt, 0], tf.int64)

    def record(i):
      label = tf.random.stateless_uniform(
          [], tf.random.experimental.stateless_fold_in(label_seed, i), 0, num_classes,
          tf.int32)
      return {'image': tf.stack([tf.constant(split_salt, tf.int64), i]), 'label': label}

    return tf.data.Dataset.range(split_size).shard(shard_count, shard_index).map(record)

  def decode(salt_and_index):  # (2,) int64 -> uint8 (size, size, 3)
    image_seed = tf.random.experimental.stateless_fold_in(
        tf.stack([salt_and_index[0], tf.constant(1, tf.int64)]), salt_and_index[1])
    return tf.cast(tf.random.stateless_uniform(
        [size, size, 3], image_seed, 0, 256, tf.int32), tf.uint8)

  return Source(
      name='fake', read=read, decode=decode, rows=_rows(read, decode),
      known_num_examples=lambda split: split_size, num_classes=num_classes,
      image_shape=(size, size, 3), mean=IMAGENET_MEAN_STD[0], std=IMAGENET_MEAN_STD[1])


def _rows(read, decode):
  """`Source.rows` of a source read through tf.data: examples [start, stop) of the
  file order (the records before `start` are read, not decoded)."""
  def rows(split, start, stop):
    ds = read(split, 0, 1, None, False).skip(start).take(stop - start)
    return decoded_arrays(ds, decode, stop - start, f'split {split!r} [{start}:{stop}]')
  return rows


def decoded_arrays(records: tf.data.Dataset, decode, expected: int,
                   what: str) -> tuple[np.ndarray, np.ndarray]:
  """The images of `records` decoded and their labels: uint8 (n, H, W, C), int32 (n,),
  filled batch by batch into arrays of `expected` rows (so that the split is held
  once, not also as a list of batches and their concatenation); ValueError naming
  `what` if there are none."""
  ds = records.map(lambda r: {'image': decode(r['image']), 'label': r['label']},
                   num_parallel_calls=tf.data.AUTOTUNE)
  images = labels = None
  n = 0
  for part in ds.batch(1024).as_numpy_iterator():
    k = len(part['label'])
    if images is None:
      images = np.empty((max(expected, k),) + part['image'].shape[1:], part['image'].dtype)
      labels = np.empty((len(images),), part['label'].dtype)
    if n + k > len(images):  # more than counted (a source whose count is a guess): grow
      images = np.concatenate([images[:n], part['image']])
      labels = np.concatenate([labels[:n], part['label']])
    else:
      images[n:n + k], labels[n:n + k] = part['image'], part['label']
    n += k
  if not n:
    raise ValueError(f'{what} has no examples')
  return images[:n], labels[:n]


def _fixed_shape(decode, shape):
  if None in shape:
    return decode
  return lambda encoded: tf.ensure_shape(decode(encoded), shape)


def open_tfds_source(config) -> Source:
  """The Source of `config.dataset`, one of the datasets read through TFDS."""
  if config.dataset == 'fake':
    return _fake_source(config)
  if config.dataset == 'imagenet100':
    return _imagenet100_source(config)
  return _tfds_source(config)
