r"""Command line: evaluate a checkpoint.  Flags only; the work is `run.run_evaluations`.

    python -m resa_jax.evaluate --checkpoint=WORKDIR --eval=knn,linear,semi,clustering \
        [--output=DIR] [--encoder=momentum|online] [--config.data_dir=...]
    python -m resa_jax.evaluate --checkpoint=CONVERTED_DIR --config=imagenet --eval=knn

The model is the checkpoint's: a training workdir's config.json (with
config_history.json's changes), a converted checkpoint's metadata.  A workdir needs no
--config: its own config is used, `--config.FIELD=VALUE` changes a field.  --config
(a file, or a shipped config's name) gives the dataset and the other fields; a
converted checkpoint needs it.  Where --config's model fields differ from the
checkpoint's, the checkpoint's are used and a `note:` line says so; an explicit
`--config.FIELD=VALUE` that contradicts the checkpoint is refused.

Multi-host as training: the same command on every process, with
--coordinator_address/--num_processes/--process_id or --distributed.
"""

import contextlib
import os
import pathlib
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from resa_jax import interrupts  # noqa: E402

if __name__ == '__main__':
  interrupts.watch()  # before the imports below start TensorFlow and JAX

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from resa_jax import cli  # noqa: E402
from resa_jax import reporting  # noqa: E402
from resa_jax import workdir as workdir_lib  # noqa: E402
from resa_jax.evaluate import checkpoint_config  # noqa: E402
from resa_jax.evaluate import common  # noqa: E402
from resa_jax.evaluate import run  # noqa: E402

FLAGS = flags.FLAGS
# Parsed as --config when none is given, so that --config.FIELD=VALUE overrides have
# their fields' types; the checkpoint's own config then replaces its values.
DEFAULT_CONFIG = cli.SHIPPED_CONFIGS / 'default.py'


def define_flags() -> None:
  """The command-line flags of `python -m resa_jax.evaluate`."""
  defaults = run.Options(evaluations=())
  config_flags.DEFINE_config_file('config', None, 'A config file or a shipped config\'s '
                                  'name: the dataset and the other non-model fields (the '
                                  "model is the checkpoint's).  Default: a workdir's own "
                                  'config.json; a converted checkpoint needs it.',
                                  lock_config=True)
  flags.DEFINE_string('checkpoint', None, 'A training workdir (its newest checkpoint), its '
                      'checkpoints/ folder, or a converted checkpoint (python -m '
                      'resa_jax.convert).')
  flags.DEFINE_string('eval', 'knn,linear,clustering',
                      f'Comma-separated evaluations among {", ".join(common.EVALUATIONS)}.')
  flags.DEFINE_string('output', None, 'Folder for the result files (default: '
                      '<checkpoint>/eval).')
  flags.DEFINE_string('encoder', defaults.encoder, "'momentum' (the paper's "
                      "evaluation) or 'online'.")
  flags.DEFINE_integer('batch_size', defaults.batch_size, 'Global batch of feature '
                       'extraction and evaluation; 0: config.batch_size.')
  flags.DEFINE_list('knn_ks', [str(k) for k in defaults.knn_ks], 'k of the weighted kNN.')
  flags.DEFINE_string('linear_protocol', defaults.linear_protocol,
                      "'features' (CIFAR: Adam on fixed features) or 'imagenet' (frozen "
                      'encoder, augmented images, SGD); default: imagenet for ImageNet '
                      'datasets, features otherwise.')
  flags.DEFINE_integer('linear_epochs', defaults.linear_epochs,
                       '-1: 500 (features) or 100 (imagenet).')
  flags.DEFINE_integer('linear_batch_size', defaults.linear_batch_size,
                       '-1: 1000 (features) or 256 (imagenet).')
  flags.DEFINE_float('linear_lr', defaults.linear_lr, 'ImageNet protocol base lr (x batch '
                     '/ 256); -1: 0.03 for ViTs, else 40 if pre-trained with batch >= 1024, '
                     'else 10.')
  flags.DEFINE_integer('linear_n_last_blocks', defaults.linear_n_last_blocks,
                       "ViTs' ImageNet probe: class tokens of the last n blocks (their "
                       '--n_last_blocks); -1: 1 for *_base ViTs, else 4.')
  flags.DEFINE_bool('linear_avgpool_patchtokens', defaults.linear_avgpool_patchtokens,
                    "ViTs' ImageNet probe: append the mean patch token (their "
                    '--avgpool_patchtokens); unset: on for *_base ViTs only.')
  flags.DEFINE_float('semi_fraction', defaults.semi_fraction, 'Labelled fraction: 0.01 or '
                     '0.1 for ImageNet (the shipped lists), any in (0, 1] elsewhere '
                     '(class-balanced, seeded).')
  flags.DEFINE_integer('semi_epochs', defaults.semi_epochs, 'Fine-tuning epochs.')
  flags.DEFINE_integer('semi_batch_size', defaults.semi_batch_size, 'Fine-tuning batch.')
  flags.DEFINE_float('semi_encoder_lr', defaults.semi_encoder_lr, 'x batch / 256.')
  flags.DEFINE_float('semi_head_lr', defaults.semi_head_lr, 'x batch / 256.')
  flags.DEFINE_integer('clustering_samples', defaults.clustering_samples,
                       'Random examples of the eval split for the clustering analysis.')
  flags.DEFINE_string('clustering_metric', defaults.clustering_metric,
                      "Silhouette distance: 'cosine' or 'euclidean'.")
  flags.DEFINE_bool('tsne', defaults.tsne, 'Also write tsne.png.')
  flags.DEFINE_bool('save_features', defaults.save_features, 'Also write the extracted '
                    'features and labels of each split to features_<split>.npz.')
  flags.DEFINE_integer('seed', defaults.seed, 'Seed of subsets, initialisations, shuffles.')
  flags.DEFINE_string('dtype', defaults.dtype, "Compute dtype: float32 (the authors' "
                      'evaluation), bfloat16, float16, or as_trained (the dtype the '
                      'checkpoint was trained with).')
  cli.define_multihost_flags()


