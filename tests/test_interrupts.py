"""SIGTERM and SIGINT at any point (resa_jax/interrupts.py).

Each case runs a small Python program in a subprocess (the watcher blocks signals in
its whole process), waits until it says `ready`, sends a real signal and checks the
exit code, the one line and how long it took.  The last test sends Ctrl-C to the real
training command during set-up and during the steps.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
import types

import pytest

from helpers import ROOT, RUN_FLAGS, TINY, PausedRun, checkpoint_steps, error_line

pytestmark = pytest.mark.slow  # each case is a process that receives a real signal

PRELUDE = '''
import sys, time
from resa_jax import interrupts
'''


def start(body: str) -> subprocess.Popen:
  proc = subprocess.Popen([sys.executable, '-c', PRELUDE + textwrap.dedent(body)], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == 'ready', proc.communicate()
  return proc


def stop(proc, *signums):
  """Sends the signals (0.3 s apart); returns (exit code, stdout, stderr, seconds)."""
  begin = time.monotonic()
  for signum in signums:
    proc.send_signal(signum)
    time.sleep(0.3)
  out, err = proc.communicate(timeout=60)
  return proc.returncode, out, err, time.monotonic() - begin


def test_a_main_thread_blocked_outside_python_is_ended_after_the_grace_time():
  proc = start('''
      interrupts.watch(grace_seconds=1); interrupts.mark_main_started()
      with interrupts.polling():
        print('ready', flush=True)
        time.sleep(600)  # blocked in C: no Python handler could run
  ''')
  code, _, err, seconds = stop(proc, signal.SIGTERM)
  assert code == 143 and seconds < 10
  assert err.strip().splitlines() == [
      'error: SIGTERM: the main thread did not stop within 1 s (blocked in data loading, '
      'compilation or a step); exiting without saving (finished checkpoints are kept)']


def test_python_code_outside_the_steps_gets_stopped_at_once():
  proc = start('''
      interrupts.watch(grace_seconds=30); interrupts.mark_main_started()
      try:
        print('ready', flush=True)
        while True:
          sum(range(100))
      except interrupts.Stopped as e:
        interrupts.acknowledge()
        print('stopped', e, e.exit_code, interrupts.requested(), flush=True)
        sys.exit(e.exit_code)
  ''')
  code, out, err, seconds = stop(proc, signal.SIGINT)
  assert (code, out.split(), err) == (130, ['stopped', 'SIGINT', '130', '2'], '')
  assert seconds < 5


def test_the_steps_finish_and_are_saved_then_not_polling_stretches_are_stopped():
  proc = start('''
      interrupts.watch(grace_seconds=30); interrupts.mark_main_started()
      steps = 0
      with interrupts.polling():
        print('ready', flush=True)
        while interrupts.requested() is None:
          end = time.monotonic() + 0.5
          while time.monotonic() < end:  # a step: Python code, not interrupted
            pass
          steps += 1
        print('step finished after the signal:', interrupts.requested(), flush=True)
        try:
          with interrupts.not_polling():  # an evaluation after a stop request: skipped
            print('evaluated', flush=True)
        except interrupts.Stopped:
          print('evaluation stopped', flush=True)
        interrupts.acknowledge()
        time.sleep(2)  # saving; longer than nothing, shorter than the grace time
        print('saved', flush=True)
        sys.exit(130)
  ''')
  code, out, err, _ = stop(proc, signal.SIGINT)
  assert code == 130 and err == ''
  assert out.splitlines() == ['step finished after the signal: 2', 'evaluation stopped',
                              'saved']


def test_a_second_signal_while_saving_ends_at_once():
  proc = start('''
      interrupts.watch(grace_seconds=30); interrupts.mark_main_started()
      with interrupts.polling():
        print('ready', flush=True)
        while interrupts.requested() is None:
          time.sleep(0.01)
        interrupts.acknowledge()
        time.sleep(600)  # a save that takes too long for the user
  ''')
  code, _, err, seconds = stop(proc, signal.SIGINT, signal.SIGINT)
  assert code == 130 and seconds < 10
  assert err.strip().splitlines() == [
      'error: second SIGINT while saving: exiting now (finished checkpoints are kept)']


def test_a_signal_while_starting_ends_at_once():
  proc = start('''
      interrupts.watch()
      print('ready', flush=True)
      time.sleep(600)  # imports, before the command's main function runs
  ''')
  code, _, err, seconds = stop(proc, signal.SIGTERM)
  assert code == 143 and seconds < 5
  assert err.strip() == 'error: SIGTERM while starting; stopped (nothing written)'


def test_library_use_without_the_watcher_polls_with_plain_handlers():
  proc = start('''
      with interrupts.polling():
        print('ready', flush=True)
        while interrupts.requested() is None:
          time.sleep(0.01)
      print('requested', interrupts.requested(), flush=True)
  ''')
  code, out, _, _ = stop(proc, signal.SIGTERM)
  assert (code, out.split()) == (0, ['requested', '15'])


@pytest.mark.parametrize('when', ['steps', 'set-up'])
def test_ctrl_c_in_the_training_command(env, tmp_path, when):
  """Ctrl-C (SIGINT) between steps: the step is saved, exit 130; during set-up (the kNN
  baselines): one line, exit 130, no checkpoint."""
  workdir = tmp_path / 'run'
  if when == 'steps':
    run = PausedRun(env, workdir, 3, tmp_path)  # waiting for the batch of step 4
    assert run.terminate_and_go_on(signal.SIGINT) == 130, run.stderr()[-3000:]
    assert 'SIGINT at step 4: checkpoint saved, exiting' in run.stdout()
    assert 'Traceback' not in run.stderr(), run.stderr()[-3000:]
    assert checkpoint_steps(workdir)[-1] == 4
    return
  flags = [f if 'knn_every' not in f else '--config.knn_every_epochs=1' for f in RUN_FLAGS]
  proc = subprocess.Popen([sys.executable, '-m', 'resa_jax.main', f'--config={TINY}',
                           f'--workdir={workdir}', *flags], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for line in proc.stdout:  # the header comes before the baselines
    if line.startswith('ReSA: '):
      break
  begin = time.monotonic()
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 130 and time.monotonic() - begin < 30, err[-3000:]
  assert 'Traceback' not in err and 'step 1/' not in out, (out, err[-3000:])
  assert error_line(types.SimpleNamespace(stderr=err)).startswith(
      'error: SIGINT: stopped outside the training steps, nothing to save')
  assert not (workdir / 'checkpoints').exists() or checkpoint_steps(workdir) == []
  assert not os.path.exists(workdir / 'results.json')
