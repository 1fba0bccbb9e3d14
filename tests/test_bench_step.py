"""experiments/bench_step.py on a tiny config: a sane, self-consistent report."""

import json
import math

import jax
import ml_collections
import pytest

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
