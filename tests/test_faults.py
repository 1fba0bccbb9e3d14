"""Faults of a workdir: a finished run rerun, two runs on one workdir, a stale lock (also
where the file system has no flock), a resume with another config; results.json always
valid JSON; a full disk and a read-only file system.

The real `python -m resa_jax.main` on tests/configs/tiny.py and 2 simulated devices
(conftest's `env`), and conftest's uninterrupted `reference` run.
"""

import contextlib
import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import (TOTAL_STEPS, PausedRun, checkpoint_steps, error_line, restore,
                     resumed_step, snapshot, train, unprivileged)


def strict_json(text):
  """json.loads that refuses NaN / Infinity (what other JSON readers do)."""
  def refuse(name):
    raise ValueError(f'invalid JSON constant {name}')
  return json.loads(text, parse_constant=refuse)


def test_write_json_writes_nonfinite_numbers_as_null(tmp_path):
  from resa_jax import reporting
  path = tmp_path / 'out.json'
  reporting.write_json(path, {'loss': float('nan'), 'rates': [1.5, np.float32(np.inf)],
                              'array': np.array([-np.inf, 2.0]), 'step': np.int64(3),
                              'curve': [(1, float('nan'))], 'ok': True, 'name': 'x'})
  assert strict_json(path.read_text()) == {'loss': None, 'rates': [1.5, None],
                                           'array': [None, 2.0], 'step': 3,
                                           'curve': [[1, None]], 'ok': True, 'name': 'x'}


