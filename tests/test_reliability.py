"""Reliability: preemption, corrupt checkpoints, divergence, unwritable folders,
determinism and health counters.  The runs are the real `python -m resa_jax.main` on
tests/configs/tiny.py (fake 16x16 data, width-4 ResNet-18) for 12 steps (3 epochs of
4), a checkpoint every 2 steps, kNN off, on 2 simulated CPU devices; the uninterrupted
one is conftest's `reference`.  What these tests hold is written down in
docs/reliability.md; the refusals of bad input are in tests/test_refusals.py.

Killing at a chosen step: the killed runs are the same command started through
`helpers.PAUSE_DRIVER`, which prints 'PAUSED after step k' and waits before taking the
batch of step k + 1.  The test then sends SIGKILL (or SIGTERM, then lets it go on) -- a
real signal at a known step, with whatever checkpoint writes are still in flight.
"""

import json
import os
import re
import shutil
import signal

import jax
import numpy as np
import pytest

from helpers import (TINY, TOTAL_STEPS, PausedRun, assert_bit_identical, checkpoint_steps,
                     error_line, largest_data_file, restore, resumed_step, run, snapshot,
                     tensorboard_scalars, tiny_config, train, unprivileged)


def test_nonfinite_fraction_counts_nan_and_inf():
  import jax.numpy as jnp
  from resa_jax import step as step_lib
  tree = {'a': jnp.array([1.0, jnp.nan, 3.0, jnp.inf]), 'b': jnp.array([[-jnp.inf, 0.0]]),
          'step': jnp.array(3, jnp.int32)}  # integers are not counted
  assert float(step_lib.nonfinite_fraction(tree)) == pytest.approx(3 / 6)
  assert float(step_lib.nonfinite_fraction({'a': jnp.ones(5)})) == 0.0


# ----------------------------------------------------------- determinism ----

@pytest.mark.slow
def test_same_seed_same_metrics_and_state(env, reference, template, tmp_path):
  """Two runs, same seed and device count: identical losses, results and final state."""
  workdir, _ = reference
  again = train(env, tmp_path / 'run')
  assert again.returncode == 0, again.stderr[-3000:]
  print(f'\n[reliability] second run (cached compile): {again.seconds:.1f} s')
  history = [json.loads((w / 'history.json').read_text()) for w in (workdir, tmp_path / 'run')]
  assert history[0]['loss'] == history[1]['loss'] and len(history[0]['loss']) == 7
  results = [json.loads((w / 'results.json').read_text()) for w in (workdir, tmp_path / 'run')]
  for key in ('finished', 'step', 'epoch', 'final_loss', 'knn_top1', 'devices'):
    assert results[0][key] == results[1][key], key
  assert results[0]['step'] == TOTAL_STEPS and results[0]['devices'] == 2
  (a, step_a), (b, step_b) = (restore(template, w / 'checkpoints')
                              for w in (workdir, tmp_path / 'run'))
  assert step_a == step_b == TOTAL_STEPS
  arrays = assert_bit_identical(a, b)
  print(f'\n[reliability] same seed twice: {len(history[0]["loss"])} logged losses equal, '
        f'final_loss {results[0]["final_loss"]!r} equal, {arrays} state arrays bit-identical')
  # The data order and augmentation are a function of (seed, step) only (resa_jax/data/
  # order.py): tests/test_data.py (resume at a step, 1 device against 8, every placement)
  # and tests/test_multihost.py::test_two_processes_read_the_input_of_one.


# -------------------------------------------------------- health counters ----

