"""train_metrics.MetricsLog on its own: divergence, averaging, honest rates; and the
evaluation loops' progress lines (progress.Progress), which time work by the same rule
(progress.Rate), on a fake clock."""

import math
import pathlib

import numpy as np
import pytest

from resa_jax import progress as progress_lib
from resa_jax import train_metrics


class FakeWriter:
  def __init__(self):
    self.rows = []

  def write_scalars(self, step, scalars):
    self.rows.append((step, dict(scalars)))


class FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def metrics(loss, grad_norm=1.0, state_finite=1.0):
  return dict(loss=np.float32(loss), lr=np.float32(0.1), ema_momentum=np.float32(0.99),
              assignment_entropy=np.float32(2.0), grad_norm=np.float32(grad_norm),
              nonfinite_fraction=np.float32(0.0 if math.isfinite(grad_norm) else 1.0),
              state_finite=np.float32(state_finite))


def make_log(**kwargs):
  writer, history, lines, clock = FakeWriter(), {'loss': []}, [], FakeClock()
  log = train_metrics.MetricsLog(writer=writer, history=history, batch_size=8, total_steps=10,
                                 steps_per_epoch=5, checkpoint_dir=pathlib.Path('/ckpt'),
                                 print_fn=lines.append, clock=clock, **kwargs)
  return log, writer, history, lines, clock


def test_mean_history_and_rates_exclude_the_compiled_first_step():
  log, writer, history, lines, clock = make_log()
  log.add(1, metrics(4.0))
  clock.now += 50.0  # compilation: never timed
  assert log.flush(1)['loss'] == 4.0
  assert 'img/s' not in lines[-1] and log.images_per_sec is None
  for step, loss in ((2, 3.0), (3, 2.0)):
    log.add(step, metrics(loss))
  clock.now += 2.0  # two steps of 8 images in 2 s
  mean = log.flush(3)
  assert mean['loss'] == pytest.approx(2.5) and mean['images_per_sec'] == pytest.approx(8.0)
  assert history['loss'] == [(1, 4.0), (3, 2.5)]
  assert [step for step, _ in writer.rows] == [1, 3]
  assert 'step 3/10 (epoch 0.60) loss 2.5000' in lines[-1]
  assert '8.0 img/s | ETA 0m07s' in lines[-1]  # 7 steps left at 1 s each
  assert log.flush(3) is None  # nothing kept: nothing written
  clock.now += 30.0  # a kNN evaluation ...
  log.restart_clock()  # ... after which the loop restarts the clock
  log.add(4, metrics(1.0))
  clock.now += 1.0
  log.flush(4)
  assert log.images_per_sec == pytest.approx(3 * 8 / 3.0)  # eval time not counted


def test_progress_rate_is_a_moving_window_and_results_rate_the_whole_run():
  log, writer, _, lines, clock = make_log(window=2)
  log.add(1, metrics(1.0))
  clock.now += 60.0  # compilation
  log.flush(1)
  rates = []
  for step, seconds in ((2, 1.0), (3, 1.0), (4, 9.0), (5, 1.0), (6, 1.0)):  # step 4: slow
    log.add(step, metrics(1.0))
    clock.now += seconds
    rates.append(log.flush(step)['images_per_sec'])
  # window of 2 intervals: 8/1, 16/2, 16/10, 16/10, 16/2 images per second
  assert rates == pytest.approx([8.0, 8.0, 1.6, 1.6, 8.0])
  assert [row[1]['images_per_sec'] for row in writer.rows[1:]] == pytest.approx(rates)
  assert '8.0 img/s | ETA 0m04s' in lines[-1]  # 4 steps left at 1 s each (window)
  assert log.images_per_sec == pytest.approx(5 * 8 / 13.0)  # whole run, compile left out


@pytest.mark.parametrize('bad', [dict(loss=float('nan')), dict(loss=1.0, grad_norm=float('inf')),
                                 dict(loss=1.0, state_finite=0.0)])
def test_divergence_names_the_step_and_writes_nothing(bad):
  log, writer, history, _, _ = make_log()
  log.add(1, metrics(1.0))
  log.add(2, metrics(**bad))
  with pytest.raises(train_metrics.TrainingDivergedError, match='diverged at step 2') as error:
    log.flush(2)
  assert '/ckpt' in str(error.value)
  assert writer.rows == [] and history['loss'] == []


