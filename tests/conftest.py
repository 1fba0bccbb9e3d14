"""Test set-up: 8 simulated CPU devices (set before jax is imported anywhere), one
persistent XLA compilation cache for this process and every command the tests launch,
and the fixtures several modules share.

Markers (setup.cfg): `slow` for tests that launch a process, send signals, execute the
notebook, benchmark, or train for more than about 20 s; `data` for tests that read
../shared/datasets.  `bash scripts/test.sh -m "not slow"` is the fast tier.
"""

import os
import pathlib
import shutil
import tempfile

_flags = os.environ.get('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in _flags:
  os.environ['XLA_FLAGS'] = (_flags + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# Compile time dominates these tiny models; XLA's heavy optimisations do not pay off.
# Tests that compare runs across meshes run in float64 (tests/test_train_step.py), where
# the order of a reduction does not show at their tolerances.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
# One compilation cache for the session ($RESA_TEST_XLA_CACHE keeps one across sessions):
# the many tests that build the same tiny model's step compile it once.
XLA_CACHE = os.environ.get('RESA_TEST_XLA_CACHE') or tempfile.mkdtemp(prefix='resa_xla_cache_')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', XLA_CACHE)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import pytest  # noqa: E402

import helpers  # noqa: E402

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='session')
def reference_dir() -> pathlib.Path:
  """The folder of reference vectors: $RESA_REFERENCE_DIR or ../shared/reference."""
  path = os.environ.get('RESA_REFERENCE_DIR')
  path = pathlib.Path(path) if path else PROJECT_ROOT.parent / 'shared' / 'reference'
  if not path.is_dir():
    pytest.skip(f'reference vectors not found at {path}')
  return path


@pytest.fixture(scope='session')
def env() -> dict:
  """The environment of a command the tests launch: 2 simulated devices (enough for the
  sharded Sinkhorn and BatchNorm collectives), the session's compilation cache."""
  return helpers.cli_env(devices=2, cache_dir=os.environ['JAX_COMPILATION_CACHE_DIR'])


@pytest.fixture(scope='session')
def template():
  """The abstract TrainState of tests/configs/tiny.py (shapes only)."""
  return helpers.abstract_state(helpers.tiny_config())


@pytest.fixture(scope='session')
def reference(env, tmp_path_factory):
  """An uninterrupted run of the training command (helpers.RUN_FLAGS): (workdir, process).
  Made once a session; tests copy its workdir before changing anything."""
  workdir = tmp_path_factory.mktemp('reference') / 'run'
  proc = helpers.train(env, workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


@pytest.fixture(scope='session')
def tiny_checkpoints(tmp_path_factory) -> pathlib.Path:
  """A folder of checkpoints of the tiny config's initial TrainState (key 1) at step 8:
  'workdir' (with config.json), 'bare' (checkpoints only), 'converted' (a converted
  checkpoint with its model's metadata), 'nonfinite' (a workdir whose momentum encoder
  has a NaN in one kernel; the online encoder is finite), and 'a_file'.  Shared: tests
  write their outputs elsewhere."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from resa_jax import checkpoints as checkpoints_lib, convert, models  # pylint: disable=g-import-not-at-top
  from resa_jax import step as step_lib  # pylint: disable=g-import-not-at-top
  config = helpers.tiny_config()
  online, momentum = models.create_networks(config)
  tx = step_lib.create_optimizer(config, step_lib.learning_rate_schedule(config, 1, 1))
  state = jax.device_get(jax.jit(lambda: step_lib.create_train_state(
      jax.random.key(1), online, momentum, tx, (16, 16, 3)))())
  state = state.replace(step=np.asarray(8, np.int32))
  root = tmp_path_factory.mktemp('tiny_checkpoints')

  def save(workdir, state):
    workdir.mkdir()
    (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
    manager = checkpoints_lib.Checkpoints(workdir / 'checkpoints', 3)
    manager.save(8, state)
    manager.close()

  save(root / 'workdir', state)
  shutil.copytree(root / 'workdir' / 'checkpoints', root / 'bare' / 'checkpoints')
  convert.save_converted(
      root / 'converted', {'params': state.params, 'batch_stats': state.batch_stats,
                           'momentum_params': state.momentum_params,
                           'momentum_batch_stats': state.momentum_batch_stats},
      {k: config[k] for k in ('arch', 'width_per_group', 'stem', 'mlp_layers', 'mlp_dim',
                              'emb_dim')} | {'predictor': True})
  paths, leaves = zip(*jax.tree_util.tree_leaves_with_path(state.momentum_params))
  index = next(i for i, p in enumerate(paths) if 'encoder' in jax.tree_util.keystr(p)
               and 'kernel' in jax.tree_util.keystr(p))
  leaves = [np.array(x) for x in leaves]
  leaves[index].reshape(-1)[0] = np.nan
  save(root / 'nonfinite', state.replace(momentum_params=jax.tree.unflatten(
      jax.tree.structure(state.momentum_params), leaves)))
  (root / 'a_file').write_text('not a folder\n')
  return root
