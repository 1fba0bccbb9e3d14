"""The input through its front door (`resa_jax.data`), as the trainer and the evaluators
call it: every placement of the training views ('host', 'held', 'streamed') on the tiny
config's fake data, for structure, determinism, exact resume, 1 device against 8 and
each example once per epoch; the one rule of what is held; evaluation batches; the
datasets.  Two processes against one: tests/test_multihost.py."""

import dataclasses

import jax
import numpy as np
import pytest

from helpers import tiny_config
from resa_jax import data, sharding

KINDS = ('host', 'held', 'streamed')


def config_for(kind, **overrides):
  """The tiny config (fake 16 px images, 64 a split, batch 16: 4 steps an epoch) with its
  views made as `kind` says: the placement follows from augment_on and the budget."""
  placement = {'host': dict(augment_on='host'),
               'held': dict(augment_on='device'),
               'streamed': dict(augment_on='device', device_memory_budget_mb=0.0)}[kind]
  return tiny_config(**placement, **overrides)


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
  """{kind: steps 0-5 of its stream on 8 devices (into epoch 1)}."""
  return {kind: take(data.train_iterator(config_for(kind), mesh), 6) for kind in KINDS}


# ------------------------------------------------------------- placements ----

def test_placement_follows_augment_on_and_the_decoded_size(mesh):
  source = data.open_source(tiny_config())
  assert [data.placement(config_for(kind), source, mesh) for kind in KINDS] == list(KINDS)
  # 64 images of 16 x 16 x 3 bytes over 8 devices: 6,144 bytes (0.00586 MiB) a device.
  for budget, kind in ((0.0059, 'held'), (0.0058, 'streamed')):
    config = config_for('held', device_memory_budget_mb=budget)
    assert data.placement(config, source, mesh) == kind
  # Images of varying sizes are never held, whatever the budget.
  varying = dataclasses.replace(source, image_shape=(None, None, 3))
  assert data.placement(config_for('held'), varying, mesh) == 'streamed'


def test_placement_refusals(mesh, monkeypatch):
  source = data.open_source(tiny_config())

  class Device:
    def memory_stats(self):
      return {'bytes_limit': 10_000}  # a share of 6,144 bytes is over half of it

  small = dataclasses.make_dataclass('Mesh', ['size', 'devices'])(8, np.array([Device()] * 8))
  with pytest.raises(ValueError, match='over half of its .* lower device_memory_budget_mb'):
    data.placement(config_for('held'), source, small)
  monkeypatch.setitem(__import__('sys').modules, 'tensorflow', None)  # import fails
  assert data.placement(config_for('held'), source, mesh) == 'held'  # needs no TensorFlow
  for kind, match in (('streamed', 'over device_memory_budget_mb=0: raise it'),
                      ('host', 'the host input needs TensorFlow')):
    with pytest.raises(ValueError, match=match) as error:
      data.placement(config_for(kind), source, mesh)
    assert '\n' not in str(error.value)


@pytest.mark.parametrize('kind', KINDS)
def test_structure_shapes_dtypes_and_sharding(kind, mesh):
  config = config_for(kind, dtype='bfloat16', crops_nmb=(1, 1), crops_size=(16, 8),
                      crops_min_scale=(0.2, 0.05), crops_max_scale=(1.0, 0.2),
                      gaussian_prob=(0.0, 0.5), solarization_prob=(0.2, 0.0))
  batch = next(data.train_iterator(config, mesh))
  assert set(batch) == {'views'} and type(batch['views']) is tuple
  assert [v.shape for v in batch['views']] == [(16, 16, 16, 3), (16, 16, 16, 3), (16, 8, 8, 3)]
  source = data.open_source(config)
  low = ((0 - np.array(source.mean)) / np.array(source.std)).min() - 0.02
  high = ((1 - np.array(source.mean)) / np.array(source.std)).max() + 0.02
  for view in batch['views']:
    assert view.dtype == jax.numpy.bfloat16
    assert view.sharding == sharding.batch_sharding(mesh)
    assert {s.data.shape[0] for s in view.addressable_shards} == {2}
    assert {s.device for s in view.addressable_shards} == set(jax.devices())
    values = np.asarray(view, np.float32)  # normalised with the training statistics
    assert np.isfinite(values).all() and low <= values.min() and values.max() <= high
    assert values.std() > 0.3  # images, not constants


