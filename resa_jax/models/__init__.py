"""Flax modules: ResNet and ViT encoders, projector, predictor, and `create_networks`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from resa_jax.models import vit
from resa_jax.models.heads import (Predictor, Projector, SSLNetwork, ViTPredictor,
                                   ViTProjector)
from resa_jax.models.layers import BatchNorm
from resa_jax.models.resnet import ARCHITECTURES as RESNETS
from resa_jax.models.resnet import ResNet, create_resnet
from resa_jax.models.vit import VisionTransformer, create_vit

ARCHITECTURES = {**RESNETS, **vit.ARCHITECTURES}

__all__ = ['ARCHITECTURES', 'BatchNorm', 'Predictor', 'Projector', 'ResNet', 'SSLNetwork',
           'VisionTransformer', 'create_encoder', 'create_networks', 'create_resnet',
           'ViTPredictor', 'ViTProjector', 'create_vit', 'is_vit', 'parameter_labels']


def is_vit(arch: str) -> bool:
  """Whether `arch` is one of the ViT encoders (their `args.is_vit`)."""
  return arch in vit.ARCHITECTURES


def parameter_labels(params):
  """'frozen' or 'trainable' for each leaf of a params tree (any architecture): the
  ViT's fixed position table and patch conv are frozen (vit.is_frozen)."""
  def label(path, _):
    names = tuple(str(getattr(p, 'key', p)) for p in path)
    return 'frozen' if vit.is_frozen(names) else 'trainable'
  return jax.tree_util.tree_map_with_path(label, params)


def create_encoder(config, *, drop_path: bool = True):
  """The encoder a config names: a ResNet, or a ViT (`config.drop_path` unless
  `drop_path` is False, as for the momentum encoder)."""
  dtype = jnp.dtype(config.dtype)
  if is_vit(config.arch):
    rate = float(config.get('drop_path', 0.0)) if drop_path else 0.0
    # The position table is stored for the global crop, as their img_size (224).
    img_size = config.get('crops_size', (224,))[0]
    return create_vit(config.arch, drop_path_rate=rate, img_size=img_size,
                      patch_size=config.get('patch_size', vit.PATCH_SIZE), dtype=dtype)
  return create_resnet(config.arch, width_per_group=config.width_per_group,
                       stem=config.stem, zero_init_residual=config.zero_init_residual,
                       dtype=dtype)


def create_networks(config):
  """(online, momentum) SSLNetworks from a config (arch, stem, widths, dtype, heads)."""
  dtype = jnp.dtype(config.dtype)
  kwargs = dict(mlp_layers=config.mlp_layers, mlp_dim=config.mlp_dim, emb_dim=config.emb_dim,
                vit_heads=is_vit(config.arch), dtype=dtype)
  return (SSLNetwork(encoder=create_encoder(config), use_predictor=config.predictor, **kwargs),
          SSLNetwork(encoder=create_encoder(config, drop_path=False), use_predictor=False,
                     **kwargs))
