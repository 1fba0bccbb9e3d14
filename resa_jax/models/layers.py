"""Layers shared by the ResNet, the projector and the predictor.

BatchNorm and the initialisers follow PyTorch's conventions, so that the authors'
checkpoints load unchanged and training statistics match theirs:

* BatchNorm normalises with the biased batch variance and updates its running
  variance with the unbiased one (n / (n - 1)), eps 1e-5; `momentum` 0.9 here is
  PyTorch's 0.1.  Statistics are reduced in float32 (float64 for a float64 model:
  `param_dtype`) over every axis but the last.
  Under `jax.jit` on a global batch sharded over devices, the reduction is over the
  global batch: XLA inserts the cross-device all-reduce, which is SyncBN.
* Dense layers use PyTorch's default uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) for
  kernel and bias; convolutions use He-normal with fan_out (torchvision ResNet),
  except the CIFAR stem's conv1, which has PyTorch's default init (resnet.py).
* Convolutions go through `conv_general_dilated` below: XLA's own convolution
  everywhere, except that on the CPU backend the weight gradient is computed as one
  matmul per kernel offset (see its docstring for why and what was measured).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any

conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# PyTorch's default weight init of nn.Linear and nn.Conv2d, kaiming_uniform_(a=sqrt(5)):
# U(-b, b) with b = gain * sqrt(3 / fan_in), gain = sqrt(2 / (1 + a^2)) = sqrt(1 / 3), so
# b = 1 / sqrt(fan_in) (fan_in = in_features, or in_channels * kh * kw).  variance_scaling
# with scale 1/3 draws U(-sqrt(3 * scale / fan_in), +...) with the same fan_in.
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
dense_kernel_init = torch_default_kernel_init


def param_dtype(dtype: Dtype) -> jnp.dtype:
  """The dtype of parameters, BN statistics and BN math for a compute `dtype`.

  float32 for bfloat16 / float16 / float32 models (mixed precision keeps its master
  weights in float32); float64 for a float64 model, which the float64 parity tests
  against the authors' PyTorch run build (under JAX x64).
  """
  return jnp.promote_types(dtype, jnp.float32)


def _dense_bias_init(fan_in: int):
  bound = 1.0 / max(fan_in, 1) ** 0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class BatchNorm(nn.Module):
  """BatchNorm over all axes but the last, PyTorch semantics (module docstring)."""
  use_running_average: bool
  momentum: float = 0.9
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  scale_init: Any = nn.initializers.ones
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    stat_dtype = param_dtype(self.dtype)
    running_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros(features, stat_dtype))
    running_var = self.variable('batch_stats', 'var', lambda: jnp.ones(features, stat_dtype))
    if self.use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      xf = x.astype(stat_dtype)
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(xf, axis=axes)
      var = jnp.mean(jnp.square(xf - mean), axis=axes)  # two-pass: no cancellation
      if not self.is_initializing():
        count = x.size // features
        unbiased = var * (count / max(count - 1, 1))
        running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
        running_var.value = self.momentum * running_var.value + (1 - self.momentum) * unbiased
    scale = jax.lax.rsqrt(var + self.epsilon)
    if self.use_scale:
      scale = scale * self.param('scale', self.scale_init, (features,), stat_dtype)
    y = (x.astype(stat_dtype) - mean) * scale  # float32 (float64) math, fused by XLA
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (features,), stat_dtype)
    return y.astype(self.dtype)


def dense(features: int, fan_in: int, dtype: Dtype, name: str, use_bias: bool = True) -> nn.Dense:
  """nn.Dense with PyTorch's default initialisation (call inside a compact module)."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype(dtype),
                  kernel_init=dense_kernel_init, bias_init=_dense_bias_init(fan_in), name=name)


# ------------------------------------------------------------ convolution ----

