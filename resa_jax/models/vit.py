"""Vision Transformers (NHWC in, (B, D) out), laid out as the authors' PyTorch ViT.

The authors' `src/vision_transformer.py` (winci-ai/resa, commit 9e996b9; DINO / MoCo v3
style, "mostly copy-paste from timm"):

* tokens: a patch embedding gives (B, h0 * w0, D), patches row-major
  (`flatten(2).transpose(1, 2)`); x = concat([cls_token, patches]) + pos, (B, 1 + h0 w0, D).
  - ViT: one Conv(16x16, stride 16, bias).
  - ViTC (MoCo v3's conv stem): 4 x [Conv3x3/2 pad 1 no bias, BatchNorm (eps 1e-5), ReLU]
    with D/8, D/4, D/2, D channels, then Conv1x1 with bias; one block fewer (depth 11).
* blocks, pre-norm: x = x + attn(norm1(x)); x = x + mlp(norm2(x)), with
  attn(x) = proj(concat_h softmax(q_h k_h^T / sqrt(d_h)) v_h), [q | k | v] = qkv(x), and
  mlp(x) = fc2(GELU(fc1(x))) (exact erf GELU, hidden 4 D).  Every LayerNorm has eps 1e-6
  and the biased variance.
* output: norm(x)[:, 0], the class token after the final LayerNorm (no pooling, no head).

Position embedding: a fixed MAE-style 2-D sin-cos table (`sincos_pos_embed`), which they
store as a parameter with requires_grad=False.  It lives in 'params' here (so converted
checkpoints use the stored table as stored) and the forward stops its gradient.  At a
resolution other than the table's, `interpolate_pos_embed` resizes it as their
`interpolate_pos_encoding` does.

Initialisation as theirs: Linear layers xavier-uniform with zero bias, except qkv, drawn
U(-b, b) with b = sqrt(6 / (D + D)) as if q, k and v were separate (D, D) matrices; the
ViT patch conv xavier-uniform over fan_in = 3 * 16 * 16, fan_out = D, zero bias; the
class token N(0, 1e-6^2); the ViTC stem convs PyTorch's default init; LayerNorm 1 / 0.
Parameter names mirror the PyTorch state dict (blocks_3/attn/qkv, patch_embed/proj_4)
so that resa_jax/convert is a renaming.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from resa_jax.models.layers import (BatchNorm, conv_general_dilated, param_dtype,
                                    torch_default_kernel_init)

Dtype = Any
PATCH_SIZE = 16
LN_EPS = 1e-6  # their norm_layer=partial(nn.LayerNorm, eps=1e-6)


# ------------------------------------------------------- position table ----

def sincos_pos_embed(dim: int, grid: int) -> np.ndarray:
  """Their fixed 2-D sin-cos table, (1 + grid^2, dim) float32, computed in float64.

  Row 0 (class token) is zeros; row 1 + r * grid + c is [E(c), E(r)]: the first dim/2
  values encode the column c (their meshgrid puts w first).  E(p) = [sin(p w_k),
  cos(p w_k)] with w_k = 10000^(-k / (dim / 4)), k = 0 .. dim/4 - 1.
  """
  if dim % 4:
    raise ValueError(f'sin-cos position embedding needs dim divisible by 4, got {dim}')
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
  pos = np.arange(grid, dtype=np.float64)
  col, row = np.meshgrid(pos, pos)  # (grid, grid): col[r, c] = c, row[r, c] = r

  def embed(p):
    out = np.einsum('m,d->md', p.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  table = np.concatenate([embed(col), embed(row)], axis=1)
  return np.concatenate([np.zeros((1, dim)), table], axis=0).astype(np.float32)


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """PyTorch's bicubic taps at offsets -1, 0, 1, 2 for fractional positions t, (n, 4)."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)


