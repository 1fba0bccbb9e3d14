"""The training loop's metrics: fetched from the device in groups, checked for NaN/Inf,
averaged, written through a clu metric writer and printed as the progress line."""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Any, Callable

import jax
import numpy as np

from resa_jax import progress as progress_lib


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
    self.last_loss = math.nan
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
    self.pending.clear()
    mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    self.last_loss = mean['loss']
    steps_per_sec, rate = self.rate.measure(step), ''
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
    """Over the whole run (results.json); None before two flushes."""
    steps_per_sec = self.rate.overall
    return steps_per_sec * self.batch_size if steps_per_sec else None


class _JsonLinesWriter:
  """The part of clu's MetricWriter the loop uses, where clu's writers cannot be
  imported (they need TensorFlow): each write_scalars a line of metrics.jsonl."""

  def __init__(self, path: pathlib.Path | None):
    self._path = path  # None: not the chief, nothing written

  def write_scalars(self, step: int, scalars: dict) -> None:
    if self._path is not None:
      line = json.dumps({'step': int(step), **{k: float(v) for k, v in scalars.items()}})
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
