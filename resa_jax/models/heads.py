"""Projector, predictor, and the network that composes them with the encoder.

Projector G: [Linear(mlp_dim)-BN-ReLU] x (mlp_layers - 1), Linear(emb), BN without
scale and bias.  Predictor P: Linear(mlp_dim)-BN-ReLU-Linear(emb).  As the authors'
`get_projector` / `get_predictor`.

For a ViT encoder (their `args.is_vit`, winci-ai/resa `src/model.py`) the heads have no
BatchNorm: G = [Linear(mlp_dim)-GELU] x (mlp_layers - 1), Linear(emb); P =
LayerNorm(emb, eps 1e-6)-Linear(mlp_dim)-GELU-Linear(emb); exact erf GELU, Linear
weights xavier-uniform with zero bias (their `_init_weights`).  Their modules are
nn.Sequential, so the Flax names seq_<i> are the Sequential indices.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from resa_jax.models.layers import BatchNorm, dense, param_dtype

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


def _xavier_dense(features: int, dtype: Dtype, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype(dtype),
                  kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.zeros,
                  name=name)


class ViTProjector(nn.Module):
  """(B, D) -> (B, emb): Linear-GELU x (mlp_layers - 1), Linear; Sequential indices 0, 2, ..."""
  mlp_layers: int = 3
  mlp_dim: int = 2048
  emb_dim: int = 512
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    for i in range(self.mlp_layers - 1):
      x = nn.gelu(_xavier_dense(self.mlp_dim, self.dtype, f'seq_{2 * i}')(x), approximate=False)
    return _xavier_dense(self.emb_dim, self.dtype, f'seq_{2 * (self.mlp_layers - 1)}')(x)


class ViTPredictor(nn.Module):
  """(B, emb) -> (B, emb): LayerNorm (seq_0), Linear (seq_1), GELU, Linear (seq_3)."""
  mlp_dim: int = 2048
  emb_dim: int = 512
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    x = nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=self.dtype,
                     param_dtype=param_dtype(self.dtype), name='seq_0')(x)
    x = nn.gelu(_xavier_dense(self.mlp_dim, self.dtype, 'seq_1')(x), approximate=False)
    return _xavier_dense(self.emb_dim, self.dtype, 'seq_3')(x)


class SSLNetwork(nn.Module):
  """Encoder -> projector (-> predictor): images to (encoding h, embedding z).

  Parameters live under 'encoder', 'projector' and, when `use_predictor` is set,
  'predictor'.  The momentum network is the same class without predictor, so its
  parameters are exactly the online 'encoder' and 'projector' subtrees.
  Outputs are not normalised; h is in the compute dtype, z too.  `vit_heads` selects
  the authors' ViT heads (module docstring).
  """
  encoder: nn.Module
  mlp_layers: int = 3
  mlp_dim: int = 2048
  emb_dim: int = 512
  use_predictor: bool = False
  vit_heads: bool = False
  dtype: Dtype = jnp.float32

  def setup(self):
    if self.vit_heads:
      projector, predictor = ViTProjector, ViTPredictor
    else:
      projector, predictor = Projector, Predictor
    self.projector = projector(self.mlp_layers, self.mlp_dim, self.emb_dim, self.dtype)
    if self.use_predictor:
      self.predictor = predictor(self.mlp_dim, self.emb_dim, self.dtype)

  def __call__(self, x, train: bool = True):
    h = self.encoder(x, train=train)
    z = self.projector(h, train=train)
    if self.use_predictor:
      z = self.predictor(z, train=train)
    return h, z

  def encode(self, x, train: bool = False):
    return self.encoder(x, train=train)