@pytest.mark.slow
def test_health_counters_are_logged(reference):
  workdir, proc = reference
  scalars = tensorboard_scalars(workdir)
  for tag in ('loss', 'assignment_entropy', 'grad_norm', 'nonfinite_fraction', 'state_finite',
              'checkpoint_save_sec'):
    assert tag in scalars, sorted(scalars)
  assert all(v == 0.0 for _, v in scalars['nonfinite_fraction'])
  assert all(v == 1.0 for _, v in scalars['state_finite'])
  assert all(0 < v < np.log(16) + 1e-3 for _, v in scalars['assignment_entropy'])  # <= log B
  saves = scalars['checkpoint_save_sec']
  assert [s for s, _ in saves] == list(range(2, TOTAL_STEPS + 1, 2))
  assert all(0 < v < 60 for _, v in saves)
  results = json.loads((workdir / 'results.json').read_text())
  assert results['checkpoint_save_sec_mean'] == pytest.approx(np.mean([v for _, v in saves]),
                                                              rel=1e-5)
  progress = [l for l in proc.stdout.splitlines() if l.startswith(f'step {TOTAL_STEPS}/')]
  assert progress and 'entropy' in progress[0]
  print(f'\n[reliability] checkpoint save (blocking part): mean '
        f'{results["checkpoint_save_sec_mean"]:.3f} s over {len(saves)} saves')


# ------------------------------------------------------------- preemption ----