@pytest.mark.parametrize('kind', KINDS)
def test_same_seed_same_batches_other_seed_other_batches(kind, mesh, six_steps):
  steps = six_steps[kind]
  assert_same_batches(take(data.train_iterator(config_for(kind), mesh), 2), steps[:2])
  other = next(data.train_iterator(config_for(kind, seed=1), mesh))
  assert not np.allclose(other['views'][0], steps[0]['views'][0])
  assert not np.allclose(steps[0]['views'][0], steps[0]['views'][1])  # two views
  assert not np.allclose(steps[0]['views'][0], steps[4]['views'][0])  # another step


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('start_step', [3, 5])  # the last step of epoch 0; inside epoch 1
def test_resume_at_a_step_continues_the_stream(kind, start_step, mesh, six_steps):
  resumed = data.train_iterator(config_for(kind), mesh, start_step=start_step)
  assert_same_batches(take(resumed, 6 - start_step), six_steps[kind][start_step:])


@pytest.mark.parametrize('kind', KINDS)
def test_one_device_and_eight_give_the_same_batches(kind, six_steps):
  one_device = sharding.create_mesh(jax.devices()[:1])
  single = take(data.train_iterator(config_for(kind), one_device), 2)
  # The host stream is the same bytes; views made on the devices are equal to the float
  # rounding of their resampling sums (a few 1e-6 in [0, 1]).
  assert_same_batches(single, six_steps[kind][:2], atol=0.0 if kind == 'host' else 1e-4)


def example_ids(weak_views, images, mean, std):
  """The example of each row of weak views that are the image itself, un-normalised."""
  by_pixels = {image.tobytes(): i for i, image in enumerate(images)}
  pixels = np.rint((weak_views * std + mean) * 255).astype(np.uint8)
  return [by_pixels[row.tobytes()] for row in pixels]


@pytest.mark.parametrize('kind', KINDS)
def test_each_example_once_per_epoch(kind, mesh):
  # A weak view of scale 1 without flips is the whole image, so it names its example.
  # 72 examples: 4 batches of 16 an epoch, 8 left out (a different 8 each epoch).
  config = config_for(kind, crops_min_scale=(1.0,), flip_prob=0.0, fake_num_examples=72)
  source = data.open_source(config)
  images, _ = source.rows('train', 0, 72)
  weak = [b['views'][0] for b in take(data.train_iterator(config, mesh, source=source), 8)]
  ids = [example_ids(v, images, np.array(source.mean), np.array(source.std)) for v in weak]
  epochs = [sum(ids[4 * e:4 * e + 4], []) for e in (0, 1)]
  for seen in epochs:
    assert len(seen) == len(set(seen)) == 64 and set(seen) <= set(range(72))
  assert epochs[0] != epochs[1]  # reshuffled


def test_the_held_split_is_split_over_the_devices(mesh):
  """Each device holds 1 / 8 of the split, and each block is decoded once, alone: the
  process never decodes the whole split."""
  config = config_for('held', fake_num_examples=60)  # 8 a device, the last block padded
  source = data.open_source(config)
  asked = []
  recording = dataclasses.replace(
      source, rows=lambda split, start, stop: asked.append((start, stop)) or
      source.rows(split, start, stop))
  next(data.train_iterator(config, mesh, source=recording))
  assert sorted(asked) == [(8 * d, min(60, 8 * d + 8)) for d in range(8)]
  held = data.device.hold_split(source, 'train', 60, mesh)
  images, _ = source.rows('train', 0, 60)
  for shard in held.addressable_shards:
    start = shard.index[0].start
    assert shard.data.shape == (8, 16, 16, 3)
    expected = np.zeros((8, 16, 16, 3), np.uint8)
    expected[:len(images[start:start + 8])] = images[start:start + 8]
    np.testing.assert_array_equal(np.asarray(shard.data), expected)


def test_host_stream_streamed_from_files_resumes_and_covers_the_split(mesh):
  """The host stream of a split over host_memory_budget_mb: each epoch reads the files
  in a seeded order through a shuffle buffer; resuming skips what was read."""
  config = config_for('host', host_memory_budget_mb=0.0, crops_min_scale=(1.0,),
                      flip_prob=0.0, shuffle_buffer=16)
  full = take(data.train_iterator(config, mesh), 6)
  assert_same_batches(take(data.train_iterator(config, mesh, start_step=3), 3), full[3:])
  source = data.open_source(config)
  images, _ = source.rows('train', 0, 64)
  ids = sum((example_ids(b['views'][0], images, np.array(source.mean), np.array(source.std))
             for b in full[:4]), [])
  assert sorted(ids) == list(range(64))


