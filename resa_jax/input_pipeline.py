"""TFDS -> tf.data -> global sharded arrays: ReSA's multi-view training input and the
evaluation inputs.

One training step reads `config.batch_size` (B, global) images and makes
V = sum(config.crops_nmb) views of each (augment.py: view 0 weak, the others strong):

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

Datasets (`config.dataset`)
---------------------------
fashion_mnist (28x28x1; prepared offline from the Debian package dataset-fashion-mnist
when present, see `_prepare_fashion_mnist_from_files`), cifar10, cifar100 (fine
`label`; the eval inputs also carry `coarse_label`), stl10 (use
`train_split='train+unlabelled'` for pre-training), imagenet2012, imagenet100 (the
100 classes of resa_jax/data/imagenet100_classes.txt, relabelled 0..99 in sorted
synset order), image_folder (`<data_dir>/{train,val}/<class>/<image>`, through
`tfds.folder_dataset.ImageFolder`; undecodable images are skipped) and fake (random
uint8 images, no TFDS; for benchmarks and tests).  A TFDS dataset that is not
prepared is prepared on first use where that can work (single process,
config.tfds_download), as `tfds.load` does; otherwise `DatasetNotFoundError` says how
to prepare it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib.resources
import math
import os
import tempfile
import urllib.parse
import zlib
from typing import Callable, Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from resa_jax import augment
from resa_jax import sharding


def _hide_accelerators_from_tf() -> None:
  """TF only feeds the host; JAX owns the GPUs (and their memory)."""
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TF already initialised its devices: nothing to do safely.
    pass


_hide_accelerators_from_tf()

DATASETS = ('fashion_mnist', 'cifar10', 'cifar100', 'stl10', 'imagenet2012',
            'imagenet100', 'image_folder', 'fake')
DEBIAN_FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
_FASHION_MNIST_FILES = ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz',
                        't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')
# Sizes of the ImageNet-100 subset listed in data/imagenet100_classes.txt.
_IMAGENET100_SIZES = {'train': 126_689, 'validation': 5_000}
# Decoded splits up to this size (per process) are kept in memory.
_MAX_CACHE_BYTES = 1 << 30
_IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_MEAN_STD = {
    'fashion_mnist': ((0.2860,), (0.3530,)),
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    'stl10': ((0.43, 0.42, 0.39), (0.27, 0.26, 0.27)),  # the authors' values
}
_DTYPES = {'float32': tf.float32, 'bfloat16': tf.bfloat16, 'float16': tf.float16}


class DatasetNotFoundError(ValueError):
  """The dataset is not prepared; the message says how to prepare it."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_train_examples: int  # of config.train_split
  num_eval_train_examples: int  # of config.eval_train_split
  num_eval_examples: int  # of config.eval_split
  num_classes: int
  image_shape: tuple  # (H, W, C) of the raw images; None where sizes vary
  mean: tuple  # per channel, of images in [0, 1]
  std: tuple
  num_coarse_classes: int | None = None  # CIFAR-100's 20 superclasses


# ---------------------------------------------------------------------------
# Validation


