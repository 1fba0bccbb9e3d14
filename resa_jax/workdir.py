"""The training workdir as a whole: its lock, its config and whether it is finished.

Everything here runs before TensorFlow, data loading or a device is touched, so a
refusal takes a fraction of a second and writes nothing.

* **Lock.**  `<workdir>/.lock` holds `pid@host` of the run that trains there (or, by
  the same rule, of the `python -m resa_jax.evaluate` that writes its `--output`), under
  the `filelock` library's advisory lock (`flock`).  A second run on a live workdir is
  refused (`WorkdirLocked`, naming the holder).  The kernel drops the flock when its
  process dies, so the lock of a killed run (`kill -9`, OOM) is stale at once and the
  next run takes it over with a one-line note.  A run that ends (finished, stopped,
  failed) removes the file.  On a file system without flock (some network mounts)
  filelock keeps a marker file with the holder's pid and host instead: held while that
  pid is alive on this host; a marker of another host is honoured.  Multi-host: only
  process 0 takes the lock (the other processes are started together with it and share
  its fate).
* **Config.**  `config.json` is the config the workdir was trained with.  Resuming
  with a config that differs in a field that changes the training is refused unless
  `allow_config_change`; then `config.json` keeps the original and
  `config_history.json` records each change as `{step, changed: {field: [old, new]}}`.
  The record is checked, not trusted: a workdir with checkpoints whose config.json is
  missing or unreadable (or whose config_history.json is unreadable) is refused, since
  no change could be told; `allow_config_change` then records --config as its config.
* **Finished.**  A finished run (its `results.json`, at the step its config asks for)
  rerun with its own config prints its results and changes nothing, whatever its
  checkpoints folder holds.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import socket

from resa_jax import checkpoints as checkpoints_lib
from resa_jax import reporting

LOCK_NAME = '.lock'
HISTORY_NAME = 'config_history.json'

# Fields that do not change what is trained (the data order, the model, the
# optimisation and the schedule stay the same), so a resumed run may change them
# freely: logging, checkpointing and periodic-kNN bookkeeping, where the data lives,
# how far this invocation runs, input prefetching.  Every other field (num_epochs and
# num_train_steps included: they change the schedule) is compared on resume.
TRAINING_NEUTRAL_FIELDS = frozenset({
    'data_dir', 'manual_dir', 'tfds_download', 'prefetch',
    'log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
    'knn_every_epochs', 'knn_k', 'knn_temperature', 'knn_max_train_examples',
    'eval_split', 'eval_train_split', 'eval_resize',
    'run_steps', 'allow_config_change',
})


class WorkdirLocked(ValueError):
  """Another live run holds the workdir."""


def check_workdir(workdir) -> pathlib.Path:
  """`workdir` as a Path; ValueError for a URL or a path that is not a directory."""
  if '://' in str(workdir):  # pathlib would quietly make a local folder 'gs:/...'
    raise ValueError(f'workdir {workdir} is a URL; it must be a local or mounted path '
                     '(e.g. a gcsfuse mount of the bucket)')
  workdir = pathlib.Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f'workdir {workdir} exists and is not a directory')
  return workdir


# ------------------------------------------------------------------- lock ----

def _me() -> str:
  return f'{os.getpid()}@{socket.gethostname()}'


def _holder(path: pathlib.Path) -> str:
  """`pid@host` of the lock file's holder ('' if none is recorded).  Where the file
  system has no flock the file is filelock's marker, which records the pid and the host
  on lines of their own (`pid=` and `host=` in its newer format)."""
  try:
    lines = path.read_text(errors='replace').split()
  except OSError:
    return ''
  if len(lines) < 2:
    return ''.join(lines)  # ours
  fields = dict(line.partition('=')[::2] for line in lines if '=' in line)
  return f'{fields.get("pid", lines[0])}@{fields.get("host", lines[1])}'


def _note_takeover(holder: str, path: pathlib.Path) -> None:
  print(f'note: taking over the lock of a run that is no longer running ({holder}, {path})',
        flush=True)


def _locked_message(folder, holder: str, flag: str) -> str:
  pid, _, host = holder.partition('@')
  what = 'the workdir' if flag == '--workdir' else f'the {flag} folder'
  return (f'{what} {folder} is in use by another run (pid {pid or "?"} on host '
          f'{host or "?"}, see {LOCK_NAME}); wait for it to end or stop it, or use '
          f'another {flag}')


def _file_lock(path: pathlib.Path):
  """The lock on `path`; `acquire` raises filelock.Timeout if it stays held for a second
  (the second lets a run that is ending, and removing the file, finish that)."""
  import filelock  # pylint: disable=g-import-not-at-top
  return filelock.FileLock(path, timeout=1.0, mode=0o644, thread_local=False)


def refuse_if_locked(workdir, flag: str = '--workdir') -> None:
  """Raises WorkdirLocked if a live run holds `workdir` (the folder of `flag`).  A free lock is taken and
  released at once, which changes nothing but a dead run's marker (no flock), removed; a
  lock file this process may not open is left to `require_writable` and `Lock.acquire`,
  which say why."""
  import filelock  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(workdir) / LOCK_NAME
  previous = _holder(path)
  if not path.exists():
    return
  probe = _file_lock(path)
  try:
    probe.acquire()
  except filelock.Timeout:
    raise WorkdirLocked(_locked_message(workdir, _holder(path), flag)) from None
  except OSError:
    return
  probe.release()
  if previous and not path.exists():  # a marker (no flock) of a dead run, now removed
    _note_takeover(previous, path)


class Lock:
  """The lock of one workdir, held from `acquire` to `release` (or process exit)."""

  def __init__(self, path: pathlib.Path, lock):
    self.path, self._lock = path, lock
    self._marker = _is_marker(lock)  # no flock: filelock's marker, which it removes

  @classmethod
  def acquire(cls, workdir, flag: str = '--workdir') -> 'Lock':
    """Creates the workdir (the folder of `flag`) if needed and takes its lock;
    WorkdirLocked if held."""
    import filelock  # pylint: disable=g-import-not-at-top
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_NAME
    previous = _holder(path)  # of a run killed while it held the lock
    lock = _file_lock(path)
    try:
      lock.acquire()
    except filelock.Timeout:
      raise WorkdirLocked(_locked_message(workdir, _holder(path), flag)) from None
    if previous and previous != _me():
      _note_takeover(previous, path)
    held = cls(path, lock)
    if not held._marker:  # flock: the file is ours to say who holds it
      path.write_text(f'{_me()}\n')
    return held

  def release(self) -> None:
    if self._lock is None:
      return
    if not self._marker:
      # While held: a run that opened this file meanwhile finds it unlinked and retries
      # on a new one (filelock checks the link count after each flock).
      self.path.unlink(missing_ok=True)
    self._lock.release()
    self._lock = None


def _is_marker(lock) -> bool:
  """Whether filelock fell back to its marker file (no flock on this file system):
  the file then records the holder in filelock's own format."""
  try:
    lock.pid  # pylint: disable=pointless-statement
  except AttributeError:  # "marker access requires a soft fallback"
    return False
  return True


