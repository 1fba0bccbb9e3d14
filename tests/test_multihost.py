"""Multi-host training on one machine: 2 processes x 4 CPU devices against 1 x 8.

Two `python -m resa_jax.main --coordinator_address=localhost:PORT --num_processes=2
--process_id=i` processes, each with 4 simulated CPU devices and JAX's CPU
collectives across processes (gloo, JAX's default), train the tiny config in two
invocations: the first is preempted (SIGTERM to one process; both save the same
step together and exit 143), the second restores that checkpoint on both processes
and trains to the end.  One process with 8 devices trains on the same global
batches in one go.  The final TrainStates, read back from both checkpoint
directories, must agree in float64 (every leaf to 1e-10 of its scale, 1e-12 as a
whole), and so must the kNN results; only process 0 prints progress.

The host's training stream is cut into `input_shards` readers (2 here, one per process
of the multi-process run), so the one process with 8 devices reads the same global
batches (resa_jax/data/order.py).  All three processes compile into one persistent
cache, so the resuming invocation does not compile again.  A second test reads the
input alone through `resa_jax.data`'s front door, every placement, on 2 processes and
on 1.
"""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / 'tests' / 'configs' / 'tiny.py')
NUM_STEPS = 4  # one epoch of the tiny config: kNN before training and at its end
# float64 (under JAX x64): the processes' all-reduces sum in another order than one
# process's, which float32 shows at 1e-5..5e-3 in some BatchNorm biases after 4 steps,
# depending on the CPU; float64 leaves that order at the 1e-12 level and anything else
# in plain view.
OVERRIDES = {'num_train_steps': NUM_STEPS, 'checkpoint_every_steps': NUM_STEPS,
             'dtype': 'float64', 'input_shards': 2}
TIMEOUT = 300


def _env(devices: int, cache_dir) -> dict:
  env = {k: v for k, v in os.environ.items()  # no cluster settings of the caller's
         if not k.startswith(('SLURM_', 'OMPI_', 'JAX_', 'TPU_'))}
  env.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu', JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo',
             CUDA_VISIBLE_DEVICES='', TF_CPP_MIN_LOG_LEVEL='3',
             JAX_DISABLE_MOST_OPTIMIZATIONS='1', PYTHONPATH=str(ROOT), JAX_ENABLE_X64='1',
             # The resuming invocation reuses the first one's compiled programs.
             JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _start(cmd, devices, log_dir, name):
  out = open(log_dir / f'{name}.out', 'w')  # files, not pipes: nobody blocks on a full pipe
  err = open(log_dir / f'{name}.err', 'w')
  return subprocess.Popen(cmd, cwd=ROOT, env=_env(devices, log_dir / 'jax_cache'), stdout=out,
                          stderr=err, text=True)


def _finish(procs: dict, log_dir, expected_code: int = 0) -> dict:
  """Waits for every process; kills the rest as soon as one fails or times out."""
  outputs = {}
  try:
    for name, proc in procs.items():
      code = proc.wait(timeout=TIMEOUT)
      stdout = (log_dir / f'{name}.out').read_text()
      stderr = (log_dir / f'{name}.err').read_text()
      assert code == expected_code, f'{name} exited {code}:\n{stdout[-2000:]}\n{stderr[-4000:]}'
      outputs[name] = stdout
  finally:
    _kill(procs.values())
  return outputs


def _kill(procs):
  for proc in procs:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def _wait_for(path: pathlib.Path, text: str, procs):
  deadline = time.monotonic() + TIMEOUT
  while text not in path.read_text():
    assert all(p.poll() is None for p in procs), f'a process ended before {text!r}'
    assert time.monotonic() < deadline, f'no {text!r} in {path.name} after {TIMEOUT} s'
    time.sleep(0.2)


def _main_cmd(workdir, port, process_id, *extra):
  flags = [f'--config.{k}={v}' for k, v in OVERRIDES.items()]
  return [sys.executable, '-m', 'resa_jax.main', f'--config={TINY}', f'--workdir={workdir}',
          *flags, *extra, f'--coordinator_address=localhost:{port}', '--num_processes=2',
          f'--process_id={process_id}']


def _two_processes(workdir, log_dir, name, *extra):
  port = _free_port()
  return {f'{name}{i}': _start(_main_cmd(workdir, port, i, *extra), 4, log_dir, f'{name}{i}')
          for i in range(2)}