def validate_config(config) -> None:
  """Raises ValueError (one line) on a config the input pipeline cannot serve."""
  if config.dataset not in DATASETS:
    raise ValueError(f'unknown dataset {config.dataset!r}; known: {", ".join(DATASETS)}')
  groups = {name: tuple(config[name]) for name in (
      'crops_nmb', 'crops_size', 'crops_min_scale', 'crops_max_scale',
      'gaussian_prob', 'solarization_prob')}
  lengths = {name: len(value) for name, value in groups.items()}
  if len(set(lengths.values())) != 1:
    raise ValueError(f'crop-group lists must have equal lengths, got {lengths}')
  if not groups['crops_nmb'] or min(groups['crops_nmb']) < 1 or sum(groups['crops_nmb']) < 2:
    raise ValueError('crops_nmb needs positive counts and at least 2 views in all '
                     f'(one weak, one strong), got {groups["crops_nmb"]}')
  if min(groups['crops_size']) < 1:
    raise ValueError(f'crops_size must be positive, got {groups["crops_size"]}')
  for lo, hi in zip(groups['crops_min_scale'], groups['crops_max_scale']):
    if not 0 < lo <= hi <= 1:
      raise ValueError('need 0 < crops_min_scale <= crops_max_scale <= 1, got '
                       f'{groups["crops_min_scale"]} and {groups["crops_max_scale"]}')
  probs = {'color_jitter_prob': config.color_jitter_prob,
           'grayscale_prob': config.grayscale_prob, 'flip_prob': config.flip_prob}
  probs.update({f'gaussian_prob[{i}]': p for i, p in enumerate(groups['gaussian_prob'])})
  probs.update({f'solarization_prob[{i}]': p
                for i, p in enumerate(groups['solarization_prob'])})
  for name, p in probs.items():
    if not 0 <= p <= 1:
      raise ValueError(f'{name} must be a probability, got {p}')
  if config.eval_resize < groups['crops_size'][0]:
    raise ValueError(f'eval_resize ({config.eval_resize}) must be >= crops_size[0] '
                     f'({groups["crops_size"][0]}): evaluation centre-crops the resized image')
  if config.dtype not in _DTYPES:
    raise ValueError(f'dtype must be one of {sorted(_DTYPES)}, got {config.dtype!r}')
  check_batch_size(config.batch_size, jax.device_count())


def check_batch_size(batch_size: int, num_devices: int) -> None:
  if batch_size < 1 or batch_size % num_devices:
    raise ValueError(f'batch size {batch_size} must be a positive multiple of the '
                     f'number of devices ({num_devices})')
  if batch_size % jax.process_count():
    raise ValueError(f'batch size {batch_size} must be divisible by the number of '
                     f'processes ({jax.process_count()})')


# ---------------------------------------------------------------------------
# Sources: where the examples of a split come from, before any augmentation.
#
# `read` gives this process's share of a split as records {'image': ..., 'label':
# int32, [extra labels]}, in an order that is a function of `shuffle_seed` only
# (the file order when it is None).  Records hold the image still encoded (bytes;
# for fake data, its index): `decode` turns one into uint8 (H, W, C).  With
# `exact_shards`, every process gets at most ceil(N / process_count) examples
# (evaluation needs that bound; training does not).


@dataclasses.dataclass(frozen=True)
class _Source:
  name: str
  read: Callable[..., tf.data.Dataset]  # (split, process_index, process_count, shuffle_seed, exact_shards)
  decode: Callable[[tf.Tensor], tf.Tensor]  # record['image'] -> uint8 (H, W, C)
  known_num_examples: Callable[[str], int | None]  # global size of a split, None if unknown
  num_classes: int
  image_shape: tuple
  mean: tuple
  std: tuple
  extra_labels: tuple = ()  # further int labels carried to the eval inputs
  num_coarse_classes: int | None = None
  may_fail_decoding: bool = False  # undecodable images are dropped, before skipping


def _one_line(text: str) -> str:
  return ' '.join(str(text).split())


def _prepare_hint(name: str, data_dir: str, manual_dir: str) -> str:
  if name == 'fashion_mnist':
    return ('install the Debian package dataset-fashion-mnist (files in '
            f'{DEBIAN_FASHION_MNIST_DIR}), or run `tfds build fashion_mnist '
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
  local_dir = _local_fashion_mnist_dir(config) if name == 'fashion_mnist' else None
  if not local_dir and not config.get('tfds_download', True):
    raise DatasetNotFoundError(
        f'{name} is not prepared in {data_dir} (config.tfds_download is off): {hint}')
  try:
    if local_dir:
      _prepare_fashion_mnist_from_files(local_dir, config.data_dir)
    else:
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          manual_dir=config.manual_dir, try_download_gcs=False))
  except Exception as e:  # pylint: disable=broad-except
    reason = _one_line(f'{type(e).__name__}: {e}')[:300]
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

  def read(split, process_index, process_count, shuffle_seed, exact_shards):
    decoders = {'image': tfds.decode.SkipDecoding()}
    if label_map is not None and exact_shards and process_count > 1:
      # Filtering after splitting would make the shares uneven: filter, then shard.
      ds = relabel(builder.as_dataset(split=split, decoders=decoders))
      return ds.shard(process_count, process_index)
    subsplit = tfds.split_for_jax_process(
        split, process_index=process_index, process_count=process_count)
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