# ----------------------------------------------------------------- config ----

def _as_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


class UnreadableRecord(ValueError):
  """config.json or config_history.json exists but is not what this project writes."""


# Fields every config.json this project has written holds: a JSON object without them
# is not a config record (an emptied or foreign file), whose fields would all be
# "unknown" to the check below, and so never changed.
_RECORD_FIELDS = ('dataset', 'arch', 'batch_size', 'base_lr', 'num_epochs', 'seed')
# The key of `config_changes` when --config replaces an unreadable record (no config
# field has a dot in its name).
REPLACED = 'config.json'


def _read_json(path: pathlib.Path, valid, what: str):
  try:
    value = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise UnreadableRecord(f'{path} is unreadable ({type(e).__name__}: '
                           f'{reporting.one_line(e, 100)})') from None
  if not valid(value):
    raise UnreadableRecord(f'{path} is not {what}')
  return value


def _is_change_record(record) -> bool:
  return (isinstance(record, dict) and isinstance(record.get('step'), int)
          and isinstance(record.get('changed', {}), dict)
          and all(isinstance(v, list) and len(v) == 2 for v in record.get('changed', {}).values()))


def _read_record(workdir: pathlib.Path) -> dict | None:
  """config.json with the changes of config_history.json applied; None without
  config.json.  UnreadableRecord (naming the file and what is wrong) if either exists
  and cannot be read as this project writes it."""
  if not (workdir / 'config.json').exists():
    return None
  stored = _read_json(workdir / 'config.json',
                      lambda v: isinstance(v, dict) and all(k in v for k in _RECORD_FIELDS),
                      f'a config (a JSON object with {", ".join(_RECORD_FIELDS)})')
  history = []
  if (workdir / HISTORY_NAME).exists():
    history = _read_json(workdir / HISTORY_NAME,
                         lambda v: isinstance(v, list) and all(map(_is_change_record, v)),
                         'a list of {step, changed: {field: [old, new]}} records')
  for record in history:
    stored.update({name: new for name, (_, new) in record.get('changed', {}).items()})
  return stored


def trained_config(workdir) -> dict | None:
  """The config the workdir was trained with: config.json with the changes of
  config_history.json applied; None without checkpoints, or without a readable
  config.json (evaluation then needs --config)."""
  workdir = pathlib.Path(workdir)
  if not checkpoints_lib.checkpoint_steps(workdir / 'checkpoints'):
    return None
  try:
    return _read_record(workdir)
  except UnreadableRecord:
    return None


