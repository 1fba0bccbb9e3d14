"""`validate_config`: every check of a config that can run before data loading or a
device is touched, so a bad config fails in seconds with one line.  The one place a
config is checked; the data's own refusals (missing files, too few examples) come when
it is opened."""

from __future__ import annotations

import math


def validate_config(config) -> None:
  """Raises ValueError with a one-line cause for a config that cannot train or evaluate.

  Model and optimisation fields first, then the input's (dataset, crop groups,
  probabilities, dtype, where views are made, the batch over the devices).
  """
  from resa_jax import models  # pylint: disable=g-import-not-at-top
  if config.arch not in models.ARCHITECTURES:
    raise ValueError(f'unknown architecture {config.arch!r}; expected one of '
                     f'{", ".join(sorted(models.ARCHITECTURES))}')
  if config.stem not in ('imagenet', 'cifar'):
    raise ValueError(f"unknown stem {config.stem!r}; expected 'imagenet' or 'cifar'")
  if config.optimizer not in ('sgd', 'adamw'):
    raise ValueError(f"unknown optimizer {config.optimizer!r}; expected 'sgd' or 'adamw'")
  positive = ('batch_size', 'width_per_group', 'mlp_layers', 'mlp_dim', 'emb_dim', 'base_lr',
              'temperature', 'sinkhorn_epsilon', 'sinkhorn_iters', 'num_epochs',
              'log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints', 'knn_k',
              'knn_temperature')
  for name in positive:
    if not 0 < config[name] < math.inf:  # also rejects NaN
      raise ValueError(f'{name} must be positive and finite, got {config[name]!r}')
  for name in ('weight_decay', 'warmup_epochs', 'final_lr_ratio'):
    if not 0 <= config[name] < math.inf:
      raise ValueError(f'{name} must be >= 0 and finite, got {config[name]!r}')
  for name in ('run_steps', 'num_train_steps', 'steps_per_epoch', 'knn_max_train_examples'):
    if config[name] != -1 and not config[name] > 0:  # -1: the documented "unset"
      raise ValueError(f'{name} must be positive, or -1 (unset), got {config[name]!r}')
  if not 0 <= config.get('drop_path', 0.0) < 1:
    raise ValueError(f'drop_path must be in [0, 1), got {config.drop_path!r}')
  if config.get('drop_path', 0.0) > 0 and not models.is_vit(config.arch):
    raise ValueError(f'drop_path is for ViT encoders; --config.arch is {config.arch}')
  conv_stem = models.is_vit(config.arch) and models.vit.ARCHITECTURES[config.arch].conv_stem
  if models.is_vit(config.arch) and config.get('patch_size', 16) != 16 and (
      conv_stem or config.patch_size < 1):
    raise ValueError(f'patch_size {config.patch_size!r}: a positive size for a plain ViT; '
                     f'the ViTC conv stem has patches of 16')
  if not 0 <= config.ema_momentum <= 1:
    raise ValueError(f'ema_momentum must be in [0, 1], got {config.ema_momentum!r}')
  _validate_input(config)


# Compute dtypes.  float64: for checking numerics (runs compared across meshes or
# processes), under JAX x64 (JAX_ENABLE_X64=1); never for speed.
DTYPES = ('float32', 'bfloat16', 'float16', 'float64')


def _validate_input(config) -> None:
  """The fields of the input: dataset, crop groups, probabilities, dtype, placement."""
  import jax  # pylint: disable=g-import-not-at-top
  from resa_jax import data  # pylint: disable=g-import-not-at-top
  from resa_jax import sharding  # pylint: disable=g-import-not-at-top
  if config.dataset not in data.DATASETS:
    raise ValueError(f'unknown dataset {config.dataset!r}; known: {", ".join(data.DATASETS)}')
  groups = {name: tuple(config[name]) for name in (
      'crops_nmb', 'crops_size', 'crops_min_scale', 'crops_max_scale',
      'gaussian_prob', 'solarization_prob')}
  lengths = {name: len(value) for name, value in groups.items()}
  if len(set(lengths.values())) != 1:
    raise ValueError(f'crop-group lists must have equal lengths, got {lengths}')
  if not groups['crops_nmb'] or min(groups['crops_nmb']) < 0 or groups['crops_nmb'][0] < 1:
    raise ValueError('crops_nmb counts the strong views of each crop group (the weak view '
                     'comes on top, as the authors\' --crops_nmb); the first group needs at '
                     f'least one strong view, got {groups["crops_nmb"]}')
  if min(groups['crops_size']) < 1:
    raise ValueError(f'crops_size must be positive, got {groups["crops_size"]}')
  for lo, hi in zip(groups['crops_min_scale'], groups['crops_max_scale']):
    if not 0 < lo <= hi <= 1:
      raise ValueError('need 0 < crops_min_scale <= crops_max_scale <= 1, got '
                       f'{groups["crops_min_scale"]} and {groups["crops_max_scale"]}')
  probs = {'color_jitter_prob': config.color_jitter_prob,
           'grayscale_prob': config.grayscale_prob, 'flip_prob': config.flip_prob}
  probs.update({f'gaussian_prob[{i}]': p for i, p in enumerate(groups['gaussian_prob'])})
  probs.update({f'solarization_prob[{i}]': p
                for i, p in enumerate(groups['solarization_prob'])})
  for name, p in probs.items():
    if not 0 <= p <= 1:
      raise ValueError(f'{name} must be a probability, got {p}')
  if config.eval_resize < groups['crops_size'][0]:
    raise ValueError(f'eval_resize ({config.eval_resize}) must be >= crops_size[0] '
                     f'({groups["crops_size"][0]}): evaluation centre-crops the resized image')
  if config.dtype not in DTYPES:
    raise ValueError(f'dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}')
  if config.dtype == 'float64' and not jax.config.jax_enable_x64:
    raise ValueError('dtype float64 needs JAX x64: set JAX_ENABLE_X64=1 (float64 is for '
                     'checking numerics, not for training)')
  augment_on = config.get('augment_on', 'auto')
  if augment_on not in data.AUGMENT_ON:
    raise ValueError(f"augment_on must be one of {', '.join(data.AUGMENT_ON)}, got "
                     f"{augment_on!r}")
  for name in ('host_memory_budget_mb', 'device_memory_budget_mb'):
    if not 0 <= config[name] < math.inf:
      raise ValueError(f'{name} must be >= 0 and finite (0: never hold a split in memory), '
                       f'got {config[name]!r}')
  sharding.check_batch_size(config.batch_size, jax.device_count())
  data.order.num_input_shards(config, jax.process_count())
