"""The training views made on the devices (device_input.py, config.augment_on='device'):
the host path's structure, each example once per epoch, determinism and resume, 1 device
vs 8, the refusals, and training end to end."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from resa_jax import datasets, device_input, input_pipeline, sharding, train, validation


def device_config(**overrides):
  config = tiny_config()  # fake 16 px data, 64 examples, batch 16: 4 steps per epoch
  config.augment_on = 'device'
  for key, value in overrides.items():
    config[key] = value
  return config


def take(iterator, num_steps):
  return [jax.tree.map(np.asarray, next(iterator)) for _ in range(num_steps)]


def assert_same_batches(a, b, atol=0.0):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert len(x['views']) == len(y['views'])
    for vx, vy in zip(x['views'], y['views']):
      np.testing.assert_allclose(vx, vy, rtol=0, atol=atol)


@pytest.fixture(scope='module')
def mesh():
  assert jax.device_count() == 8, 'conftest.py should simulate 8 CPU devices'
  return sharding.create_mesh()


@pytest.fixture(scope='module')
def six_steps(mesh):
  """Steps 0-5 of the tiny config's device stream on 8 devices (into epoch 1)."""
  return take(input_pipeline.create_train_iterator(device_config(), mesh), 6)


def test_same_structure_shapes_dtypes_and_sharding_as_the_host_path(mesh):
  config = device_config(dtype='bfloat16', crops_nmb=(1, 1), crops_size=(16, 8),
                         crops_min_scale=(0.2, 0.05), crops_max_scale=(1.0, 0.2),
                         gaussian_prob=(0.0, 0.5), solarization_prob=(0.2, 0.0))
  device = next(input_pipeline.create_train_iterator(config, mesh))
  config.augment_on = 'host'
  host = next(input_pipeline.create_train_iterator(config, mesh))
  assert set(device) == set(host) == {'views'}
  assert type(device['views']) is type(host['views']) is tuple
  assert [v.shape for v in device['views']] == [v.shape for v in host['views']] == [
      (16, 16, 16, 3), (16, 16, 16, 3), (16, 8, 8, 3)]
  source = datasets.open_source(config)
  low = ((0 - np.array(source.mean)) / np.array(source.std)).min() - 0.02
  high = ((1 - np.array(source.mean)) / np.array(source.std)).max() + 0.02
  for d, h in zip(device['views'], host['views']):
    assert d.dtype == h.dtype == jnp.bfloat16
    assert d.sharding == h.sharding == sharding.batch_sharding(mesh)
    assert {s.data.shape[0] for s in d.addressable_shards} == {2}
    assert {s.device for s in d.addressable_shards} == set(jax.devices())
    values = np.asarray(d, np.float32)  # normalised with the source's training statistics
    assert np.isfinite(values).all() and low <= values.min() and values.max() <= high
    assert values.std() > 0.3  # images, not constants


def test_each_example_once_per_epoch_in_the_drawn_order(mesh):
  # Constant images: any crop, resize, flip of example i is i / 255 everywhere, so the
  # weak view (no colour op) names the example.  72 = 4 batches of 16 + 8 dropped.  One
  # channel, as Fashion-MNIST's.
  config = device_config(seed=7)
  num_examples = 72
  images = np.broadcast_to(np.arange(num_examples, dtype=np.uint8)[:, None, None, None],
                           (num_examples, 16, 16, 1))
  iterator = device_input.create_device_train_iterator(
      config, mesh, images, mean=(0.0,), std=(1 / 255,))
  weak_views = [b['views'][0] for b in take(iterator, 8)]  # two epochs
  ids = [np.rint(v).astype(int) for v in weak_views]
  for i, view in zip(ids, weak_views):  # the same example in every pixel of its view
    np.testing.assert_allclose(view, np.broadcast_to(i[:, :1, :1, :1], view.shape), atol=1e-3)
  ids = [i[:, 0, 0, 0] for i in ids]
  assert device_input.epoch_steps(num_examples, 16) == 4
  for epoch in (0, 1):
    seen = np.concatenate(ids[4 * epoch:4 * epoch + 4])
    assert len(set(seen.tolist())) == 64 and set(seen.tolist()) <= set(range(num_examples))
    order = np.asarray(device_input.epoch_order(7, num_examples, epoch))
    assert sorted(order.tolist()) == list(range(num_examples))
    np.testing.assert_array_equal(seen, order[:64])  # the documented order
  assert not np.array_equal(np.concatenate(ids[:4]), np.concatenate(ids[4:]))  # reshuffled