def test_progress_lines_time_finished_work_from_the_first_call():
  clock, lines, waited = FakeClock(), [], []

  class Pending:  # an asynchronous result: block_until_ready waits for it
    def block_until_ready(self):
      waited.append(clock.now)
      clock.now += 0.5  # the queued steps finish
      return self
  progress = progress_lib.Progress('probe training', 100, 'images', every_s=30.0,
                                print_fn=lines.append, clock=clock)
  clock.now += 20.0  # the first step compiles: not timed
  progress(5, ready=Pending())  # 5%: not due, but it starts the clock (after waiting)
  assert lines == [] and waited == [120.0]
  clock.now += 5.0
  progress(10)  # 10% due: 5 images in 5 s since the first call
  assert lines == ['probe training: 10/100 images (10%), 1.0 images/s, 0m25s, ETA 1m30s']
  clock.now += 1.0
  progress(15, ready=Pending())  # neither 10% more nor 30 s: no line, nothing waited for
  assert len(lines) == 1 and len(waited) == 1
  clock.now += 29.0
  progress(16, ready=Pending())  # 30 s since the last line: due; timed after the wait
  assert len(waited) == 2  # 11 images in 35.5 s, 84 left
  assert lines[-1] == 'probe training: 16/100 images (16%), 0.3 images/s, 0m56s, ETA 4m31s'
  progress(100)
  assert lines[-1].startswith('probe training: 100/100 images (100%), ') and 'ETA' not in lines[-1]


def test_progress_first_call_at_the_end_has_no_rate():
  lines = []
  progress = progress_lib.Progress('features', 4, print_fn=lines.append, clock=FakeClock())
  progress(4)
  assert lines == ['features: 4/4 batches (100%), 0m00s']


def test_progress_lines_rate_the_last_intervals_like_the_training_line():
  clock, lines = FakeClock(), []
  progress = progress_lib.Progress('features', 100, print_fn=lines.append, clock=clock)
  progress(0)  # starts the clock
  for done in range(10, 70, 10):  # six lines, 10 batches a second ...
    clock.now += 1.0
    progress(done)
  clock.now += 10.0  # ... then 1 batch a second
  progress(70)
  assert len(lines) == 7  # one line each tenth (integer tenths: 0.1 * 3 > 0.3)
  # the last five intervals: 50 batches in 14 s (the first two have left the window)
  assert lines[-1] == 'features: 70/100 batches (70%), 3.6 batches/s, 0m16s, ETA 0m08s'


def test_history_is_cut_back_to_the_checkpoint_and_results_come_from_it(tmp_path, capsys):
  """history.json is written before each checkpoint: resumed at step 6, the points after
  it go; an unreadable one is reported and its curves restart; results.json's numbers are
  the history's (the loss of the final step alone, every timed interval)."""
  import json  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'history.json'
  path.write_text(json.dumps({
      'loss': [[2, 3.0], [4, 2.0], [6, 1.5], [8, 1.0]], 'knn': [[1.0, 20.0], [2.0, 30.0]],
      'timed': [[4, 2, 1.0], [6, 2, 1.0], [8, 2, 3.0]], 'last_loss': [8, 0.9],
      'checkpoint_save_sec': [[4, 0.5], [8, 1.5]], 'wall_time': 9.0,
      'knn_top1_random_init': 10.0}))
  history = train_metrics.restored_history(path, 6, steps_per_epoch=4)
  assert history['loss'] == [[2, 3.0], [4, 2.0], [6, 1.5]] and history['knn'] == [[1.0, 20.0]]
  assert history['timed'] == [[4, 2, 1.0], [6, 2, 1.0]]
  assert history['checkpoint_save_sec'] == [[4, 0.5]] and history['knn_top1_random_init'] == 10.0
  assert train_metrics.final_loss(history, 8) is None  # step 8 is not in it
  results = train_metrics.results(
      {**history, 'last_loss': (8, 0.75), 'knn': [[1.0, 20.0], [2.0, 31.0]]}, step=8,
      steps_per_epoch=4, batch_size=8, knn_k=5, devices=2, platform='cpu')
  assert (results['final_loss'], results['knn_top1'], results['epoch']) == (0.75, 31.0, 2.0)
  assert results['images_per_sec'] == pytest.approx(4 * 8 / 2.0)
  assert results['checkpoint_save_sec_mean'] == 0.5 and results['wall_time_sec'] == 9.0
  stale = train_metrics.results(history, step=8, steps_per_epoch=4, batch_size=8, knn_k=5,
                                devices=2, platform='cpu')
  assert stale['knn_top1'] is None  # the kNN of epoch 1 is not the final one
  path.write_text('{"loss": [[2, 3.0]')
  assert train_metrics.restored_history(path, 6, 4) == {'loss': [], 'knn': [], 'wall_time': 0.0}
  assert 'history.json is unreadable (JSONDecodeError' in capsys.readouterr().out