@pytest.mark.slow
def test_preemption_kill9_sigterm_and_corrupt_checkpoint_resume_bit_identical(
    env, reference, template, tmp_path):
  """kill -9 after steps 3, 6 and 9, SIGTERM before step 8 and a truncated latest
  checkpoint, all in one workdir; the final state equals the uninterrupted run's."""
  workdir = tmp_path / 'run'
  log = []

  def check_resume(stdout, expected):
    assert resumed_step(stdout) == expected, stdout[-2000:]

  # kill -9 after step 3, once the checkpoint of step 2 is on disk.
  run = PausedRun(env, workdir, 3, tmp_path)
  assert run.kill(after_checkpoint=2) == -signal.SIGKILL
  expected = max(checkpoint_steps(workdir), default=0)
  assert expected == 2
  log.append(f'kill -9 after step 3 -> checkpoints {checkpoint_steps(workdir)}')

  # kill -9 after step 6, right after the (asynchronous) save of step 6 was started:
  # it may be finalised or left half-written.
  run = PausedRun(env, workdir, 6, tmp_path)
  check_resume(run.stdout(), expected)
  assert run.kill() == -signal.SIGKILL
  expected = max(checkpoint_steps(workdir), default=0)
  log.append(f'kill -9 after step 6 -> checkpoints {checkpoint_steps(workdir)}')

  # SIGTERM while waiting for step 8 (a checkpoint step): save, exit 143.
  run = PausedRun(env, workdir, 7, tmp_path)
  check_resume(run.stdout(), expected)
  assert run.terminate_and_go_on() == 143, run.stderr()[-3000:]
  assert 'SIGTERM at step 8: checkpoint saved, exiting' in run.stdout(), run.stdout()[-2000:]
  assert 'Traceback' not in run.stderr(), run.stderr()[-3000:]
  assert checkpoint_steps(workdir)[-1] == 8
  _, step = restore(template, workdir / 'checkpoints')
  assert step == 8
  log.append(f'SIGTERM before step 8 -> exit 143, checkpoints {checkpoint_steps(workdir)}')

  # Truncate the largest array file of checkpoint 8 (a half-written file).
  previous = checkpoint_steps(workdir)[-2]
  data = largest_data_file(workdir / 'checkpoints' / '8')
  os.truncate(data, data.stat().st_size // 2)
  run = PausedRun(env, workdir, 9, tmp_path)
  warning = [l for l in run.stdout().splitlines() if l.startswith('warning: checkpoint at step 8')]
  assert warning and 'is not valid for value of size' in warning[0], run.stdout()[-2000:]
  check_resume(run.stdout(), previous)
  assert run.kill(after_checkpoint=8) == -signal.SIGKILL  # step 8 saved again
  expected = max(checkpoint_steps(workdir), default=0)
  assert expected == 8
  log.append(f'truncated checkpoint 8 -> fell back to {previous}; kill -9 after step 9 -> '
             f'checkpoints {checkpoint_steps(workdir)}')

  # The same command runs to the end.
  final = train(env, workdir)
  assert final.returncode == 0, final.stderr[-3000:]
  check_resume(final.stdout, expected)
  assert json.loads((workdir / 'results.json').read_text())['step'] == TOTAL_STEPS
  (got, step), (want, want_step) = (restore(template, w / 'checkpoints')
                                    for w in (workdir, reference[0]))
  assert step == want_step == TOTAL_STEPS
  arrays = assert_bit_identical(got, want)
  print('\n[reliability] ' + '\n[reliability] '.join(log) +
        f'\n[reliability] final state ({arrays} arrays: online and momentum parameters, '
        'BatchNorm statistics, optimizer state) bit-identical to the uninterrupted run')


# ------------------------------------------------- corrupt checkpoints ----

def _truncate_data(step_dir):
  data = largest_data_file(step_dir)
  os.truncate(data, data.stat().st_size // 2)


def _truncate_metadata(step_dir):
  path = step_dir / 'default' / '_METADATA'
  os.truncate(path, path.stat().st_size // 2)


def _empty(step_dir):
  for p in step_dir.iterdir():
    shutil.rmtree(p) if p.is_dir() else p.unlink()


def _half_written(step_dir):  # what an interrupted orbax save leaves
  step_dir.rename(step_dir.with_name(step_dir.name + '.orbax-checkpoint-tmp-1234'))


CORRUPTIONS = {  # name: (corrupt(step_dir), words the warning must contain; None: no warning)
    'truncated_array_file': (_truncate_data, 'is not valid for value of size'),
    'truncated_metadata': (_truncate_metadata, 'JSONDecodeError'),
    'emptied_step_directory': (_empty, 'default is missing'),
    'missing_item_directory': (lambda d: shutil.rmtree(d / 'default'), 'default is missing'),
    'half_written_step': (_half_written, None),
    'removed_step_directory': (shutil.rmtree, None),
}


@pytest.fixture(scope='module')
def saved_checkpoints(template, tmp_path_factory):
  """A checkpoints/ folder as training leaves it: three steps (8, 10, 12) of distinct
  random TrainStates of the tiny config, written by checkpoints.Checkpoints."""
  from resa_jax import checkpoints as checkpoints_lib  # pylint: disable=g-import-not-at-top
  folder = tmp_path_factory.mktemp('saved') / 'checkpoints'
  manager = checkpoints_lib.Checkpoints(folder, 3)
  rng = np.random.default_rng(0)
  for step in (8, 10, 12):
    state = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype)
                         if np.dtype(s.dtype).kind == 'f' else np.zeros(s.shape, s.dtype),
                         template)
    manager.save(step, state.replace(step=np.asarray(step, np.int32)))
  manager.close()
  return folder


@pytest.mark.parametrize('kind', list(CORRUPTIONS))
def test_corrupt_latest_checkpoint_falls_back(kind, saved_checkpoints, template, tmp_path,
                                              capsys):
  checkpoints = tmp_path / 'checkpoints'
  shutil.copytree(saved_checkpoints, checkpoints)
  latest, previous = checkpoint_steps(tmp_path)[-1], checkpoint_steps(tmp_path)[-2]
  pristine = tmp_path / 'pristine'
  shutil.copytree(checkpoints, pristine)
  shutil.rmtree(pristine / str(latest))
  want, want_step = restore(template, pristine)
  capsys.readouterr()

  corrupt, words = CORRUPTIONS[kind]
  corrupt(checkpoints / str(latest))
  before = snapshot(checkpoints)
  got, step = restore(template, checkpoints)
  out = capsys.readouterr().out
  assert step == want_step == previous
  assert_bit_identical(got, want)
  assert snapshot(checkpoints) == before  # nothing deleted, nothing written
  warnings = [l for l in out.splitlines() if l.startswith('warning:')]
  print(f'\n[reliability] {kind}: restored step {step}; ' + (warnings[0] if warnings else 'no warning'))
  if words is None:
    assert not warnings
  else:
    assert len(warnings) == 1 and f'checkpoint at step {latest} is unreadable' in warnings[0]
    assert words in warnings[0], warnings[0]


def test_no_readable_checkpoint_is_an_error_and_deletes_nothing(saved_checkpoints, template,
                                                               tmp_path):
  checkpoints = tmp_path / 'checkpoints'
  shutil.copytree(saved_checkpoints, checkpoints)
  for step in checkpoint_steps(tmp_path):
    _truncate_metadata(checkpoints / str(step))
  before = snapshot(checkpoints)
  with pytest.raises(ValueError, match='no readable checkpoint'):
    restore(template, checkpoints)
  assert snapshot(checkpoints) == before


# ------------------------------------------------------------- divergence ----

def _continue_reference(env, reference, tmp_path, *overrides):
  """Copies the finished reference run and trains it 4 steps further with `overrides`."""
  workdir = tmp_path / 'run'
  shutil.copytree(reference[0], workdir)
  before = snapshot(workdir / 'checkpoints')
  proc = train(env, workdir, '--config.num_train_steps=16', '--config.allow_config_change=True',
               *overrides)
  return workdir, before, proc


@pytest.mark.slow
@pytest.mark.parametrize('overrides,what', [
    # lr 1e30: step 13 blows the weights up, step 14's loss is NaN.
    (('--config.base_lr=1e30',), 'loss nan'),
    # weight decay 1e39 (inf in float32): step 13's loss and gradients are finite,
    # the parameters after it are not.
    (('--config.weight_decay=1e39',), 'parameters non-finite'),
], ids=['nan_loss', 'nonfinite_parameters'])
def test_divergence_stops_with_step_and_keeps_last_good_checkpoint(
    env, reference, template, tmp_path, overrides, what):
  workdir, before, proc = _continue_reference(env, reference, tmp_path, *overrides)
  assert proc.returncode == 3, proc.stderr[-3000:]
  line = error_line(proc)
  step = int(re.search(r'diverged at step (\d+)', line).group(1))
  assert TOTAL_STEPS < step <= 16 and what in line, line
  if what == 'parameters non-finite':
    assert step == TOTAL_STEPS + 1 and 'loss nan' not in line, line
  assert 'last good checkpoint is kept in' in line
  assert snapshot(workdir / 'checkpoints') == before  # the latest is still step 12
  state, latest = restore(template, workdir / 'checkpoints')
  assert latest == TOTAL_STEPS
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))
  print(f'\n[reliability] divergence ({what}): exit 3 at step {step}, {proc.seconds:.1f} s: {line}')


