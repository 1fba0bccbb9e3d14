"""Command line: convert an authors' ReSA PyTorch checkpoint into a converted checkpoint.

    python -m resa_jax.convert --checkpoint=resa_800ep.pth --out=DIR

The model (architecture, widths, stem, heads) is read from the checkpoint's shapes; a
model flag, when given, must agree with them.  DIR must be new or empty.  Evaluate
the result with `python -m resa_jax.evaluate --checkpoint=DIR --config=<data>`.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from resa_jax import interrupts  # noqa: E402

if __name__ == '__main__':
  interrupts.watch()  # before the imports below start JAX

from absl import flags  # noqa: E402

from resa_jax import cli  # noqa: E402

FLAGS = flags.FLAGS


def _model_help(what: str, encoder_only: str = '') -> str:
  fallback = f' ({encoder_only} for an encoder-only file)' if encoder_only else ''
  return f'{what} Default: read from the checkpoint{fallback}.'


def define_flags() -> None:
  """The command-line flags of `python -m resa_jax.convert`."""
  flags.DEFINE_string('checkpoint', None, 'The .pth file: a full checkpoint '
                      '(module.encoder.*, module.projector.*, ...) or an encoder state dict.')
  flags.DEFINE_string('out', None, 'New (or empty) output directory.')
  flags.DEFINE_string('arch', None, _model_help('resnet18/34/50/101/200, resnet50w2/w4, '
                                                'vit_*, vitc_*.'))
  flags.DEFINE_integer('width_per_group', None, _model_help('ResNet width (64: the standard '
                                                            'ResNets).'), lower_bound=1)
  flags.DEFINE_enum('stem', None, ['imagenet', 'cifar'], _model_help('ResNet stem.'))
  flags.DEFINE_integer('mlp_layers', None, _model_help('Projector Linear layers.', '3'),
                       lower_bound=1)
  flags.DEFINE_integer('mlp_dim', None, _model_help('Projector / predictor hidden width.',
                                                    '2048'), lower_bound=1)
  flags.DEFINE_integer('emb_dim', None, _model_help('Embedding width.', '512'), lower_bound=1)


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  for name, what in (('checkpoint', 'the .pth file'), ('out', 'a new output directory')):
    if not FLAGS[name].value:
      cli.fail(f'--{name} is required ({what})')
  cli.quiet_logging()
  from resa_jax import convert  # pylint: disable=g-import-not-at-top  (JAX)
  given = {name: FLAGS[name].value for name in convert.architecture.FIELDS
           if FLAGS[name].value is not None}
  try:
    metadata = convert.convert_file(FLAGS.checkpoint, FLAGS.out, given)
  except convert.ConversionError as e:
    cli.fail(e)
  model = ', '.join(f'{k}={metadata[k]}' for k in convert.architecture.FIELDS if k in metadata)
  print(f'wrote {os.path.abspath(FLAGS.out)} ({model}; {", ".join(metadata["parts"])})')


if __name__ == '__main__':
  define_flags()
  cli.run(main)