def _decode_image(channels: int):
  def decode(encoded):
    image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
    return tf.ensure_shape(image, [None, None, channels])
  return decode


def _tfds_source(config) -> _Source:
  name = config.dataset
  builder = prepared_builder(name, config)
  features = builder.info.features
  shape = tuple(features['image'].shape)
  mean, std = _MEAN_STD.get(name, _IMAGENET_MEAN_STD)
  coarse = ('coarse_label',) if 'coarse_label' in features else ()
  return _Source(
      name=name,
      read=_tfds_read(builder, label_keys=('label',) + coarse),
      decode=_fixed_shape(_decode_image(shape[-1]), shape),
      known_num_examples=functools.partial(_split_sizes, builder),
      num_classes=features['label'].num_classes,
      image_shape=shape, mean=mean, std=std, extra_labels=coarse,
      num_coarse_classes=features['coarse_label'].num_classes if coarse else None)


def imagenet100_classes() -> list[str]:
  """The 100 synset ids of ImageNet-100, in the shipped file's order."""
  text = importlib.resources.files('resa_jax').joinpath(
      'data', 'imagenet100_classes.txt').read_text()
  return [line.strip() for line in text.splitlines() if line.strip()]


def _imagenet100_source(config) -> _Source:
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

  return _Source(
      name='imagenet100', read=_tfds_read(builder, label_map=label_map),
      decode=_decode_image(3), known_num_examples=known_num_examples,
      num_classes=len(synsets), image_shape=(None, None, 3),
      mean=_IMAGENET_MEAN_STD[0], std=_IMAGENET_MEAN_STD[1])


def _image_folder_source(config) -> _Source:
  root = config.data_dir
  hint = ('config.data_dir must hold train/<class>/<image> and val/<class>/<image> '
          '(jpeg, png, ...)')
  if not root or not tf.io.gfile.isdir(os.path.join(root, 'train')):
    raise DatasetNotFoundError(f'image_folder: no train/ folder in {root!r}: {hint}')
  builder = tfds.folder_dataset.ImageFolder(root)

  def read(split, process_index, process_count, shuffle_seed, exact_shards):
    del shuffle_seed, exact_shards  # ImageFolder's own file shuffle is unseeded.
    if split not in builder.info.splits:
      raise ValueError(f'image_folder has splits {sorted(builder.info.splits)}, '
                       f'not {split!r}')
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            decoders={'image': tfds.decode.SkipDecoding()})
    ds = ds.shard(process_count, process_index)
    return ds.map(lambda ex: {'image': ex['image'], 'label': tf.cast(ex['label'], tf.int32)})

  return _Source(
      name='image_folder', read=read, decode=_decode_image(3),
      known_num_examples=functools.partial(_split_sizes, builder),
      num_classes=builder.info.features['label'].num_classes,
      image_shape=(None, None, 3), mean=_IMAGENET_MEAN_STD[0],
      std=_IMAGENET_MEAN_STD[1], may_fail_decoding=True)


def _fake_source(config) -> _Source:
  """Random uint8 images (size config.fake_image_size, 3 channels) and labels.

  Example i of split s is a stateless function of (s, i), like a real dataset it
  does not change with config.seed: records carry only (salt of s, i), the image
  is made by `decode`.
  """
  size, num_classes = int(config.fake_image_size), int(config.fake_num_classes)
  num_examples = int(config.fake_num_examples)

  def read(split, process_index, process_count, shuffle_seed, exact_shards):
    del shuffle_seed, exact_shards
    salt = _salt(split)
    label_seed = tf.constant([salt, 0], tf.int64)

    def record(i):
      label = tf.random.stateless_uniform(
          [], tf.random.experimental.stateless_fold_in(label_seed, i), 0, num_classes,
          tf.int32)
      return {'image': tf.stack([tf.constant(salt, tf.int64), i]), 'label': label}

    return tf.data.Dataset.range(num_examples).shard(process_count, process_index).map(record)

  def decode(salt_and_index):  # (2,) int64 -> uint8 (size, size, 3)
    image_seed = tf.random.experimental.stateless_fold_in(
        tf.stack([salt_and_index[0], tf.constant(1, tf.int64)]), salt_and_index[1])
    return tf.cast(tf.random.stateless_uniform(
        [size, size, 3], image_seed, 0, 256, tf.int32), tf.uint8)

  return _Source(
      name='fake', read=read, decode=decode,
      known_num_examples=lambda split: num_examples, num_classes=num_classes,
      image_shape=(size, size, 3), mean=_IMAGENET_MEAN_STD[0], std=_IMAGENET_MEAN_STD[1])


