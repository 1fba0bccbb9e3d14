"""The model under evaluation: a training workdir's or a converted checkpoint's encoder
(and projector), restored onto the mesh, with its feature function.

`load_model(config, checkpoint, mesh)` reads either kind; its shape checks are
`checkpoints.first_shape_difference`, so a checkpoint of another architecture is an
`EvaluationError` that names the first array that differs.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from resa_jax import checkpoints
from resa_jax import reporting
from resa_jax import sharding
from resa_jax import step
from resa_jax import workdir as workdir_lib
from resa_jax.evaluate import common
from resa_jax.evaluate import features

# Config fields that fix the shapes of the encoder and the projector.
MODEL_FIELDS = ('arch', 'width_per_group', 'stem', 'patch_size', 'mlp_layers', 'mlp_dim',
                'emb_dim')
_EVAL_PARTS = ('encoder', 'projector')  # what evaluation uses of a network
_PREFIXES = {'momentum': 'momentum_', 'online': ''}  # TrainState field prefixes


def check_encoder(encoder: str) -> None:
  """EvaluationError unless `encoder` is 'momentum' or 'online' (the one check, used
  by `load_model` and by `run.Options.check` before any work)."""
  if encoder not in _PREFIXES:
    raise common.EvaluationError(f"--encoder must be 'momentum' or 'online', got {encoder!r}")


@dataclasses.dataclass
class Model:
  """An encoder (and projector) ready for evaluation.

  net: an SSLNetwork without predictor (the momentum network's class, whichever
  encoder was chosen), so `net.apply(variables, x)` gives (encoding, embedding)
  and `method='encode'` the encoding.  variables: {'params', 'batch_stats'},
  each with 'encoder' and, when the checkpoint has one, 'projector'; replicated
  over the mesh.  source: what was loaded, for the result files.
  """
  net: Any
  variables: Any
  source: dict

  @property
  def has_projector(self) -> bool:
    return 'projector' in self.variables['params']

  def feature_fn(self, mesh: Mesh, *, layers: bool = False):
    """images (B, H, W, C) -> {name: (B, d)}: `features.make_feature_fn` on this model."""
    features_fn = features.make_feature_fn(self.net, mesh, layers=layers)
    return lambda images: features_fn(self.variables, images)


def _model_summary(config) -> str:
  return ', '.join(f'{k}={config[k]}' for k in MODEL_FIELDS)


def _trained_field(workdir: pathlib.Path, name: str):
  """A field of the config the workdir was trained with, None if it has none."""
  trained = workdir_lib.trained_config(workdir)
  return trained.get(name) if isinstance(trained, dict) else None


def _trained_config_note(workdir: pathlib.Path, config) -> str:
  """'; its config.json has width_per_group=8' when the training config differs."""
  path = workdir / 'config.json'
  try:
    trained = json.loads(path.read_text())
  except (OSError, ValueError):
    return ''
  differences = [f'{k}={trained[k]}' for k in MODEL_FIELDS + ('predictor',)
                 if k in trained and trained[k] != config[k]]
  return f'; its config.json has {", ".join(differences)}' if differences else ''


def restore_train_state(config, checkpoint_dir, mesh: Mesh, image_channels: int):
  """(TrainState, step): the newest readable checkpoint of a training run.

  `checkpoint_dir` is `<workdir>/checkpoints`.  The template comes from
  step.create_train_state with `config`; before restoring, the stored shapes of
  the newest step are compared with it, so a checkpoint of another architecture
  is an EvaluationError that names the first parameter that differs.
  """
  checkpoint_dir = pathlib.Path(checkpoint_dir).absolute()
  steps = checkpoints.checkpoint_steps(checkpoint_dir)
  if not steps:
    raise common.EvaluationError(f'no checkpoint in {checkpoint_dir}')
  try:
    abstract = step.abstract_train_state(config, image_channels)
  except Exception as e:  # pylint: disable=broad-except  (e.g. a zero-width layer)
    raise common.EvaluationError(f'cannot build the model of --config ({_model_summary(config)}): '
                          f'{type(e).__name__}: {reporting.first_line(e)}') from e
  stored = checkpoints.stored_shapes(checkpoint_dir / str(steps[-1]))
  if stored is not None:
    where = f'the checkpoint in {checkpoint_dir} (step {steps[-1]})'
    roots = ('params', 'batch_stats', 'momentum_params', 'momentum_batch_stats')
    is_model = lambda name: name.split('/', 1)[0] in roots
    expected = checkpoints.leaf_shapes(abstract)
    model_part = lambda shapes, want: {k: v for k, v in shapes.items() if is_model(k) == want}
    mismatch = checkpoints.first_shape_difference(model_part(stored, True), model_part(expected, True))
    if mismatch:
      raise common.EvaluationError(
          f'{where} is of another architecture than --config ({_model_summary(config)}): '
          f'{mismatch}' + _trained_config_note(checkpoint_dir.parent, config))
    mismatch = checkpoints.first_shape_difference(model_part(stored, False),
                                            model_part(expected, False))
    if mismatch:
      raise common.EvaluationError(
          f'{where} has an optimizer state that --config (optimizer={config.optimizer}, '
          f'grad_clip={config.get("grad_clip")}) does not make: {mismatch}')
  replicated = sharding.replicated_sharding(mesh)
  template = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), abstract)
  manager = checkpoints.Checkpoints(checkpoint_dir, int(config.keep_checkpoints))
  try:
    state, restored_step = manager.restore_latest(template)
  finally:
    manager.close()
  if restored_step is None:
    raise common.EvaluationError(
        f'no readable checkpoint in {checkpoint_dir} (steps {steps}); does --config '
        'match the training run (optimizer, architecture)?')
  return state, int(restored_step)


def _select_parts(params, batch_stats) -> dict:
  return {'params': {k: params[k] for k in _EVAL_PARTS if k in params},
          'batch_stats': {k: batch_stats[k] for k in _EVAL_PARTS if k in batch_stats}}


def _load_converted(config, path: pathlib.Path, net, mesh: Mesh, encoder: str,
                    image_channels: int):
  """(variables, source) of a folder written by `python -m resa_jax.convert`."""
  from resa_jax import convert  # pylint: disable=g-import-not-at-top
  try:
    converted, metadata = convert.load_converted(path)
  except Exception as e:  # pylint: disable=broad-except
    raise common.EvaluationError(f'cannot read the converted checkpoint {path}: '
                                 f'{type(e).__name__}: {reporting.first_line(e)}') from e
  differences = [f'{k}={metadata[k]} (--config: {config[k]})' for k in MODEL_FIELDS
                 if k in metadata and metadata[k] != config[k]]
  if differences:
    raise common.EvaluationError(f'{path} was converted for another architecture than '
                                 f'--config: {", ".join(differences)}')
  prefix, used = _PREFIXES[encoder], encoder
  if prefix + 'params' not in converted:
    prefix, used = '', f'online (the checkpoint has no {encoder} network)'
  selected = _select_parts(converted.get(prefix + 'params', {}),
                           converted.get(prefix + 'batch_stats', {}))
  if 'encoder' not in selected['params']:
    raise common.EvaluationError(f'{path} holds no encoder weights')
  size = int(config.crops_size[0])
  expected = jax.eval_shape(lambda: net.init(
      jax.random.key(0), jnp.zeros((2, size, size, image_channels)), train=False))
  expected = _select_parts(expected['params'], expected.get('batch_stats', {}))
  parts = set(selected['params'])
  expected = {c: {k: v for k, v in t.items() if k in parts} for c, t in expected.items()}
  mismatch = checkpoints.first_shape_difference(checkpoints.leaf_shapes(selected),
                                                checkpoints.leaf_shapes(expected))
  if mismatch:
    raise common.EvaluationError(f'the checkpoint in {path} is of another architecture than '
                                 f'--config ({_model_summary(config)}): {mismatch}')
  variables = jax.tree.map(lambda x: sharding.place(np.asarray(x), mesh), selected)
  return variables, {'kind': 'converted', 'path': str(path), 'step': None, 'encoder': used,
                     'origin': metadata.get('source'),
                     'train_batch_size': metadata.get('train_batch_size')}


def load_model(config, checkpoint, mesh: Mesh, *, encoder: str = 'momentum',
               image_channels: int = 3) -> Model:
  """The encoder (and projector) of a checkpoint, for evaluation.

  Args:
    config: the model fields (arch, width_per_group, stem, mlp_layers, mlp_dim,
      emb_dim, dtype) say what the checkpoint must hold.
    checkpoint: a training workdir (its newest readable TrainState in
      `checkpoints/`), the `checkpoints/` folder itself, or a folder written by
      `python -m resa_jax.convert` (the authors' weights).
    mesh: the variables are replicated over it.
    encoder: 'momentum' (features are the momentum encoder's: docs/method.md,
      'Evaluation protocols') or 'online'.  A converted checkpoint without a
      momentum network falls back to its online encoder (said in
      `source['encoder']`).
    image_channels: input channels of the encoder's first convolution.

  Raises:
    EvaluationError: missing checkpoint, or one of another architecture.
  """
  from resa_jax import convert, models  # pylint: disable=g-import-not-at-top
  check_encoder(encoder)
  path = pathlib.Path(checkpoint).absolute()
  if not path.exists():
    raise common.EvaluationError(f'checkpoint {path} does not exist')
  _, net = models.create_networks(config)  # no predictor: encoder + projector
  if (path / convert.METADATA_FILE).is_file():
    variables, source = _load_converted(config, path, net, mesh, encoder, image_channels)
    return Model(net=net, variables=variables, source=source)
  checkpoint_dir = path / 'checkpoints' if (path / 'checkpoints').is_dir() else path
  if not checkpoints.checkpoint_steps(checkpoint_dir):
    raise common.EvaluationError(
        f'{path} is neither a training workdir with checkpoints nor a converted '
        f'checkpoint (no checkpoints/ and no {convert.METADATA_FILE})')
  state, restored_step = restore_train_state(config, checkpoint_dir, mesh, image_channels)
  prefix = _PREFIXES[encoder]
  variables = _select_parts(getattr(state, prefix + 'params'),
                            getattr(state, prefix + 'batch_stats'))
  return Model(net=net, variables=variables,
               source={'kind': 'workdir', 'path': str(path), 'step': restored_step,
                       'encoder': encoder,
                       'train_batch_size': _trained_field(checkpoint_dir.parent, 'batch_size')})