def test_same_seed_same_views_and_resume_continues(mesh, six_steps):
  config = device_config()
  # Built directly from the split's arrays: what create_train_iterator dispatched to.
  source = datasets.open_source(config)
  images, labels = datasets.split_arrays(source, config.train_split)
  assert images.shape == (64, 16, 16, 3) and images.dtype == np.uint8
  assert labels.shape == (64,)
  again = device_input.create_device_train_iterator(config, mesh, images, source.mean,
                                                    source.std)
  assert_same_batches(take(again, 2), six_steps[:2])
  # Resumed at step 3: steps 3 (epoch 0), 4 and 5 (epoch 1) of the uninterrupted run.
  resumed = input_pipeline.create_train_iterator(config, mesh, start_step=3)
  assert_same_batches(take(resumed, 3), six_steps[3:])
  other_seed = next(input_pipeline.create_train_iterator(device_config(seed=1), mesh))
  assert not np.allclose(other_seed['views'][0], six_steps[0]['views'][0])
  assert not np.allclose(six_steps[0]['views'][0], six_steps[0]['views'][1])  # two views
  assert not np.allclose(six_steps[0]['views'][0], six_steps[4]['views'][0])  # another step


def test_one_device_and_eight_give_the_same_views(six_steps):
  one_device = sharding.create_mesh(jax.devices()[:1])
  single = take(input_pipeline.create_train_iterator(device_config(), one_device), 2)
  assert_same_batches(single, six_steps[:2], atol=1e-5)  # float rounding of the sums only


@pytest.mark.parametrize('overrides, match', [
    (dict(augment_on='tpu'), "augment_on must be one of auto, host, device, got 'tpu'"),
])
def test_validate_config_refuses(overrides, match):
  config = tiny_config()
  for key, value in overrides.items():
    config[key] = value
  with pytest.raises(ValueError, match=match) as error:
    validation.validate_config(config)
  assert '\n' not in str(error.value)


def test_validate_config_accepts_device_on_data_held_in_memory():
  validation.validate_config(device_config())
  validation.validate_config(device_config(dataset='cifar10_jpeg'))  # names only


@pytest.mark.slow  # about 30 s on 2 cores, most of it compiling the train step
def test_training_end_to_end(tmp_path):
  config = device_config(num_train_steps=4, knn_every_epochs=0)  # no kNN: the input only
  workdir = tmp_path / 'run'
  results = train.train_and_evaluate(config, workdir)
  assert results['finished'] and results['step'] == 4
  assert results == json.loads((workdir / 'results.json').read_text())
  assert np.isfinite(results['final_loss'])


# ------------------------------------------ streamed datasets: crop on the host ----

