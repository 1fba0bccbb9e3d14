"""Fingerprint of a training run: sha256 of every array of its final checkpoint and of
results.json without its timings.  A refactoring that must not change behaviour
compares the fingerprint before and after.

    python experiments/fingerprint_run.py [--workdir DIR] [--devices 2] [--keep] \
        [-- --config.stem=imagenet ...]

Trains tests/configs/tiny.py (fixed seed 0, kNN every epoch) with the real
`python -m resa_jax.main` in a fresh workdir, then reads the newest checkpoint with
orbax directly (no project code), so the script itself does not depend on the
layout it checks.  Arguments after `--` go to resa_jax.main (config overrides).
Prints one line per array and two summary hashes.
"""

import argparse
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Timings and where the run happened: everything else in results.json must not change.
VOLATILE = {'wall_time_sec', 'images_per_sec', 'checkpoint_save_sec_mean', 'devices',
            'platform', 'train_images_per_sec', 'compile_sec'}


def checkpoint_hashes(checkpoint_dir: pathlib.Path) -> dict[str, str]:
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  step = max(int(p.name) for p in checkpoint_dir.iterdir() if p.name.isdigit())
  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.restore(checkpoint_dir / str(step) / 'default')
  hashes = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    name = '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)
    array = np.ascontiguousarray(np.asarray(leaf))
    digest = hashlib.sha256(array.dtype.str.encode() + str(array.shape).encode())
    digest.update(array.tobytes())
    hashes[f'{step}/{name}'] = digest.hexdigest()
  return hashes


def results_hash(results_file: pathlib.Path) -> tuple[str, dict]:
  results = {k: v for k, v in json.loads(results_file.read_text()).items()
             if k not in VOLATILE}
  text = json.dumps(results, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest(), results


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', default='')
  parser.add_argument('--devices', type=int, default=2)
  parser.add_argument('--keep', action='store_true', help='keep the workdir')
  parser.add_argument('overrides', nargs='*', help='after --: flags for resa_jax.main')
  args = parser.parse_args()
  workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix='resa_fingerprint_'))
  if workdir.exists():
    shutil.rmtree(workdir)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', CUDA_VISIBLE_DEVICES='',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={args.devices}')
  os.environ.update(env)  # orbax restores onto the topology it saved from
  command = [sys.executable, '-m', 'resa_jax.main',
             f'--config={ROOT / "tests" / "configs" / "tiny.py"}', f'--workdir={workdir}',
             *args.overrides]
  subprocess.run(command, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
  hashes = checkpoint_hashes(workdir / 'checkpoints')
  for name, digest in sorted(hashes.items()):
    print(f'{digest}  {name}')
  total = hashlib.sha256(''.join(f'{k}={v}\n' for k, v in sorted(hashes.items())).encode())
  digest, results = results_hash(workdir / 'results.json')
  print(f'checkpoint: {len(hashes)} arrays, combined sha256 {total.hexdigest()}')
  print(f'results.json minus timings: sha256 {digest} {json.dumps(results, sort_keys=True)}')
  if not args.keep:
    shutil.rmtree(workdir)
  return 0


if __name__ == '__main__':
  sys.exit(main())
