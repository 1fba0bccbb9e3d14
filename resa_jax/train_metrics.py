"""The training loop's metrics: fetched from the device in groups, checked for NaN/Inf,
averaged, written through a clu metric writer and printed as the progress line; kept in
the run's history (history.json), from which alone results.json is computed."""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any, Callable

import jax
import numpy as np

from resa_jax import progress as progress_lib
from resa_jax import reporting


# results.json / history.json names of each kNN metric's curve (points (epoch, value)).
KNN_CURVES = {'knn_top1': 'knn', 'knn5_euclidean_top1': 'knn5_euclidean'}
# history.json's curves of points (step, ...): losses, timed intervals, checkpoint saves.
STEP_CURVES = ('loss', 'timed', 'checkpoint_save_sec')


class TrainingDivergedError(RuntimeError):
  """The loss, gradient or new state became NaN or Inf; the message names the step."""


# ------------------------------------------------------------- metrics ----

class MetricsLog:
  """Device metrics of the finished steps: fetched in groups, checked, logged.

  `add(step, metrics)` keeps a step's metrics (still on the device, so the host
  does not wait for it); `flush(step)` fetches all kept ones, raises
  TrainingDivergedError naming the first step whose loss, gradient norm or new
  state is not finite, then writes their mean through `writer`, appends the loss
  to `history['loss']` and prints the progress line.

  What results.json reports is kept in `history` (history.json), so that a run resumed
  at any step, its last included, reports what an uninterrupted run does:
  `history['last_loss']` is (step, loss) of the newest step alone (the mean of a
  logging window would depend on where a run was resumed), `history['timed']` holds
  (step, steps, seconds) of each timed interval.

  Rates follow `progress.Rate` over steps: the first flush starts the clock (the first
  step's compilation is never timed) and `restart_clock()` (after a kNN evaluation)
  leaves the evaluation out.  The progress line, TensorBoard's `images_per_sec` and the
  ETA are over the last `window` intervals between flushes; `images_per_sec`
  (results.json) is over the whole run.
  """

  def __init__(self, *, writer, history: dict, batch_size: int, total_steps: int,
               steps_per_epoch: int, checkpoint_dir: pathlib.Path,
               print_fn: Callable[[str], None] = lambda line: print(line, flush=True),
               clock: Callable[[], float] = time.time, window: int = 5):
    self.writer, self.history, self.print_fn = writer, history, print_fn
    self.batch_size, self.total_steps = batch_size, total_steps
    self.steps_per_epoch, self.checkpoint_dir = steps_per_epoch, checkpoint_dir
    self.pending: list[tuple[int, Any]] = []
    self.rate = progress_lib.Rate(clock, window)  # steps per second
    self._last_step = 0

  def add(self, step: int, metrics) -> None:
    self._last_step = step
    self.pending.append((step, metrics))

  def restart_clock(self) -> None:
    """Times from now: the time since the last flush (an evaluation) is left out."""
    self.rate.restart(self._last_step)

  def _check(self, fetched) -> None:
    for (s, _), m in zip(self.pending, fetched):
      if not (np.isfinite(m['loss']) and np.isfinite(m['grad_norm']) and m['state_finite']):
        raise TrainingDivergedError(
            f'training diverged at step {s}: loss {m["loss"]}, gradient norm '
            f'{m["grad_norm"]} ({m["nonfinite_fraction"]:.1%} of the gradient entries '
            f'non-finite), parameters {"finite" if m["state_finite"] else "non-finite"} '
            f'after the step; nothing of it was saved, the last good checkpoint is kept '
            f'in {self.checkpoint_dir}')

  def flush(self, step: int) -> dict | None:
    """Checks and logs the kept steps' metrics; returns their mean (None if none)."""
    if not self.pending:
      return None
    fetched = jax.device_get([m for _, m in self.pending])
    self._check(fetched)
    mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    self.history['last_loss'] = (self.pending[-1][0], float(fetched[-1]['loss']))
    self.pending.clear()
    timed_before = (self.rate.units, self.rate.seconds)
    steps_per_sec, rate = self.rate.measure(step), ''
    if self.rate.units > timed_before[0]:
      self.history.setdefault('timed', []).append(
          (step, self.rate.units - timed_before[0], self.rate.seconds - timed_before[1]))
    if steps_per_sec:
      mean['images_per_sec'] = steps_per_sec * self.batch_size
      rate = (f' | {mean["images_per_sec"]:.1f} img/s | ETA '
              f'{self.rate.eta(step, self.total_steps)}')
    self.writer.write_scalars(step, mean)
    self.history['loss'].append((step, mean['loss']))
    self.print_fn(f'step {step}/{self.total_steps} (epoch {step / self.steps_per_epoch:.2f}) '
                  f'loss {mean["loss"]:.4f} lr {mean["lr"]:.4g} ema {mean["ema_momentum"]:.5f} '
                  f'entropy {mean["assignment_entropy"]:.3f}{rate}')
    return mean

  @property
  def images_per_sec(self) -> float | None:
    """Over the whole run, every invocation of it (results.json); None before two
    flushes."""
    return images_per_sec(self.history, self.batch_size)


