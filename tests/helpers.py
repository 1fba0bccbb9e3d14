"""What several test modules share: the tiny config, running a command (in this process
or as a real subprocess), one-line errors, folder snapshots, checkpoints, TensorBoard
scalars.  Fixtures built on these live in conftest.py; no test module imports another.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / 'tests' / 'configs' / 'tiny.py')
TIMEOUT = 300
# The command-line modules, by the name a user types after `python -m`.
COMMANDS = {'resa_jax.main': 'resa_jax.main', 'resa_jax.evaluate': 'resa_jax.evaluate.__main__',
            'resa_jax.convert': 'resa_jax.convert.__main__'}


def tiny_config(**overrides):
  """tests/configs/tiny.py's config, loaded from its path as --config=TINY does, with
  `overrides` set: the one config of the whole suite."""
  spec = importlib.util.spec_from_file_location('tiny_config', TINY)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in overrides.items():
    config[key] = value
  return config


# ------------------------------------------------------------------ images ----

def natural_image(rng, size, channels):
  """uint8: smooth gradients and waves per channel, plus pixel noise."""
  yy, xx = np.mgrid[0:size, 0:size] / size
  planes = []
  for _ in range(channels):
    a, b, phase = rng.uniform(2, 8, 2).tolist() + [rng.uniform(0, 6)]
    planes.append(60 * (xx - yy) + 70 * np.sin(a * xx + phase) * np.cos(b * yy - phase))
  image = 128 + np.stack(planes, -1) + rng.normal(0, 20, (size, size, channels))
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def seed(i):
  """A TensorFlow stateless-RNG seed (int64 tensor of shape (2,))."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.constant([i, 12345], tf.int64)


# ------------------------------------------------------- commands in-process ----

@dataclasses.dataclass
class Outcome:
  code: int
  stdout: str
  stderr: str


def _absl_flags() -> frozenset[str]:
  from absl import flags, logging  # pylint: disable=g-import-not-at-top,unused-import
  return frozenset(flags.FLAGS)


_ABSL_FLAGS = _absl_flags()