def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs):
  """`lax.conv_general_dilated` for `nn.Conv(conv_general_dilated=...)`; same values.

  On the CPU backend XLA lowers the gradient of a convolution with respect to its
  weights to a slow kernel: 1,180-2,170 ms for a 3x3 64->64 convolution on
  64x32x32x64 float32, against 86 ms for the forward and 128 ms for the input
  gradient (experiments/RESULTS.md, "This machine on 2026-12-01").  That gradient is
  a sum over kernel offsets (i, j) of  x_pad[:, i::s, j::s, :]^T @ g  (one (C_in, C_out)
  matmul per offset over all batch and output positions), which XLA's dot runs at
  matmul speed on most CPUs.  So for plain NHWC/HWIO convolutions (no dilation, one
  feature group) under the CPU backend, where `cpu_matmul_weight_gradient()` says so
  (CPUs without AVX-512, or RESA_CPU_CONV_MATMUL=1), this function is a
  `jax.custom_vjp` whose backward is XLA's input gradient plus those matmuls; everywhere
  else, and on GPU/TPU always, it is `lax.conv_general_dilated` itself.  Forward values are identical; gradients agree
  to summation order (tests/test_conv.py: 1e-12 in float64).
  """
  plain = functools.partial(lax.conv_general_dilated, window_strides=window_strides,
                            padding=padding, lhs_dilation=lhs_dilation,
                            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                            feature_group_count=feature_group_count, precision=precision,
                            **kwargs)
  nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ('NHWC', 'HWIO', 'NHWC'))
  simple = (lhs.ndim == 4 and feature_group_count == 1 and not kwargs
            and all(d == 1 for d in (lhs_dilation or (1, 1)) + tuple(rhs_dilation or (1, 1)))
            and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc)
  # Its gradients differ from XLA's by summation order only: 2 processes against 1
  # (tests/test_multihost.py) agree to 5e-14 per leaf in float64; float32 shows that
  # order at 1e-5..5e-3 in a BatchNorm bias after 4 steps.
  if not simple or jax.default_backend() != 'cpu' or not cpu_matmul_weight_gradient():
    return plain(lhs, rhs)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  return _cpu_conv(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding),
                   precision)


def cpu_matmul_weight_gradient() -> bool:
  """Whether CPU convolutions take their weight gradient as matmuls: RESA_CPU_CONV_MATMUL=1
  or 0 when set; else on CPUs without AVX-512, where it is faster (the ResNet-18 CIFAR
  step at batch 64: 1.7x faster on an AVX2 VM; on an AVX-512 VM 6.11 s against XLA's
  5.66 s; experiments/RESULTS.md, 'The CPU weight gradient as matmuls')."""
  setting = os.environ.get('RESA_CPU_CONV_MATMUL')
  if setting in ('0', '1'):
    return setting == '1'
  return not _cpu_has_avx512()


@functools.lru_cache(maxsize=None)
def _cpu_has_avx512() -> bool:
  try:
    with open('/proc/cpuinfo') as f:
      flags = next((line.split(':', 1)[1].split() for line in f
                    if line.startswith('flags')), [])
  except OSError:  # not Linux: no flags to read
    return False
  return 'avx512f' in flags


def _nhwc_conv(x, w, strides, padding, precision):
  return lax.conv_general_dilated(x, w, strides, padding, precision=precision,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _cpu_conv(x, w, strides, padding, precision):
  return _nhwc_conv(x, w, strides, padding, precision)


def _cpu_conv_fwd(x, w, strides, padding, precision):
  return _nhwc_conv(x, w, strides, padding, precision), (x, w)


def _cpu_conv_bwd(strides, padding, precision, residuals, g):
  x, w = residuals
  (gx,) = jax.linear_transpose(lambda x: _nhwc_conv(x, w, strides, padding, precision), x)(g)
  n, oh, ow, _ = g.shape  # (N, OH, OW, C_out)
  (sh, sw), (kh, kw) = strides, w.shape[:2]
  x_pad = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  # Offsets whose window runs past the padded input never occur: OH was computed from it.
  # As 2-D (N OH OW, C) matrices: XLA:CPU runs this dot 2-3x faster than the 4-D einsum.
  g2 = g.reshape(n * oh * ow, -1)  # (N OH OW, C_out)
  out_dtype = param_dtype(w.dtype)
  gw = jnp.stack([
      jnp.stack([
          jnp.dot(lax.slice(x_pad, (0, i, j, 0),
                            (n, i + sh * (oh - 1) + 1, j + sw * (ow - 1) + 1, x.shape[3]),
                            (1, sh, sw, 1)).reshape(n * oh * ow, -1).T,
                  g2, precision=precision, preferred_element_type=out_dtype)
          for j in range(kw)])
      for i in range(kh)])  # (KH, KW, C_in, C_out)
  return gx, gw.astype(w.dtype)


_cpu_conv.defvjp(_cpu_conv_fwd, _cpu_conv_bwd)
