"""What a dataset is to the rest of the project, with no TensorFlow: the `Source` record,
`DatasetInfo`, the dataset names and their normalisation statistics, the sizes of a
split, and the one decision of what is held in memory (`share_fits`).

`resa_jax.data.open_source` makes the `Source` of `config.dataset`: the TFDS-backed ones
in `tfds_sources.py` (TensorFlow), the CIFAR-10 JPEG snapshot in `local_files.py` (no
TensorFlow: it trains where only JAX is installed).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np

DATASETS = ('fashion_mnist', 'cifar10', 'cifar10_jpeg', 'cifar100', 'stl10', 'imagenet2012',
            'imagenet100', 'image_folder', 'fake')
# The datasets the CIFAR protocols (5-NN Euclidean majority vote) apply to.
CIFAR_DATASETS = ('cifar10', 'cifar10_jpeg', 'cifar100')
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
MEAN_STD = {
    'fashion_mnist': ((0.2860,), (0.3530,)),
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    'stl10': ((0.43, 0.42, 0.39), (0.27, 0.26, 0.27)),  # the authors' values
}


class DatasetNotFoundError(ValueError):
  """The dataset is not prepared or its files are unreadable; the message says how to
  prepare it."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the rest of the project needs to know of `config.dataset`."""
  num_train_examples: int  # of config.train_split
  num_eval_train_examples: int  # of config.eval_train_split
  num_eval_examples: int  # of config.eval_split
  num_classes: int
  image_shape: tuple  # (H, W, C) of the raw images; None where sizes vary
  mean: tuple  # per channel, of images in [0, 1]
  std: tuple
  num_coarse_classes: int | None = None  # CIFAR-100's 20 superclasses


@dataclasses.dataclass(frozen=True)
class Source:
  """One dataset, before augmentation.

  read(split, shard_index, shard_count, shuffle_seed, exact_shards) ->
    tf.data.Dataset of one shard of `split` as records
    {'image': encoded, 'label': int32, [extra labels: int32]}, in an order that is a
    function of `shuffle_seed` only (the file order when it is None).  Records hold
    the image still encoded (bytes; for fake data, its index).  With `exact_shards`,
    every shard has at most ceil(N / shard_count) examples (evaluation needs that
    bound; training does not).  Shard i is records i, i + shard_count, ... of the file
    order, or the i-th of shard_count contiguous blocks (TFDS's own split).
  decode(record['image']) -> uint8 (H, W, C).
  known_num_examples(split) -> global size of the split, None if unknown (then
    `num_examples` counts it).
  rows(split, start, stop) -> (uint8 (n, H, W, C), int32 (n,)): examples [start, stop)
    of the split's file order, decoded; only for sources of one image size (None for
    the others).  What the devices hold (each device its block) and in-memory
    evaluation read.
  needs_tensorflow: False for a source whose `rows` work without TensorFlow (the
    CIFAR-10 JPEG snapshot): it trains with the views made on the devices and
    evaluates from memory where TensorFlow is not installed.
  """
  name: str
  read: Callable[..., Any]
  decode: Callable[[Any], Any]
  known_num_examples: Callable[[str], int | None]
  num_classes: int
  image_shape: tuple
  mean: tuple
  std: tuple
  extra_labels: tuple = ()  # further int labels carried to the eval inputs
  # (mean, std) of the evaluation inputs when they differ from training's: the
  # authors' CIFAR eval loader normalises CIFAR-100 with the CIFAR-10 statistics.
  eval_normalization: tuple | None = None
  num_coarse_classes: int | None = None
  # num_listed(split): files listed, where only those that decode are the split (image
  # folders); None: every listed example is read.
  num_listed: Callable[[str], int] | None = None
  rows: Callable[[str, int, int], tuple] | None = None
  needs_tensorflow: bool = True

  @property
  def eval_mean_std(self) -> tuple:
    """(mean, std) the evaluation inputs are normalised with."""
    return self.eval_normalization or (self.mean, self.std)


def array_source(name: str, splits: dict, mean: tuple, std: tuple,
                 num_classes: int) -> Source:
  """A Source of numpy arrays already in memory, {split: (uint8 (N, H, W, C), int32
  (N,))}, all of one image shape: for data a program already holds (benchmarks, tests,
  a dataset of your own); it needs no TensorFlow unless the host placement reads it."""
  shapes = {images.shape[1:] for images, _ in splits.values()}
  if len(shapes) != 1 or any(images.dtype != np.uint8 or images.ndim != 4 or
                             len(images) != len(labels) for images, labels in splits.values()):
    raise ValueError(f'{name}: array_source takes uint8 images (N, H, W, C) of one shape and '
                     f'one label per image, got {sorted(map(str, shapes))}')

  def arrays(split):
    if split not in splits:
      raise ValueError(f'{name} has splits {sorted(splits)}, not {split!r}')
    return splits[split]

  def read(split, shard_index, shard_count, shuffle_seed, exact_shards):
    del shuffle_seed, exact_shards
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  (the host pipeline's)
    images, labels = arrays(split)
    ds = tf.data.Dataset.from_tensor_slices({'image': images, 'label': labels})
    return ds.shard(shard_count, shard_index)

  def rows(split, start, stop):
    images, labels = arrays(split)
    return images[start:stop], np.asarray(labels[start:stop], np.int32)

  return Source(name=name, read=read, decode=lambda image: image,
                known_num_examples=lambda split: len(arrays(split)[1]),
                num_classes=num_classes, image_shape=tuple(shapes.pop()), mean=tuple(mean),
                std=tuple(std), rows=rows, needs_tensorflow=False)


def num_examples(source: Source, split: str) -> int:
  """Global size of `split`; counted by reading when unknown (mocked data)."""
  n = source.known_num_examples(split)
  if n is None:
    ds = source.read(split, 0, 1, None, True)  # tf.data
    n = int(ds.cardinality())
    if n < 0:  # unknown or infinite: count
      n = int(ds.reduce(np.int64(0), lambda count, _: count + 1))
  return n


def used_words(source: Source, split: str) -> str:
  """' (2 of 82 images used)' where files of `split` were skipped, else '': what a
  refusal about the size of `split` adds to its count."""
  n, listed = num_examples(source, split), source.num_listed and source.num_listed(split)
  return f' ({n} of {listed} images used)' if listed and listed != n else ''


def dataset_info(config, source: Source) -> DatasetInfo:
  """Sizes, classes and statistics of `config.dataset`, whose open `source` is given."""
  return DatasetInfo(
      num_train_examples=num_examples(source, config.train_split),
      num_eval_train_examples=num_examples(source, config.eval_train_split),
      num_eval_examples=num_examples(source, config.eval_split),
      num_classes=source.num_classes, image_shape=source.image_shape,
      mean=tuple(source.mean), std=tuple(source.std),
      num_coarse_classes=source.num_coarse_classes)


def share_bytes(source: Source, split: str, holders: int) -> int | None:
  """Decoded bytes of the largest of `holders` equal shares of `split` (uint8 pixels);
  None where the images vary in size (they are never held)."""
  if None in source.image_shape:
    return None
  share = math.ceil(num_examples(source, split) / holders)
  return share * int(np.prod(source.image_shape))


def share_fits(source: Source, split: str, holders: int, budget_mb: float) -> bool:
  """The one rule of what is held in memory: `split` split over `holders` (processes
  for the host's memory, devices for theirs) is held when each share, decoded, is at
  most `budget_mb` MiB; otherwise it is streamed from its files."""
  size = share_bytes(source, split, holders)
  return size is not None and size <= budget_mb * 2 ** 20