def options_from_flags() -> run.Options:
  """Options from the parsed flags; EvaluationError (one line) on a bad value."""
  flags_ = FLAGS
  evaluations = run.parse_evaluations(flags_.eval)
  try:
    knn_ks = [int(k) for k in flags_.knn_ks]
  except ValueError as e:
    raise common.EvaluationError(f'--knn_ks must be integers, got {flags_.knn_ks}') from e
  options = run.Options(
      evaluations=evaluations, encoder=flags_.encoder, batch_size=flags_.batch_size,
      knn_ks=knn_ks, linear_protocol=flags_.linear_protocol,
      linear_epochs=flags_.linear_epochs, linear_batch_size=flags_.linear_batch_size,
      linear_lr=flags_.linear_lr, linear_n_last_blocks=flags_.linear_n_last_blocks,
      linear_avgpool_patchtokens=flags_.linear_avgpool_patchtokens,
      semi_fraction=flags_.semi_fraction,
      semi_epochs=flags_.semi_epochs, semi_batch_size=flags_.semi_batch_size,
      semi_encoder_lr=flags_.semi_encoder_lr, semi_head_lr=flags_.semi_head_lr,
      clustering_samples=flags_.clustering_samples,
      clustering_metric=flags_.clustering_metric, tsne=flags_.tsne,
      save_features=flags_.save_features, seed=flags_.seed, dtype=flags_.dtype)
  options.check()
  return options


def _config_given(argv) -> bool:
  return any(a == '--config' or a.startswith('--config=') for a in argv[1:])


def parse_flags(argv):
  """`cli.parse_flags`, with DEFAULT_CONFIG as --config when none is given."""
  if not _config_given(argv):
    argv = [argv[0], f'--config={DEFAULT_CONFIG}', *argv[1:]]
  return cli.parse_flags(argv)


@contextlib.contextmanager
def output_lock(output: str):
  """One evaluation writes `output` at a time: the training workdir's lock
  (`workdir.Lock`: `<output>/.lock`, taken by process 0, stale once its holder dies).
  The folders created for it are removed again where the evaluation wrote nothing."""
  import jax  # pylint: disable=g-import-not-at-top
  created = [f for f in (output, *pathlib.Path(output).parents) if not os.path.exists(f)]
  lock = workdir_lib.Lock.acquire(output, '--output') if jax.process_index() == 0 else None
  try:
    yield
  finally:
    if lock is not None:
      lock.release()
      for folder in created:  # the deepest first
        with contextlib.suppress(OSError):  # not empty: the evaluation wrote its files
          os.rmdir(folder)


def main(argv):
  flags_ = FLAGS
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  cli.quiet_logging()
  try:
    options = options_from_flags()
    if not flags_.checkpoint:
      raise common.EvaluationError('--checkpoint is required (a training workdir or a converted '
                                   'checkpoint)')
    output = flags_.output or os.path.join(flags_.checkpoint, 'eval')
    workdir_lib.refuse_if_locked(output, '--output')  # before any work, as training
    reporting.require_writable(output, '--output')
    config, notes = checkpoint_config.config_for_checkpoint(
        flags_.config, flags_.checkpoint, config_given=_config_given(sys.argv),
        overridden=config_flags.get_override_values(flags_['config']))
  except ValueError as e:
    cli.fail(reporting.first_line(e))
  cli.initialize_distributed()
  for note in notes:
    reporting.say(note)
  try:
    with output_lock(output):
      run.run_evaluations(config, flags_.checkpoint, output, options)
  except ValueError as e:  # EvaluationError, bad config, missing data, conversion errors
    cli.fail(reporting.first_line(e))


if __name__ == '__main__':
  define_flags()
  cli.run(main, flags_parser=parse_flags)
