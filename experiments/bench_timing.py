"""Timing helpers of bench_step.py: blocked calls, compile time apart, a count of XLA
compilations (a `jax.monitoring` listener) to prove the timed calls reuse one
executable, and the peak memory the backend reports."""

from __future__ import annotations

import resource
import time
import warnings

import jax

BACKEND_COMPILES = []  # one entry (seconds) per XLA compilation in this process


def _on_event_duration(name, duration, **_):
  if name == '/jax/core/compile/backend_compile_duration':
    BACKEND_COMPILES.append(duration)


jax.monitoring.register_event_duration_secs_listener(_on_event_duration)


def cache_size(jitted) -> int:
  """Entries in a jitted function's compilation cache (-1 where jax hides it)."""
  try:
    return int(jitted._cache_size())  # pylint: disable=protected-access
  except AttributeError:
    return -1


def block(tree):
  return jax.block_until_ready(tree)


def time_calls(fn, args_fn, steps: int, warmup: int):
  """Seconds of `steps` blocked calls fn(*args_fn()) after `warmup` ones."""
  for _ in range(warmup):
    block(fn(*args_fn()))
  times = []
  for _ in range(steps):
    args = args_fn()
    start = time.perf_counter()
    block(fn(*args))
    times.append(time.perf_counter() - start)
  return times


def memory_report(compiled=None) -> dict:
  """Peak memory: the device's where reported, else the process's peak RSS."""
  out = {}
  stats = None
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except  (not implemented on some backends)
    pass
  if stats and 'peak_bytes_in_use' in stats:
    out['peak_bytes'] = int(stats['peak_bytes_in_use'])
    out['peak_kind'] = 'device peak_bytes_in_use'
  else:
    # Linux reports ru_maxrss in KiB.
    out['peak_bytes'] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    out['peak_kind'] = 'process peak RSS (host)'
  if compiled is not None:
    try:
      ma = compiled.memory_analysis()
      out['xla_plan_bytes'] = int(ma.argument_size_in_bytes + ma.output_size_in_bytes +
                                  ma.temp_size_in_bytes - ma.alias_size_in_bytes)
      out['xla_temp_bytes'] = int(ma.temp_size_in_bytes)
    except Exception:  # pylint: disable=broad-except
      pass
  return out


def compile_timed(jitted, args, log, what: str):
  """(compiled, lower seconds, XLA compile seconds) of `jitted` on `args`."""
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  lower_s = time.perf_counter() - start
  compiles_before = len(BACKEND_COMPILES)
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  if len(BACKEND_COMPILES) == compiles_before:  # the event was renamed in this jax?
    log('warning: no XLA compilation event seen; the recompilation check relies on the '
        'jit cache size alone')
  log(f'{what}: trace + lower {lower_s:.2f} s, XLA compile {compile_s:.2f} s')
  return compiled, lower_s, compile_s


def time_without_recompiling(fn, args_fn, steps: int, warmup: int, jitted) -> dict:
  """time_calls(fn, ...) and the compilations it caused: AssertionError if any of the
  `jitted` functions compiled again during the timed calls."""
  with warnings.catch_warnings():
    warnings.filterwarnings('ignore', message='Some donated buffers were not usable')
    before_warmup = len(BACKEND_COMPILES)
    time_calls(fn, args_fn, 0, warmup)
    warmup_compiles = len(BACKEND_COMPILES) - before_warmup
    caches = [cache_size(f) for f in jitted]
    before = len(BACKEND_COMPILES)
    times = time_calls(fn, args_fn, steps, 0)
    timed_compiles = len(BACKEND_COMPILES) - before
  size = cache_size(jitted[0])
  recompilations = timed_compiles + sum(cache_size(f) - c for f, c in zip(jitted, caches))
  if recompilations:
    raise AssertionError(f'the train step recompiled {recompilations} time(s) during the '
                         f'timed steps (jit cache size {size})')
  return dict(times=times, warmup_compilations=warmup_compiles, recompilations=recompilations,
              jit_cache_size=size)