def config_changes(workdir, config) -> dict:
  """{field: [trained value, new value]} of the training-changing fields that differ
  from the workdir's config ({} for a new workdir).  Raises ValueError (one line naming
  the fields) unless config.allow_config_change.

  A workdir with checkpoints has its config checked, never trusted: a config.json that
  is missing or unreadable, or an unreadable config_history.json, is refused unless
  config.allow_config_change, which records --config as its config from here on
  ({REPLACED: [what was wrong, ...]}; `record_config`)."""
  workdir = pathlib.Path(workdir)
  if not checkpoints_lib.checkpoint_steps(workdir / 'checkpoints'):
    return {}
  allowed = config.get('allow_config_change', False)
  try:
    stored = _read_record(workdir)
    if stored is None:
      raise UnreadableRecord(f'{workdir / "config.json"} is missing')
  except UnreadableRecord as e:
    if not allowed:
      raise ValueError(f'the workdir {workdir} has checkpoints but {e}, so a changed config '
                       'cannot be told: restore it, use a new --workdir, or pass '
                       '--config.allow_config_change=True to record --config as its config '
                       'from here on') from None
    return {REPLACED: [str(e), 'replaced by --config']}
  new = _as_json(config)
  changes = {name: [stored[name], new[name]] for name in sorted(new)
             if name not in TRAINING_NEUTRAL_FIELDS and name in stored
             and stored[name] != new[name]}
  if changes and not allowed:
    def listing(i):
      return ', '.join(f'{name}={json.dumps(values[i])}' for name, values in changes.items())
    raise ValueError(f'the workdir {workdir} was trained with {listing(0)}; --config has '
                     f'{listing(1)}; rerun with the config it was trained with, use a new '
                     '--workdir, or pass --config.allow_config_change=True to continue anyway')
  return changes


def record_config(workdir, config, start_step: int, changes: dict) -> None:
  """config.json of a new run; for a resumed run with changes, a config_history.json
  record (config.json keeps the original).  A record --config replaces (`REPLACED`)
  is kept beside the new one as `<name>.unreadable`."""
  workdir = pathlib.Path(workdir)
  history_path = workdir / HISTORY_NAME
  if REPLACED in changes:
    for path in (workdir / 'config.json', history_path):
      if path.exists():
        os.replace(path, path.with_name(path.name + '.unreadable'))
    reporting.write_json(workdir / 'config.json', _as_json(config))
    reporting.write_json(history_path, [{'step': int(start_step),
                                         'replaced': changes[REPLACED][0]}])
    print(f'config recorded at step {start_step} from --config: {changes[REPLACED][0]} '
          '(the old files are kept as *.unreadable)', flush=True)
    return
  if not start_step or not (workdir / 'config.json').exists():
    reporting.write_json(workdir / 'config.json', _as_json(config))
    if history_path.exists():  # of an earlier run that left no checkpoint
      history_path.unlink()
    return
  if changes:
    history = json.loads(history_path.read_text()) if history_path.exists() else []
    history.append({'step': int(start_step), 'changed': changes})
    reporting.write_json(history_path, history)
    print('config changed at step {}: {}'.format(start_step, ', '.join(
        f'{k} {json.dumps(a)} -> {json.dumps(b)}' for k, (a, b) in changes.items())), flush=True)


def num_total_steps(config, steps_per_epoch: int) -> int:
  """The steps a run of `config` takes: num_train_steps if > 0, else
  ceil(num_epochs * steps_per_epoch)."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return int(math.ceil(config.num_epochs * steps_per_epoch))


def read_results(workdir) -> dict | None:
  """results.json of a finished run; None if there is none (or it is unreadable)."""
  try:
    results = json.loads((pathlib.Path(workdir) / 'results.json').read_text())
  except (OSError, ValueError):
    return None
  if not (isinstance(results, dict) and results.get('finished') is True
          and isinstance(results.get('step'), int) and results['step'] > 0
          and isinstance(results.get('epoch'), (int, float)) and results['epoch'] > 0):
    return None
  return results


def finished_results(workdir, config) -> dict | None:
  """results.json of a finished run that `config` asks no more steps of, else None.
  (Call it after `config_changes` found no change.)

  Decided from results.json and the config alone, not from the checkpoints' steps: an
  unreadable or half-written step folder newer than the final step does not make a
  finished run train (and rewrite its files) again.  Checkpoints must exist: without
  them there is no record the config was checked against.
  """
  workdir = pathlib.Path(workdir)
  results = read_results(workdir)
  if results is None or not checkpoints_lib.checkpoint_steps(workdir / 'checkpoints'):
    return None
  steps_per_epoch = (config.steps_per_epoch if config.steps_per_epoch > 0
                     else round(results['step'] / results['epoch']))
  if num_total_steps(config, steps_per_epoch) != results['step']:
    return None  # a run continued to more steps (allow_config_change)
  return results
