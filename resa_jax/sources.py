"""What a dataset is to the rest of the project, with no TensorFlow: the `Source` record,
`DatasetInfo`, the dataset names and their normalisation statistics.

`datasets.open_source` makes the `Source` of `config.dataset`; the TFDS-backed ones are
built in `tfds_sources.py` (TensorFlow), the in-memory CIFAR-10 JPEG snapshot in
`datasets.py` (no TensorFlow: it trains where only JAX is installed).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable

DATASETS = ('fashion_mnist', 'cifar10', 'cifar10_jpeg', 'cifar100', 'stl10', 'imagenet2012',
            'imagenet100', 'image_folder', 'fake')
# The datasets the CIFAR protocols (5-NN Euclidean majority vote) apply to.
CIFAR_DATASETS = ('cifar10', 'cifar10_jpeg', 'cifar100')
# Datasets of one image size that always decode, which augment_on='device' holds whole
# on the devices; the others (ImageNet, image folders) are streamed from files.
DATASETS_HELD_ON_DEVICE = ('fashion_mnist', 'cifar10', 'cifar10_jpeg', 'cifar100', 'stl10',
                           'fake')
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
MEAN_STD = {
    'fashion_mnist': ((0.2860,), (0.3530,)),
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    'stl10': ((0.43, 0.42, 0.39), (0.27, 0.26, 0.27)),  # the authors' values
}


class DatasetNotFoundError(ValueError):
  """The dataset is not prepared; the message says how to prepare it."""


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

  read(split, process_index, process_count, shuffle_seed, exact_shards) ->
    tf.data.Dataset of this process's share of `split` as records
    {'image': encoded, 'label': int32, [extra labels: int32]}, in an order that is a
    function of `shuffle_seed` only (the file order when it is None).  Records hold
    the image still encoded (bytes; for fake data, its index).  With `exact_shards`,
    every process gets at most ceil(N / process_count) examples (evaluation needs
    that bound; training does not).  A process's share is records process_index,
    process_index + process_count, ... of the file order.
  decode(record['image']) -> uint8 (H, W, C).
  known_num_examples(split) -> global size of the split, None if unknown (then
    `datasets.num_examples` counts it).
  arrays(split) -> (uint8 (N, H, W, C), int32 (N,)), the whole split decoded in file
    order, for a source held in memory; None for the others.  Only these train and
    evaluate without TensorFlow (`read` and `decode` are tf.data's).
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
  may_fail_decoding: bool = False  # undecodable images are dropped, before skipping
  arrays: Callable[[str], tuple] | None = None

  @property
  def eval_mean_std(self) -> tuple:
    """(mean, std) the evaluation inputs are normalised with."""
    return self.eval_normalization or (self.mean, self.std)


def salt(name: str) -> int:
  """A stable 31-bit integer for a name (a split, a stream), for seeds."""
  return zlib.crc32(name.encode()) & 0x7FFFFFFF