def run_in_process(command: str, *args, monkeypatch, capsys) -> Outcome:
  """`python -m COMMAND ARGS` up to its exit, in this process: the command's own flag
  definitions, flag parser and `main`, on absl's global flags (its flags are removed
  again afterwards).  Left out: the signal watcher, the log filters and
  jax.distributed (what `cli.run` and `cli.initialize_distributed` set up), which the
  subprocess smoke tests cover.  For refusals and quick commands; exit code 0 when
  `main` returns."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from resa_jax import cli  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(COMMANDS[command])
  argv = [command, *map(str, args)]
  monkeypatch.setattr(cli, 'quiet_logging', lambda: None)
  monkeypatch.setattr(cli, 'initialize_distributed', lambda: None)
  monkeypatch.setattr(sys, 'argv', argv)
  # Flags other modules defined at import (experiments' scripts) step aside meanwhile;
  # absl's own (logging) stay.
  others = {name: flags.FLAGS[name] for name in list(flags.FLAGS) if name not in _ABSL_FLAGS}
  for name in others:
    delattr(flags.FLAGS, name)
  capsys.readouterr()
  try:
    module.define_flags()
    rest = getattr(module, 'parse_flags', cli.parse_flags)(argv)
    module.main(rest)
    code = 0
  except SystemExit as e:
    code = e.code
  finally:
    flags.FLAGS.unparse_flags()
    for name in list(flags.FLAGS):
      if name not in _ABSL_FLAGS:
        delattr(flags.FLAGS, name)
    for name, flag in others.items():
      flags.FLAGS[name] = flag
  out = capsys.readouterr()
  return Outcome(code, out.out, out.err)


# --------------------------------------------------------- real subprocesses ----

def cli_env(devices: int = 2, cache_dir=None, **extra) -> dict:
  """The environment of a command run as a subprocess: `devices` simulated CPU devices
  (2 unless the test is about devices), XLA's light optimisation level, the given
  persistent compilation cache."""
  env = dict(os.environ)
  env.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             CUDA_VISIBLE_DEVICES='', TF_CPP_MIN_LOG_LEVEL='3',
             JAX_DISABLE_MOST_OPTIMIZATIONS='1', PYTHONPATH=str(ROOT))
  if cache_dir is not None:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  env.update(extra)
  return env


def run(env, *args, module='resa_jax.main', prefix=(), cwd=ROOT, timeout=TIMEOUT):
  """`python -m MODULE ARGS` as a subprocess; the result has `.seconds`."""
  start = time.perf_counter()
  proc = subprocess.run([*prefix, sys.executable, '-m', module, *map(str, args)], cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=timeout)
  proc.seconds = time.perf_counter() - start
  return proc


def error_line(result) -> str:
  """The one `error: ...` line, which must end stderr; no traceback."""
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith('error:')]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-3000:]
  return errors[0]


def snapshot(folder) -> dict:
  """{relative path: (size, mtime_ns)} of every file and folder under `folder`."""
  folder = pathlib.Path(folder)
  return {str(p.relative_to(folder)): (p.stat().st_size if p.is_file() else -1,
                                       p.stat().st_mtime_ns)
          for p in sorted(folder.rglob('*'))}


# ---------------------------------------------------------------- training ----

# The one command of every training run of the reliability tests (with --workdir):
# 12 steps (3 epochs of 4), a checkpoint every 2 steps, kNN off.
RUN_FLAGS = ('--config.num_epochs=3', '--config.checkpoint_every_steps=2',
             '--config.knn_every_epochs=0')
TOTAL_STEPS = 12


def train(env, workdir, *overrides, prefix=()):
  return run(env, f'--config={TINY}', f'--workdir={workdir}', *RUN_FLAGS, *overrides,
             prefix=prefix)


def checkpoint_steps(workdir) -> list[int]:
  """Finalised checkpoints (orbax writes <step>.orbax-checkpoint-tmp-* then renames)."""
  folder = pathlib.Path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def resumed_step(stdout) -> int:
  """The step a training run's output says it resumed at (0: it started afresh)."""
  match = re.search(r'resumed at step (\d+)', stdout)
  return int(match.group(1)) if match else 0


def largest_data_file(step_dir) -> pathlib.Path:
  """The largest array file of an orbax checkpoint step folder."""
  files = [p for p in (step_dir / 'default').rglob('*') if p.is_file() and p.parent.name == 'd']
  return max(files, key=lambda p: p.stat().st_size)


def abstract_state(config):
  """The abstract TrainState of `config` (shapes only; nothing computed)."""
  import jax  # pylint: disable=g-import-not-at-top
  from resa_jax import models, step as step_lib  # pylint: disable=g-import-not-at-top
  online, momentum = models.create_networks(config)
  tx = step_lib.create_optimizer(config, step_lib.learning_rate_schedule(config, 4, 12))
  size = int(config.crops_size[0])
  return jax.eval_shape(lambda: step_lib.create_train_state(
      jax.random.key(0), online, momentum, tx, (size, size, 3)))


def restore(template, checkpoint_dir):
  """(state as numpy leaves, step) of the newest readable checkpoint."""
  import jax  # pylint: disable=g-import-not-at-top
  from resa_jax import checkpoints as checkpoints_lib  # pylint: disable=g-import-not-at-top
  checkpoints = checkpoints_lib.Checkpoints(pathlib.Path(checkpoint_dir), 3)
  try:
    state, step = checkpoints.restore_latest(template)
  finally:
    checkpoints.close()
  return jax.tree.map(np.asarray, state), step


