"""Results are true or absent: whatever path a training run takes to its end, its
results.json is the uninterrupted run's (the same keys, the final step's loss, the kNN
of the final parameters; a timing where the run timed something), or the command leaves
the files as they were.  Only strict JSON, in the files and on the console.

The paths: uninterrupted; stopped by SIGTERM at a step and resumed (mid-epoch, and
right after the last step, before its kNN); the same with the newest checkpoint
unreadable; a finished run rerun, also with an unreadable or a stray newest step folder,
or with a changed config that adds no step.  The runs are `train.train_and_evaluate` on
tests/configs/tiny.py (8 steps of fake data, kNN every epoch) in this process; the stop
is a real SIGTERM to this process, taken by the loop between steps
(`interrupts.polling`).  The same through the real command, against conftest's
`reference`, is the last test (`slow`).
"""

import contextlib
import io
import json
import os
import shutil
import signal

import pytest

from helpers import (TOTAL_STEPS, PausedRun, run_in_process, snapshot, tiny_config, train,
                     TINY)
from resa_jax import data
from resa_jax import train as train_lib

# Keys whose values an interrupted run must reproduce exactly; the timings must be
# numbers (their values depend on the machine's load).
DETERMINISTIC = ('finished', 'step', 'epoch', 'final_loss', 'knn_top1', 'knn_top1_raw_pixels',
                 'knn_top1_random_init', 'knn_k', 'devices', 'platform')
TIMINGS = ('images_per_sec', 'wall_time_sec', 'checkpoint_save_sec_mean')


def strict_json(text):
  """json.loads that refuses NaN / Infinity (as other JSON readers do)."""
  def refuse(name):
    raise ValueError(f'invalid JSON constant {name}')
  return json.loads(text, parse_constant=refuse)


def printed_results(out: str) -> dict:
  lines = [l for l in out.splitlines() if 'results: ' in l]
  assert len(lines) == 1, out[-3000:]
  return strict_json(lines[0].split('results: ', 1)[1])


def assert_same_results(got: dict, want: dict) -> None:
  assert sorted(got) == sorted(want) == sorted(DETERMINISTIC + TIMINGS)
  for key in DETERMINISTIC:
    assert got[key] == want[key], (key, got[key], want[key])
  for key in TIMINGS:
    assert isinstance(got[key], float) and got[key] > 0, (key, got[key])


def assert_strict_json_files(workdir) -> None:
  for path in workdir.glob('*.json'):
    strict_json(path.read_text())


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  """(workdir, results, stdout) of the tiny config trained from start to end."""
  workdir = tmp_path_factory.mktemp('uninterrupted') / 'run'
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    results = train_lib.train_and_evaluate(tiny_config(), workdir)
  assert printed_results(out.getvalue()) == results
  assert all(isinstance(results[k], float) for k in ('final_loss', 'knn_top1'))
  return workdir, results, out.getvalue()


def sigterm_before_step(monkeypatch, step: int) -> None:
  """SIGTERM to this process as the loop asks for the batch of `step`: the loop takes
  that step, then stops (checkpoint, SystemExit(143))."""
  create = data.train_iterator

  def create_and_stop(config, mesh, *, start_step=0, source=None):
    batches = create(config, mesh, start_step=start_step, source=source)
    for taken in range(start_step, 10**9):
      if taken + 1 == step:
        os.kill(os.getpid(), signal.SIGTERM)
      yield next(batches)
  monkeypatch.setattr(data, 'train_iterator', create_and_stop)


def _empty(step_dir):
  for path in step_dir.iterdir():
    shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.mark.slow  # trains: about 1 minute on 2 cores, with the module's uninterrupted run
@pytest.mark.parametrize('stop_after,unreadable_newest,resumed_at', [
    (5, False, 5),  # mid-epoch, between checkpoints
    (8, False, 8),  # right after the last step, before its kNN: nothing left to train
    (8, True, 6),  # the same, its final checkpoint unreadable: steps 7 and 8 again
], ids=['mid_epoch', 'last_step', 'last_step_unreadable'])
def test_stopped_and_resumed_reports_the_uninterrupted_results(
    uninterrupted, stop_after, unreadable_newest, resumed_at, tmp_path, monkeypatch, capsys):
  _, want, _ = uninterrupted
  workdir = tmp_path / 'run'
  with monkeypatch.context() as patched:
    sigterm_before_step(patched, stop_after)
    with pytest.raises(SystemExit) as stopped:
      train_lib.train_and_evaluate(tiny_config(), workdir)
  assert stopped.value.code == 143
  out = capsys.readouterr().out
  assert f'SIGTERM at step {stop_after}: checkpoint saved, exiting' in out, out[-2000:]
  assert not (workdir / 'results.json').exists()
  assert_strict_json_files(workdir)
  if unreadable_newest:
    _empty(workdir / 'checkpoints' / str(stop_after))

  got = train_lib.train_and_evaluate(tiny_config(), workdir)
  out = capsys.readouterr().out
  assert f'resumed at step {resumed_at}' in out, out[-2000:]
  assert printed_results(out) == got == strict_json((workdir / 'results.json').read_text())
  assert_same_results(got, want)
  assert_strict_json_files(workdir)
  print(f'\n[results] stopped after step {stop_after}, resumed at {resumed_at}: final_loss '
        f'{got["final_loss"]!r}, knn_top1 {got["knn_top1"]} (uninterrupted: '
        f'{want["final_loss"]!r}, {want["knn_top1"]})')