@pytest.mark.slow
def test_finished_run_rerun_prints_results_and_changes_nothing(env, reference, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(reference[0], workdir)
  before = snapshot(workdir)
  results = strict_json((workdir / 'results.json').read_text())
  assert math.isfinite(results['final_loss']) and results['images_per_sec'] > 0
  for overrides in ((), ('--config.knn_k=3', '--config.log_every_steps=5')):  # neutral fields
    proc = train(env, workdir, *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [l for l in proc.stdout.splitlines() if 'results: ' in l]
    assert len(lines) == 1 and f'finished at step {TOTAL_STEPS}; nothing to do' in lines[0]
    assert strict_json(lines[0].split('results: ', 1)[1]) == results
    assert 'step 1/' not in proc.stdout  # no training step
    assert snapshot(workdir) == before
    print(f'\n[faults] finished run rerun {overrides}: exit 0 in {proc.seconds:.1f} s, '
          f'{len(before)} files and folders unchanged')


@pytest.mark.slow
def test_finished_run_in_a_read_only_workdir_prints_its_results(env, reference, tmp_path):
  """Reading a finished run needs no write: it is not refused as unwritable."""
  workdir = tmp_path / 'run'
  shutil.copytree(reference[0], workdir)
  folders = [workdir] + [p for p in workdir.rglob('*') if p.is_dir()]
  for folder in folders:
    folder.chmod(0o555)
  try:
    proc = train(env, workdir, prefix=unprivileged(workdir))
  finally:
    for folder in folders:
      folder.chmod(0o755)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'finished at step {TOTAL_STEPS}; nothing to do' in proc.stdout


@pytest.mark.slow
def test_second_run_is_refused_and_a_stale_lock_taken_over(env, tmp_path):
  workdir = tmp_path / 'run'
  first = PausedRun(env, workdir, 3, tmp_path)
  try:
    deadline = time.monotonic() + 120
    while 2 not in checkpoint_steps(workdir):
      assert time.monotonic() < deadline
      time.sleep(0.05)
    time.sleep(1.0)
    before = snapshot(workdir)
    second = train(env, workdir)
    assert second.returncode == 2, second.stderr[-3000:]
    line = error_line(second)
    assert f'pid {first.proc.pid} on host' in line and 'in use by another run' in line, line
    assert second.seconds < 15, second.seconds
    assert snapshot(workdir) == before
    print(f'\n[faults] second run on a live workdir: exit 2 in {second.seconds:.1f} s: {line}')
  finally:
    assert first.kill() == -signal.SIGKILL
  assert (workdir / '.lock').read_text().startswith(f'{first.proc.pid}@')  # stale
  third = train(env, workdir)
  assert third.returncode == 0, third.stderr[-3000:]
  notes = [l for l in third.stdout.splitlines() if l.startswith('note: taking over the lock')]
  assert len(notes) == 1 and f'{first.proc.pid}@' in notes[0], third.stdout[-2000:]
  assert resumed_step(third.stdout) == 2
  assert strict_json((workdir / 'results.json').read_text())['step'] == TOTAL_STEPS
  assert not (workdir / '.lock').exists()  # removed at the end of the run
  print(f'\n[faults] after kill -9: {notes[0]}')


# Takes the workdir lock of argv[1] as train.py does, on a file system without flock
# (some network mounts), holds it argv[2] seconds and releases it.
HOLD_WITHOUT_FLOCK = """
import errno, fcntl, sys, time
def no_flock(fd, operation):
  raise OSError(errno.ENOSYS, 'Function not implemented')
fcntl.flock = no_flock
from resa_jax import workdir
workdir.refuse_if_locked(sys.argv[1])
lock = workdir.Lock.acquire(sys.argv[1])
print('held', flush=True)
time.sleep(float(sys.argv[2]))
lock.release()
"""


@pytest.mark.slow
def test_without_flock_the_lock_is_held_while_its_pid_lives(env, tmp_path):
  workdir = tmp_path / 'run'

  def hold(seconds):
    return subprocess.Popen([sys.executable, '-c', HOLD_WITHOUT_FLOCK, str(workdir),
                             str(seconds)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  first = hold(120)
  try:
    assert first.stdout.readline() == 'held\n', first.stderr.read()
    second = hold(0)
    _, err = second.communicate(timeout=120)
    assert second.returncode != 0 and 'WorkdirLocked' in err, err
    assert f'pid {first.pid} on host' in err and 'in use by another run' in err, err
  finally:
    first.kill()
    first.wait()
  third = hold(0)
  out, err = third.communicate(timeout=120)
  assert third.returncode == 0, err
  notes = [l for l in out.splitlines() if l.startswith('note: taking over the lock')]
  assert len(notes) == 1 and f'({first.pid}@' in notes[0], out
  assert not (workdir / '.lock').exists()


@pytest.mark.slow
def test_resume_with_another_config_is_refused_unless_allowed(env, reference, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(reference[0], workdir)
  before = snapshot(workdir)
  original = (workdir / 'config.json').read_text()
  changed = ('--config.base_lr=0.5', '--config.num_train_steps=14')
  proc = train(env, workdir, *changed)
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = error_line(proc)
  assert ('was trained with base_lr=0.3, num_train_steps=-1; --config has base_lr=0.5, '
          'num_train_steps=14;') in line and '--config.allow_config_change=True' in line, line
  assert snapshot(workdir) == before
  print(f'\n[faults] resume with another config: exit 2 in {proc.seconds:.1f} s: {line}')

  allowed = train(env, workdir, *changed, '--config.allow_config_change=True')
  assert allowed.returncode == 0, allowed.stderr[-3000:]
  assert resumed_step(allowed.stdout) == TOTAL_STEPS
  assert 'config changed at step 12: base_lr 0.3 -> 0.5, num_train_steps -1 -> 14' \
      in allowed.stdout
  assert strict_json((workdir / 'results.json').read_text())['step'] == 14
  assert (workdir / 'config.json').read_text() == original
  assert strict_json((workdir / 'config_history.json').read_text()) == [
      {'step': TOTAL_STEPS, 'changed': {'base_lr': [0.3, 0.5], 'num_train_steps': [-1, 14]}}]
  # The workdir's config is now the changed one: the same command (with or without
  # the flag) finds the run finished; the original config is a change again.
  again = train(env, workdir, *changed)
  assert again.returncode == 0 and 'finished at step 14; nothing to do' in again.stdout
  proc = train(env, workdir)
  assert proc.returncode == 2 and 'was trained with base_lr=0.5' in error_line(proc)


# ------------------------------------------------------------ full disk ----

def test_refused_writes_are_recognised_through_causes_and_errno_codes_in_text():
  from resa_jax import reporting
  full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  try:
    try:
      raise full
    except OSError as e:
      raise RuntimeError('the save failed') from e
  except RuntimeError as e:
    assert reporting.refused_write(e) is full
  tensorstore = ValueError('RESOURCE_EXHAUSTED: Error writing "params/0" ... Failed to write '
                           "2319 bytes to file 8: No space left on device [os_error_code='28']")
  assert reporting.refused_write(tensorstore).errno == errno.ENOSPC
  logged = "Failed to save: [Errno 122] Disk quota exceeded: '/w/x'"  # a log record's message
  assert reporting.refused_write_in_text(logged).errno == errno.EDQUOT
  assert reporting.refused_write_in_text(str(tensorstore)).errno == errno.ENOSPC
  assert reporting.refused_write_in_text('[Errno 2] No such file') is None
  # By the code, not the words: the words alone, or a code other than a full disk, is not;
  # a code in a text only where TensorStore puts it (its ValueError), not in any error.
  assert reporting.refused_write(Exception(str(logged))) is None
  assert reporting.refused_write(RuntimeError(str(tensorstore))) is None
  assert reporting.refused_write(ValueError('No space left on device')) is None
  assert reporting.refused_write(ValueError("Permission denied [os_error_code='13']")) is None
  assert reporting.refused_write(PermissionError(errno.EACCES, 'Permission denied')).errno \
      == errno.EACCES
  assert reporting.refused_write(ValueError('bad value')) is None
  assert reporting.refused_write(FileNotFoundError(errno.ENOENT, 'No such file')) is None


def test_a_real_tensorstore_write_to_a_full_disk_is_recognised(tmp_path):
  """The installed TensorStore's error for ENOSPC, from a real write to a full 64 KB
  tmpfs: recognised by its status text, the only place it carries the errno."""
  import numpy as np
  import tensorstore as ts
  from resa_jax import reporting
  with tmpfs(tmp_path / 'disk', 'size=64k') as disk:
    array = ts.open({'driver': 'zarr', 'kvstore': {'driver': 'file', 'path': str(disk / 'a')}},
                    create=True, dtype=ts.float32, shape=[100_000]).result()
    with pytest.raises(Exception) as raised:
      array.write(np.random.default_rng(0).random(100_000, np.float32)).result()  # 400 KB
  assert reporting.refused_write(raised.value).errno == errno.ENOSPC, repr(raised.value)


def test_late_callbacks_into_a_closed_event_loop_are_dropped():
  """The command's unraisable hook drops what a closed asyncio loop raises (orbax's
  loop, after a failed save), recognised by where it is raised, and passes the rest."""
  import asyncio  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  from resa_jax import cli
  passed = []
  hook = cli._unraisable_but_not_a_late_callback(passed.append)
  loop = asyncio.new_event_loop()
  loop.close()
  with pytest.raises(RuntimeError) as late:
    loop.call_soon(print)
  hook(types.SimpleNamespace(exc_value=late.value, exc_traceback=late.value.__traceback__))
  try:
    raise RuntimeError(str(late.value))  # the same words, raised elsewhere
  except RuntimeError as e:
    other = types.SimpleNamespace(exc_value=e, exc_traceback=e.__traceback__)
  hook(other)
  assert passed == [other]


def test_write_json_on_a_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
  """ENOSPC injected where a buffered write reaches the disk (the fsync before the
  rename): the error names results.json, which keeps its old content."""
  from resa_jax import reporting
  path = tmp_path / 'results.json'
  reporting.write_json(path, {'step': 8})
  before = path.read_text()

  def full_disk(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(os, 'fsync', full_disk)
  with pytest.raises(OSError) as raised:
    reporting.write_json(path, {'step': 12})
  assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(path)
  assert reporting.refused_write_line(raised.value).startswith(
      f'the disk is full: cannot write {path} (No space left on device); free some space')
  assert path.read_text() == before and os.listdir(tmp_path) == ['results.json']


def test_checkpoint_save_on_a_full_disk_names_the_folder(tmp_path, monkeypatch):
  """TensorStore's words for ENOSPC, injected in orbax's save: an OSError naming the
  checkpoints folder; the checkpoint saved before is still restored."""
  import numpy as np
  from resa_jax import checkpoints as checkpoints_lib
  checkpoints = checkpoints_lib.Checkpoints(tmp_path / 'checkpoints', 3)
  state = {'w': np.arange(4.0, dtype=np.float32)}
  checkpoints.save(1, state)
  checkpoints.wait()

  def full_disk(*args, **kwargs):
    raise ValueError('RESOURCE_EXHAUSTED: Error writing "w/0": No space left on device '
                     "[os_error_code='28']")
  monkeypatch.setattr(checkpoints.manager, 'save', full_disk)
  with pytest.raises(OSError) as raised:
    checkpoints.save(2, {'w': state['w'] + 1})
  assert raised.value.errno == errno.ENOSPC
  assert raised.value.filename == str((tmp_path / 'checkpoints').absolute())
  monkeypatch.undo()
  restored, step = checkpoints.restore_latest({'w': np.zeros(4, np.float32)})
  checkpoints.close()
  assert step == 1 and np.array_equal(np.asarray(restored['w']), state['w'])


@contextlib.contextmanager
def tmpfs(folder, options: str):
  """A tmpfs mounted on `folder` with `options` ('size=2m': a disk that fills up; 'ro':
  a read-only file system).  Skips where this process may not mount (not root, or no
  CAP_SYS_ADMIN in a container)."""
  folder.mkdir()
  if not shutil.which('mount') or os.geteuid() != 0:
    pytest.skip('mounting a tmpfs needs root')
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(folder)],
                           capture_output=True, text=True)
  if mounted.returncode != 0:
    pytest.skip(f'cannot mount a tmpfs here: {mounted.stderr.strip()}')
  try:
    yield folder
  finally:
    subprocess.run(['umount', '-l', str(folder)], check=False)


@pytest.mark.slow
def test_full_disk_during_a_checkpoint_save_one_line_keeps_the_last_checkpoint(
    env, template, tmp_path):
  """A real full disk: a 2 MB tmpfs holds the first checkpoint (1.3 MB) but not the
  second.  One line, exit 4, the first checkpoint restorable; with space freed the
  same command resumes from it and finishes."""
  with tmpfs(tmp_path / 'disk', 'size=2m') as disk:
    workdir = disk / 'run'
    proc = train(env, workdir)
    assert proc.returncode == 4, proc.stderr[-3000:]
    line = error_line(proc)
    assert line.startswith(f'error: the disk is full: cannot write {workdir}/checkpoints '
                           '(No space left on device)'), line
    steps = checkpoint_steps(workdir)
    _, latest = restore(template, workdir / 'checkpoints')
    assert steps and latest == steps[-1] < TOTAL_STEPS
    assert strict_json((workdir / 'history.json').read_text())['loss']
    assert not (workdir / 'results.json').exists() and not (workdir / '.lock').exists()
    print(f'\n[faults] full disk at a checkpoint save: exit 4 in {proc.seconds:.1f} s, '
          f'checkpoint {latest} kept: {line}')
    subprocess.run(['mount', '-o', 'remount,size=64m', str(disk)], check=True)
    again = train(env, workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert resumed_step(again.stdout) == latest
    assert strict_json((workdir / 'results.json').read_text())['step'] == TOTAL_STEPS


@pytest.mark.slow
def test_read_only_file_system_workdir_is_refused_before_tensorflow(env, tmp_path):
  with tmpfs(tmp_path / 'disk', 'ro,size=64k') as disk:
    proc = train(env, disk / 'run')
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = error_line(proc)
  assert f'--workdir={disk}/run cannot be created: {disk} is on a read-only file system' \
      in line, line
  print(f'\n[faults] read-only file system: exit 2 in {proc.seconds:.1f} s: {line}')


def test_an_unreadable_config_record_is_replaced_only_when_allowed(tiny_checkpoints, tmp_path):
  """Refused (tests/test_refusals.py) unless allow_config_change, which records --config
  as the workdir's config, keeps the unreadable files and makes the check work again."""
  from helpers import tiny_config
  from resa_jax import workdir as workdir_lib
  workdir = tmp_path / 'run'
  shutil.copytree(tiny_checkpoints / 'workdir', workdir)
  (workdir / 'config.json').write_text('{"arch": "resnet18", "ba')
  (workdir / 'config_history.json').write_text('[]')
  config = tiny_config()
  config.base_lr = 4.8
  with pytest.raises(ValueError, match='config.json is unreadable'):
    workdir_lib.config_changes(workdir, config)
  assert workdir_lib.trained_config(workdir) is None  # evaluation: needs --config
  config.allow_config_change = True
  changes = workdir_lib.config_changes(workdir, config)
  assert list(changes) == [workdir_lib.REPLACED] and 'JSONDecodeError' in changes['config.json'][0]
  workdir_lib.record_config(workdir, config, 8, changes)
  assert (workdir / 'config.json.unreadable').read_text() == '{"arch": "resnet18", "ba'
  assert (workdir / 'config_history.json.unreadable').read_text() == '[]'
  history = strict_json((workdir / 'config_history.json').read_text())
  assert len(history) == 1 and history[0]['step'] == 8 and 'unreadable' in history[0]['replaced']
  assert workdir_lib.trained_config(workdir)['base_lr'] == 4.8
  config.allow_config_change = False  # the guard is on again, against the new record
  assert workdir_lib.config_changes(workdir, config) == {}
  config.base_lr = 0.3
  with pytest.raises(ValueError, match='was trained with base_lr=4.8; --config has base_lr=0.3'):
    workdir_lib.config_changes(workdir, config)
