"""Image folders, `config.data_dir`/<split>/<class>/<image> (files named .jpg, .jpeg or
.png, any case, as TFDS's `ImageFolder` lists them), as a `sources.Source`.  Each
split is checked on first use: every file is decoded once, and the split is the files
that decode without a message; the others are named in one `note:` line (with what the
decoders printed on stderr, summarised) and never read again.  So the split's size, the
epochs and the kNN bank count images that are used, and the decoders' messages are not
repeated each epoch.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import re
import sys
import tempfile

import numpy as np
import tensorflow as tf

from resa_jax import reporting
from resa_jax.data import tfds_sources
from resa_jax.data.sources import DatasetNotFoundError, IMAGENET_MEAN_STD, Source


def open_image_folder(config) -> Source:
  """`config.data_dir`/<split>/<class>/<image>.  A split is checked on first use
  (`_decodable_files`): the files that decode are the split; the others are named in one
  `note:` line and never read again, so counts, epochs and the kNN bank are exact."""
  root = config.data_dir
  hint = ('config.data_dir must hold train/<class>/<image> and val/<class>/<image> '
          '(files named .jpg, .jpeg or .png)')
  if not root or not tf.io.gfile.isdir(os.path.join(root, 'train')):
    raise DatasetNotFoundError(f'image_folder: no train/ folder in {root!r}: {hint}')
  splits = _folders(root)
  class_names = sorted({name for split in splits for name in _folders(os.path.join(root, split))})
  decode = tfds_sources.decode_image(3)

  @functools.lru_cache(maxsize=None)
  def files(split):
    if split not in splits:
      raise ValueError(f'image_folder has splits {splits}, not {split!r}')
    where = os.path.join(root, split)
    return _decodable_files(*_listed(where, class_names), where, decode)

  def read(split, shard_index, shard_count, shuffle_seed, exact_shards):
    del exact_shards
    paths, labels, _ = files(split)
    if shuffle_seed is not None:  # a file order of its own for each seed (epoch)
      order = np.random.default_rng(shuffle_seed).permutation(len(paths))
      paths, labels = paths[order], labels[order]
    ds = tf.data.Dataset.from_tensor_slices({'path': paths, 'label': labels})
    return ds.shard(shard_count, shard_index).map(
        lambda r: {'image': tf.io.read_file(r['path']), 'label': r['label']})

  def known_num_examples(split):
    return len(files(split)[1]) if split in splits else None

  return Source(
      name='image_folder', read=read, decode=decode, known_num_examples=known_num_examples,
      num_classes=len(class_names),
      image_shape=(None, None, 3), mean=IMAGENET_MEAN_STD[0],
      std=IMAGENET_MEAN_STD[1], num_listed=lambda split: files(split)[2])


# Files are checked this many at a time; a chunk whose decoding printed something is
# decoded again one file at a time, to tell which file it was.
_CHECK_CHUNK = 1024


# The files listed, as TFDS's ImageFolder lists them; the classes are the class folders
# of every split, sorted (so a label means the same class in every split).
_EXTENSIONS = ('.jpg', '.jpeg', '.png')


def _folders(path: str) -> list[str]:
  """The names of the folders in `path`, sorted."""
  return sorted(name.rstrip('/') for name in tf.io.gfile.listdir(path)
                if tf.io.gfile.isdir(os.path.join(path, name)))


def _listed(where: str, class_names: list) -> tuple[list, list]:
  """(paths, labels) of the files where/<class>/<name> named like an image, in sorted
  order; a label is the class's index in `class_names`."""
  paths, labels = [], []
  for label, name in enumerate(class_names):
    folder = os.path.join(where, name)
    if tf.io.gfile.isdir(folder):
      files = sorted(f for f in tf.io.gfile.listdir(folder) if f.lower().endswith(_EXTENSIONS))
      paths += [os.path.join(folder, f) for f in files]
      labels += [label] * len(files)
  return paths, labels


