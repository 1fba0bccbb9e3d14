"""The real `python -m resa_jax.main` end to end, on 8 simulated CPU devices."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / 'tests' / 'configs' / 'tiny.py')


def run_main(workdir, *overrides, config=TINY, devices=8, timeout=600):
  env = dict(os.environ)
  env.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             CUDA_VISIBLE_DEVICES='', TF_CPP_MIN_LOG_LEVEL='3',
             JAX_DISABLE_MOST_OPTIMIZATIONS='1', PYTHONPATH=str(ROOT))
  cmd = [sys.executable, '-m', 'resa_jax.main', f'--config={config}', f'--workdir={workdir}',
         *overrides]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_train_stop_resume_to_the_end(tmp_path):
  workdir = tmp_path / 'run'
  first = run_main(workdir, '--config.run_steps=5')
  assert first.returncode == 0, first.stderr[-3000:]
  assert 'stopped after 5 steps' in first.stdout
  assert not (workdir / 'results.json').exists()
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps == [3, 5]
  # Progress lines: step, epoch, loss, lr, EMA momentum, images/s and ETA.
  progress = [l for l in first.stdout.splitlines() if l.startswith('step 4/8')]
  assert progress and all(k in progress[0] for k in ('epoch', 'loss', 'lr', 'ema', 'img/s', 'ETA'))
  assert 'kNN top-1 before training' in first.stdout

  second = run_main(workdir)
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'resumed at step 5' in second.stdout
  assert 'kNN top-1 before training' not in second.stdout  # baselines are kept
  results = json.loads((workdir / 'results.json').read_text())
  assert results['finished'] and results['step'] == 8 and results['epoch'] == 2.0
  for key in ('final_loss', 'knn_top1', 'knn_top1_raw_pixels', 'knn_top1_random_init',
              'images_per_sec', 'wall_time_sec'):
    assert isinstance(results[key], float), key
  assert 0 <= results['knn_top1'] <= 100 and results['images_per_sec'] > 0
  assert results['devices'] == 8
  history = json.loads((workdir / 'history.json').read_text())
  assert [round(e, 6) for e, _ in history['knn']] == [1.0, 2.0]
  assert history['knn'][-1][1] == results['knn_top1']
  assert [s for s, _ in history['loss']][-1] == 8
  assert results['wall_time_sec'] >= history['wall_time'] - 1e-6 > 0
  assert (workdir / 'training_curves.png').stat().st_size > 1000
  assert list(workdir.glob('events.out.tfevents.*')), 'no TensorBoard event file'
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps[-1] == 8 and len(steps) <= 3


@pytest.mark.parametrize('overrides,message', [
    (['--config.dataset=mnist_typo'], 'unknown dataset'),
    (['--config.arch=resnet9'], 'unknown architecture'),
    (['--config.batch_size=12'], 'multiple of the number of devices'),
    (['--config.crops_size=(16,8)'], 'equal lengths'),
    (['--config.not_a_field=1'], 'not_a_field'),
    (['--config.base_lr=0'], 'base_lr must be positive'),
])
def test_bad_config_exits_2_with_one_line_and_writes_nothing(tmp_path, overrides, message):
  workdir = tmp_path / 'run'
  proc = run_main(workdir, *overrides)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
  assert not workdir.exists()
