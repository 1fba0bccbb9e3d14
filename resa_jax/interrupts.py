"""SIGTERM and SIGINT (Ctrl-C) honoured at any point of a command, within seconds.

Python runs a signal handler only when the main thread next executes Python code, so a
main thread blocked inside TensorFlow or XLA (an input pipeline that yields nothing, a
long compilation) would ignore SIGTERM until SIGKILL.  `watch()` (called first thing
by the command lines, before JAX or TensorFlow start their threads) therefore blocks
both signals in every thread and receives them in one watcher thread with
`signal.sigwait`.  On a signal the watcher

* during training steps (inside `polling()`): leaves the stop to the loop, which sees
  `requested()` after the step in flight, saves a checkpoint and exits 128 + signum;
* anywhere else (data loading, evaluation, the kNN inside the loop): raises `Stopped`
  in the main thread at its next Python bytecode (`_thread.interrupt_main`); before
  the command's main function runs (`mark_main_started()`, while importing): exits at once;
* if the main thread has not acknowledged (`acknowledge()`, called when it starts
  saving or exiting) within GRACE_SECONDS, or on a second signal: prints one line and
  ends the process with `os._exit(128 + signum)`.  Checkpoints are written to a
  temporary folder and renamed when complete, so an exit at any moment keeps every
  finished checkpoint.

Library use (no `watch()`): `polling()` installs plain handlers that set `requested()`
for the loop, as a SIGTERM handler would; elsewhere Python's defaults apply.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import _thread

GRACE_SECONDS = 30.0
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(BaseException):
  """A stop signal arrived while the main thread was not inside `polling()`."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum

  @property
  def exit_code(self) -> int:
    return 128 + self.signum


_state = {'watching': False, 'polling': False, 'requested': None, 'running': False}
_acknowledged = threading.Event()


def requested() -> int | None:
  """The stop signal received so far (its number), or None."""
  return _state['requested']


def signal_name(signum: int) -> str:
  return signal.Signals(signum).name


def mark_main_started() -> None:
  """The command's main function has started (it turns `Stopped` into one line); before,
  during imports, a signal ends the process at once (nothing to save yet)."""
  _state['running'] = True


def acknowledge() -> None:
  """The main thread has seen the stop and is saving or exiting: no forced exit."""
  _acknowledged.set()


def watch(grace_seconds: float = GRACE_SECONDS) -> None:
  """Blocks SIGINT/SIGTERM in this thread (and the threads it starts from now on) and
  starts the watcher.  Call from the main thread before JAX or TensorFlow start
  threads; elsewhere, or a second time, it does nothing."""
  if threading.current_thread() is not threading.main_thread() or _state['watching']:
    return
  for signum in SIGNALS:  # what interrupt_main runs in the main thread
    signal.signal(signum, _raise_stopped)
  signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
  threading.Thread(target=_watcher, args=(grace_seconds,), name='resa-stop-signals',
                   daemon=True).start()
  _state['watching'] = True


def unwatch() -> None:
  """Multi-host: the main thread receives the signals again (the watcher stays idle).
  SIGTERM's handler is left as jax.distributed set it (its preemption service);
  SIGINT raises KeyboardInterrupt as Python's default."""
  if _state['watching']:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
    _state['watching'] = False


@contextlib.contextmanager
def polling(install_handlers: bool = True):
  """The caller checks `requested()` between steps: a signal only sets it.  Without
  `watch()`, installs handlers that do so (main thread only; not multi-host, where
  SIGTERM belongs to JAX's preemption service)."""
  fallback = {}
  if (install_handlers and not _state['watching']
      and threading.current_thread() is threading.main_thread()):
    # Library use: a stop seen by an earlier loop of this process is not this one's.
    _state['requested'] = None
    _acknowledged.clear()
    fallback = {s: signal.signal(s, lambda signum, _: _request(signum)) for s in SIGNALS}
  _state['polling'] = True
  try:
    yield
  finally:
    _state['polling'] = False
    for signum, handler in fallback.items():
      signal.signal(signum, handler)


@contextlib.contextmanager
def not_polling():
  """Inside `polling()`, a stretch (an evaluation) that a signal interrupts at once."""
  was, _state['polling'] = _state['polling'], False
  try:
    if requested() is not None and not _acknowledged.is_set():
      raise Stopped(requested())
    yield
  finally:
    _state['polling'] = was


def _request(signum: int) -> None:
  if _state['requested'] is None:
    _state['requested'] = signum


def _raise_stopped(signum, _frame):
  """Runs in the main thread (interrupt_main): raises unless the loop polls."""
  _request(signum)
  if not _state['polling']:
    raise Stopped(signum)


def _exit(signum: int, text: str) -> None:
  print(f'error: {text}', file=sys.stderr, flush=True)
  os._exit(128 + signum)  # pylint: disable=protected-access


def _watcher(grace_seconds: float) -> None:
  signum = signal.sigwait(SIGNALS)
  name = signal_name(signum)
  _request(signum)
  if not _state['running']:
    _exit(signum, f'{name} while starting; stopped (nothing written)')
  if not _state['polling']:
    _thread.interrupt_main(signum)
  second = signal.sigtimedwait(SIGNALS, grace_seconds)  # None after the grace time
  if not _acknowledged.is_set():
    why = ('a second signal' if second else
           f'the main thread did not stop within {grace_seconds:.0f} s (blocked in '
           'data loading, compilation or a step)')
    _exit(signum, f'{name}: {why}; exiting without saving (finished checkpoints are kept)')
  if second is None:  # acknowledged: the main thread saves and exits, unless a second
    signal.sigwait(SIGNALS)  # signal ends it
  _exit(signum, f'second {name} while saving: exiting now (finished checkpoints are kept)')