def _fixed_shape(decode, shape):
  if None in shape:
    return decode
  return lambda encoded: tf.ensure_shape(decode(encoded), shape)


def open_source(config) -> _Source:
  if config.dataset not in DATASETS:
    raise ValueError(f'unknown dataset {config.dataset!r}; known: {", ".join(DATASETS)}')
  if config.dataset == 'fake':
    return _fake_source(config)
  if config.dataset == 'image_folder':
    return _image_folder_source(config)
  if config.dataset == 'imagenet100':
    return _imagenet100_source(config)
  return _tfds_source(config)


def _num_examples(source: _Source, split: str) -> int:
  """Global size of `split`; counted by reading when unknown (mocked data)."""
  n = source.known_num_examples(split)
  if n is None:
    ds = source.read(split, 0, 1, None, True)
    n = int(ds.cardinality())
    if n < 0:  # unknown or infinite: count
      n = int(ds.reduce(np.int64(0), lambda count, _: count + 1))
  return n


# ---------------------------------------------------------------------------
# Fashion-MNIST from local IDX files (no internet)


def _local_fashion_mnist_dir(config) -> str | None:
  """config.manual_dir or the Debian package's folder, if it has the 4 IDX files."""
  for folder in (config.manual_dir, DEBIAN_FASHION_MNIST_DIR):
    if folder and all(os.path.isfile(os.path.join(folder, f)) for f in _FASHION_MNIST_FILES):
      return folder
  return None


class _LocalFilesDownloadManager:
  """A TFDS download manager whose downloads are local files of the same name.

  Wraps the builder's own manager: every URL maps to `<local_dir>/<basename of the
  URL>`, which is then extracted by that manager as usual.  No checksum is checked
  (the Debian files are recompressed copies of the originals); the prepared dataset
  is still checked by TFDS's builder (it reads exactly 60000 + 10000 examples).
  """

  def __init__(self, dl_manager, local_dir: str):
    self._dl_manager = dl_manager
    self._local_dir = local_dir

  def _local_path(self, url: str) -> str:
    path = os.path.join(self._local_dir, os.path.basename(urllib.parse.urlparse(url).path))
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path} (for {url}) not found')
    return path

  def download(self, urls):
    return tf.nest.map_structure(self._local_path, urls)

  def download_and_extract(self, urls):
    return self._dl_manager.extract(self.download(urls))

  def __getattr__(self, name):
    return getattr(self._dl_manager, name)


def _prepare_fashion_mnist_from_files(local_dir: str, data_dir: str | None) -> None:
  """Prepares TFDS's `fashion_mnist` in `data_dir` from the IDX .gz files in `local_dir`.

  TFDS's own builder does the work (same features, splits, example order and
  version, so `tfds.builder('fashion_mnist')` reads the result); only its downloads
  are redirected to the local files.  TFDS's manual-dir mechanism alone does not do:
  it validates the files against the registered checksums of the originals and the
  Debian files differ.  Temporary extractions go to a scratch dir that is removed.
  """
  builder_cls = tfds.builder_cls('fashion_mnist')

  class FashionMnistFromLocalFiles(builder_cls, skip_registration=True):
    name = 'fashion_mnist'
    # code_path is only used to find the checksums file, which is not wanted here
    # (and resolving it needs `importlib_resources`, absent from some installs).
    code_path = None

    def _split_generators(self, dl_manager):
      return super()._split_generators(_LocalFilesDownloadManager(dl_manager, local_dir))

  with tempfile.TemporaryDirectory(prefix='resa_fashion_mnist_') as scratch:
    FashionMnistFromLocalFiles(data_dir=data_dir).download_and_prepare(
        download_dir=scratch,
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))


