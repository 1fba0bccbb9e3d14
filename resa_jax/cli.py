"""What the command lines share (`resa_jax.main`, `resa_jax.evaluate`, `resa_jax.convert`):
absl flag parsing with one-line errors, the multi-host flags, and the one way a command
fails.

Every failure a user can cause ends the same way: one `error: ...` line on standard
error and exit code 2 (bad input: a folder this user cannot write included) or 3 (a
diverged run), never a traceback.  A write the disk refuses (full, quota) ends with
exit code 4 and one line naming the path; what was written before stays.  `--help`
prints the command's module docstring and its own flags, and exits 0.
"""

from __future__ import annotations

import logging as python_logging
import os
import pathlib
import sys

from absl import flags
from absl import logging

from resa_jax import interrupts
from resa_jax import reporting

FLAGS = flags.FLAGS


def fail(message, code: int = 2, at_once: bool = False):
  """Prints `error: <message on one line>` to standard error and exits with `code`;
  `at_once`: without the interpreter's shutdown (os._exit, after flushing stdout)."""
  print(f'error: {reporting.one_line(message)}', file=sys.stderr, flush=True)
  if at_once:
    sys.stdout.flush()
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


def define_multihost_flags() -> None:
  """--coordinator_address, --num_processes, --process_id, --distributed."""
  flags.DEFINE_string('coordinator_address', None,
                      'Multi-host: host:port of process 0 for jax.distributed.initialize '
                      '(or $JAX_COORDINATOR_ADDRESS; under srun/mpirun/GKE, and with '
                      '--distributed, JAX detects what is unset).')
  flags.DEFINE_integer('num_processes', None, 'Multi-host: total number of processes.')
  flags.DEFINE_integer('process_id', None, 'Multi-host: index of this process.')
  flags.DEFINE_boolean('distributed', None,
                       'Multi-host: --distributed calls jax.distributed.initialize() on '
                       "JAX's cluster detection (use it on Cloud TPU VM pod slices); "
                       '--nodistributed never does; unset: when the flags above, '
                       '$JAX_COORDINATOR_ADDRESS or a multi-task srun/mpirun/GKE launch '
                       'ask for it.')


def initialize_distributed() -> None:
  """jax.distributed from the multi-host flags (a one-line error on a bad combination);
  then only process 0 prints progress (the others' errors still show).

  One process: SIGTERM/SIGINT are watched from here on (`interrupts.watch`, before JAX
  starts its threads).  Several: SIGTERM goes to JAX's preemption service instead.
  """
  import os  # pylint: disable=g-import-not-at-top
  from resa_jax import sharding  # pylint: disable=g-import-not-at-top
  interrupts.watch()
  try:
    if sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                       FLAGS.process_id, force=FLAGS.distributed):
      interrupts.unwatch()
  except ValueError as e:
    fail(e)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() > 0:
    sys.stdout = open(os.devnull, 'w')  # pylint: disable=consider-using-with


DISK_FULL_EXIT_CODE = 4


def run(main, flags_parser=None) -> None:
  """`app.run(main)` with `flags_parser` (default: `parse_flags`); one line for a stop
  signal outside the training steps (those save first and exit themselves, see
  resa_jax/interrupts.py): exit 130 (SIGINT) or 143 (SIGTERM); one line for a write
  the system refused (`reporting.refused_write`): exit 4 for a full disk or quota,
  2 for a read-only file system or a permission."""
  from absl import app  # pylint: disable=g-import-not-at-top
  interrupts.mark_main_started()
  try:
    app.run(main, flags_parser=flags_parser or parse_flags)
  except interrupts.Stopped as e:
    interrupts.acknowledge()
    fail(f'{e}: stopped outside the training steps, nothing to save (finished '
         'checkpoints and result files are kept)', code=e.exit_code)
  except Exception as e:  # pylint: disable=broad-except
    refused = reporting.refused_write(e)
    if refused is None:
      raise
    # At once: the writes still in flight (orbax's threads, TensorStore's) would fail
    # too as the interpreter shuts down, each with a traceback (into closed event loops,
    # executors already shut down).  The line says it once; the lock is released.
    fail(reporting.refused_write_line(refused), at_once=True,
         code=DISK_FULL_EXIT_CODE if refused.errno in reporting.DISK_FULL_ERRNOS else 2)


def _not_a_refused_write(record) -> bool:
  """False for a log record about a write the system refused: orbax's background
  threads (and asyncio, for their tasks) log each failed write with a traceback; the
  same error is raised to the command, which says it in one line (`run`)."""
  if record.levelno < python_logging.ERROR:
    return True
  return (reporting.refused_write(record.exc_info[1] if record.exc_info else None) is None
          and reporting.refused_write_in_text(record.getMessage()) is None)


