"""The datasets behind `resa_jax.data.open_source`: image folders, the TFDS catalogue on
TFDS mock data (with the views made on the host and, for the fixed-size ones, on the
devices from the split held there), ImageNet-100's classes, CIFAR-100's evaluation
statistics, missing data, real Fashion-MNIST (the Debian package); the input's config
refusals are rows of tests/test_refusals.py."""

import os
import pathlib
import re

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from helpers import tiny_config
from resa_jax import data, sharding, validation
from resa_jax.configs import default
from resa_jax.data import local_files, tfds_sources


def small_config(**overrides):
  """Three views (a weak and a strong 32 px view, a strong 16 px one) of 32 px images."""
  return tiny_config(**{**dict(fake_image_size=32, crops_nmb=(1, 1), crops_size=(32, 16),
                               crops_min_scale=(0.2, 0.05), crops_max_scale=(1.0, 0.2),
                               gaussian_prob=(0.5, 0.5), solarization_prob=(0.2, 0.0),
                               eval_resize=36, shuffle_buffer=64), **overrides})


@pytest.fixture(scope='module')
def mesh():
  return sharding.create_mesh()


def take(iterator, num_steps):
  return [jax.tree.map(np.asarray, next(iterator)) for _ in range(num_steps)]


def test_validate_config_accepts_defaults():
  validation.validate_config(small_config())
  validation.validate_config(default.get_config())
  validation.validate_config(small_config(augment_on='device', dataset='cifar10_jpeg'))


def _write_image_folder(root: pathlib.Path):
  rng = np.random.default_rng(0)
  for split, per_class in (('train', 4), ('val', 2)):
    for label in ('ant', 'bee', 'cat'):
      folder = root / split / label
      folder.mkdir(parents=True)
      for i in range(per_class):
        image = rng.integers(0, 256, size=(rng.integers(40, 60), rng.integers(40, 60), 3))
        encoded = tf.io.encode_jpeg(tf.constant(image, tf.uint8)) if i % 2 else \
            tf.io.encode_png(tf.constant(image, tf.uint8))
        (folder / f'{i}.{"jpg" if i % 2 else "png"}').write_bytes(encoded.numpy())
  (root / 'train' / 'ant' / 'broken.jpg').write_bytes(b'not an image')


def test_image_folder(tmp_path, mesh):
  _write_image_folder(tmp_path)
  config = small_config(dataset='image_folder', data_dir=str(tmp_path), eval_split='val',
                        batch_size=8)
  info = data.dataset_info(config)
  assert (info.num_classes, info.image_shape) == (3, (None, None, 3))
  assert (info.num_train_examples, info.num_eval_examples) == (12, 6)  # broken.jpg out
  batch = next(data.train_iterator(config, mesh))
  assert [v.shape for v in batch['views']] == [(8, 32, 32, 3), (8, 32, 32, 3), (8, 16, 16, 3)]
  val = list(data.eval_iterator(config, mesh, 'val'))
  labels = np.concatenate([np.asarray(b['label'])[np.asarray(b['mask'])] for b in val])
  assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]
  train = list(data.eval_iterator(config, mesh, 'train'))
  assert sum(int(np.asarray(b['mask']).sum()) for b in train) == 12  # broken.jpg skipped
  # Streamed from its files (12 decodable images: 3 steps of 4 an epoch), the views made
  # on the host and, the branch ImageNet takes on GPUs and TPUs, cropped on the host and
  # coloured on the devices: resumed exactly.
  four = sharding.create_mesh(jax.devices()[:4])
  source = data.open_source(config)
  for augment_on, kind in (('host', 'host'), ('device', 'streamed')):
    config = small_config(dataset='image_folder', data_dir=str(tmp_path), eval_split='val',
                          batch_size=4, augment_on=augment_on)
    assert data.placement(config, source, four) == kind
    full = take(data.train_iterator(config, four, source=source), 4)
    resumed = take(data.train_iterator(config, four, start_step=2, source=source), 2)
    for x, y in zip(resumed, full[2:]):
      for vx, vy in zip(x['views'], y['views']):
        np.testing.assert_array_equal(vx, vy)


def test_image_folder_of_undecodable_files_is_refused_at_once(tmp_path):
  for split in ('train', 'val'):
    for label in ('ant', 'bee'):
      (tmp_path / split / label).mkdir(parents=True)
      for i in range(3):
        (tmp_path / split / label / f'{i}.jpg').write_bytes(b'not an image')
  config = small_config(dataset='image_folder', data_dir=str(tmp_path), eval_split='val')
  with pytest.raises(data.DatasetNotFoundError,
                     match=r'none of the 6 images of .*train decodes'):
    data.dataset_info(config)
  _write_image_folder(tmp_path / 'good')  # one good train image is enough; val has none
  for label in ('ant', 'bee'):
    (tmp_path / 'good' / 'val' / label / '0.png').write_bytes(b'broken')
  config.data_dir = str(tmp_path / 'mixed')
  (tmp_path / 'mixed').mkdir()
  (tmp_path / 'good' / 'train').rename(tmp_path / 'mixed' / 'train')
  (tmp_path / 'val').rename(tmp_path / 'mixed' / 'val')
  with pytest.raises(data.DatasetNotFoundError, match=r'none of the 6 images of .*mixed/val '
                     'decodes'):
    data.dataset_info(config)
  for path in (tmp_path / 'mixed' / 'val').rglob('*.jpg'):  # class folders of no image
    path.rename(path.with_suffix('.txt'))
  with pytest.raises(data.DatasetNotFoundError,
                     match=r'mixed/val holds no .jpg, .jpeg or .png file in a class folder'):
    data.dataset_info(config)


