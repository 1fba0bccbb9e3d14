"""Projector, predictor, and the network that composes them with the encoder.

Projector G: [Linear(mlp_dim)-BN-ReLU] x (mlp_layers - 1), Linear(emb), BN without
scale and bias.  Predictor P: Linear(mlp_dim)-BN-ReLU-Linear(emb).  As the authors'
`get_projector` / `get_predictor`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from resa_jax.models.layers import BatchNorm, dense

Dtype = Any


class Projector(nn.Module):
  mlp_layers: int = 3
  mlp_dim: int = 2048
  emb_dim: int = 512
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    for i in range(self.mlp_layers - 1):
      x = dense(self.mlp_dim, x.shape[-1], self.dtype, f'linear{i}')(x)
      x = BatchNorm(use_running_average=not train, dtype=self.dtype, name=f'bn{i}')(x)
      x = nn.relu(x)
    last = self.mlp_layers - 1
    x = dense(self.emb_dim, x.shape[-1], self.dtype, f'linear{last}')(x)
    return BatchNorm(use_running_average=not train, use_scale=False, use_bias=False,
                     dtype=self.dtype, name=f'bn{last}')(x)


class Predictor(nn.Module):
  mlp_dim: int = 2048
  emb_dim: int = 512
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = dense(self.mlp_dim, x.shape[-1], self.dtype, 'linear0')(x)
    x = nn.relu(BatchNorm(use_running_average=not train, dtype=self.dtype, name='bn0')(x))
    return dense(self.emb_dim, x.shape[-1], self.dtype, 'linear1')(x)


class SSLNetwork(nn.Module):
  """Encoder -> projector (-> predictor): images to (encoding h, embedding z).

  Parameters live under 'encoder', 'projector' and, when `use_predictor` is set,
  'predictor'.  The momentum network is the same class without predictor, so its
  parameters are exactly the online 'encoder' and 'projector' subtrees.
  Outputs are not normalised; h is in the compute dtype, z too.
  """
  encoder: nn.Module
  mlp_layers: int = 3
  mlp_dim: int = 2048
  emb_dim: int = 512
  use_predictor: bool = False
  dtype: Dtype = jnp.float32

  def setup(self):
    self.projector = Projector(self.mlp_layers, self.mlp_dim, self.emb_dim, self.dtype)
    if self.use_predictor:
      self.predictor = Predictor(self.mlp_dim, self.emb_dim, self.dtype)

  def __call__(self, x, train: bool = True):
    h = self.encoder(x, train=train)
    z = self.projector(h, train=train)
    if self.use_predictor:
      z = self.predictor(z, train=train)
    return h, z

  def encode(self, x, train: bool = False):
    return self.encoder(x, train=train)
