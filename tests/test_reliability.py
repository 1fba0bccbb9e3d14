"""Reliability (issue #8): preemption, corrupt checkpoints, divergence, bad input,
determinism and health counters, each measured on the real `python -m resa_jax.main`
(bad input also on `python -m resa_jax.evaluate` and `python -m resa_jax.convert`).

Runs use tests/configs/tiny.py (fake 16x16 data, width-4 ResNet-18) for 12 steps
(3 epochs of 4), a checkpoint every 2 steps, kNN off, on 2 simulated CPU devices
(enough for the sharded Sinkhorn/BatchNorm collectives; 8 only make the runs
slower).  Subprocesses share a persistent XLA compilation cache, so only the first
one compiles.  The figures in docs_reliability.md come from these tests:

    pytest tests/test_reliability.py -s --durations=0

Killing at a chosen step: the killed runs are the same command started through
`PAUSE_DRIVER`, which wraps `input_pipeline.create_train_iterator` so that the run
prints 'PAUSED after step k' and waits before taking the batch of step k + 1.
The test then sends SIGKILL (or SIGTERM, then lets it go on) -- a real signal at a
known step, with whatever checkpoint writes are still in flight.
"""

import concurrent.futures
import importlib.util
import json
import os
import pathlib
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / 'tests' / 'configs' / 'tiny.py')
DEVICES = 2
TOTAL_STEPS = 12
# The one command of every training run below (with --workdir).
RUN_FLAGS = ('--config.num_epochs=3', '--config.checkpoint_every_steps=2',
             '--config.knn_every_epochs=0')
TIMEOUT = 300

PAUSE_DRIVER = r'''
import os, runpy, sys, time
pause_after = int(os.environ['RESA_TEST_PAUSE_AFTER_STEP'])
go_file = os.environ['RESA_TEST_GO_FILE']
from resa_jax import input_pipeline
create_train_iterator = input_pipeline.create_train_iterator

def paused_train_iterator(config, mesh, *, start_step=0):
  batches = create_train_iterator(config, mesh, start_step=start_step)
  done = start_step  # steps taken when the next batch is asked for
  while True:
    if done == pause_after:
      print(f'PAUSED after step {done}', flush=True)
      while not os.path.exists(go_file):
        time.sleep(0.02)
    yield next(batches)
    done += 1

input_pipeline.create_train_iterator = paused_train_iterator
sys.argv = ['resa_jax.main'] + sys.argv[1:]
runpy.run_module('resa_jax.main', run_name='__main__', alter_sys=True)
'''


# ----------------------------------------------------------------- helpers ----

@pytest.fixture(scope='module')
def env(tmp_path_factory):
  env = dict(os.environ)
  env.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={DEVICES}',
             CUDA_VISIBLE_DEVICES='', TF_CPP_MIN_LOG_LEVEL='3',
             JAX_DISABLE_MOST_OPTIMIZATIONS='1', PYTHONPATH=str(ROOT),
             JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp('xla_cache')),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return env


def run(env, *args, module='resa_jax.main', prefix=()):
  start = time.perf_counter()
  proc = subprocess.run([*prefix, sys.executable, '-m', module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=TIMEOUT)
  proc.seconds = time.perf_counter() - start
  return proc


def train(env, workdir, *overrides, prefix=()):
  return run(env, f'--config={TINY}', f'--workdir={workdir}', *RUN_FLAGS, *overrides,
             prefix=prefix)


def tiny_config():
  """tests/configs/tiny.py's config, loaded from its path as --config=TINY does."""
  spec = importlib.util.spec_from_file_location('tiny_config', TINY)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def checkpoint_steps(workdir) -> list[int]:
  """Finalised checkpoints (orbax writes <step>.orbax-checkpoint-tmp-* then renames)."""
  folder = pathlib.Path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def snapshot(folder) -> dict:
  """{relative path: (size, mtime_ns)} of every file and folder under `folder`."""
  folder = pathlib.Path(folder)
  return {str(p.relative_to(folder)): (p.stat().st_size if p.is_file() else -1,
                                       p.stat().st_mtime_ns)
          for p in sorted(folder.rglob('*'))}


def error_line(proc) -> str:
  """The one `error: ...` line, which must end stderr; no traceback."""
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith('error:')]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-3000:]
  return errors[0]


