"""Where the examples of a split come from, before any augmentation: TFDS datasets,
Fashion-MNIST from local IDX files, image folders, ImageNet-100, fake data.

A `Source` (sources.py) is what the input pipeline (`input_pipeline.py`), evaluation and
the tests read; `open_source(config)` makes the one `config.dataset` names, once per run
(the caller hands it down), and `dataset_info(config, source)` gives the sizes, classes
and normalisation the rest of the project needs.  Importing this module does not start
TensorFlow: the TFDS-backed sources (`tfds_sources.py`) import it when opened, and the
CIFAR-10 JPEG snapshot, held in memory, needs none (`Source.arrays`).

Datasets (`config.dataset`)
---------------------------
fashion_mnist (28x28x1; prepared offline from the Debian package dataset-fashion-mnist
when present, see `local_data.prepare_fashion_mnist`), cifar10, cifar10_jpeg (the
CIFAR-10 JPEG snapshot, `config.data_dir` = the archive or its folder, default
../shared/datasets/cifar10_jpeg.tar.gz; `local_data.load_cifar10_jpeg`), cifar100 (fine
`label`; the eval inputs also carry `coarse_label`), stl10 (use
`train_split='train+unlabelled'` for pre-training), imagenet2012, imagenet100 (the
100 classes of resa_jax/data/imagenet100_classes.txt, relabelled 0..99 in sorted
synset order), image_folder (`<data_dir>/{train,val}/<class>/<image>`, through
`tfds.folder_dataset.ImageFolder`; undecodable images are skipped) and fake (random
uint8 images, no TFDS; for benchmarks and tests).  A TFDS dataset not prepared is
prepared on first use where that can work (single process, config.tfds_download), as
`tfds.load` does; otherwise `DatasetNotFoundError` says how to prepare it.
"""

from __future__ import annotations

import math

import numpy as np

from resa_jax import local_data
from resa_jax import reporting
# The names a user of this module needs, defined in the TensorFlow-free sources.py.
from resa_jax.sources import (  # pylint: disable=unused-import
    CIFAR_DATASETS, DATASETS, DATASETS_HELD_ON_DEVICE, MEAN_STD, DatasetInfo,
    DatasetNotFoundError, Source, salt)


def _cifar10_jpeg_source(config) -> Source:
  """CIFAR-10 (JPEG snapshot), decoded into memory; splits 'train' and 'test'.

  Normalised with CIFAR-10's statistics (the authors' values), not the snapshot's own.
  """
  try:
    path = local_data.cifar10_jpeg_path(config.data_dir)
    arrays = local_data.load_cifar10_jpeg(path)
  except (OSError, ValueError) as e:
    raise DatasetNotFoundError(f'cifar10_jpeg: {reporting.one_line(e, 300)}') from e

  def split_arrays(split):
    if split not in arrays:
      raise ValueError(f'cifar10_jpeg has splits {sorted(arrays)}, not {split!r}')
    return arrays[split]

  def read(split, process_index, process_count, shuffle_seed, exact_shards):
    del shuffle_seed, exact_shards  # file order; the pipeline shuffles in memory
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  (the host pipeline's)
    images, labels = split_arrays(split)
    ds = tf.data.Dataset.from_tensor_slices({'image': images, 'label': labels})
    return ds.shard(process_count, process_index)

  mean, std = MEAN_STD['cifar10']
  return Source(
      name='cifar10_jpeg', read=read, decode=lambda image: image,
      known_num_examples=lambda split: len(arrays[split][1]) if split in arrays else None,
      num_classes=len(local_data.CIFAR10_CLASSES), image_shape=(32, 32, 3), mean=mean, std=std,
      arrays=split_arrays)


def open_source(config) -> Source:
  """The Source of `config.dataset`.  Opening lists or decodes files (an image folder's
  tree, the JPEG snapshot): open it once per run and hand it down."""
  if config.dataset not in DATASETS:
    raise ValueError(f'unknown dataset {config.dataset!r}; known: {", ".join(DATASETS)}')
  if config.dataset == 'cifar10_jpeg':
    return _cifar10_jpeg_source(config)
  from resa_jax import tfds_sources  # pylint: disable=g-import-not-at-top  (TensorFlow)
  return tfds_sources.open_tfds_source(config)


def num_examples(source: Source, split: str) -> int:
  """Global size of `split`; counted by reading when unknown (mocked data)."""
  n = source.known_num_examples(split)
  if n is None:
    ds = source.read(split, 0, 1, None, True)  # tf.data
    n = int(ds.cardinality())
    if n < 0:  # unknown or infinite: count
      n = int(ds.reduce(np.int64(0), lambda count, _: count + 1))
  return n


def dataset_info(config, source: Source | None = None) -> DatasetInfo:
  """Sizes, classes and statistics of `config.dataset` (`source`: it, already open)."""
  source = source or open_source(config)
  return DatasetInfo(
      num_train_examples=num_examples(source, config.train_split),
      num_eval_train_examples=num_examples(source, config.eval_train_split),
      num_eval_examples=num_examples(source, config.eval_split),
      num_classes=source.num_classes, image_shape=source.image_shape,
      mean=tuple(source.mean), std=tuple(source.std),
      num_coarse_classes=source.num_coarse_classes)


def split_arrays(source: Source, split: str, process_index: int = 0,
                 process_count: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """A process's share of `split` decoded, in file order: uint8 (n, H, W, C) and int32
  (n,).  The defaults read the whole split (what `augment_on='device'` holds).

  A source held in memory (`Source.arrays`) gives views of its arrays.  Others are read
  through tf.data and filled into arrays of the expected size batch by batch, so that
  reading holds the split once, not also as a list of batches and their concatenation.
  """
  if source.arrays is not None:
    images, labels = source.arrays(split)
    return images[process_index::process_count], labels[process_index::process_count]
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  ds = source.read(split, process_index, process_count, None, False)
  ds = ds.map(lambda r: {'image': source.decode(r['image']), 'label': r['label']},
              num_parallel_calls=tf.data.AUTOTUNE)
  expected = math.ceil(num_examples(source, split) / process_count)
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
