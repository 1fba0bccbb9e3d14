"""experiments/bench_step.py on a tiny config: a sane, self-consistent report, with and
without the views made on the devices inside the timed step."""

import json
import math

import jax
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import pytest

from resa_jax import sharding
from resa_jax.configs import fake_data_benchmark
from experiments import bench_step


def tiny_config():
  config = fake_data_benchmark.get_config()
  config.update(ml_collections.ConfigDict(dict(
      arch='resnet18', width_per_group=4, stem='cifar', fake_image_size=16, crops_size=(16,),
      mlp_dim=32, emb_dim=16, predictor=False, dtype='float32', batch_size=8,
      fake_num_classes=10)))
  return config


def _positive(x):
  return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_benchmark_report_on_two_devices(tmp_path):
  config = tiny_config()
  report = bench_step.benchmark(config, steps=2, warmup=1, parts=True,
                                devices=jax.devices()[:2], log=lambda *_: None)

  assert report['num_devices'] == 2 and 'batch 8' in report['summary']
  assert len(report['step_times_s']) == 2
  for key in ('lower_s', 'compile_s', 'step_median_s', 'step_mean_s', 'images_per_s'):
    assert _positive(report[key]), key
  # Compile time is reported apart: the timed steps reuse the compiled executable.
  assert report['recompilations'] == 0 and report['jit_cache_size'] == 1
  assert report['warmup_compilations'] == 0
  # A tiny model compiles in seconds and steps in milliseconds: a timed step that
  # included the compilation would be as slow as it.
  assert max(report['step_times_s']) < report['compile_s']
  assert math.isclose(report['images_per_s'], 8 / report['step_median_s'], rel_tol=1e-9)
  assert min(report['step_times_s']) <= report['step_median_s'] <= max(report['step_times_s'])
  assert math.isfinite(report['loss'])
  assert report['memory']['peak_bytes'] > 0 and report['memory']['peak_kind']
  assert set(report['parts']) == set(bench_step.PART_LABELS)
  for name, part in report['parts'].items():
    assert _positive(part['median_s']) and _positive(part['mean_s']), name
  assert _positive(report['resa_over_supervised'])

  # --write keeps rows of other hardware / configs and replaces its own.
  json_path, md_path = tmp_path / 'rows.json', tmp_path / 'RESULTS.md'
  other = dict(report, hardware='another machine')
  bench_step.write_results(other, 'cmd other', json_path, md_path)
  bench_step.write_results(report, 'cmd 1', json_path, md_path)
  bench_step.write_results(report, 'cmd 2', json_path, md_path)
  rows = json.loads(json_path.read_text())
  assert sorted(r['command'] for r in rows) == ['cmd 2', 'cmd other']
  text = md_path.read_text()
  assert f'## {bench_step.SECTION}' in text and 'another machine' in text
  assert text.count(report['summary']) == 4  # two rows in each of the two tables


def test_views_program_gathers_a_batch_of_distinct_held_images():
  """make_views_fn: the step's batch is B distinct held images (each constant image has
  its own level, and a weak view of a constant image is that constant), its views are
  sharded along the batch in config.dtype, a function of the step alone."""
  config = tiny_config()  # 16 px, a weak and a strong view, batch 8, float32
  mesh = sharding.create_mesh(jax.devices()[:2])
  levels = np.arange(32) * 7  # 32 held images, 0..217
  images = np.broadcast_to(levels[:, None, None, None], (32, 16, 16, 3)).astype(np.uint8)
  images = jax.device_put(images, sharding.replicated_sharding(mesh))
  views_fn = bench_step.make_views_fn(config, mesh)
  first, again, second = (views_fn(images, np.int32(step)) for step in (0, 0, 1))

  assert len(first) == 2
  for view in first:
    assert view.shape == (8, 16, 16, 3) and view.dtype == np.float32
    assert view.sharding.spec == P(mesh.axis_names[0]) and len(view.sharding.device_set) == 2
  np.testing.assert_array_equal(np.asarray(first[1]), np.asarray(again[1]))
  assert not np.allclose(np.asarray(first[1]), np.asarray(second[1]))
  mean, std = np.asarray(bench_step._VIEWS_MEAN), np.asarray(bench_step._VIEWS_STD)
  for weak in (first[0], second[0]):
    pixels = np.asarray(weak) * std + mean  # back to [0, 1]
    gathered = np.round(pixels[:, 0, 0, 0] * 255 / 7).astype(int)
    np.testing.assert_allclose(pixels, np.broadcast_to(
        gathered[:, None, None, None] * 7 / 255, pixels.shape), atol=1e-5)
    assert len(set(gathered)) == 8 and set(gathered) <= set(range(32))


@pytest.mark.slow
def test_device_views_inside_the_timed_step():
  config = tiny_config()
  report = bench_step.benchmark(config, steps=2, warmup=1, parts=False, with_device_views=True,
                                devices=jax.devices()[:2], log=lambda *_: None)
  views = report['device_views']
  for key in ('views_compile_s', 'views_median_s', 'step_median_s', 'step_mean_s',
              'images_per_s'):
    assert _positive(views[key]), key
  # The step takes the views program's outputs without compiling again.
  assert views['recompilations'] == 0 and views['warmup_compilations'] == 0
  assert report['recompilations'] == 0
  assert math.isclose(views['images_per_s'], 8 / views['step_median_s'], rel_tol=1e-9)
  assert views['held_examples'] == bench_step.HELD_BATCHES * 8
  assert views['source_image_size'] == 16
  # The process's peak is read after both modes: never below the step's alone.
  assert views['memory']['peak_bytes'] >= report['memory']['peak_bytes'] > 0
  assert views['memory']['xla_plan_bytes'] > 0
  assert report['parts'] == {}