# ---------------------------------------------------------------------------
# Public info


def dataset_info(config) -> DatasetInfo:
  source = open_source(config)
  return DatasetInfo(
      num_train_examples=_num_examples(source, config.train_split),
      num_eval_train_examples=_num_examples(source, config.eval_train_split),
      num_eval_examples=_num_examples(source, config.eval_split),
      num_classes=source.num_classes, image_shape=source.image_shape,
      mean=tuple(source.mean), std=tuple(source.std),
      num_coarse_classes=source.num_coarse_classes)


def steps_per_epoch(config) -> int:
  """Training steps per epoch: config.steps_per_epoch if > 0, else N // batch_size."""
  if config.steps_per_epoch > 0:
    return int(config.steps_per_epoch)
  source = open_source(config)
  return max(1, _num_examples(source, config.train_split) // config.batch_size)


# ---------------------------------------------------------------------------
# Seeds


def _python_seed(*parts: int) -> int:
  """A 31-bit int seed from a few ints (for TFDS / tf.data shuffles)."""
  return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0]
             & 0x7FFFFFFF)


def _salt(name: str) -> int:
  return zlib.crc32(name.encode()) & 0x7FFFFFFF


# ---------------------------------------------------------------------------
# Augmented (training) streams


def _tf_options(num_parallel_calls) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  if num_parallel_calls == 1:
    options.threading.private_threadpool_size = 1
  return options


def _load_into_memory(source: _Source, split: str, process_index: int,
                      process_count: int) -> dict[str, tf.Tensor] | None:
  """This process's share of `split`, decoded, if it is small enough; else None.

  {'image': uint8 (n_local, H, W, C), 'label': int32 (n_local,)}.
  """
  shape = source.image_shape
  if None in shape or source.may_fail_decoding:
    return None
  n_local = math.ceil(_num_examples(source, split) / process_count)
  if n_local * int(np.prod(shape)) > _MAX_CACHE_BYTES:
    return None
  ds = source.read(split, process_index, process_count, None, False)
  ds = ds.map(lambda r: {'image': source.decode(r['image']), 'label': r['label']},
              num_parallel_calls=tf.data.AUTOTUNE)
  parts = list(ds.batch(4096).as_numpy_iterator())
  if not parts:
    raise ValueError(f'{source.name} split {split!r} is empty')
  return {k: tf.constant(np.concatenate([p[k] for p in parts])) for k in parts[0]}