def test_host_crops_are_the_host_views_crop_and_flip():
  """cropped_view is make_view's crop, resize and flip (same seeds), rounded to uint8;
  a strong view's bicubic resize within 1 level of the antialiased one."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from helpers import natural_image  # pylint: disable=g-import-not-at-top
  from resa_jax import augment  # pylint: disable=g-import-not-at-top
  image = natural_image(np.random.default_rng(0), 48, 3)
  weak, strong = augment.view_specs(device_config(crops_size=(24,)))[:2]
  for i in range(20):
    seed = tf.constant([7, i], tf.int64)
    expected = augment.make_view(tf.constant(image), seed, weak).numpy() * 255
    got = augment.cropped_view(tf.constant(image), seed, weak, 3).numpy()
    assert got.dtype == np.uint8 and got.shape == (24, 24, 3)
    assert np.abs(got - expected).max() <= 0.5 + 1e-3  # rounding only
    plain = augment.cropped_view(tf.constant(image), seed, strong, 3).numpy().astype(int)
    s_crop = augment.split_seed(seed, 7)[0]  # make_view's crop, resized with antialiasing
    crop = augment.random_resized_crop(tf.constant(image), s_crop, 24, (strong.min_scale,
                                       strong.max_scale), method='bicubic').numpy() * 255
    flip = augment.random_flip(tf.constant(crop), augment.split_seed(seed, 7)[6]).numpy()
    assert np.abs(plain - flip).max() <= 1.0 + 1e-3, i


def test_device_colour_is_the_device_views_colour():
  """colour_views on the crops device_views would make (rounded to uint8) draws the same
  colour, grayscale, blur and solarisation choices: the views agree to rounding."""
  from resa_jax import augment_device  # pylint: disable=g-import-not-at-top
  from resa_jax.views import view_specs  # pylint: disable=g-import-not-at-top
  config = device_config(crops_size=(16,), gaussian_prob=(0.5,))
  images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (32, 16, 16, 3), np.uint8))
  key = jax.random.key(3)
  full = augment_device.device_views(key, images, config, normalize=False)
  crops = []
  for v, spec in enumerate(view_specs(config)):
    def crop_and_flip(image, i, v=v, spec=spec):
      k = jax.random.fold_in(jax.random.fold_in(key, i), v)
      params = augment_device.draw_view_params(k, spec, 16, 16)
      view = augment_device.resized_crop(image, params['box'], spec.size,
                                         'bilinear' if spec.weak else 'bicubic')
      view = jnp.where(params['flip'], augment_device.flip_left_right(view), view)
      return jnp.round(view * 255).astype(jnp.uint8)
    crops.append(jax.vmap(crop_and_flip)(images, jnp.arange(32)))
  finished = augment_device.colour_views(key, crops, config, normalize=False)
  for a, b in zip(full, finished):
    assert np.abs(np.asarray(a) - np.asarray(b)).mean() < 1 / 255
    assert np.abs(np.asarray(a) - np.asarray(b)).max() < 6 / 255  # contrast amplifies


def colour_stream(config, mesh, start_step=0):
  """The streamed placement on the tiny fake data: host crops, device colour."""
  from resa_jax import host_input  # pylint: disable=g-import-not-at-top
  source = datasets.open_source(config)
  cropped = input_pipeline._to_mesh(  # pylint: disable=protected-access
      mesh, host_input.train_batches(config, source, start_step=start_step, cropped=True), 1)
  return device_input.create_colour_iterator(config, mesh, cropped, source.mean, source.std,
                                             start_step=start_step)


def test_streamed_placement_is_deterministic_resumable_and_mesh_independent(mesh):
  config = device_config(dtype='bfloat16')
  first = take(colour_stream(config, mesh), 5)
  assert [v.shape for v in first[0]['views']] == [(16, 16, 16, 3)] * 2
  assert all(v.dtype == jnp.bfloat16 for v in first[0]['views'])
  assert_same_batches(take(colour_stream(config, mesh, start_step=3), 2), first[3:])
  one_device = sharding.create_mesh(jax.devices()[:1])
  assert_same_batches(take(colour_stream(config, one_device), 2), first[:2], atol=1e-2)
  # The weak view is crop and flip only: the host path's, from the same seeds, rounded.
  config = device_config(augment_on='host')
  host = take(input_pipeline.create_train_iterator(config, mesh), 1)[0]['views'][0]
  streamed = take(colour_stream(config, mesh), 1)[0]['views'][0]
  std = np.asarray(datasets.open_source(config).std)
  assert np.abs(host - streamed).max() <= 0.5 / 255 / std.min() + 1e-5