def assert_bit_identical(a, b) -> int:
  """Every leaf of `a` and `b` equal byte for byte (NaN == NaN, -0.0 != 0.0); the count."""
  import jax  # pylint: disable=g-import-not-at-top
  paths_a, leaves_a = zip(*jax.tree_util.tree_leaves_with_path(a))
  paths_b, leaves_b = zip(*jax.tree_util.tree_leaves_with_path(b))
  assert paths_a == paths_b
  for path, x, y in zip(paths_a, leaves_a, leaves_b):
    x, y = np.atleast_1d(x), np.atleast_1d(y)
    assert x.dtype == y.dtype and np.array_equal(x.view(np.uint8), y.view(np.uint8)), \
        jax.tree_util.keystr(path)
  return len(leaves_a)


def tensorboard_scalars(workdir) -> dict[str, list]:
  """{tag: [(step, value)]} of the event files, read by TensorBoard's own loader."""
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  scalars = {}
  for path in sorted(pathlib.Path(workdir).glob('events.out.tfevents.*')):
    for event in event_file_loader.EventFileLoader(str(path)).Load():
      for value in event.summary.value:
        number = (float(tensor_util.make_ndarray(value.tensor)) if value.HasField('tensor')
                  else value.simple_value)
        scalars.setdefault(value.tag, []).append((event.step, number))
  return scalars


# The training command, paused before the batch of step k + 1: it wraps
# resa_jax.data.train_iterator, prints 'PAUSED after step k' and waits for a file.
PAUSE_DRIVER = r'''
import os, runpy, sys, time
pause_after = int(os.environ['RESA_TEST_PAUSE_AFTER_STEP'])
go_file = os.environ['RESA_TEST_GO_FILE']
from resa_jax import data
train_iterator = data.train_iterator

def paused_train_iterator(config, mesh, *, start_step=0, source=None):
  batches = train_iterator(config, mesh, start_step=start_step, source=source)
  done = start_step  # steps taken when the next batch is asked for
  while True:
    if done == pause_after:
      print(f'PAUSED after step {done}', flush=True)
      while not os.path.exists(go_file):
        time.sleep(0.02)
    yield next(batches)
    done += 1

data.train_iterator = paused_train_iterator
sys.argv = ['resa_jax.main'] + sys.argv[1:]
runpy.run_module('resa_jax.main', run_name='__main__', alter_sys=True)
'''


class PausedRun:
  """The training command through PAUSE_DRIVER, stopped before step `pause_after` + 1:
  a real signal can then be sent at a known step."""

  def __init__(self, env, workdir, pause_after, tmp_path, *overrides):
    self.workdir = workdir
    self.go_file = tmp_path / f'go_{pause_after}'
    self.stdout_path = tmp_path / f'stdout_{pause_after}.txt'
    self.stderr_path = tmp_path / f'stderr_{pause_after}.txt'
    env = dict(env, RESA_TEST_PAUSE_AFTER_STEP=str(pause_after),
               RESA_TEST_GO_FILE=str(self.go_file))
    with open(self.stdout_path, 'w') as out, open(self.stderr_path, 'w') as err:
      self.proc = subprocess.Popen(
          [sys.executable, '-c', PAUSE_DRIVER, f'--config={TINY}', f'--workdir={workdir}',
           *RUN_FLAGS, *overrides], cwd=ROOT, env=env, stdout=out, stderr=err)
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


# ------------------------------------------------------------- checkpoints ----

def torchvision_resnet18_state_dict(torch, width: int = 64) -> dict:
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


def unprivileged(folder) -> list[str]:
  """A command prefix under which `folder` (mode 0555) cannot be written: none for a
  user other than root; for root, whom chmod does not stop, a new user namespace
  (`unshare --user`: the same files, seen by an unmapped user without root's
  capabilities over them).  Skips the test where neither stops a write."""
  import pytest  # pylint: disable=g-import-not-at-top
  prefix = [] if os.geteuid() != 0 or not shutil.which('unshare') else ['unshare', '--user']
  probe = subprocess.run([*prefix, 'sh', '-c', f'mkdir "{folder}/probe"'], capture_output=True)
  if probe.returncode == 0:
    os.rmdir(folder / 'probe')
    pytest.skip(f'cannot make a folder this process may not write (uid {os.geteuid()})')
  return prefix