def _decodable_files(paths: list, labels: list, where: str, decode):
  """(paths, int32 labels, the number of files listed) of the files listed (`paths`,
  `labels`) that `decode` (the pipelines' decoder) reads and decodes without a message.
  Each file is decoded once, in parallel (1,350 to 1,800 ImageNet-sized JPEGs a second
  on 2 cores).  libjpeg and libpng print their warnings on stderr (and have no switch for
  it), so a file they warn about (e.g. 'Corrupt JPEG data: premature end of data
  segment': a damaged image that still decodes) is left out too, and the pipelines never
  decode a file that prints.  What was left out and why is one `note:` line;
  DatasetNotFoundError if no file decodes."""
  num_listed = len(paths)
  if not num_listed:
    raise DatasetNotFoundError(f'image_folder: {where} holds no .jpg, .jpeg or .png file in '
                               'a class folder')

  def image(path):  # the file's image; an error (not a file, unreadable, no image) drops it
    return decode(tf.io.read_file(path))
  kept, failed, warned, said = [], [], {}, []
  with _stderr_captured() as printed:
    for start in range(0, num_listed, _CHECK_CHUNK):
      chunk = paths[start:start + _CHECK_CHUNK]
      decodes = tf.data.Dataset.from_tensor_slices((tf.range(len(chunk)), chunk)).map(
          lambda i, path: (i, tf.shape(image(path))[0]),
          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
      good = [int(i) for i, _ in decodes.ignore_errors().as_numpy_iterator()]
      failed += [chunk[i] for i in sorted(set(range(len(chunk))) - set(good))]
      chunk_said = printed()
      said += chunk_said
      for i in good if chunk_said else ():  # which file printed: one at a time
        image(chunk[i])
        if lines := printed():
          warned[chunk[i]] = lines[0]
      kept += [(chunk[i], labels[start + i]) for i in good if chunk[i] not in warned]
  if not kept:
    raise DatasetNotFoundError(
        f'image_folder: none of the {num_listed} images of {where} decodes' + _summary(said))
  if failed or warned:
    name = lambda path: os.path.relpath(path, where)  # noqa: E731
    reporting.say(
        f'note: image_folder {where}: {len(kept)} of {num_listed} images used'
        + (f'; {len(failed)} did not decode ({_some(sorted(map(name, failed)))})' if failed
           else '')
        + (f'; {len(warned)} decoded with a warning, left out ('
           + _some([f'{name(p)}: {w.strip()!r}' for p, w in sorted(warned.items())]) + ')'
           if warned else '') + _summary(said))
  return (np.array([p for p, _ in kept]), np.array([label for _, label in kept], np.int32),
          num_listed)


def _some(names: list, shown: int = 3) -> str:
  return ', '.join(names[:shown]) + (f' and {len(names) - shown} more' if len(names) > shown
                                     else '')


@contextlib.contextmanager
def _stderr_captured():
  """File descriptor 2 (where C libraries print) sent to a temporary file while the body
  runs; yields `new()`: the lines written there since its last call."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)  # fd 2 shares the file's offset: read with pread
    done = 0

    def new() -> list[str]:
      nonlocal done
      sys.stderr.flush()
      text = os.pread(capture.fileno(), os.fstat(capture.fileno()).st_size - done, done)
      done += len(text)
      return text.decode(errors='replace').splitlines()

    try:
      yield new
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)


def _summary(lines, kinds_shown: int = 4) -> str:
  """'; stderr said: 80x "Invalid JPEG file structure: ...", ...': each kind of line
  (its text with the numbers taken out) once, with how often, the most frequent first."""
  kinds = collections.defaultdict(list)
  for line in lines:
    kinds[re.sub(r'[0-9]+', '#', line)].append(line)
  if not kinds:
    return ''
  ranked = sorted(kinds.values(), key=len, reverse=True)
  return ('; stderr said: ' + ', '.join(f'{len(k)}x {k[0].strip()!r}'
                                        for k in ranked[:kinds_shown])
          + (f' and {len(ranked) - kinds_shown} other kinds of line'
             if len(ranked) > kinds_shown else ''))
