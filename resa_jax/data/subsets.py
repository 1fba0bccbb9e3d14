"""The labelled subsets of semi-supervised fine-tuning (docs/method.md, 'Evaluation
protocols') and their input.

The subsets are the 1% and 10% ImageNet lists of SimCLR / SwAV / the ReSA authors
(shipped in resa_jax/data, matched on TFDS's `file_name`), or a seeded class-balanced
subset of any other dataset.  `subset_train_batches` streams augmented batches of a
subset (`views_tf.classifier_view`); the fine-tuning itself is
`evaluate.linear.train_classifier` with an encoder learning rate (`evaluate/run.py`
puts them together).  TensorFlow is imported only by the functions that read data.
"""

from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import Mesh
import numpy as np

from resa_jax import sharding
from resa_jax.data import sources

_SUBSET_FILES = {0.01: '1percent.txt', 0.1: '10percent.txt'}


def imagenet_subset_file_names(fraction: float) -> list[str]:
  """The file names (e.g. 'n01440764_10026.JPEG') of the 1% or 10% ImageNet subset.

  The lists of SimCLR / SwAV / the ReSA authors, shipped in resa_jax/data.
  """
  import importlib.resources  # pylint: disable=g-import-not-at-top
  if fraction not in _SUBSET_FILES:
    raise ValueError(f'the ImageNet subsets are 1% and 10% (--semi_fraction=0.01 '
                          f'or 0.1), not {fraction}')
  text = importlib.resources.files('resa_jax').joinpath(
      'data', _SUBSET_FILES[fraction]).read_text()
  return [line.strip() for line in text.splitlines() if line.strip()]


def file_name_filter(file_names: Sequence[str]):
  """A tf.data predicate: record -> whether record['file_name'] is in `file_names`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(
          tf.constant(list(file_names), tf.string),
          tf.ones([len(file_names)], tf.int32)), default_value=0)
  return lambda record: table.lookup(record['file_name']) > 0


def balanced_subset(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
  """Sorted indices of a class-balanced subset: round(fraction * n_c) (at least 1)
  random examples of each class c, drawn with a seeded generator (deterministic);
  0 < fraction <= 1 (`run.Options.check` validates the flag)."""
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  chosen = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    count = max(1, int(round(fraction * len(members))))
    chosen.append(rng.permutation(members)[:count])
  return np.sort(np.concatenate(chosen))


def _subset_records(config, source: sources.Source, fraction: float, seed: int):
  """(records, size): the labelled subset of config.eval_train_split.

  records: tf.data.Dataset of {'image': encoded, 'label': int32} over the whole
  subset (every process), in file order.  ImageNet (imagenet2012): the shipped
  1% / 10% lists, matched on TFDS's 'file_name' feature.  Other datasets:
  `balanced_subset` of the split's labels.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from resa_jax.data import tfds_sources  # pylint: disable=g-import-not-at-top
  split = config.eval_train_split
  if config.dataset == 'imagenet2012':
    names = imagenet_subset_file_names(fraction)
    builder = tfds_sources.prepared_builder('imagenet2012', config)
    records = builder.as_dataset(split=split, shuffle_files=False,
                                 decoders={'image': tfds.decode.SkipDecoding()})
    records = records.filter(file_name_filter(names)).map(
        lambda ex: {'image': ex['image'], 'label': tf.cast(ex['label'], tf.int32)})
    return records, len(names)
  records = source.read(split, 0, 1, None, True)
  labels = np.concatenate(list(
      records.map(lambda r: r['label']).batch(8192).as_numpy_iterator()))
  keep = balanced_subset(labels, fraction, seed)
  table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(tf.constant(keep, tf.int64),
                                          tf.ones([len(keep)], tf.int32)), default_value=0)
  records = records.enumerate().filter(lambda i, r: table.lookup(i) > 0).map(
      lambda i, r: {'image': r['image'], 'label': r['label']})
  return records, len(keep)


def subset_train_batches(config, mesh: Mesh, source: sources.Source, fraction: float, *,
                         batch_size: int, seed: int = 0, cache_file: str = ''):
  """(endless iterator, subset size): augmented labelled batches of a subset.

  The subset of `_subset_records`; each process takes every process_count-th
  record.  The records are cached (in memory, or in `cache_file`, so ImageNet is
  read once) and reshuffled every pass with a fixed seed; each image gets
  RandomResizedCrop(crops_size[0], scale 0.08-1) + horizontal flip, normalised,
  with a stateless seed of (seed, process, example counter).  Yields
  {'image': (B, S, S, C) config.dtype, 'label': (B,) int32} as global arrays
  sharded over the mesh.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from resa_jax.data import views_tf  # pylint: disable=g-import-not-at-top
  sharding.check_batch_size(batch_size, mesh.size)
  records, size = _subset_records(config, source, fraction, seed)
  process_count, process_index = jax.process_count(), jax.process_index()
  if size < batch_size:
    raise ValueError(f'the {fraction:g} subset has {size} examples, fewer than one '
                          f'batch of {batch_size}; lower --semi_batch_size')
  if process_count > 1:
    records = records.shard(process_count, process_index)
  crop = int(config.crops_size[0])
  dtype = tf.dtypes.as_dtype(config.dtype)
  base_seed = tf.constant([seed, 7919 * (process_index + 1)], tf.int64)

  def make_example(counter, record):
    view = views_tf.classifier_view(source.decode(record['image']),
                                   tf.random.experimental.stateless_fold_in(base_seed, counter),
                                   crop)
    return {'image': tf.cast(views_tf.normalize(view, *source.eval_mean_std), dtype),
            'label': record['label']}

  ds = records.cache(cache_file)
  ds = ds.shuffle(min(int(config.shuffle_buffer), size), seed=seed,
                  reshuffle_each_iteration=True).repeat().enumerate()
  ds = ds.map(make_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size // process_count, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

  def batches():
    for batch in ds.as_numpy_iterator():
      yield sharding.shard_host_batch(mesh, batch)

  return batches(), size