def images_per_sec(history: dict, batch_size: int) -> float | None:
  """Images per second over the timed intervals of `history` (MetricsLog's 'timed')."""
  steps = sum(s for _, s, _ in history.get('timed', ()))
  seconds = sum(t for _, _, t in history.get('timed', ()))
  return steps * batch_size / seconds if seconds > 0 else None


def final_loss(history: dict, step: int) -> float | None:
  """The loss of step `step` alone, if it was the newest step logged; else None."""
  last = history.get('last_loss')
  return float(last[1]) if last is not None and int(last[0]) == step else None


# ------------------------------------------------------------- history ----

def restored_history(path: pathlib.Path, start_step: int, steps_per_epoch: int) -> dict:
  """history.json of the run, cut back to `start_step` (the checkpoint resumed from):
  it is written before each checkpoint, so it may be ahead of the newest readable one.
  An unreadable one is reported, and its curves restart (the kNN baselines are then
  measured again)."""
  history = {'loss': [], 'knn': [], 'wall_time': 0.0}
  if not start_step or not path.exists():
    return history
  try:
    stored = json.loads(path.read_text())
    if not isinstance(stored, dict):
      raise ValueError('not a JSON object')
  except (OSError, ValueError) as e:
    print(f'warning: {path} is unreadable ({type(e).__name__}: {reporting.one_line(e, 200)}); '
          f'its curves restart at step {start_step}', flush=True)
    return history
  history.update(stored)
  for curve in STEP_CURVES:
    history[curve] = [p for p in history.get(curve, []) if p[0] <= start_step]
  if history.get('last_loss') and history['last_loss'][0] > start_step:
    del history['last_loss']
  for curve in KNN_CURVES.values():
    if curve in history:
      history[curve] = [p for p in history[curve] if p[1] is not None and
                        p[0] <= start_step / steps_per_epoch + 1e-9]
  return history


def at_epoch(curve, epoch: float):
  """The value of a kNN curve's point at `epoch`; None if it has none there."""
  return next((value for e, value in reversed(curve or []) if abs(e - epoch) < 1e-9), None)


def results(history: dict, *, step: int, steps_per_epoch: int, batch_size: int, knn_k: int,
            devices: int, platform: str) -> dict:
  """results.json of a run finished at `step`, from its history alone.

  So a run resumed at any step, its last included, reports what an uninterrupted run
  does: the loss of the final step, the kNN measured after it (None where none was),
  the rates over every invocation's timed intervals and saves.
  """
  epoch = step / steps_per_epoch
  saves = [seconds for _, seconds in history.get('checkpoint_save_sec', [])]
  cifar = {}
  if 'knn5_euclidean_top1_raw_pixels' in history or history.get('knn5_euclidean'):
    cifar = {'knn5_euclidean_top1': at_epoch(history.get('knn5_euclidean'), epoch),
             **{f'knn5_euclidean_top1_{baseline}': history.get(f'knn5_euclidean_top1_{baseline}')
                for baseline in ('raw_pixels', 'random_init')}}
  return {
      'finished': True,
      'step': step,
      'epoch': epoch,
      'final_loss': final_loss(history, step),
      'knn_top1': at_epoch(history.get('knn'), epoch),
      'knn_top1_raw_pixels': history.get('knn_top1_raw_pixels'),
      'knn_top1_random_init': history.get('knn_top1_random_init'),
      'knn_k': knn_k,
      **cifar,  # the authors' CIFAR metric (5-NN Euclidean majority vote), where measured
      'images_per_sec': images_per_sec(history, batch_size),
      'wall_time_sec': history.get('wall_time', 0.0),
      'checkpoint_save_sec_mean': float(np.mean(saves)) if saves else None,
      'devices': devices,
      'platform': platform,
  }


class _JsonLinesWriter:
  """The part of clu's MetricWriter the loop uses, where clu's writers cannot be
  imported (they need TensorFlow): each write_scalars a line of metrics.jsonl."""

  def __init__(self, path: pathlib.Path | None):
    self._path = path  # None: not the chief, nothing written

  def write_scalars(self, step: int, scalars: dict) -> None:
    if self._path is not None:
      line = reporting.json_line({'step': int(step), **{k: float(v) for k, v in scalars.items()}})
      with open(self._path, 'a', encoding='utf-8') as f:
        f.write(line + '\n')

  def flush(self) -> None:
    pass


def metric_writer(workdir: pathlib.Path, is_chief: bool):
  """clu's default writer (TensorBoard events and the log), or without TensorFlow
  metrics.jsonl in the workdir."""
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
  except ImportError:
    print('TensorFlow is not installed: metrics go to metrics.jsonl, not TensorBoard',
          flush=True)
    return _JsonLinesWriter(workdir / 'metrics.jsonl' if is_chief else None)
  return metric_writers.create_default_writer(str(workdir), just_logging=not is_chief)
