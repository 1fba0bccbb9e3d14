"""Flax modules: ResNet encoders, projector, predictor, and `create_networks`."""

from __future__ import annotations

import jax.numpy as jnp

from resa_jax.models.heads import Predictor, Projector, SSLNetwork
from resa_jax.models.layers import BatchNorm
from resa_jax.models.resnet import ARCHITECTURES, ResNet, create_resnet

__all__ = ['ARCHITECTURES', 'BatchNorm', 'Predictor', 'Projector', 'ResNet', 'SSLNetwork',
           'create_networks', 'create_resnet']


def create_networks(config):
  """(online, momentum) SSLNetworks from a config (arch, stem, widths, dtype, heads)."""
  dtype = jnp.dtype(config.dtype)
  encoder = create_resnet(config.arch, width_per_group=config.width_per_group,
                          stem=config.stem, zero_init_residual=config.zero_init_residual,
                          dtype=dtype)
  kwargs = dict(encoder=encoder, mlp_layers=config.mlp_layers, mlp_dim=config.mlp_dim,
                emb_dim=config.emb_dim, dtype=dtype)
  return (SSLNetwork(use_predictor=config.predictor, **kwargs),
          SSLNetwork(use_predictor=False, **kwargs))
