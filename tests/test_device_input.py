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
    (dict(augment_on='device', dataset='image_folder'),
     "augment_on='device' needs a dataset held in memory .*image_folder.*use 'host'"),
    (dict(augment_on='device', dataset='imagenet2012'), 'needs a dataset held in memory'),
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