def _jpeg(rng, size=24) -> bytes:
  return tf.io.encode_jpeg(tf.constant(rng.integers(0, 256, (size, size, 3)), tf.uint8)).numpy()


def test_image_folder_files_left_out_are_named_once_and_never_read_again(tmp_path, mesh,
                                                                         capfd):
  """A truncated JPEG, a file that is no image and a folder named like one cannot be
  read or decoded; a JPEG with junk before its end marker decodes, but libjpeg prints a
  warning for it each time.  All four are left out when the split is first used, named
  in one note line with libjpeg's words, and an epoch over the split decodes only the
  others: nothing more on stderr."""
  rng = np.random.default_rng(1)
  good = {'train': 9, 'val': 4}
  for split, count in good.items():
    for i in range(count):
      folder = tmp_path / split / f'c{i % 2}'
      folder.mkdir(parents=True, exist_ok=True)
      (folder / f'{i}.jpg').write_bytes(_jpeg(rng))
  intact = _jpeg(rng)
  (tmp_path / 'train' / 'c0' / 'cut.jpg').write_bytes(intact[:len(intact) // 2])
  (tmp_path / 'train' / 'c1' / 'text.jpg').write_bytes(b'not an image')
  (tmp_path / 'train' / 'c0' / 'folder.jpg').mkdir()  # listed, cannot be read
  (tmp_path / 'train' / 'c1' / 'junk.jpg').write_bytes(intact[:-2] + bytes(18) + intact[-2:])
  assert tf.io.decode_jpeg(intact[:-2] + bytes(18) + intact[-2:]).shape == (24, 24, 3)
  config = small_config(dataset='image_folder', data_dir=str(tmp_path), eval_split='val',
                        eval_train_split='train', batch_size=8)
  capfd.readouterr()
  info = data.dataset_info(config)
  assert (info.num_train_examples, info.num_eval_examples) == (9, 4)
  out, err = capfd.readouterr()
  notes = [line for line in out.splitlines() if line.startswith('note:')]
  warning = r"'Corrupt JPEG data: \d+ extraneous bytes before marker 0xd9'"
  assert len(notes) == 1 and re.fullmatch(
      f'note: image_folder {re.escape(str(tmp_path))}/train: 9 of 13 images used; 3 did not '
      rf'decode \(c0/cut.jpg, c0/folder.jpg, c1/text.jpg\); 1 decoded with a warning, left out '
      rf'\(c1/junk.jpg: '
      f'{warning}\\); stderr said: 1x {warning}', notes[0]), out
  assert 'Corrupt JPEG' not in err, err
  source = data.open_source(config)
  assert data.used_words(source, 'train') == ' (9 of 13 images used)'
  assert data.used_words(source, 'val') == ''
  capfd.readouterr()
  train = list(data.eval_iterator(config, mesh, 'train', source=source))
  labels = np.concatenate([np.asarray(b['label'])[np.asarray(b['mask'])] for b in train])
  assert sorted(labels.tolist()) == [0] * 5 + [1] * 4
  take(data.train_iterator(config, mesh, source=source), 3)  # more than an epoch
  out, err = capfd.readouterr()
  assert 'JPEG' not in err and 'note:' not in out, (out, err)


def test_missing_data_raises_dataset_not_found(tmp_path):
  config = small_config(dataset='image_folder', data_dir=str(tmp_path / 'nowhere'))
  with pytest.raises(data.DatasetNotFoundError, match='train/') as error:
    data.dataset_info(config)
  assert '\n' not in str(error.value)
  config = small_config(dataset='cifar10', data_dir=str(tmp_path), tfds_download=False)
  with pytest.raises(data.DatasetNotFoundError, match='tfds build cifar10') as error:
    data.dataset_info(config)
  assert '\n' not in str(error.value)
  # ImageNet needs the manual download (no network is tried).
  config = small_config(dataset='imagenet2012', data_dir=str(tmp_path))
  with pytest.raises(data.DatasetNotFoundError, match='ILSVRC2012_img_train.tar') as error:
    data.dataset_info(config)
  assert '\n' not in str(error.value)
  assert isinstance(error.value, ValueError)


def test_imagenet100_class_list():
  classes = tfds_sources.imagenet100_classes()
  assert len(classes) == len(set(classes)) == 100
  assert all(c.startswith('n') and len(c) == 9 for c in classes)


@pytest.mark.parametrize('name, num_classes, raw_shape', [
    ('cifar10', 10, (32, 32, 3)),
    ('cifar100', 100, (32, 32, 3)),
    ('stl10', 10, (96, 96, 3)),
    ('imagenet2012', 1000, (None, None, 3)),
    ('imagenet100', 100, (None, None, 3)),
])
def test_tfds_datasets_on_mock_data(name, num_classes, raw_shape, tmp_path, mesh):
  num_examples = 400 if name == 'imagenet100' else 24  # imagenet100 keeps ~10%
  config = small_config(dataset=name, data_dir=str(tmp_path), batch_size=8,
                        crops_size=(24, 16), eval_resize=28)
  if name == 'stl10':
    config.train_split = 'train+unlabelled'
  if name.startswith('imagenet'):
    config.eval_split = 'validation'
  with tfds.testing.mock_data(num_examples=num_examples):
    info = data.dataset_info(config)
    assert info.num_classes == num_classes and info.image_shape == raw_shape
    assert len(info.mean) == len(info.std) == 3
    source = data.open_source(config)
    for augment_on in ('host', 'device'):  # on the devices: held if it can be, else streamed
      config.augment_on = augment_on
      kind = data.placement(config, source, mesh)
      assert kind == ('host' if augment_on == 'host' else 'held' if None not in raw_shape
                      else 'streamed')
      if kind != 'streamed' or name == 'imagenet2012':
        batch = next(data.train_iterator(config, mesh, source=source))
        assert [v.shape for v in batch['views']] == [(8, 24, 24, 3), (8, 24, 24, 3),
                                                     (8, 16, 16, 3)], kind
    evals = list(data.eval_iterator(config, mesh, config.eval_split, source=source))
  assert evals[0]['image'].shape == (8, 24, 24, 3)
  masks = np.concatenate([np.asarray(b['mask']) for b in evals])
  labels = np.concatenate([np.asarray(b['label']) for b in evals])[masks]
  assert masks.sum() == info.num_eval_examples
  assert 0 <= labels.min() and labels.max() < num_classes
  if name == 'cifar100':
    assert info.num_coarse_classes == 20
    coarse = np.concatenate([np.asarray(b['coarse_label']) for b in evals])[masks]
    assert 0 <= coarse.min() and coarse.max() < 20


def test_cifar100_eval_uses_the_cifar10_statistics(tmp_path, mesh):
  """The authors' CIFAR eval loader normalises CIFAR-100 with CIFAR-10's mean and std;
  their training transform (and ours) uses CIFAR-100's own."""
  config = small_config(dataset='cifar100', data_dir=str(tmp_path), batch_size=8,
                        crops_nmb=(1,), crops_size=(32,), crops_min_scale=(1.0,),
                        crops_max_scale=(1.0,), gaussian_prob=(0.0,), solarization_prob=(0.0,))
  with tfds.testing.mock_data(num_examples=8):
    source = data.open_source(config)
    cifar10 = data.open_source(small_config(dataset='cifar10', data_dir=str(tmp_path)))
    first = next(data.eval_iterator(config, mesh, 'test'))
    raw = next(iter(tfds.as_numpy(tfds.builder('cifar100', data_dir=str(tmp_path)).as_dataset(
        split='test', batch_size=8, shuffle_files=False))))
  assert source.eval_mean_std == (cifar10.mean, cifar10.std) != (source.mean, source.std)
  expected = (raw['image'] / 255.0 - np.asarray(cifar10.mean)) / np.asarray(cifar10.std)
  np.testing.assert_allclose(np.asarray(first['image']), expected, atol=1e-5)


# ---------------------------------------------------------------------------
# Real Fashion-MNIST (the Debian package dataset-fashion-mnist)


@pytest.mark.skipif(not os.path.isdir(local_files.DEBIAN_FASHION_MNIST_DIR),
                    reason='Debian package dataset-fashion-mnist not installed')
def test_fashion_mnist_real(mesh):
  config = small_config(dataset='fashion_mnist', data_dir=None, crops_nmb=(1,),
                        crops_size=(28,), crops_min_scale=(0.2,), crops_max_scale=(1.0,),
                        gaussian_prob=(0.0,), solarization_prob=(0.2,))
  info = data.dataset_info(config)  # prepares ~/tensorflow_datasets once
  assert (info.num_train_examples, info.num_eval_examples) == (60_000, 10_000)
  assert (info.num_classes, info.image_shape) == (10, (28, 28, 1))
  batch = next(data.train_iterator(config, mesh))
  assert [v.shape for v in batch['views']] == [(16, 28, 28, 1)] * 2
  # Eval images are the dataset's own images, normalised, in TFDS order.
  first = next(data.eval_iterator(config, mesh, 'test', batch_size=64))
  reference = next(iter(tfds.as_numpy(tfds.builder('fashion_mnist').as_dataset(
      split='test', batch_size=64))))
  expected = (reference['image'] / 255.0 - info.mean[0]) / info.std[0]
  np.testing.assert_allclose(np.asarray(first['image']), expected, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(first['label']), reference['label'])
