"""Datasets prepared from files already on this machine, without internet.

Fashion-MNIST: the Debian package `dataset-fashion-mnist` ships the same IDX files
TFDS downloads (recompressed, so their checksums differ); `prepare_fashion_mnist`
has TFDS's own builder prepare `fashion_mnist` from them.

CIFAR-10 (JPEG snapshot): 60,000 32x32 JPEG files in `train|test/<class>/NNNN.jpg`,
as a .tar.gz or unpacked (../shared/datasets/cifar10_jpeg.tar.gz; lossy copies of
CIFAR-10, quality about 75).  `load_cifar10_jpeg` reads them once per process and
decodes the ranges asked for into uint8 arrays, with the standard splits and CIFAR-10's
label order; `cifar10_jpeg_source` is its `Source`.  Numbers measured on it are
"CIFAR-10 (JPEG snapshot)", not CIFAR-10.

Nothing here imports TensorFlow at import time.
"""

from __future__ import annotations

import functools
import os
import pathlib
import tarfile
import tempfile
import urllib.parse
import zlib

import numpy as np

from resa_jax import reporting
from resa_jax.data import sources

DEBIAN_FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
_FASHION_MNIST_FILES = ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz',
                        't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')


def fashion_mnist_dir(manual_dir: str | None) -> str | None:
  """`manual_dir` or the Debian package's folder, whichever has the 4 IDX files first."""
  for folder in (manual_dir, DEBIAN_FASHION_MNIST_DIR):
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
    if isinstance(urls, dict):
      return {key: self.download(url) for key, url in urls.items()}
    if isinstance(urls, (list, tuple)):
      return type(urls)(self.download(url) for url in urls)
    return self._local_path(urls)

  def download_and_extract(self, urls):
    return self._dl_manager.extract(self.download(urls))

  def __getattr__(self, name):
    return getattr(self._dl_manager, name)


