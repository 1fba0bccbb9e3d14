"""`validate_config`: every check of a config that can run before TensorFlow, data
loading or a device is touched, so a bad config fails in seconds with one line."""

from __future__ import annotations

import math


def validate_config(config) -> None:
  """Raises ValueError with a one-line cause for a config that cannot train or evaluate.

  Model and optimisation fields first (cheap), then the input pipeline's checks
  (`input_pipeline.validate_config`: dataset, crop groups, probabilities, dtype,
  batch over the devices), which import TensorFlow.
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
  conv_stem = models.is_vit(config.arch) and models.vit.ARCHITECTURES[config.arch][3]
  if models.is_vit(config.arch) and config.get('patch_size', 16) != 16 and (
      conv_stem or config.patch_size < 1):
    raise ValueError(f'patch_size {config.patch_size!r}: a positive size for a plain ViT; '
                     f'the ViTC conv stem has patches of 16')
  if not 0 <= config.ema_momentum <= 1:
    raise ValueError(f'ema_momentum must be in [0, 1], got {config.ema_momentum!r}')
  from resa_jax import input_pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow)
  input_pipeline.validate_config(config)
