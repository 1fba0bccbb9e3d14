r"""Command line: train ReSA.

    python -m resa_jax.main --config=configs/fashion_mnist.py --workdir=/tmp/resa_fmnist \
        [--config.batch_size=256 ...]

Flags only; the work is `resa_jax.train.train_and_evaluate`.  A bad config, missing
data or a workdir this user cannot write ends with a one-line `error: ...` and exit
code 2 before anything is written; a diverged run with exit code 3, keeping its last
good checkpoint; a full disk with exit code 4, keeping the checkpoints and files
written before; SIGTERM or Ctrl-C with 143 or 130, after saving the steps done since
the last checkpoint (resa_jax/interrupts.py).
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from resa_jax import interrupts  # noqa: E402

if __name__ == '__main__':
  interrupts.watch()  # SIGTERM / Ctrl-C from here on: one line, nothing lost

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from resa_jax import cli  # noqa: E402
from resa_jax import reporting  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags of `python -m resa_jax.main`."""
  config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
  cli.define_multihost_flags()


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if FLAGS.workdir is None:
    cli.fail('--workdir is required')
  cli.quiet_logging()
  cli.initialize_distributed()
  from resa_jax import train  # pylint: disable=g-import-not-at-top
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except train.TrainingDivergedError as e:
    cli.fail(e, code=3)
  except ValueError as e:  # bad config, missing data (DatasetNotFoundError)
    cli.fail(reporting.first_line(e))


if __name__ == '__main__':
  define_flags()
  cli.run(main)