def prepare_fashion_mnist(local_dir: str, data_dir: str | None) -> None:
  """Prepares TFDS's `fashion_mnist` in `data_dir` from the IDX .gz files in `local_dir`.

  TFDS's own builder does the work (same features, splits, example order and
  version, so `tfds.builder('fashion_mnist')` reads the result); only its downloads
  are redirected to the local files.  TFDS's manual-dir mechanism alone does not do:
  it validates the files against the registered checksums of the originals and the
  Debian files differ.  Temporary extractions go to a scratch dir that is removed.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
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
# CIFAR-10 as JPEG files (../shared/datasets/cifar10_jpeg.tar.gz)

CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse',
                   'ship', 'truck')  # alphabetical, which is also CIFAR-10's label order
CIFAR10_JPEG_ENV = 'RESA_CIFAR10_JPEG'
_CIFAR10_JPEG_SPLITS = ('train', 'test')
_ARCHIVE_NAME = 'cifar10_jpeg.tar.gz'
_JPEG_START = b'\xff\xd8'  # every JPEG file's first two bytes (SOI)


def cifar10_jpeg_path(data_dir: str | None) -> str:
  """Where the CIFAR-10 JPEG snapshot is: `data_dir` (the .tar.gz, a folder with train/
  and test/, or a folder holding cifar10_jpeg.tar.gz) if given, else $RESA_CIFAR10_JPEG
  if set, else ../shared/datasets/cifar10_jpeg.tar.gz beside the repository.  The first
  of these that is given is used or refused (FileNotFoundError naming it), never
  replaced by a copy found elsewhere."""
  repository = pathlib.Path(__file__).resolve().parents[2]
  for what, candidate in (('--config.data_dir', data_dir),
                          (f'${CIFAR10_JPEG_ENV}', os.environ.get(CIFAR10_JPEG_ENV)),
                          ('the default', str(repository.parent / 'shared' / 'datasets' /
                                              _ARCHIVE_NAME))):
    if not candidate:
      continue
    path = pathlib.Path(candidate)
    if path.is_dir() and (path / _ARCHIVE_NAME).is_file():
      path = path / _ARCHIVE_NAME
    if path.is_file() or (path / 'train').is_dir():
      return str(path)
    hint = ('' if what != 'the default' else ': pass --config.data_dir=PATH (the '
            f'{_ARCHIVE_NAME} archive or its unpacked folder) or set ${CIFAR10_JPEG_ENV}')
    found = ('is neither the CIFAR-10 JPEG snapshot archive nor a folder holding train/ '
             'and test/') if path.exists() else 'does not exist'
    raise FileNotFoundError(f'{candidate} ({what}) {found}{hint}')
  raise AssertionError('unreachable: the default path is always a candidate')


def _jpeg_files(path: str):
  """Yields (split, class name, file name, bytes) of every JPEG in the archive/folder."""
  if os.path.isdir(path):
    for split in _CIFAR10_JPEG_SPLITS:
      for class_name in sorted(os.listdir(os.path.join(path, split))):
        folder = os.path.join(path, split, class_name)
        for name in sorted(os.listdir(folder)):
          with open(os.path.join(folder, name), 'rb') as f:
            yield split, class_name, name, f.read()
    return
  with tarfile.open(path) as archive:
    for member in archive:
      parts = member.name.strip('./').split('/')
      if member.isfile() and len(parts) == 3 and parts[2].lower().endswith('.jpg'):
        yield parts[0], parts[1], parts[2], archive.extractfile(member).read()


class Cifar10Jpeg:
  """The snapshot's files, read once and kept encoded (19 MB); decoded on demand.

  `labels[split]`: int32 (N,) in CIFAR-10's class order; examples are ordered by class,
  then file name.  `rows(split, start, stop)` decodes examples [start, stop) only (what
  one device holds, or one process's evaluation share), remembering the last few
  ranges asked for (the periodic kNN reads the same two each time).
  """

  def __init__(self, path: str):
    self.path = path
    files = {split: [] for split in _CIFAR10_JPEG_SPLITS}
    try:
      for split, class_name, name, data in _jpeg_files(path):
        if split not in files:
          continue
        if class_name not in CIFAR10_CLASSES:
          raise ValueError(f'{path}: unknown class folder {split}/{class_name}')
        if not data.startswith(_JPEG_START):  # found now, not when its block is decoded
          raise ValueError(f'{path}: {split}/{class_name}/{name} is not a JPEG file')
        files[split].append((CIFAR10_CLASSES.index(class_name), name, data))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
      raise ValueError(f'{path}: damaged or truncated ({type(e).__name__}: {e})') from e
    for split, found in files.items():
      if not found:
        raise ValueError(f'{path} holds no {split}/<class>/*.jpg files')
      found.sort(key=lambda f: f[:2])
    self._encoded = {split: [f[2] for f in found] for split, found in files.items()}
    self.labels = {split: np.asarray([f[0] for f in found], np.int32)
                   for split, found in files.items()}
    self.rows = functools.lru_cache(maxsize=4)(self._decode_rows)

  def _decode_rows(self, split: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    if split not in self.labels:
      raise ValueError(f'cifar10_jpeg has splits {sorted(self.labels)}, not {split!r}')
    try:
      images = _decode_jpegs(self._encoded[split][start:stop])
    except ValueError as e:  # undecodable or mixed sizes
      raise sources.DatasetNotFoundError(
          f'cifar10_jpeg: {self.path}: {split} holds a file that is not a 32x32 JPEG '
          f'({type(e).__name__})') from e
    if images.shape[1:] != (32, 32, 3):
      raise sources.DatasetNotFoundError(
          f'cifar10_jpeg: {self.path}: {split} images are {images.shape[1:]}, not 32x32x3')
    return images, self.labels[split][start:stop]


@functools.lru_cache(maxsize=2)
def load_cifar10_jpeg(path: str) -> Cifar10Jpeg:
  """The snapshot at `path` (an archive or a folder), read once per process."""
  return Cifar10Jpeg(path)


def cifar10_jpeg_source(config):
  """CIFAR-10 (JPEG snapshot) as a `Source` of splits 'train' and 'test', with no
  TensorFlow (but where tf.data reads it).  Normalised with CIFAR-10's statistics (the
  authors' values), not the snapshot's own."""
  try:
    snapshot = load_cifar10_jpeg(cifar10_jpeg_path(config.data_dir))
  except (OSError, ValueError) as e:
    raise sources.DatasetNotFoundError(f'cifar10_jpeg: {reporting.one_line(e, 300)}') from e

  def read(split, shard_index, shard_count, shuffle_seed, exact_shards):
    del shuffle_seed, exact_shards  # file order; the pipeline shuffles in memory
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  (the host pipeline's)
    images, labels = snapshot.rows(split, 0, len(snapshot.labels[split]))
    ds = tf.data.Dataset.from_tensor_slices({'image': images, 'label': labels})
    return ds.shard(shard_count, shard_index)

  mean, std = sources.MEAN_STD['cifar10']
  return sources.Source(
      name='cifar10_jpeg', read=read, decode=lambda image: image,
      known_num_examples=lambda split: len(snapshot.labels.get(split, ())) or None,
      num_classes=len(CIFAR10_CLASSES), image_shape=(32, 32, 3), mean=mean, std=std,
      rows=snapshot.rows, needs_tensorflow=False)


def _decode_jpegs(files: list[bytes]) -> np.ndarray:
  """uint8 (N, H, W, 3) of N encoded images of one size; ValueError if one is not.

  TensorFlow's `decode_jpeg` (libjpeg, fancy upsampling) where TensorFlow is installed:
  the decoder every other dataset of this project goes through, whose pixel means are the
  snapshot README's (0.4868, 0.4822, 0.4414).  Without TensorFlow (the training command
  runs on the snapshot with JAX alone), PIL's, the authors' loader's: it decodes the
  chroma differently, its means are about 0.004 higher in R and B, a pixel differs from
  TensorFlow's by about 1/255 on average (tests/test_cifar10_jpeg.py).
  """
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    tf = None
  if tf is None:
    import io  # pylint: disable=g-import-not-at-top
    from PIL import Image  # pylint: disable=g-import-not-at-top
    try:
      return np.stack([np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))
                       for data in files])
    except OSError as e:  # PIL's UnidentifiedImageError is an OSError
      raise ValueError(str(e)) from e
  decoded = tf.data.Dataset.from_tensor_slices(files).map(
      lambda data: tf.io.decode_jpeg(data, channels=3), num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True).batch(4096)
  try:
    return np.concatenate(list(decoded.as_numpy_iterator()))
  except tf.errors.InvalidArgumentError as e:
    raise ValueError(str(e)) from e


def hide_accelerators_from_tf() -> None:
  """TF only feeds the host; JAX owns the GPUs (and their memory)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TF already initialised its devices: nothing to do safely.
    pass