# ------------------------------------------- a finished run, run again ----

@pytest.fixture
def finished(tiny_checkpoints, tmp_path):
  """A finished run of the tiny config, without training: the checkpoint of step 8 (its
  last), its config.json, history.json and results.json as training writes them."""
  workdir = tmp_path / 'run'
  shutil.copytree(tiny_checkpoints / 'workdir', workdir)
  (workdir / 'history.json').write_text(json.dumps(
      {'loss': [[8, 2.5]], 'knn': [[2.0, 25.0]], 'wall_time': 30.0, 'last_loss': [8, 2.25],
       'knn_top1_random_init': 17.0, 'knn_top1_raw_pixels': 20.0}))
  results = {'finished': True, 'step': 8, 'epoch': 2.0, 'final_loss': 2.25, 'knn_top1': 25.0,
             'knn_top1_raw_pixels': 20.0, 'knn_top1_random_init': 17.0, 'knn_k': 5,
             'images_per_sec': 10.0, 'wall_time_sec': 30.0, 'checkpoint_save_sec_mean': 1.0,
             'devices': 8, 'platform': 'cpu'}
  (workdir / 'results.json').write_text(json.dumps(results))
  return workdir, results


# (id, what is done to the finished workdir's checkpoints folder, extra flags)
RERUNS = [
    ('as_it_is', lambda checkpoints: None, []),
    ('newest_step_emptied', lambda checkpoints: _empty(checkpoints / '8'), []),
    ('stray_empty_newer_step', lambda checkpoints: (checkpoints / '12').mkdir(), []),
    ('neutral_fields_changed', lambda checkpoints: None,
     ['--config.knn_k=3', '--config.log_every_steps=5']),
]


@pytest.mark.parametrize('name,damage,flags', RERUNS, ids=[r[0] for r in RERUNS])
def test_a_finished_run_rerun_changes_nothing(finished, name, damage, flags, monkeypatch,
                                              capsys):
  """Nothing compiled or trained, every file as it was, its results printed as JSON."""
  del name
  workdir, results = finished
  damage(workdir / 'checkpoints')
  before = snapshot(workdir)
  outcome = run_in_process('resa_jax.main', f'--config={TINY}', f'--workdir={workdir}', *flags,
                           monkeypatch=monkeypatch, capsys=capsys)
  assert outcome.code == 0, outcome
  assert f'{workdir} finished at step 8; nothing to do' in outcome.stdout
  assert printed_results(outcome.stdout) == results
  assert 'compiling' not in outcome.stdout and 'warning' not in outcome.stdout
  assert snapshot(workdir) == before


def test_a_changed_config_that_adds_no_step_changes_nothing(finished, monkeypatch, capsys):
  """allow_config_change with nothing left to train: not recorded, nothing rewritten."""
  workdir, results = finished
  before = snapshot(workdir)
  outcome = run_in_process('resa_jax.main', f'--config={TINY}', f'--workdir={workdir}',
                           '--config.base_lr=0.5', '--config.allow_config_change=True',
                           monkeypatch=monkeypatch, capsys=capsys)
  assert outcome.code == 0, outcome
  assert printed_results(outcome.stdout) == results
  assert 'compiling the train step' not in outcome.stdout
  assert snapshot(workdir) == before  # no config_history.json, results as they were


def test_results_json_line_is_strict():
  from resa_jax import reporting
  line = reporting.json_line({'final_loss': float('nan'), 'rate': float('inf'), 'step': 8})
  assert strict_json(line) == {'final_loss': None, 'rate': None, 'step': 8}


# ------------------------------------------------- the real command ----

@pytest.mark.slow
def test_sigterm_right_after_the_last_step_then_the_same_command(env, reference, tmp_path):
  """The training command stopped by SIGTERM after its last step (exit 143, no
  results.json), then run again: the uninterrupted run's results."""
  want = strict_json((reference[0] / 'results.json').read_text())
  workdir = tmp_path / 'run'
  paused = PausedRun(env, workdir, TOTAL_STEPS - 1, tmp_path)
  assert paused.terminate_and_go_on() == 143, paused.stderr()[-3000:]
  assert f'SIGTERM at step {TOTAL_STEPS}: checkpoint saved' in paused.stdout()
  assert not (workdir / 'results.json').exists()
  again = train(env, workdir)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f'resumed at step {TOTAL_STEPS}' in again.stdout
  got = strict_json((workdir / 'results.json').read_text())
  assert printed_results(again.stdout) == got
  assert_same_results(got, want)
  assert_strict_json_files(workdir)
  print(f'\n[results] real command, SIGTERM after step {TOTAL_STEPS}: final_loss '
        f'{got["final_loss"]!r} = uninterrupted {want["final_loss"]!r}')
