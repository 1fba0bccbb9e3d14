"""Rates and ETAs of running work: the one rule behind every rate the project prints or
records, and the evaluation loops' progress lines.

The rule (`Rate`): only finished work is timed, from the first measurement on, so the
work before it (a first step, which compiles) never is; `restart` leaves a stretch out
(the training loop's kNN evaluation); a printed rate and its ETA are over the last
`window` intervals between measurements, so one slow interval (a checkpoint, another
process on the machine) neither swings them nor stays in them; `overall` is the same
rule over the whole run.

clu's `periodic_actions.ReportProgress` is not used: it reports steps/s to the log as
work-unit notes, times from the previous report (so a step still queued on the device
or an evaluation between reports is counted), and rounds its ETA to minutes.
"""

from __future__ import annotations

import collections
import time
from typing import Callable

from resa_jax import reporting


def format_duration(seconds: float) -> str:
  """'1h02m03s', or '2m03s' under an hour."""
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f'{hours}h{minutes:02d}m{seconds:02d}s' if hours else f'{minutes}m{seconds:02d}s'


class Rate:
  """Units (steps, images, batches) per second of finished work, measured at the points
  the caller chooses: `measure(done)` with the count done so far."""

  def __init__(self, clock: Callable[[], float] = time.time, window: int = 5):
    self.clock = clock
    self._start: tuple[float, int] | None = None  # (time, done) of the current interval
    self._window = collections.deque(maxlen=window)  # (units, seconds) per interval
    self.units, self.seconds = 0, 0.0  # every timed interval: `overall`
    self.recent: float | None = None  # the last `measure`'s rate

  @property
  def started(self) -> bool:
    return self._start is not None

  def restart(self, done: int) -> None:
    """Times from now, at `done`: the time since the last measurement is left out."""
    self._start = (self.clock(), done)

  def measure(self, done: int) -> float | None:
    """Ends the current interval at `done` (the first call only starts one) and returns
    the rate over the last `window` intervals; None while none was timed."""
    now = self.clock()
    if self._start is not None and done > self._start[1]:
      units, seconds = done - self._start[1], now - self._start[0]
      self._window.append((units, seconds))
      self.units += units
      self.seconds += seconds
    self._start = (now, done)
    units, seconds = (sum(column) for column in zip(*self._window or [(0, 0.0)]))
    self.recent = units / seconds if seconds > 0 else None
    return self.recent

  @property
  def overall(self) -> float | None:
    """The rate over every timed interval of the run; None while none was timed."""
    return self.units / self.seconds if self.seconds > 0 else None

  def eta(self, done: int, total: int) -> str:
    """The time `total - done` more units take at the last measured rate, as
    `format_duration` writes it (call it after a `measure` that returned a rate)."""
    return format_duration((total - done) / self.recent)


class Progress:
  """Prints 'label: done/total unit (pct), rate unit/s, elapsed, ETA' about every 10% of
  the work or every `every_s` seconds, on the first process.  Call it with the count done.

  The rate follows `Rate`: it counts from the first call, so the work before it (the
  first batch, which compiles) is not timed and the first line has no rate.  Give
  `ready` the newest result of asynchronously dispatched work (a step's loss): it is
  waited for before the clock is read, so a rate is of finished work, not of work queued
  on the device.
  """

  def __init__(self, label: str, total: int, unit: str = 'batches', every_s: float = 30.0,
               print_fn: Callable[[str], None] | None = None,
               clock: Callable[[], float] = time.time):
    self.label, self.total, self.unit, self.every_s = label, max(int(total), 1), unit, every_s
    self.print_fn = print_fn or (lambda line: print(line, flush=True))
    self.clock = clock
    self.rate = Rate(clock)
    self.start = self.last = clock()
    self.next_tenth = 1  # a line when done reaches this many tenths of the total

  def __call__(self, done: int, *_, ready=None) -> None:
    due = (done >= self.total or 10 * done >= self.next_tenth * self.total
           or self.clock() - self.last >= self.every_s)
    if not due and self.rate.started:
      return
    if ready is not None:
      import jax  # pylint: disable=g-import-not-at-top
      jax.block_until_ready(ready)
    per_second = self.rate.measure(done)  # the first call starts the clock
    if not due:
      return
    while self.next_tenth * self.total <= 10 * done:  # integers: 0.1 + 0.2 != 0.3
      self.next_tenth += 1
    self.last = self.clock()
    rate = f'{per_second:.1f} {self.unit}/s, ' if per_second else ''
    eta = (f', ETA {self.rate.eta(done, self.total)}'
           if per_second and done < self.total else '')
    if reporting.is_chief():
      self.print_fn(f'{self.label}: {done}/{self.total} {self.unit} ({100 * done / self.total:.0f}%), '
                    f'{rate}{format_duration(self.last - self.start)}{eta}')