def test_steps_per_epoch_and_its_refusal():
  assert data.steps_per_epoch(tiny_config()) == 4
  assert data.steps_per_epoch(tiny_config(steps_per_epoch=7)) == 7
  for overrides in ({}, {'steps_per_epoch': 7}):  # the split is checked either way
    with pytest.raises(ValueError, match='has 64 examples, fewer than one batch of 128'):
      data.steps_per_epoch(tiny_config(batch_size=128, **overrides))


# ------------------------------------------------------------- evaluation ----

def test_eval_iterator_one_pass_with_padding(mesh):
  config = tiny_config(fake_num_examples=44)
  batches = list(data.eval_iterator(config, mesh, 'test', batch_size=16))
  assert len(batches) == 3 == data.eval_num_batches(44, 16, 1)
  for b in batches:
    assert b['image'].shape == (16, 16, 16, 3) and b['image'].dtype == np.float32
    assert b['label'].dtype == np.int32 and b['mask'].dtype == bool
    assert b['image'].sharding == sharding.batch_sharding(mesh)
  masks = np.concatenate([np.asarray(b['mask']) for b in batches])
  assert masks.sum() == 44 and masks[:44].all()
  source = data.open_source(config)
  images, labels = source.rows('test', 0, 44)
  got = np.concatenate([np.asarray(b['image']) for b in batches])[:44]
  expected = (images / 255.0 - np.array(source.mean)) / np.array(source.std)
  np.testing.assert_allclose(got, expected, atol=1e-5)  # the images themselves, in order
  np.testing.assert_array_equal(
      np.concatenate([np.asarray(b['label']) for b in batches])[:44], labels)


def test_eval_from_memory_is_normalised_on_the_mesh(mesh):
  """A source read without TensorFlow: its uint8 rows go to the mesh and are resized and
  normalised there, padding zero, as the tf.data path's."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (20, 12, 12, 3), np.uint8)
  labels = rng.integers(0, 5, 20).astype(np.int32)
  source = data.array_source('arrays', {'train': (images, labels), 'test': (images, labels)},
                             (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), num_classes=5)
  for size in (12, 16):  # as they are; resized (bilinear, antialiased)
    config = tiny_config(crops_size=(size,))
    batches = list(data.eval_iterator(config, mesh, 'test', batch_size=8, source=source))
    assert len(batches) == 3 and all(b['image'].sharding == sharding.batch_sharding(mesh)
                                     for b in batches)
    got = np.concatenate([np.asarray(b['image']) for b in batches])
    mask = np.concatenate([np.asarray(b['mask']) for b in batches])
    assert mask.sum() == 20 and not got[20:].any()
    np.testing.assert_array_equal(np.concatenate([np.asarray(b['label'])
                                                  for b in batches])[:20], labels)
    if size == 12:
      np.testing.assert_allclose(got[:20], (images / 255.0 - (0.5, 0.4, 0.3)) /
                                 (0.2, 0.25, 0.3), atol=1e-5)
    else:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      resized = tf.image.resize(images, (16, 16), 'bilinear', antialias=True).numpy()
      np.testing.assert_allclose(got[:20], (np.clip(resized / 255.0, 0, 1) - (0.5, 0.4, 0.3))
                                 / (0.2, 0.25, 0.3), atol=1e-4)


def test_linear_probe_iterator(mesh):
  batch = next(data.linear_probe_iterator(tiny_config(), mesh, batch_size=8))
  assert batch['image'].shape == (8, 16, 16, 3) and batch['label'].shape == (8,)
  assert batch['label'].dtype == np.int32
  assert batch['image'].sharding == sharding.batch_sharding(mesh)


def test_view_specs_multicrop():
  config = tiny_config(crops_nmb=(1, 6), crops_size=(224, 96), crops_min_scale=(0.2, 0.05),
                       crops_max_scale=(1.0, 0.2), gaussian_prob=(0.5, 0.5),
                       solarization_prob=(0.2, 0.0))
  specs = data.view_specs(config)
  assert [s.size for s in specs] == [224, 224] + [96] * 6
  assert [s.weak for s in specs] == [True] + [False] * 7
  assert [s.resize_method for s in specs[:3]] == ['bilinear', 'bicubic', 'bicubic']
  assert specs[1].solarization_prob == 0.2 and specs[2].solarization_prob == 0.0
  assert specs[2].min_scale == 0.05 and specs[2].max_scale == 0.2
