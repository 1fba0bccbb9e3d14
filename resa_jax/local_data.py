"""Datasets prepared from files already on this machine, without internet.

Fashion-MNIST: the Debian package `dataset-fashion-mnist` ships the same IDX files
TFDS downloads (recompressed, so their checksums differ); `prepare_fashion_mnist`
has TFDS's own builder prepare `fashion_mnist` from them.
"""

from __future__ import annotations

import os
import tempfile
import urllib.parse

import tensorflow as tf
import tensorflow_datasets as tfds

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
    return tf.nest.map_structure(self._local_path, urls)

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
