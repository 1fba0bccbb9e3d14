"""Command line: train ReSA.

    python -m resa_jax.main --config=configs/fashion_mnist.py --workdir=/tmp/resa_fmnist \
        [--config.batch_size=256 ...]

Flags only; the work is `resa_jax.train.train_and_evaluate`.  A bad config or
missing data ends with a one-line `error: ...` and exit code 2 before anything is
written; a diverged run with exit code 3, keeping its last good checkpoint.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
flags.DEFINE_string('coordinator_address', None,
                    'Multi-host: host:port of process 0 for jax.distributed.initialize '
                    '(or $JAX_COORDINATOR_ADDRESS; under srun/mpirun/GKE, and with '
                    '--distributed, JAX detects what is unset).')
flags.DEFINE_integer('num_processes', None, 'Multi-host: total number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-host: index of this process.')
flags.DEFINE_boolean('distributed', None,
                     'Multi-host: --distributed calls jax.distributed.initialize() on JAX\'s '
                     'cluster detection (use it on Cloud TPU VM pod slices); --nodistributed '
                     'never does; unset: when the flags above, $JAX_COORDINATOR_ADDRESS or a '
                     'multi-task srun/mpirun/GKE launch ask for it.')


def _fail(message: str, code: int = 2):
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if FLAGS.workdir is None:
    _fail('--workdir is required')
  if not FLAGS['verbosity'].present:  # orbax and TF are chatty at INFO
    logging.set_verbosity(logging.WARNING)
  from resa_jax import sharding
  try:
    sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id, force=FLAGS.distributed)
  except ValueError as e:
    _fail(str(e))
  import jax
  if jax.process_index() > 0:  # one progress log per job (process 0's); errors still show
    sys.stdout = open(os.devnull, 'w')  # pylint: disable=consider-using-with
  from resa_jax import train
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except train.TrainingDivergedError as e:
    _fail(str(e), code=3)
  except ValueError as e:  # bad config, missing data (DatasetNotFoundError)
    _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


def parse_flags(argv):
  """absl flag parsing with a one-line error (exit 2) instead of usage text."""
  try:
    rest = FLAGS(argv)
  except flags.Error as e:  # unknown flag or --config.x field, bad value, broken config file
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    _fail(lines[0].rstrip(':') + (f': {lines[-1]}' if len(lines) > 1 else ''))
  except Exception as e:  # pylint: disable=broad-except  (a config file that fails to load)
    field = str(e).strip('"\'')
    unknown = [a.split('=')[0] for a in argv if a.startswith('--config.') and
               field in a.split('=')[0].split('.')[1:]]
    if isinstance(e, (AttributeError, KeyError)) and unknown:
      _fail(f'{unknown[0]}: the config has no field {field!r} (the fields are in '
            'configs/default.py)')
    _fail(f'cannot load the config: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}')
  if FLAGS.config is None:
    _fail('--config is required, e.g. --config=configs/fashion_mnist.py')
  try:  # a config file that cannot be read only raises when first used
    FLAGS.config.keys()
  except OSError as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    _fail(f'cannot load the config file {FLAGS["config"].config_filename}: {lines[-1]}')
  return rest


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