@pytest.fixture(scope='module')
def template():
  """Abstract TrainState of the tiny config (shapes only; nothing computed)."""
  from resa_jax import models, step as step_lib
  config = tiny_config()
  online, momentum = models.create_networks(config)
  tx = step_lib.create_optimizer(config, step_lib.learning_rate_schedule(config, 4, 12))
  return jax.eval_shape(lambda: step_lib.create_train_state(
      jax.random.key(0), online, momentum, tx, (16, 16, 3)))


def restore(template, checkpoint_dir):
  """(state as numpy leaves, step) of the newest readable checkpoint, via checkpoints.Checkpoints."""
  from resa_jax import checkpoints as checkpoints_lib
  checkpoints = checkpoints_lib.Checkpoints(pathlib.Path(checkpoint_dir), 3)
  try:
    state, step = checkpoints.restore_latest(template)
  finally:
    checkpoints.close()
  return jax.tree.map(np.asarray, state), step


def assert_bit_identical(a, b):
  paths_a, leaves_a = zip(*jax.tree_util.tree_leaves_with_path(a))
  paths_b, leaves_b = zip(*jax.tree_util.tree_leaves_with_path(b))
  assert paths_a == paths_b
  for path, x, y in zip(paths_a, leaves_a, leaves_b):
    x, y = np.atleast_1d(x), np.atleast_1d(y)  # bytes: NaN == NaN, -0.0 != 0.0
    assert x.dtype == y.dtype and np.array_equal(x.view(np.uint8), y.view(np.uint8)), \
        jax.tree_util.keystr(path)
  return len(leaves_a)