def _epoch_records(source: _Source, split: str, *, epoch: int, order_seed: int,
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


def _host_batches(config, source: _Source, split: str, *, batch_size: int,
                  start_step: int, make_example: Callable, salt: str,
                  process_index: int, process_count: int,
                  num_parallel_calls=tf.data.AUTOTUNE) -> Iterator[dict]:
  """This process's batches (numpy) of global steps start_step, start_step + 1, ...

  make_example(image uint8 (H, W, C), label, seed (2,)) -> dict of tensors; the seed
  is a function of (config.seed, salt, global step, position in the global batch).
  """
  local_batch = batch_size // process_count
  num_examples = _num_examples(source, split)
  epoch_steps = num_examples // batch_size
  if epoch_steps < 1:
    raise ValueError(f'{source.name} split {split!r} has {num_examples} examples, '
                     f'fewer than one batch of {batch_size}')
  in_memory = _load_into_memory(source, split, process_index, process_count)
  decoded = in_memory is not None or source.may_fail_decoding
  base_seed = tf.constant([int(config.seed), _salt(salt)], tf.int64)
  order_seed = _python_seed(int(config.seed), _salt(salt))
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


def _train_example_fn(config, source: _Source):
  specs = augment.view_specs(config)
  dtype = _DTYPES[config.dtype]

  def make_example(image, label, seed):
    del label  # self-supervised
    view_seeds = augment.split_seed(seed, len(specs))
    views = tuple(
        tf.cast(augment.normalize(augment.make_view(image, s, spec), source.mean, source.std),
                dtype)
        for s, spec in zip(view_seeds, specs))
    return {'views': views}  # view k: (crops_size[g_k], crops_size[g_k], C)

  return make_example


def _linear_probe_example_fn(config, source: _Source):
  size, dtype = int(config.crops_size[0]), _DTYPES[config.dtype]

  def make_example(image, label, seed):
    s_crop, s_flip = augment.split_seed(seed, 2)
    view = augment.random_resized_crop(image, s_crop, size, (0.08, 1.0), method='bilinear')
    view = augment.random_flip(view, s_flip, 0.5)
    return {'image': tf.cast(augment.normalize(view, source.mean, source.std), dtype),
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
  batch over the mesh's data axis.
  """
  validate_config(config)
  check_batch_size(config.batch_size, mesh.size)
  source = open_source(config)
  host = _host_batches(
      config, source, config.train_split, batch_size=config.batch_size,
      start_step=start_step, make_example=_train_example_fn(config, source), salt='train',
      process_index=jax.process_index(), process_count=jax.process_count())
  return _to_mesh(mesh, host, config.prefetch)


def create_linear_probe_train_iterator(config, mesh, *, start_step: int = 0,
                                       batch_size: int | None = None) -> Iterator[dict]:
  """Endless iterator over config.eval_train_split for linear probes.

  RandomResizedCrop(crops_size[0], scale 0.08-1, bilinear) + flip, normalised:
  {'image': (B, S, S, C) config.dtype, 'label': (B,) int32}, B = batch_size or
  config.batch_size; same determinism and resume rules as the training stream.
  """
  batch_size = batch_size or config.batch_size
  check_batch_size(batch_size, mesh.size)
  source = open_source(config)
  host = _host_batches(
      config, source, config.eval_train_split, batch_size=batch_size,
      start_step=start_step, make_example=_linear_probe_example_fn(config, source),
      salt='linear_probe', process_index=jax.process_index(),
      process_count=jax.process_count())
  return _to_mesh(mesh, host, config.prefetch)


# ---------------------------------------------------------------------------
# Evaluation (no augmentation)


def _eval_dataset(config, source: _Source, split: str, *, batch_size: int,
                  process_index: int, process_count: int) -> tf.data.Dataset:
  """One pass over this process's share of `split`, padded to the same number of
  batches on every process; padding has mask False."""
  local_batch = batch_size // process_count
  size, dtype = int(config.crops_size[0]), _DTYPES[config.dtype]
  num_batches = math.ceil(math.ceil(_num_examples(source, split) / process_count)
                          / local_batch)
  variable_size = None in source.image_shape

  def preprocess(record):
    image = source.decode(record['image'])
    if variable_size:  # ImageNet-like: resize the shorter side, centre crop
      image = augment.resize_shorter_and_center_crop(image, int(config.eval_resize), size)
    else:  # 28x28, 32x32, 96x96 data: the image itself
      image = augment.plain(image, size)
    example = {'image': tf.cast(augment.normalize(image, source.mean, source.std), dtype),
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


def create_eval_iterator(config, mesh, split: str, *,
                         batch_size: int | None = None) -> Iterator[dict]:
  """One pass over `split` without augmentation.

  Yields {'image': (B, S, S, C) config.dtype, 'label': (B,) int32, 'mask': (B,) bool}
  (+ 'coarse_label' for CIFAR-100), S = crops_size[0]: ImageNet-sized images are
  resized (shorter side config.eval_resize) and centre-cropped, small fixed-size ones
  are used as they are.  B = batch_size or config.batch_size; the last batches are
  padded (mask False) so that every example appears exactly once with mask True.
  """
  batch_size = batch_size or config.batch_size
  check_batch_size(batch_size, mesh.size)
  source = open_source(config)
  ds = _eval_dataset(config, source, split, batch_size=batch_size,
                     process_index=jax.process_index(), process_count=jax.process_count())
  return _to_mesh(mesh, ds.as_numpy_iterator(), config.prefetch)