def _restore(checkpoint_dir: pathlib.Path, step: int) -> dict:
  """The saved TrainState at `step` as a flat {path: numpy array}."""
  import jax
  import orbax.checkpoint as ocp
  path = checkpoint_dir / str(step) / 'default'
  with ocp.PyTreeCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(path).item_metadata
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    tree = checkpointer.restore(path, restore_args=restore_args)
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  multi, single = tmp_path / 'multi', tmp_path / 'single'
  flags = [f'--config.{k}={v}' for k, v in OVERRIDES.items()]
  reference = _start([sys.executable, '-m', 'resa_jax.main', f'--config={TINY}',
                      f'--workdir={single}', *flags], 8, tmp_path, 'single')
  try:
    # Preemption: SIGTERM to process 1 alone, once both are past start-up (the kNN
    # baselines gather across processes) and before training.  JAX's preemption
    # service makes both save the same step and exit 143.
    first = _two_processes(multi, tmp_path, 'first')
    _wait_for(tmp_path / 'first0.out', 'kNN top-1 before training', first.values())
    first['first1'].send_signal(signal.SIGTERM)
    first = _finish(first, tmp_path, expected_code=143)
    # Resuming: both processes restore that checkpoint and train to the end.
    second = _finish({**_two_processes(multi, tmp_path, 'second'), 'single': reference},
                     tmp_path)
  finally:
    _kill([reference])

  match = re.search(r'SIGTERM at step (\d+): checkpoint saved', first['first0'])
  assert match, first['first0'][-2000:]
  stop_step = int(match.group(1))
  assert 1 <= stop_step < NUM_STEPS
  assert f'resumed at step {stop_step}' in second['second0']
  assert 'over 8 device(s)' in second['second0'] and f'step {NUM_STEPS}/' in second['second0']
  # Process 0 reports; process 1 prints nothing of its own (gloo's C++ lines aside).
  for out in (first['first1'], second['second1']):
    assert not any(word in out for word in ('ReSA', 'step', 'kNN', 'results')), out[-2000:]

  results = json.loads((multi / 'results.json').read_text())
  expected = json.loads((single / 'results.json').read_text())
  assert results['finished'] and results['step'] == NUM_STEPS and results['devices'] == 8
  for key in ('knn_top1_raw_pixels', 'knn_top1_random_init', 'knn_top1'):
    assert results[key] == pytest.approx(expected[key], abs=1e-6), key
  history = json.loads((multi / 'history.json').read_text())
  assert [s for s, _ in history['loss']][-1] == NUM_STEPS
  assert (multi / 'training_curves.png').exists() and (multi / 'config.json').exists()

  steps = sorted(int(p.name) for p in (multi / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps == [stop_step, NUM_STEPS]
  got = _restore(multi / 'checkpoints', NUM_STEPS)
  want = _restore(single / 'checkpoints', NUM_STEPS)
  assert got.keys() == want.keys() and int(got["['step']"]) == NUM_STEPS
  # Parameters, BatchNorm statistics and the optimizer state, leaf by leaf relative to
  # the leaf's scale: the cross-process all-reduce sums in another order than the
  # in-process one, nothing else.  Measured in float64 (2026-12-04, AVX-512 VM, CPU
  # matmul weight gradient on): 5e-14 at worst (a BatchNorm bias), 1e-12 in SGD's
  # momentum buffer; in float32 the same order showed at 1e-5..5e-3 in one BN bias.
  for part in ('params', 'momentum_params', 'batch_stats', 'momentum_batch_stats',
               'opt_state'):
    keys = [k for k in want if k.startswith(f"['{part}']")]
    assert keys, part
    for k in keys:
      scale = float(np.max(np.abs(want[k])))
      np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-10 * scale + 1e-300,
                                 err_msg=k)
    assert _relative_difference(got, want, keys) <= 1e-12, part
  # The tolerances are far below what the resumed steps change.
  initial = _restore(multi / 'checkpoints', stop_step)
  keys = [k for k in want if k.startswith("['params']")]
  assert _relative_difference(initial, want, keys) > 1e-3


def _relative_difference(a: dict, b: dict, keys) -> float:
  diff = np.sqrt(sum(np.sum((a[k] - b[k]).astype(np.float64) ** 2) for k in keys))
  return float(diff / np.sqrt(sum(np.sum(b[k].astype(np.float64) ** 2) for k in keys)))


# ------------------------------------------------ the input, 2 processes vs 1 ----

# Reads the input through the front door, as the trainer and the evaluators do, and
# saves (process 0) what every placement gives: 5 training steps (into epoch 1) gathered
# across the processes, and one pass over the test split.
DATA_DRIVER = textwrap.dedent('''
    import importlib.util, sys
    import numpy as np
    tiny_path, out, num_processes, process_id, address = sys.argv[1:6]
    from resa_jax import sharding
    if int(num_processes) > 1:
      sharding.initialize_distributed(address, int(num_processes), int(process_id))
    import jax
    from jax.experimental import multihost_utils
    from resa_jax import data
    spec = importlib.util.spec_from_file_location('tiny', tiny_path)
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    mesh = sharding.create_mesh()
    saved = {}
    for kind, overrides in (('host', dict(augment_on='host')),
                            ('held', dict(augment_on='device')),
                            ('streamed', dict(augment_on='device', device_memory_budget_mb=0.0))):
      config = tiny.get_config()
      config.update(dict(input_shards=2, fake_num_examples=44, **overrides))
      assert data.placement(config, data.open_source(config), mesh) == kind
      batches = data.train_iterator(config, mesh)
      for step in range(5):
        for v, view in enumerate(next(batches)['views']):
          saved[f'{kind}_{step}_{v}'] = multihost_utils.process_allgather(view, tiled=True)
    for key, part in enumerate(data.eval_iterator(config, mesh, 'test')):
      for name, value in part.items():
        saved[f'eval_{key}_{name}'] = multihost_utils.process_allgather(value, tiled=True)
    if jax.process_index() == 0:
      np.savez(out, **saved)
''')


@pytest.mark.slow
def test_two_processes_read_the_input_of_one(tmp_path):
  """Each placement gives 2 processes x 4 devices the global batches 1 process x 8 reads
  (the host's stream with input_shards=2 on both); evaluation covers the split once."""
  port = _free_port()
  procs = {f'two{i}': _start([sys.executable, '-c', DATA_DRIVER, TINY, str(tmp_path / 'two.npz'),
                              '2', str(i), f'localhost:{port}'], 4, tmp_path, f'two{i}')
           for i in range(2)}
  procs['one'] = _start([sys.executable, '-c', DATA_DRIVER, TINY, str(tmp_path / 'one.npz'),
                         '1', '0', ''], 8, tmp_path, 'one')
  _finish(procs, tmp_path)
  two, one = np.load(tmp_path / 'two.npz'), np.load(tmp_path / 'one.npz')
  assert sorted(two.files) == sorted(one.files)
  for key in (k for k in one.files if not k.startswith('eval')):
    # The host's bytes are the same; the views made on 4 devices against 8 differ by the
    # float rounding of their resampling sums at most.
    atol = 0.0 if key.startswith('host') else 1e-4
    np.testing.assert_allclose(two[key], one[key], rtol=0, atol=atol, err_msg=key)
  assert not np.allclose(two['held_0_0'], two['held_4_0'])  # the stream moves on

  def evaluated(saved):  # (label, image) of every example, in some order
    rows = []
    for key in (k for k in saved.files if k.endswith('_mask')):
      mask, prefix = saved[key], key[:-len('mask')]
      rows += [(int(label), image.tobytes()) for label, image in
               zip(saved[prefix + 'label'][mask], saved[prefix + 'image'][mask])]
    return sorted(rows)

  # Evaluation: each process its share, so the order differs; the examples do not.
  assert evaluated(two) == evaluated(one) and len(evaluated(one)) == 44  # the test split


# ---------------------------------------------- when jax.distributed starts ----

_CLUSTER_VARS = ('SLURM_', 'OMPI_', 'TPU_WORKER_HOSTNAMES', 'JAX_COORDINATOR_ADDRESS',
                 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')


@pytest.fixture
def initialize_calls(monkeypatch):
  """A clean cluster environment; jax.distributed.initialize records its arguments."""
  import jax
  for name in list(os.environ):
    if name.startswith(_CLUSTER_VARS):
      monkeypatch.delenv(name)
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda *args: calls.append(args))
  return calls


@pytest.mark.parametrize('env,expected', [
    ({}, False),
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '16'}, False),  # the batch script, not a step
    ({'SLURM_STEP_NODELIST': 'n[1-2]', 'SLURM_STEP_NUM_TASKS': '1'}, False),
    ({'SLURM_STEP_NODELIST': 'n[1-2]', 'SLURM_STEP_NUM_TASKS': '16'}, True),  # srun
    ({'OMPI_MCA_orte_hnp_uri': '1.0;tcp://h:1', 'OMPI_COMM_WORLD_SIZE': '1'}, False),
    ({'OMPI_MCA_orte_hnp_uri': '1.0;tcp://h:1', 'OMPI_COMM_WORLD_SIZE': '4'}, True),
    ({'TPU_WORKER_HOSTNAMES': 'h0'}, False),
    ({'TPU_WORKER_HOSTNAMES': 'h0,h1,h2,h3'}, True),
])
def test_auto_detected_launches(initialize_calls, monkeypatch, env, expected):
  from resa_jax import sharding
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert sharding.initialize_distributed() is expected
  assert initialize_calls == ([()] if expected else [])
  assert sharding.initialize_distributed(force=False) is False  # --nodistributed
  assert len(initialize_calls) == int(expected)


def test_explicit_and_forced_initialisation(initialize_calls, monkeypatch):
  from resa_jax import sharding
  assert sharding.initialize_distributed('host0:1234', 2, 1)
  assert sharding.initialize_distributed(force=True)  # --distributed: JAX detects all
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', 'host0:99')
  assert sharding.initialize_distributed()  # the rest from the cluster
  monkeypatch.setenv('JAX_NUM_PROCESSES', '4')
  monkeypatch.setenv('JAX_PROCESS_ID', '3')
  assert sharding.initialize_distributed()
  assert sharding.initialize_distributed('host1:5', 8, 0)  # flags win over the environment
  assert initialize_calls == [('host0:1234', 2, 1), (), ('host0:99', None, None),
                              ('host0:99', 4, 3), ('host1:5', 8, 0)]
  monkeypatch.delenv('JAX_PROCESS_ID')
  with pytest.raises(ValueError, match='go together'):
    sharding.initialize_distributed('host0:1234')