# ------------------------------------------------------ unwritable folders ----

# (id, module, arguments, words of the error line); {ro} is a folder of mode 0555 that
# the process cannot write, {tmp} the folder holding it.
UNWRITABLE = [
    ('workdir_read_only', 'resa_jax.main', ['--workdir={ro}'],
     '--workdir={ro} cannot be written: it is not writable by'),
    ('workdir_parent_read_only', 'resa_jax.main', ['--workdir={ro}/run'],
     '--workdir={ro}/run cannot be created: {ro} is not writable by'),
    ('evaluate_output_read_only', 'resa_jax.evaluate',
     ['--checkpoint={tmp}/checkpoint', '--output={ro}/out'],
     '--output={ro}/out cannot be created: {ro} is not writable by'),
    ('evaluate_default_output_read_only', 'resa_jax.evaluate', ['--checkpoint={ro}'],
     '--output={ro}/eval cannot be created: {ro} is not writable by'),
]


@pytest.mark.slow
@pytest.mark.parametrize('name,module,args,words', UNWRITABLE, ids=[c[0] for c in UNWRITABLE])
def test_unwritable_workdir_or_output_one_line_exit_2_nothing_written(
    env, tmp_path, name, module, args, words):
  ro = tmp_path / 'read_only'
  (tmp_path / 'checkpoint').mkdir()
  ro.mkdir()
  ro.chmod(0o555)
  try:
    prefix = unprivileged(ro)
    before = snapshot(tmp_path)
    proc = run(env, f'--config={TINY}', *[a.format(ro=ro, tmp=tmp_path) for a in args],
               module=module, prefix=prefix)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc)
    assert words.format(ro=ro) in line and 'choose a writable' in line, line
    assert snapshot(tmp_path) == before
  finally:
    ro.chmod(0o755)
  print(f'\n[reliability] {name}: exit 2 in {proc.seconds:.1f} s: {line}')


def test_url_workdir_is_refused_before_anything_is_written(tmp_path, monkeypatch):
  from resa_jax import train as train_lib
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match='is a URL; it must be a local or mounted path'):
    train_lib.train_and_evaluate(tiny_config(), 'gs://bucket/run')
  assert not list(tmp_path.iterdir())  # no local 'gs:' folder