def tensorboard_scalars(workdir) -> dict[str, list]:
  """{tag: [(step, value)]} from the TFRecord event files (no TensorFlow needed)."""
  from tensorboard.compat.proto import event_pb2
  from tensorboard.util import tensor_util
  scalars = {}
  for path in pathlib.Path(workdir).glob('events.out.tfevents.*'):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):  # record: u64 length, u32 crc, payload, u32 crc
      (length,) = struct.unpack('<Q', data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 16 + length
      for value in event.summary.value:
        number = (float(tensor_util.make_ndarray(value.tensor)) if value.HasField('tensor')
                  else value.simple_value)
        scalars.setdefault(value.tag, []).append((event.step, number))
  return scalars


# -------------------------------------------------------- reference runs ----

@pytest.fixture(scope='module')
def reference(env, tmp_path_factory):
  """An uninterrupted run: its workdir and process."""
  workdir = tmp_path_factory.mktemp('reference') / 'run'
  proc = train(env, workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  print(f'\n[reliability] uninterrupted run: {proc.seconds:.1f} s (compiles)')
  return workdir, proc


def test_nonfinite_fraction_counts_nan_and_inf():
  import jax.numpy as jnp
  from resa_jax import step as step_lib
  tree = {'a': jnp.array([1.0, jnp.nan, 3.0, jnp.inf]), 'b': jnp.array([[-jnp.inf, 0.0]]),
          'step': jnp.array(3, jnp.int32)}  # integers are not counted
  assert float(step_lib.nonfinite_fraction(tree)) == pytest.approx(3 / 6)
  assert float(step_lib.nonfinite_fraction({'a': jnp.ones(5)})) == 0.0


# ----------------------------------------------------------- determinism ----

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
  assert results[0]['step'] == TOTAL_STEPS and results[0]['devices'] == DEVICES
  (a, step_a), (b, step_b) = (restore(template, w / 'checkpoints')
                              for w in (workdir, tmp_path / 'run'))
  assert step_a == step_b == TOTAL_STEPS
  arrays = assert_bit_identical(a, b)
  print(f'\n[reliability] same seed twice: {len(history[0]["loss"])} logged losses equal, '
        f'final_loss {results[0]["final_loss"]!r} equal, {arrays} state arrays bit-identical')
  # The data order and augmentation are a function of (seed, step) only, not of the
  # number of tf.data threads: tests/test_input_pipeline.py::
  # test_result_does_not_depend_on_thread_count and test_resume_reproduces_the_continuation.


# -------------------------------------------------------- health counters ----

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

class PausedRun:
  """The training command through PAUSE_DRIVER, stopped before step `pause_after` + 1."""

  def __init__(self, env, workdir, pause_after, tmp_path):
    self.workdir = workdir
    self.go_file = tmp_path / f'go_{pause_after}'
    self.stdout_path = tmp_path / f'stdout_{pause_after}.txt'
    self.stderr_path = tmp_path / f'stderr_{pause_after}.txt'
    env = dict(env, RESA_TEST_PAUSE_AFTER_STEP=str(pause_after),
               RESA_TEST_GO_FILE=str(self.go_file))
    with open(self.stdout_path, 'w') as out, open(self.stderr_path, 'w') as err:
      self.proc = subprocess.Popen(
          [sys.executable, '-c', PAUSE_DRIVER, f'--config={TINY}', f'--workdir={workdir}',
           *RUN_FLAGS], cwd=ROOT, env=env, stdout=out, stderr=err)
    deadline = time.monotonic() + TIMEOUT
    marker = f'PAUSED after step {pause_after}'
    while marker not in self.stdout():
      assert self.proc.poll() is None, f'exited {self.proc.returncode}: {self.stderr()[-3000:]}'
      assert time.monotonic() < deadline, 'never paused'
      time.sleep(0.05)

  def stdout(self):
    return self.stdout_path.read_text()

  def stderr(self):
    return self.stderr_path.read_text()

  def kill(self, after_checkpoint=None):
    """SIGKILL; first waits for checkpoint `after_checkpoint` to be finalised, if given."""
    deadline = time.monotonic() + TIMEOUT
    while after_checkpoint is not None and after_checkpoint not in checkpoint_steps(self.workdir):
      assert time.monotonic() < deadline, f'checkpoint {after_checkpoint} never appeared'
      time.sleep(0.05)
    self.proc.send_signal(signal.SIGKILL)
    return self.proc.wait(TIMEOUT)

  def terminate_and_go_on(self, signum=signal.SIGTERM):
    self.proc.send_signal(signum)
    time.sleep(0.5)  # let the handler run; then the run takes its next step
    self.go_file.touch()
    return self.proc.wait(TIMEOUT)


def resumed_step(stdout) -> int:
  match = re.search(r'resumed at step (\d+)', stdout)
  return int(match.group(1)) if match else 0


def largest_data_file(step_dir) -> pathlib.Path:
  files = [p for p in (step_dir / 'default').rglob('*') if p.is_file() and p.parent.name == 'd']
  return max(files, key=lambda p: p.stat().st_size)


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


@pytest.mark.parametrize('kind', list(CORRUPTIONS))
def test_corrupt_latest_checkpoint_falls_back(kind, reference, template, tmp_path, capsys):
  checkpoints = tmp_path / 'checkpoints'
  shutil.copytree(reference[0] / 'checkpoints', checkpoints)
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


def test_no_readable_checkpoint_is_an_error_and_deletes_nothing(reference, template, tmp_path):
  checkpoints = tmp_path / 'checkpoints'
  shutil.copytree(reference[0] / 'checkpoints', checkpoints)
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


# -------------------------------------------------------------- bad input ----

# (id, arguments ({workdir} and {tmp} are filled in), words of the error line)
BAD_INPUT = [
    ('unknown_config_field', ['--config.not_a_field=1'], "no field 'not_a_field'"),
    ('missing_config_file', ['--config={tmp}/missing.py'], 'No such file'),
    ('config_syntax_error', ['--config={tmp}/broken.py'], 'SyntaxError'),
    ('bad_value_type', ['--config.batch_size=sixteen'], 'batch_size'),
    ('no_workdir', ['--workdir='], '--workdir is required'),
    ('stray_argument', ['stray'], 'unexpected arguments: stray'),
    ('unknown_architecture', ['--config.arch=resnet9'], 'unknown architecture'),
    ('unknown_stem', ['--config.stem=vit'], 'unknown stem'),
    ('unknown_optimizer', ['--config.optimizer=adam'], 'unknown optimizer'),
    ('zero_batch_size', ['--config.batch_size=0'], 'batch_size must be positive'),
    ('negative_lr', ['--config.base_lr=-0.1'], 'base_lr must be positive'),
    ('infinite_lr', ['--config.base_lr=inf'], 'base_lr must be positive and finite'),
    ('zero_epochs', ['--config.num_epochs=0'], 'num_epochs must be positive'),
    ('zero_width', ['--config.width_per_group=0'], 'width_per_group must be positive'),
    ('zero_temperature', ['--config.temperature=0'], 'temperature must be positive'),
    ('negative_epsilon', ['--config.sinkhorn_epsilon=-0.05'],
     'sinkhorn_epsilon must be positive'),
    ('negative_weight_decay', ['--config.weight_decay=-1e-4'], 'weight_decay must be >= 0'),
    ('ema_above_one', ['--config.ema_momentum=1.5'], 'ema_momentum must be in [0, 1]'),
    ('unknown_dataset', ['--config.dataset=mnist_typo'], 'unknown dataset'),
    ('batch_not_divisible', ['--config.batch_size=15'], 'multiple of the number of devices'),
    ('crop_lists_lengths', ['--config.crops_size=(16,8)'], 'equal lengths'),
    ('probability_above_one', ['--config.grayscale_prob=1.5'],
     'grayscale_prob must be a probability'),
    ('min_scale_above_max', ['--config.crops_min_scale=(0.9,)', '--config.crops_max_scale=(0.5,)'],
     'crops_min_scale <= crops_max_scale'),
    ('bad_dtype', ['--config.dtype=float8'], 'dtype must be one of'),
    ('tfds_data_dir_missing', ['--config.dataset=cifar10', '--config.data_dir={tmp}/no_data',
                               '--config.tfds_download=False'], 'tfds build cifar10'),
    ('image_folder_missing', ['--config.dataset=image_folder', '--config.data_dir={tmp}/no_data'],
     'no train/ folder'),
    ('empty_dataset', ['--config.fake_num_examples=0'], 'has no examples'),
    ('batch_larger_than_dataset', ['--config.batch_size=128'],
     'has 64 examples, fewer than one batch of 128'),
    ('nested_override', ['--config.arch.name=resnet18'],
     "--config.arch.name: config field 'arch' has no sub-fields"),
    ('unknown_shipped_config', ['--config=cifar11'], 'no shipped config of that name'),
    ('drop_path_on_a_resnet', ['--config.drop_path=0.1'], 'drop_path is for ViT encoders'),
    ('workdir_is_a_file', ['--workdir={tmp}/a_file'], 'is not a directory'),
]


def _bad_input_args(args, tmp):
  args = [a.format(tmp=tmp) for a in args]
  if not any(a.startswith('--config=') for a in args):
    args = [f'--config={TINY}'] + args
  if not any(a.startswith('--workdir=') for a in args):
    args.append(f'--workdir={tmp}/run')
  return [a for a in args if a != '--workdir=']


@pytest.fixture(scope='module')
def bad_input_runs(env, tmp_path_factory):
  """{case id: (process, folder)}; two cases at a time."""
  def one(case):
    name, args, _ = case
    tmp = tmp_path_factory.mktemp(name)
    (tmp / 'broken.py').write_text('def get_config(:\n')
    (tmp / 'a_file').write_text('not a folder\n')
    return name, (run(env, *_bad_input_args(args, tmp)), tmp)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    runs = dict(pool.map(one, BAD_INPUT))
  seconds = sorted(p.seconds for p, _ in runs.values())
  print(f'\n[reliability] {len(runs)} bad-input cases: median {np.median(seconds):.1f} s, '
        f'max {seconds[-1]:.1f} s per case')
  return runs


@pytest.mark.parametrize('name,args,words', BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_one_line_exit_2_nothing_written(bad_input_runs, name, args, words):
  proc, tmp = bad_input_runs[name]
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = error_line(proc)
  assert words in line, line
  assert not (tmp / 'run').exists()
  assert sorted(p.name for p in tmp.iterdir()) == ['a_file', 'broken.py']
  assert (tmp / 'a_file').read_text() == 'not a folder\n'


# The other two commands, the same way: (id, module, arguments ({tmp} is filled in; it
# holds a_file, a training workdir run/ with config.json, its converted copy converted/
# and a PyTorch ResNet-18 width-4 encoder tiny.pth), words of the error line).
TOOL_BAD_INPUT = [
    ('evaluate_no_checkpoint', 'resa_jax.evaluate', [], '--checkpoint is required'),
    ('evaluate_missing_checkpoint', 'resa_jax.evaluate', ['--checkpoint={tmp}/none'],
     'does not exist'),
    ('evaluate_not_a_checkpoint', 'resa_jax.evaluate', ['--checkpoint={tmp}'],
     'neither a training workdir with checkpoints nor a converted checkpoint'),
    ('evaluate_model_override', 'resa_jax.evaluate',
     ['--checkpoint={tmp}/run', '--config.width_per_group=8'],
     '--config.width_per_group=8 contradicts the checkpoint, which records width_per_group=4'),
    ('evaluate_converted_without_config', 'resa_jax.evaluate', ['--checkpoint={tmp}/converted'],
     'records its model (arch=resnet18, width_per_group=4, stem=cifar'),
    ('evaluate_unknown_field', 'resa_jax.evaluate', ['--checkpoint={tmp}/run', '--config.nope=1'],
     "the config has no field 'nope'"),
    ('evaluate_bad_eval', 'resa_jax.evaluate', ['--checkpoint={tmp}/run', '--eval=svm'],
     'unknown evaluation svm'),
    ('evaluate_stray_argument', 'resa_jax.evaluate', ['--checkpoint={tmp}/run', 'stray'],
     'unexpected arguments: stray'),
    ('convert_no_checkpoint', 'resa_jax.convert', ['--out={tmp}/out'], '--checkpoint is required'),
    ('convert_no_out', 'resa_jax.convert', ['--checkpoint={tmp}/tiny.pth'], '--out is required'),
    ('convert_missing_file', 'resa_jax.convert', ['--checkpoint={tmp}/none.pth', '--out={tmp}/out'],
     'checkpoint not found'),
    ('convert_not_a_checkpoint', 'resa_jax.convert',
     ['--checkpoint={tmp}/a_file', '--out={tmp}/out'], 'cannot read'),
    ('convert_wrong_width', 'resa_jax.convert',
     ['--checkpoint={tmp}/tiny.pth', '--out={tmp}/out', '--width_per_group=8', '--stem=cifar'],
     '--width_per_group=8 --stem=cifar does not fit the checkpoint: its shapes say '
     '--width_per_group=4 --stem=imagenet'),
    ('convert_output_not_empty', 'resa_jax.convert', ['--checkpoint={tmp}/tiny.pth', '--out={tmp}'],
     'exists and is not an empty directory'),
    ('convert_bad_stem', 'resa_jax.convert',
     ['--checkpoint={tmp}/tiny.pth', '--out={tmp}/out', '--stem=vit'], 'value should be one of'),
    ('convert_stray_argument', 'resa_jax.convert',
     ['--checkpoint={tmp}/tiny.pth', '--out={tmp}/out', 'stray'], 'unexpected arguments: stray'),
]


@pytest.fixture(scope='module')
def tool_inputs(tmp_path_factory, template):
  """A folder of what TOOL_BAD_INPUT's cases read, copied into each case's folder."""
  torch = pytest.importorskip('torch')
  from resa_jax import checkpoints as checkpoints_lib, convert
  folder = tmp_path_factory.mktemp('tool_inputs')
  (folder / 'a_file').write_text('not a folder\n')
  state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
  (folder / 'run').mkdir()
  (folder / 'run' / 'config.json').write_text(tiny_config().to_json_best_effort(indent=2))
  manager = checkpoints_lib.Checkpoints(folder / 'run' / 'checkpoints', 3)
  manager.save(2, state)
  manager.close()
  convert.save_converted(folder / 'converted', {'params': state.params,
                                                'batch_stats': state.batch_stats},
                         {k: tiny_config()[k] for k in ('arch', 'width_per_group', 'stem')})
  torch.save(_torchvision_resnet18_state_dict(torch, width=4), folder / 'tiny.pth')
  return folder


@pytest.fixture(scope='module')
def tool_bad_input_runs(env, tool_inputs, tmp_path_factory):
  """{case id: (process, folder, snapshot of the folder before)}; two cases at a time."""
  def one(case):
    name, module, args, _ = case
    tmp = tmp_path_factory.mktemp(name)
    shutil.copytree(tool_inputs, tmp, dirs_exist_ok=True)
    before = snapshot(tmp)
    return name, (run(env, *[a.format(tmp=tmp) for a in args], module=module), tmp, before)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    runs = dict(pool.map(one, TOOL_BAD_INPUT))
  for name, (proc, _, _) in sorted(runs.items()):
    print(f'\n[reliability] {name}: exit {proc.returncode} in {proc.seconds:.1f} s')
  return runs


@pytest.mark.parametrize('name,module,args,words', TOOL_BAD_INPUT,
                         ids=[c[0] for c in TOOL_BAD_INPUT])
def test_tool_bad_input_one_line_exit_2_nothing_written(tool_bad_input_runs, name, module, args,
                                                        words):
  proc, tmp, before = tool_bad_input_runs[name]
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = error_line(proc)
  assert words in line, line
  assert snapshot(tmp) == before  # nothing written, nothing removed or touched


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


def unprivileged(folder) -> list[str]:
  """A command prefix under which `folder` (mode 0555) cannot be written: none for a
  user other than root; for root, whom chmod does not stop, a new user namespace
  (`unshare --user`: the same files, seen by an unmapped user without root's
  capabilities over them).  Skips the test where neither stops a write."""
  prefix = [] if os.geteuid() != 0 or not shutil.which('unshare') else ['unshare', '--user']
  probe = subprocess.run([*prefix, 'sh', '-c', f'mkdir "{folder}/probe"'], capture_output=True)
  if probe.returncode == 0:
    os.rmdir(folder / 'probe')
    pytest.skip(f'cannot make a folder this process may not write (uid {os.geteuid()})')
  return prefix


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


def test_configs_load_from_any_directory_by_path_or_name(env, tmp_path):
  """A config path outside the checkout, or a shipped config's name, from another
  directory (the configs import resa_jax.configs, not a top-level `configs`)."""
  mine = tmp_path / 'my_config.py'
  mine.write_text('from resa_jax.configs import fashion_mnist\n\n\ndef get_config():\n'
                  '  config = fashion_mnist.get_config()\n  config.batch_size = 0\n'
                  '  return config\n')
  for config, flags, words in ((ROOT / 'configs' / 'cifar10.py', ['--config.base_lr=-1'],
                                 'base_lr must be positive'),
                                ('cifar10', ['--config.base_lr=-1'], 'base_lr must be positive'),
                                (mine, [], 'batch_size must be positive')):
    proc = subprocess.run([sys.executable, '-m', 'resa_jax.main', f'--config={config}', *flags,
                           f'--workdir={tmp_path}/run'], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 2 and words in error_line(proc), proc.stderr[-2000:]
  assert sorted(p.name for p in tmp_path.iterdir()) == ['my_config.py']


def test_checkpoint_of_another_architecture_is_refused(env, reference, tmp_path):
  """Training or evaluating a workdir with another width: one line, exit 2, untouched."""
  workdir = tmp_path / 'run'
  shutil.copytree(reference[0], workdir)
  before = snapshot(workdir)
  proc = train(env, workdir, '--config.width_per_group=8')  # refused from config.json
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = error_line(proc)
  assert 'was trained with width_per_group=4; --config has width_per_group=8' in line, line
  assert snapshot(workdir) == before
  proc = train(env, workdir, '--config.width_per_group=8', '--config.allow_config_change=True')
  assert proc.returncode == 2, proc.stderr[-3000:]  # refused from the checkpoint's shapes
  line = error_line(proc)
  assert 'does not fit the config' in line and 'in the model' in line, line
  assert snapshot(workdir) == before
  proc = run(env, f'--config={TINY}', '--config.width_per_group=8', f'--checkpoint={workdir}',
             '--eval=knn', module='resa_jax.evaluate')
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert ('--config.width_per_group=8 contradicts the checkpoint, which records '
          'width_per_group=4') in error_line(proc)
  assert snapshot(workdir) == before


def _torchvision_resnet18_state_dict(torch, width: int = 64) -> dict:
  """The keys and shapes of torchvision's resnet18().state_dict() (random values);
  `width` 64 is torchvision's, another one scales every stage."""
  state = {}

  def conv(name, c_out, c_in, k):
    state[f'{name}.weight'] = torch.randn(c_out, c_in, k, k)

  def bn(name, c):
    state.update({f'{name}.weight': torch.ones(c), f'{name}.bias': torch.zeros(c),
                  f'{name}.running_mean': torch.zeros(c), f'{name}.running_var': torch.ones(c),
                  f'{name}.num_batches_tracked': torch.tensor(0)})
  conv('conv1', width, 3, 7)
  bn('bn1', width)
  c_in = width
  for i, c in enumerate((width, 2 * width, 4 * width, 8 * width), start=1):
    for b in range(2):
      prefix = f'layer{i}.{b}'
      conv(f'{prefix}.conv1', c, c_in if b == 0 else c, 3)
      bn(f'{prefix}.bn1', c)
      conv(f'{prefix}.conv2', c, c, 3)
      bn(f'{prefix}.bn2', c)
      if b == 0 and i > 1:
        conv(f'{prefix}.downsample.0', c, c_in, 1)
        bn(f'{prefix}.downsample.1', c)
    c_in = c
  state.update({'fc.weight': torch.randn(1000, 8 * width), 'fc.bias': torch.zeros(1000)})
  return state


def test_convert_refuses_another_architectures_checkpoint(env, tmp_path):
  torch = pytest.importorskip('torch')
  checkpoint = tmp_path / 'resnet18.pth'
  torch.save(_torchvision_resnet18_state_dict(torch), checkpoint)
  proc = run(env, f'--checkpoint={checkpoint}', '--arch=resnet50', f'--out={tmp_path}/out',
             module='resa_jax.convert')
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = error_line(proc)
  assert '--arch=resnet50 does not fit the checkpoint: its shapes say --arch=resnet18' in line
  assert not (tmp_path / 'out').exists()
  print(f'\n[reliability] convert, resnet18 weights as resnet50: {line}')


def test_url_workdir_is_refused_before_anything_is_written(tmp_path, monkeypatch):
  from resa_jax import train as train_lib
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match='is a URL; it must be a local or mounted path'):
    train_lib.train_and_evaluate(tiny_config(), 'gs://bucket/run')
  assert not list(tmp_path.iterdir())  # no local 'gs:' folder