def bicubic_matrix(n_out: int, n_in: int, scale_factor: float) -> np.ndarray:
  """(n_out, n_in) matrix of `F.interpolate(mode='bicubic', align_corners=False,
  scale_factor=s)` along one axis.

  Given a scale factor, PyTorch samples at src_i = (i + 0.5) / s - 0.5 (not at
  n_in / n_out), taps floor(src_i) - 1 .. floor(src_i) + 2 clamped into [0, n_in - 1],
  cubic kernel A = -0.75, no antialiasing.  jax.image's 'cubic' is Keys' A = -0.5 and
  renormalises at the borders instead of clamping, so it cannot reproduce this; the
  matrix is exact and tiny.  Computed in float64.
  """
  src = (np.arange(n_out, dtype=np.float64) + 0.5) / scale_factor - 0.5
  base = np.floor(src)
  weights = _cubic_weights(src - base)
  m = np.zeros((n_out, n_in))
  for tap in range(4):
    idx = np.clip(base.astype(np.int64) - 1 + tap, 0, n_in - 1)
    np.add.at(m, (np.arange(n_out), idx), weights[:, tap])
  return m


def interpolate_pos_embed(pos_embed: jax.Array, h0: int, w0: int) -> jax.Array:
  """Their `interpolate_pos_encoding`: (1, 1 + n^2, D) -> (1, 1 + h0 w0, D).

  Unchanged when h0 * w0 == n^2 and h0 == w0.  Otherwise the n x n patch part is
  resized bicubically with scale factors ((h0 + 0.1) / n, (w0 + 0.1) / n) -- their
  "small number to avoid floating point error" (facebookresearch/dino GitHub issue 8)
  -- so the output is h0 x w0 but sampled at n / (h0 + 0.1), not n / h0; the class
  row is kept.
  """
  n = int(round(math.sqrt(pos_embed.shape[1] - 1)))
  if h0 * w0 == n * n and h0 == w0:
    return pos_embed
  dim = pos_embed.shape[-1]
  grid = pos_embed[0, 1:].reshape(n, n, dim)
  rows = jnp.asarray(bicubic_matrix(h0, n, (h0 + 0.1) / n), pos_embed.dtype)
  cols = jnp.asarray(bicubic_matrix(w0, n, (w0 + 0.1) / n), pos_embed.dtype)
  grid = jnp.einsum('ir,jc,rcd->ijd', rows, cols, grid, precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate([pos_embed[:, :1], grid.reshape(1, h0 * w0, dim)], axis=1)


# --------------------------------------------------------------- layers ----

def _linear(features: int, dtype: Dtype, name: str, kernel_init=nn.initializers.xavier_uniform()):
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype(dtype), kernel_init=kernel_init,
                  bias_init=nn.initializers.zeros, name=name)


def _layer_norm(dtype: Dtype, name: str):
  return nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, dtype=dtype,
                      param_dtype=param_dtype(dtype), name=name)


