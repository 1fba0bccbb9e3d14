"""experiments/bench_step.py on a tiny config: a sane, self-consistent report, with and
without the views made on the devices inside the timed step."""

import json
import math

import jax
import pytest

from experiments import bench_step
from helpers import tiny_config


def bench_config():
  """The suite's tiny config as a benchmark config (predictor off, batch 8)."""
  return tiny_config(predictor=False, batch_size=8, fake_num_classes=10)


def _positive(x):
  return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_benchmark_report_on_two_devices(tmp_path):
  config = bench_config()
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


@pytest.mark.slow
def test_device_views_inside_the_timed_step():
  config = bench_config()
  report = bench_step.benchmark(config, steps=2, warmup=1, parts=False, with_device_views=True,
                                devices=jax.devices()[:2], log=lambda *_: None)
  views = report['device_views']
  for key in ('views_compile_s', 'views_median_s', 'exchange_median_s', 'step_median_s',
              'step_mean_s', 'images_per_s'):
    assert _positive(views[key]), key
  # The step takes the views program's outputs without compiling again.
  assert views['recompilations'] == 0 and views['warmup_compilations'] == 0
  assert report['recompilations'] == 0
  assert math.isclose(views['images_per_s'], 8 / views['step_median_s'], rel_tol=1e-9)
  assert views['held_examples'] == bench_step.HELD_BATCHES * 8
  assert views['source_image_size'] == 16
  # The process's peak is read after both modes: never below the step's alone.
  assert views['memory']['peak_bytes'] >= report['memory']['peak_bytes'] > 0
  assert report['parts'] == {}