def _unraisable_but_not_a_late_callback(default_hook):
  """A sys.unraisablehook that drops the RuntimeError of a closed asyncio event loop
  (raised by its `_check_closed`): TensorStore's writes that end after orbax closed
  their event loop (those of a failed save) call back into it, each printing a traceback
  that says nothing the error line does not.

  Recognised by where it is raised, since its RuntimeError carries nothing else: the
  code object of CPython's private `asyncio.BaseEventLoop._check_closed` (3.8 to 3.13;
  tests/test_faults.py raises one on the installed Python).  Where that is gone, nothing
  is dropped."""
  import asyncio  # pylint: disable=g-import-not-at-top
  closed_check = getattr(getattr(asyncio.BaseEventLoop, '_check_closed', None), '__code__',
                         None)

  def hook(unraisable):
    tb = unraisable.exc_traceback
    while tb is not None and tb.tb_next is not None:
      tb = tb.tb_next
    if not (isinstance(unraisable.exc_value, RuntimeError) and tb is not None
            and closed_check is not None and tb.tb_frame.f_code is closed_check):
      default_hook(unraisable)
  return hook


def quiet_logging() -> None:
  """WARNING unless --verbosity was given: orbax and TensorFlow are chatty at INFO; and
  then no log record nor late-callback traceback of a failed write
  (`_not_a_refused_write`, `_unraisable_but_not_a_late_callback`): `run` says it."""
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
    logging.get_absl_handler().addFilter(_not_a_refused_write)
    sys.unraisablehook = _unraisable_but_not_a_late_callback(sys.unraisablehook)


SHIPPED_CONFIGS = pathlib.Path(__file__).resolve().parent / 'configs'


def shipped_config_paths(argv: list[str]) -> list[str]:
  """`--config=NAME[:args]` naming a shipped config (resa_jax/configs/NAME.py) and not
  a file here becomes its path; anything else is left as it is."""
  out = []
  for arg in argv:
    name, sep, rest = arg.partition('=')[2].partition(':')
    if (arg.startswith('--config=') and name.isidentifier() and not os.path.exists(name)):
      if not (SHIPPED_CONFIGS / f'{name}.py').exists():
        shipped = sorted(p.stem for p in SHIPPED_CONFIGS.glob('*.py') if p.stem != '__init__')
        fail(f'--config={name}: no such file and no shipped config of that name (shipped: '
             f'{", ".join(shipped)})')
      arg = f'--config={SHIPPED_CONFIGS / name}.py{sep}{rest}'
    out.append(arg)
  return out


def _bad_override(argv) -> str | None:
  """The line for the first `--config.FIELD[.SUB]=VALUE` of `argv` that names no field
  of the config, None if each names one (or the config itself does not load).

  Decided from the config's own fields (it is loaded again, alone), not from the error
  ml_collections raised: that is a KeyError whose only text is a did-you-mean message."""
  import difflib  # pylint: disable=g-import-not-at-top
  from ml_collections import config_dict, config_flags  # pylint: disable=g-import-not-at-top
  alone = [argv[0], *[a for a in argv if a.startswith('--config=')][-1:]]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values=values)
  saved, sys.argv = sys.argv, alone  # config_flags takes its overrides from sys.argv too
  try:
    values(alone)
    config = values.config
    fields = list(config.keys())
  except Exception:  # pylint: disable=broad-except  (no config, or it fails: the caller says)
    return None
  finally:
    sys.argv = saved
  for arg in argv:
    name = arg.split('=', 1)[0]
    path = name[len('--config.'):].split('.')
    if not name.startswith('--config.'):
      continue
    if path[0] not in fields:
      close = difflib.get_close_matches(path[0], fields, n=1)
      return (f'{name}: the config has no field {path[0]!r} ('
              + (f'did you mean {close[0]}? ' if close else '')
              + 'the fields are in configs/default.py)')
    if len(path) > 1 and not isinstance(config[path[0]], config_dict.ConfigDict):
      return (f'{name}: config field {path[0]!r} has no sub-fields (every field is flat; '
              f'set it as --config.{path[0]}=VALUE, see configs/default.py)')
  return None


def parse_flags(argv):
  """absl flag parsing with a one-line error (exit 2) instead of usage text.

  Handles what a config flag (`--config=FILE` or a shipped config's name,
  `--config.x=y`) can raise: an unknown flag or field, a bad value, a config file
  that does not load.
  """
  argv = shipped_config_paths(argv)
  try:
    rest = FLAGS(argv)
  except SystemExit as e:  # --help / --helpfull have printed; absl exits 1 after them
    sys.exit(0 if e.code == 1 else e.code)
  except flags.Error as e:  # unknown flag or --config.x field, bad value, broken config file
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    fail(lines[0].rstrip(':') + (f': {lines[-1]}' if len(lines) > 1 else ''))
  except Exception as e:  # pylint: disable=broad-except  (a config file that fails to load)
    fail(_bad_override(argv) or
         f'cannot load the config: {type(e).__name__}: {reporting.first_line(e)}')
  if 'config' in FLAGS and FLAGS.config is None:
    fail('--config is required, e.g. --config=configs/fashion_mnist.py')
  if 'config' in FLAGS:
    try:  # a config file that cannot be read only raises when first used
      FLAGS.config.keys()
    except OSError as e:
      lines = [line.strip() for line in str(e).splitlines() if line.strip()]
      fail(f'cannot load the config file {FLAGS["config"].config_filename}: {lines[-1]}')
  return rest
