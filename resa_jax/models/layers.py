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
  everywhere but on the CPU backend, where the form measured fastest on the machine
  runs (`cpu_conv.py`: oneDNN's kernels, a matmul weight gradient, or XLA's).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from resa_jax.models import cpu_conv

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
  """`lax.conv_general_dilated` for `nn.Conv(conv_general_dilated=...)`; the same values.

  On the CPU backend a plain NHWC/HWIO convolution (no dilation, one feature group) runs
  in the form `cpu_conv.backend` measured fastest on this machine (oneDNN's kernels
  through XLA's FFI, a matmul weight gradient, or XLA's own), which agree to float
  rounding; everywhere else, and on GPUs and TPUs always, it is
  `lax.conv_general_dilated` itself.
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
  if not simple or jax.default_backend() != 'cpu':
    return plain(lhs, rhs)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  padding = tuple(tuple(int(v) for v in p) for p in padding)
  out_shape = jax.eval_shape(plain, lhs, rhs).shape
  form = cpu_conv.backend(lhs.dtype, cpu_conv.work(lhs.shape, rhs.shape, out_shape))
  if form == 'xla':
    return plain(lhs, rhs)
  return cpu_conv.conv(form, lhs, rhs, tuple(window_strides), padding, precision)
