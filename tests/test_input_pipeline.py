"""Input pipeline and augmentations: shapes, ranges, determinism, resume, sharding,
every dataset name (TFDS mock data where the data is not here), real Fashion-MNIST."""

import os
import pathlib

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from resa_jax.configs import default
from helpers import seed, small_config
from resa_jax import augment, datasets, host_input, input_pipeline, local_data, sharding, tfds_sources, validation

AUTOTUNE = tf.data.AUTOTUNE


@pytest.fixture(scope='module')
def mesh():
  assert jax.device_count() == 8, 'conftest.py should simulate 8 CPU devices'
  return sharding.create_mesh()


def host_batches(config, num_steps, start_step=0, num_parallel_calls=AUTOTUNE,
                 process_index=0, process_count=1):
  source = datasets.open_source(config)
  it = host_input._host_batches(
      config, source, config.train_split, batch_size=config.batch_size,
      start_step=start_step, make_example=host_input._train_example_fn(config, source),
      salt='train', process_index=process_index, process_count=process_count,
      num_parallel_calls=num_parallel_calls)
  return [next(it) for _ in range(num_steps)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for vx, vy in zip(x['views'], y['views']):
      np.testing.assert_array_equal(np.asarray(vx), np.asarray(vy))


# ---------------------------------------------------------------------------
# Config validation


@pytest.mark.parametrize('overrides, match', [
    (dict(dataset='mnist_typo'), 'unknown dataset'),
    (dict(crops_size=(32,)), 'equal lengths'),
    (dict(crops_nmb=(0, 1)), 'at least one strong view'),
    (dict(crops_nmb=(1, -1)), 'at least one strong view'),
    (dict(crops_min_scale=(0.5, 0.05), crops_max_scale=(0.4, 0.2)), 'crops_min_scale'),
    (dict(batch_size=12), 'multiple of the number of devices'),
    (dict(grayscale_prob=1.5), 'probability'),
    (dict(dtype='int8'), 'dtype'),
    (dict(eval_resize=24), 'eval_resize'),
])
def test_validate_config_rejects(overrides, match):
  with pytest.raises(ValueError, match=match) as error:
    validation.validate_config(small_config(**overrides))
  assert '\n' not in str(error.value)
  assert not isinstance(error.value, datasets.DatasetNotFoundError)


def test_validate_config_accepts_defaults():
  validation.validate_config(small_config())
  validation.validate_config(default.get_config())


def test_view_specs_multicrop():
  config = small_config(crops_nmb=(1, 6), crops_size=(224, 96), crops_min_scale=(0.2, 0.05),
                        crops_max_scale=(1.0, 0.2), gaussian_prob=(0.5, 0.5),
                        solarization_prob=(0.2, 0.0))
  specs = augment.view_specs(config)
  assert [s.size for s in specs] == [224, 224] + [96] * 6
  assert [s.weak for s in specs] == [True] + [False] * 7
  assert specs[1].solarization_prob == 0.2 and specs[2].solarization_prob == 0.0
  assert specs[2].min_scale == 0.05 and specs[2].max_scale == 0.2


# ---------------------------------------------------------------------------
# Augmentations


def test_random_resized_crop_box_statistics():
  height, width, scale = 80, 100, (0.2, 1.0)
  fractions, ratios = [], []
  for i in range(300):
    top, left, h, w = [int(t) for t in augment.random_resized_crop_box(seed(i), height, width, scale)]
    assert 0 <= top <= height - h and 0 <= left <= width - w and h > 0 and w > 0
    fractions.append(h * w / (height * width))
    ratios.append(w / h)
  fractions, ratios = np.array(fractions), np.array(ratios)
  assert fractions.min() >= 0.19 and fractions.max() <= 1.0
  assert ratios.min() >= 0.75 * 0.95 and ratios.max() <= 4 / 3 * 1.05
  assert fractions.std() > 0.1  # really random
  # No box of >= 99% area fits a 10x100 image: torchvision's fallback, a central
  # crop with the aspect ratio clamped to 4/3.
  top, left, h, w = [int(t) for t in augment.random_resized_crop_box(seed(0), 10, 100, (0.99, 1.0))]
  assert (h, w, top, left) == (10, 13, 0, (100 - 13) // 2)


def test_weak_view_only_resamples_pixels():
  rng = np.random.default_rng(0)
  image = tf.constant(rng.integers(60, 161, size=(40, 50, 3)), tf.uint8)
  constant = tf.constant(np.broadcast_to(np.array([200, 30, 90], np.uint8), (40, 50, 3)))
  weak = augment.ViewSpec(size=24, min_scale=0.2, max_scale=1.0, weak=True)
  strong = augment.ViewSpec(size=24, min_scale=0.2, max_scale=1.0, color_jitter_prob=1.0,
                            grayscale_prob=0.0, gaussian_prob=0.0, solarization_prob=0.0)
  strong_means = []
  for i in range(20):
    view = augment.make_view(image, seed(i), weak).numpy() * 255
    assert view.shape == (24, 24, 3)
    # A convex resampling of pixels in [60, 160] stays in [60, 160]: no colour change.
    assert view.min() >= 60 - 1e-3 and view.max() <= 160 + 1e-3
    const_view = augment.make_view(constant, seed(i), weak).numpy() * 255
    np.testing.assert_allclose(const_view, np.broadcast_to([200, 30, 90], const_view.shape),
                               atol=1e-3)
    strong_means.append(
        augment.make_view(constant, seed(i), strong).numpy().reshape(-1, 3).mean(0) * 255)
  # The strong view does change colours (this is what the weak view must not do).
  assert np.abs(np.array(strong_means) - [200, 30, 90]).max() > 20


def test_colour_ops():
  rng = np.random.default_rng(1)
  rgb = tf.constant(rng.uniform(size=(8, 8, 3)), tf.float32)
  gray = augment.random_grayscale(rgb, seed(0), 1.0).numpy()
  np.testing.assert_allclose(gray[..., 0], gray[..., 2], atol=1e-6)
  np.testing.assert_allclose(gray[..., 0], rgb.numpy() @ np.array([0.299, 0.587, 0.114]),
                             atol=1e-5)
  values = tf.constant([[[0.2], [0.6]]], tf.float32)
  np.testing.assert_allclose(augment.solarize(values).numpy().ravel(), [0.2, 0.4], atol=1e-6)
  # Blur keeps a constant image (on the uint8 grid, where PIL's blur rounds) and smooths.
  const = tf.fill((12, 12, 3), 102 / 255)
  np.testing.assert_allclose(augment.gaussian_blur(const, 1.5).numpy(), 102 / 255, atol=1e-6)
  blurred = augment.gaussian_blur(rgb, 1.0).numpy()
  assert blurred.std() < rgb.numpy().std()
  # Colour-only ops are no-ops on one channel.
  one = tf.constant(rng.uniform(size=(8, 8, 1)), tf.float32)
  np.testing.assert_array_equal(augment.adjust_saturation(one, 0.1).numpy(), one.numpy())
  np.testing.assert_array_equal(augment.adjust_hue(one, 0.3).numpy(), one.numpy())
  np.testing.assert_array_equal(augment.random_grayscale(one, seed(0), 1.0).numpy(), one.numpy())
  view = augment.make_view(tf.cast(one * 255, tf.uint8), seed(3),
                           augment.ViewSpec(size=6, min_scale=0.5, max_scale=1.0,
                                            color_jitter_prob=1.0, gaussian_prob=1.0,
                                            grayscale_prob=1.0))
  assert view.shape == (6, 6, 1)


# ---------------------------------------------------------------------------
# Training stream


def test_train_batches_shapes_dtypes_ranges_and_sharding(mesh):
  config = small_config(dtype='bfloat16')
  batch = next(input_pipeline.create_train_iterator(config, mesh))
  assert set(batch) == {'views'}
  views = batch['views']
  assert [v.shape for v in views] == [(16, 32, 32, 3), (16, 32, 32, 3), (16, 16, 16, 3)]
  info = datasets.dataset_info(config)
  low = ((0 - np.array(info.mean)) / np.array(info.std)).min() - 0.02
  high = ((1 - np.array(info.mean)) / np.array(info.std)).max() + 0.02
  for v in views:
    assert v.dtype == jax.numpy.bfloat16
    assert v.sharding == sharding.batch_sharding(mesh)
    assert len(v.addressable_shards) == 8
    assert {s.data.shape[0] for s in v.addressable_shards} == {2}
    assert {s.device for s in v.addressable_shards} == set(jax.devices())
    values = np.asarray(v, np.float32)
    assert np.isfinite(values).all() and low <= values.min() and values.max() <= high
    assert values.std() > 0.3  # images, not constants


def test_same_seed_same_batches_different_seed_different(mesh):
  def first(config, n=2):
    it = input_pipeline.create_train_iterator(config, mesh)
    return [jax.tree.map(np.asarray, next(it)) for _ in range(n)]
  a, b = first(small_config()), first(small_config())
  assert_same_batches(a, b)
  c = first(small_config(seed=1))
  assert not np.array_equal(a[0]['views'][0], c[0]['views'][0])
  # Views of one example differ from each other (independent seeds per view).
  assert not np.array_equal(a[0]['views'][0], a[0]['views'][1])


@pytest.mark.parametrize('in_memory', [True, False])
def test_resume_reproduces_the_continuation(in_memory, monkeypatch):
  if not in_memory:  # Force the streamed path (shuffle buffer, skipping records).
    monkeypatch.setattr(host_input, "_MAX_CACHE_BYTES", 0)
  config = small_config()  # 48 examples / 16 = 3 steps per epoch
  full = host_batches(config, 5)
  assert_same_batches(host_batches(config, 1, start_step=4), full[4:])  # epoch 1, step 1
  assert_same_batches(host_batches(config, 2, start_step=2), full[2:4])  # across epochs
  # Epochs are reshuffled: step 3 (epoch 1) is not step 0 again.
  assert not np.array_equal(full[0]['views'][0], full[3]['views'][0])


def test_result_does_not_depend_on_thread_count():
  config = small_config()
  assert_same_batches(host_batches(config, 2, num_parallel_calls=1),
                      host_batches(config, 2, num_parallel_calls=AUTOTUNE))


def test_epochs_cover_each_example_once(monkeypatch):
  # Weak views of a constant image reveal which example they came from.
  config = small_config(crops_min_scale=(1.0, 0.05), flip_prob=0.0)
  source = datasets.open_source(config)
  const = dict(source.__dict__)
  const['decode'] = lambda salt_and_index: tf.fill(
      (32, 32, 3), tf.cast(salt_and_index[1], tf.uint8))
  monkeypatch.setattr(datasets, 'open_source',
                      lambda _: datasets.Source(**const))
  batches = host_batches(config, 3)  # one epoch
  info = datasets.dataset_info(config)
  ids = [np.rint(b['views'][0][:, 0, 0, 0] * info.std[0] * 255 + info.mean[0] * 255)
         for b in batches]
  assert sorted(np.concatenate(ids).astype(int).tolist()) == list(range(48))


def test_processes_read_disjoint_shares():
  config = small_config()
  p0 = host_batches(config, 1, process_index=0, process_count=2)[0]
  p1 = host_batches(config, 1, process_index=1, process_count=2)[0]
  assert p0['views'][0].shape[0] == 8 and p1['views'][0].shape[0] == 8
  assert not np.array_equal(p0['views'][0], p1['views'][0])


def test_steps_per_epoch():
  assert input_pipeline.steps_per_epoch(small_config()) == 3
  assert input_pipeline.steps_per_epoch(small_config(steps_per_epoch=7)) == 7


# ---------------------------------------------------------------------------
# Evaluation and linear-probe streams


def test_eval_iterator_one_pass_with_padding(mesh):
  config = small_config(fake_num_examples=44)
  batches = list(input_pipeline.create_eval_iterator(config, mesh, 'test', batch_size=16))
  assert len(batches) == 3
  for b in batches:
    assert b['image'].shape == (16, 32, 32, 3) and b['image'].dtype == np.float32
    assert b['label'].dtype == np.int32 and b['mask'].dtype == bool
    assert b['image'].sharding == sharding.batch_sharding(mesh)
  masks = np.concatenate([np.asarray(b['mask']) for b in batches])
  assert masks.sum() == 44 and masks[:44].all()
  info = datasets.dataset_info(config)
  images = np.concatenate([np.asarray(b['image']) for b in batches])[:44]
  pixels = (images * np.array(info.std) + np.array(info.mean)) * 255
  # Plain images: every value is one of the 256 uint8 levels (no resampling, no jitter).
  np.testing.assert_allclose(pixels, np.rint(pixels), atol=2e-3)
  labels = np.concatenate([np.asarray(b['label']) for b in batches])[:44]
  assert 0 <= labels.min() and labels.max() < 10 and len(set(labels.tolist())) > 3


def test_eval_shares_cover_the_split_once():
  config = small_config(fake_num_examples=44)
  source = datasets.open_source(config)
  seen = []
  for process_index in range(2):
    ds = host_input._eval_dataset(config, source, 'test', batch_size=16,
                                      process_index=process_index, process_count=2)
    batches = list(ds.as_numpy_iterator())
    assert len(batches) == 3  # ceil(ceil(44 / 2) / 8) on both processes
    for b in batches:
      seen.extend(x.tobytes() for x in b['image'][b['mask']])
  single = host_input._eval_dataset(config, source, 'test', batch_size=16,
                                        process_index=0, process_count=1)
  everything = [x.tobytes() for b in single.as_numpy_iterator() for x in b['image'][b['mask']]]
  assert len(seen) == 44 and sorted(seen) == sorted(everything)


def test_linear_probe_iterator(mesh):
  config = small_config()
  it = input_pipeline.create_linear_probe_train_iterator(config, mesh, batch_size=8)
  batch = next(it)
  assert batch['image'].shape == (8, 32, 32, 3) and batch['label'].shape == (8,)
  assert batch['label'].dtype == np.int32 and batch['image'].sharding == sharding.batch_sharding(mesh)


# ---------------------------------------------------------------------------
# Datasets


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
  info = datasets.dataset_info(config)
  assert (info.num_classes, info.image_shape) == (3, (None, None, 3))
  assert (info.num_train_examples, info.num_eval_examples) == (13, 6)  # listed files
  batch = next(input_pipeline.create_train_iterator(config, mesh))
  assert [v.shape for v in batch['views']] == [(8, 32, 32, 3), (8, 32, 32, 3), (8, 16, 16, 3)]
  val = list(input_pipeline.create_eval_iterator(config, mesh, 'val'))
  labels = np.concatenate([np.asarray(b['label'])[np.asarray(b['mask'])] for b in val])
  assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]
  train = list(input_pipeline.create_eval_iterator(config, mesh, 'train'))
  assert sum(int(np.asarray(b['mask']).sum()) for b in train) == 12  # broken.jpg skipped
  # Streamed with decoding before skipping: 12 decodable images, 3 steps of 4 a epoch.
  config.batch_size = 4
  full = host_batches(config, 4)
  assert_same_batches(host_batches(config, 2, start_step=2), full[2:])


def test_image_folder_of_undecodable_files_is_refused_at_once(tmp_path):
  for split in ('train', 'val'):
    for label in ('ant', 'bee'):
      (tmp_path / split / label).mkdir(parents=True)
      for i in range(3):
        (tmp_path / split / label / f'{i}.jpg').write_bytes(b'not an image')
  config = small_config(dataset='image_folder', data_dir=str(tmp_path), eval_split='val')
  with pytest.raises(datasets.DatasetNotFoundError,
                     match=r'none of the first 6 images of .*train decodes'):
    datasets.dataset_info(config)
  _write_image_folder(tmp_path / 'good')  # one good train image is enough; val has none
  for label in ('ant', 'bee'):
    (tmp_path / 'good' / 'val' / label / '0.png').write_bytes(b'broken')
  config.data_dir = str(tmp_path / 'mixed')
  (tmp_path / 'mixed').mkdir()
  (tmp_path / 'good' / 'train').rename(tmp_path / 'mixed' / 'train')
  (tmp_path / 'val').rename(tmp_path / 'mixed' / 'val')
  with pytest.raises(datasets.DatasetNotFoundError, match=r'of .*mixed/val decodes'):
    datasets.dataset_info(config)


def test_missing_data_raises_dataset_not_found(tmp_path):
  config = small_config(dataset='image_folder', data_dir=str(tmp_path / 'nowhere'))
  with pytest.raises(datasets.DatasetNotFoundError, match='train/') as error:
    datasets.dataset_info(config)
  assert '\n' not in str(error.value)
  config = small_config(dataset='cifar10', data_dir=str(tmp_path), tfds_download=False)
  with pytest.raises(datasets.DatasetNotFoundError, match='tfds build cifar10') as error:
    datasets.dataset_info(config)
  assert '\n' not in str(error.value)
  # ImageNet needs the manual download (no network is tried).
  config = small_config(dataset='imagenet2012', data_dir=str(tmp_path))
  with pytest.raises(datasets.DatasetNotFoundError, match='ILSVRC2012_img_train.tar') as error:
    datasets.dataset_info(config)
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
    info = datasets.dataset_info(config)
    assert info.num_classes == num_classes and info.image_shape == raw_shape
    assert len(info.mean) == len(info.std) == 3
    batch = next(input_pipeline.create_train_iterator(config, mesh))
    assert [v.shape for v in batch['views']] == [(8, 24, 24, 3), (8, 24, 24, 3), (8, 16, 16, 3)]
    evals = list(input_pipeline.create_eval_iterator(config, mesh, config.eval_split))
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
    source = datasets.open_source(config)
    cifar10 = datasets.open_source(small_config(dataset='cifar10', data_dir=str(tmp_path)))
    first = next(input_pipeline.create_eval_iterator(config, mesh, 'test'))
    raw = next(iter(tfds.as_numpy(tfds.builder('cifar100', data_dir=str(tmp_path)).as_dataset(
        split='test', batch_size=8, shuffle_files=False))))
  assert source.eval_mean_std == (cifar10.mean, cifar10.std) != (source.mean, source.std)
  expected = (raw['image'] / 255.0 - np.asarray(cifar10.mean)) / np.asarray(cifar10.std)
  np.testing.assert_allclose(np.asarray(first['image']), expected, atol=1e-5)


def test_eval_resize_method():
  """ImageNet-sized eval images: bicubic (the authors' kNN) differs from bilinear, and
  equals TF's own antialiased bicubic resize of the shorter side, centre-cropped."""
  image = tf.constant(np.random.default_rng(3).integers(0, 256, (50, 70, 3)), tf.uint8)
  bicubic = augment.resize_shorter_and_center_crop(image, 32, 28, method='bicubic').numpy()
  bilinear = augment.resize_shorter_and_center_crop(image, 32, 28).numpy()
  assert np.abs(bicubic - bilinear).mean() > 1e-3
  resized = tf.image.resize(image, (32, 44), method='bicubic', antialias=True).numpy()
  np.testing.assert_allclose(bicubic, np.clip(resized[2:30, 8:36] / 255.0, 0, 1), atol=1e-6)


# ---------------------------------------------------------------------------
# Real Fashion-MNIST (the Debian package dataset-fashion-mnist)


@pytest.mark.skipif(not os.path.isdir(local_data.DEBIAN_FASHION_MNIST_DIR),
                    reason='Debian package dataset-fashion-mnist not installed')
def test_fashion_mnist_real(mesh):
  config = small_config(dataset='fashion_mnist', data_dir=None, crops_nmb=(1,),
                        crops_size=(28,), crops_min_scale=(0.2,), crops_max_scale=(1.0,),
                        gaussian_prob=(0.0,), solarization_prob=(0.2,))
  info = datasets.dataset_info(config)  # prepares ~/tensorflow_datasets once
  assert (info.num_train_examples, info.num_eval_examples) == (60_000, 10_000)
  assert (info.num_classes, info.image_shape) == (10, (28, 28, 1))
  batch = next(input_pipeline.create_train_iterator(config, mesh))
  assert [v.shape for v in batch['views']] == [(16, 28, 28, 1)] * 2
  # Eval images are the dataset's own images, normalised, in TFDS order.
  first = next(input_pipeline.create_eval_iterator(config, mesh, 'test', batch_size=64))
  reference = next(iter(tfds.as_numpy(tfds.builder('fashion_mnist').as_dataset(
      split='test', batch_size=64))))
  expected = (reference['image'] / 255.0 - info.mean[0]) / info.std[0]
  np.testing.assert_allclose(np.asarray(first['image']), expected, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(first['label']), reference['label'])