def _qkv_init(key, shape, dtype=jnp.float32):
  """Their qkv init: U(-b, b), b = sqrt(6 / (D + 3D / 3)) (q, k, v as separate matrices)."""
  fan_in, fan_out = shape
  bound = math.sqrt(6.0 / (fan_out // 3 + fan_in))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class Attention(nn.Module):
  """Multi-head self-attention, (B, N, D) -> (B, N, D), through dot_product_attention."""
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    qkv = _linear(3 * d, self.dtype, 'qkv', kernel_init=_qkv_init)(x)
    # Their reshape(B, N, 3, heads, d_h): output features are [q | k | v], heads inside.
    q, k, v = jnp.moveaxis(qkv.reshape(b, n, 3, self.num_heads, d // self.num_heads), 2, 0)
    y = jax.nn.dot_product_attention(q, k, v)  # scale 1/sqrt(d_h), their qk_scale=None
    return _linear(d, self.dtype, 'proj')(y.reshape(b, n, d))


class Mlp(nn.Module):
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.gelu(_linear(self.hidden, self.dtype, 'fc1')(x), approximate=False)  # nn.GELU()
    return _linear(x.shape[-1], self.dtype, 'fc2')(y)


def drop_path(x, rate: float, rng, deterministic: bool):
  """Stochastic depth per sample: x * Bernoulli(1 - rate) / (1 - rate); identity at eval."""
  if deterministic or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class Block(nn.Module):
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    # Their DropPath is nn.Identity at rate 0; drawing needs a 'drop_path' rng otherwise.
    deterministic = not train or self.drop_path_rate == 0.0
    rng = None if deterministic else self.make_rng('drop_path')
    y = Attention(self.num_heads, self.dtype, name='attn')(_layer_norm(self.dtype, 'norm1')(x))
    x = x + drop_path(y, self.drop_path_rate, rng, deterministic)
    if rng is not None:
      rng = jax.random.fold_in(rng, 1)
    hidden = int(x.shape[-1] * self.mlp_ratio)
    y = Mlp(hidden, self.dtype, name='mlp')(_layer_norm(self.dtype, 'norm2')(x))
    return x + drop_path(y, self.drop_path_rate, rng, deterministic)


def _patch_conv_init(key, shape, dtype=jnp.float32):
  """Their patch conv: xavier-uniform over fan_in = 3 * p * p, fan_out = D (HWIO kernel)."""
  kh, kw, cin, cout = shape
  bound = math.sqrt(6.0 / (cin * kh * kw + cout))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class PatchEmbed(nn.Module):
  """(B, H, W, C) -> (B, H/p, W/p, D): one p x p stride-p convolution with bias (p 16)."""
  embed_dim: int
  patch_size: int = PATCH_SIZE
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    p = self.patch_size
    return nn.Conv(self.embed_dim, (p, p), strides=p, padding='VALID',
                   dtype=self.dtype, param_dtype=param_dtype(self.dtype),
                   kernel_init=_patch_conv_init, bias_init=nn.initializers.zeros, name='proj')(x)


class ConvStem(nn.Module):
  """MoCo v3's conv stem, (B, H, W, 3) -> (B, H/16, W/16, D).

  Their `patch_embed.proj` nn.Sequential: indices 0/3/6/9 conv, 1/4/7/10 BatchNorm, ReLUs
  at 2/5/8/11, the 1x1 conv at 12; the names proj_<index> keep those indices.
  """
  embed_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    if self.embed_dim % 8:
      raise ValueError(f'the conv stem needs embed_dim divisible by 8, got {self.embed_dim}')
    pdt = param_dtype(self.dtype)
    for stage in range(4):
      x = nn.Conv(self.embed_dim // 8 * 2 ** stage, (3, 3), strides=2, padding=((1, 1), (1, 1)),
                  use_bias=False, dtype=self.dtype, param_dtype=pdt,
                  kernel_init=torch_default_kernel_init,
                  conv_general_dilated=conv_general_dilated, name=f'proj_{3 * stage}')(x)
      x = BatchNorm(use_running_average=not train, dtype=self.dtype,
                    name=f'proj_{3 * stage + 1}')(x)
      x = nn.relu(x)
    fan_in = x.shape[-1]
    bound = 1.0 / math.sqrt(fan_in)  # PyTorch's default Conv2d bias init
    return nn.Conv(self.embed_dim, (1, 1), dtype=self.dtype, param_dtype=pdt,
                   kernel_init=torch_default_kernel_init,
                   bias_init=lambda k, s, d=jnp.float32: jax.random.uniform(k, s, d, -bound, bound),
                   name='proj_12')(x)


# ---------------------------------------------------------------- model ----

class VisionTransformer(nn.Module):
  """ViT trunk: images (B, H, W, 3) -> class token after the final norm, (B, D).

  `img_size` fixes the stored position table (img_size / patch_size patches a side); other
  resolutions interpolate it (module docstring).  `patch_size` is theirs, 16, unless set
  for small images (a plain ViT only: the conv stem always reduces by 16).  `drop_path_rate` is spread linearly
  over the blocks from 0, as their `torch.linspace(0, rate, depth)`.
  """
  embed_dim: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  conv_stem: bool = False
  drop_path_rate: float = 0.0
  img_size: int = 224
  patch_size: int = PATCH_SIZE
  dtype: Dtype = jnp.float32

  @property
  def num_features(self) -> int:
    return self.embed_dim

  def setup(self):
    if self.conv_stem:
      if self.patch_size != PATCH_SIZE:
        raise ValueError(f'the conv stem has patches of {PATCH_SIZE}, got patch_size '
                         f'{self.patch_size}')
      self.patch_embed = ConvStem(self.embed_dim, self.dtype)
    else:
      self.patch_embed = PatchEmbed(self.embed_dim, self.patch_size, self.dtype)
    pdt = param_dtype(self.dtype)
    grid = self.img_size // self.patch_size
    self.cls_token = self.param('cls_token', nn.initializers.normal(1e-6), (1, 1, self.embed_dim),
                                pdt)
    self.pos_embed = self.param(
        'pos_embed', lambda _, d=pdt: jnp.asarray(sincos_pos_embed(self.embed_dim, grid), d)[None])
    rates = np.linspace(0.0, self.drop_path_rate, self.depth)
    self.blocks = [Block(self.num_heads, self.mlp_ratio, float(rates[i]), self.dtype,
                         name=f'blocks_{i}') for i in range(self.depth)]
    self.norm = _layer_norm(self.dtype, 'norm')

  def tokens(self, x, train: bool):
    """Their `prepare_tokens`: (B, H, W, 3) -> (B, 1 + h0 w0, D)."""
    x = self.patch_embed(x.astype(self.dtype), train)
    b, h0, w0, d = x.shape
    cls = jnp.broadcast_to(self.cls_token.astype(self.dtype), (b, 1, d))
    # requires_grad=False in theirs: the table is a constant of training.
    pos = interpolate_pos_embed(jax.lax.stop_gradient(self.pos_embed), h0, w0)
    return jnp.concatenate([cls, x.reshape(b, h0 * w0, d)], axis=1) + pos.astype(self.dtype)

  def __call__(self, x, train: bool = True):
    x = self.tokens(x, train)
    for block in self.blocks:
      x = block(x, train)
    return self.norm(x)[:, 0]

  def linear_features(self, x, n_last_blocks: int = 4, avgpool_patchtokens: bool = False):
    """Their `eval_linear.py` probe input (eval mode): the class tokens of the last
    `n_last_blocks` blocks, each through the final norm, concatenated oldest first,
    (B, n D); with `avgpool_patchtokens` the mean patch token of the last block's
    normed output is appended, (B, (n + 1) D)."""
    x = self.tokens(x, False)
    outputs = []
    for i, block in enumerate(self.blocks):
      x = block(x, False)
      if self.depth - i <= n_last_blocks:  # their get_intermediate_layers
        outputs.append(self.norm(x))
    feats = [o[:, 0] for o in outputs]
    if avgpool_patchtokens:
      feats.append(jnp.mean(outputs[-1][:, 1:], axis=1))
    return jnp.concatenate(feats, axis=-1)


def is_frozen(path: tuple[str, ...]) -> bool:
  """Whether a parameter (its names from the network root) is not trained: `pos_embed`
  (their requires_grad=False) and the ViT patch conv `patch_embed/proj` (they freeze it,
  following MoCo v3, for stability; the ViTC stem, proj_<i>, trains)."""
  return path[-1] == 'pos_embed' or tuple(path[-3:-1]) == ('patch_embed', 'proj')


class ViTArchitecture(NamedTuple):
  """One of their vit_* / vitc_* factories (patch 16)."""
  dim: int  # embedding width
  depth: int  # transformer blocks
  heads: int
  conv_stem: bool  # ViTC: a convolutional stem (with BatchNorm) instead of the patch conv


ARCHITECTURES = {
    'vit_tiny': ViTArchitecture(192, 12, 3, False),
    'vit_small': ViTArchitecture(384, 12, 6, False),
    'vit_base': ViTArchitecture(768, 12, 12, False),
    'vit_large': ViTArchitecture(1024, 24, 16, False),
    'vitc_tiny': ViTArchitecture(192, 11, 3, True),
    'vitc_small': ViTArchitecture(384, 11, 6, True),
    'vitc_base': ViTArchitecture(768, 11, 12, True),
    # ours, not the authors': CPU demos on small images
    'vit_mini': ViTArchitecture(128, 6, 4, False),
}


def create_vit(arch: str, *, drop_path_rate: float = 0.0, img_size: int = 224,
               patch_size: int = PATCH_SIZE, dtype: Dtype = jnp.float32) -> VisionTransformer:
  if arch not in ARCHITECTURES:
    raise ValueError(f'unknown ViT {arch!r}; expected one of {sorted(ARCHITECTURES)}')
  dim, depth, heads, conv = ARCHITECTURES[arch]
  return VisionTransformer(embed_dim=dim, depth=depth, num_heads=heads, conv_stem=conv,
                           drop_path_rate=drop_path_rate, img_size=img_size,
                           patch_size=patch_size, dtype=dtype)
