"""ResNet encoders (NHWC), laid out as the authors' PyTorch ResNet.

`width_per_group` behaves as in the authors' (SwAV-derived) ResNet: the stem has
`width_per_group * widen` channels, stage i has `planes = width_per_group * widen *
2**i`, a Bottleneck's inner width is `planes * width_per_group / 64` and its output
`4 * planes`.  With the default 64 these are the standard ResNets; `widen` 2 and 4
give ResNet-50 x2 / x4.  Strides sit on the 3x3 convolutions (ResNet v1.5).

Stems: 'imagenet' (7x7 stride-2 conv with padding 3, BN, ReLU, 3x3 stride-2 max-pool
with padding 1) and 'cifar' (3x3 stride-1 conv with padding 2, BN, ReLU, no max-pool).

The CIFAR stem is what the authors' code actually runs (winci-ai/resa_cifar,
`src/model.py` `get_encoder` on their `src/resnet.py`): their ResNet's forward always
applies a 1-pixel `ConstantPad2d(1)` (meant for the 7x7 ImageNet conv, whose own
padding is 2), and for CIFAR they swap in a 3x3 stride-1 padding-1 conv1 and an
identity max-pool but keep the pad.  The zero padding is therefore 2: a 32x32 image
gives a 34x34 conv1 output, and the stages see 34/17/9/5 pixels.  Their swapped conv1
is created after the ResNet's init loop, so it keeps PyTorch's default init
(kaiming_uniform_ with a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in =
3 * 3 * input channels), not the Kaiming-normal fan_out init of every other
convolution; so does ours.

The output is the global-average-pooled feature vector, (B, C) in the compute dtype.
Parameter names mirror the PyTorch state dict (conv1, bn1, layer1_0/conv1, ...,
downsample_conv, downsample_bn) so that resa_jax/convert is a renaming.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax.numpy as jnp

from resa_jax.models.layers import (BatchNorm, conv_general_dilated, conv_kernel_init,
                                    param_dtype, torch_default_kernel_init)

Dtype = Any


def _conv(features, kernel, stride, padding, dtype, name, kernel_init=conv_kernel_init):
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)), use_bias=False,
                 dtype=dtype, param_dtype=param_dtype(dtype), kernel_init=kernel_init,
                 conv_general_dilated=conv_general_dilated, name=name)


class BasicBlock(nn.Module):
  planes: int
  stride: int
  downsample: bool
  zero_init_residual: bool
  train: bool
  dtype: Dtype
  expansion = 1

  @nn.compact
  def __call__(self, x):
    bn = functools.partial(BatchNorm, use_running_average=not self.train, dtype=self.dtype)
    y = _conv(self.planes, 3, self.stride, 1, self.dtype, 'conv1')(x)
    y = nn.relu(bn(name='bn1')(y))
    y = _conv(self.planes, 3, 1, 1, self.dtype, 'conv2')(y)
    y = bn(name='bn2', scale_init=nn.initializers.zeros if self.zero_init_residual
           else nn.initializers.ones)(y)
    if self.downsample:
      x = _conv(self.planes, 1, self.stride, 0, self.dtype, 'downsample_conv')(x)
      x = bn(name='downsample_bn')(x)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  planes: int
  stride: int
  downsample: bool
  zero_init_residual: bool
  train: bool
  dtype: Dtype
  base_width: int = 64
  expansion = 4

  @nn.compact
  def __call__(self, x):
    bn = functools.partial(BatchNorm, use_running_average=not self.train, dtype=self.dtype)
    width = int(self.planes * (self.base_width / 64.0))
    y = _conv(width, 1, 1, 0, self.dtype, 'conv1')(x)
    y = nn.relu(bn(name='bn1')(y))
    y = _conv(width, 3, self.stride, 1, self.dtype, 'conv2')(y)
    y = nn.relu(bn(name='bn2')(y))
    y = _conv(self.planes * 4, 1, 1, 0, self.dtype, 'conv3')(y)
    y = bn(name='bn3', scale_init=nn.initializers.zeros if self.zero_init_residual
           else nn.initializers.ones)(y)
    if self.downsample:
      x = _conv(self.planes * 4, 1, self.stride, 0, self.dtype, 'downsample_conv')(x)
      x = bn(name='downsample_bn')(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet trunk without classifier: images (B, H, W, C) -> features (B, D)."""
  block: Any
  stage_sizes: Sequence[int]
  width_per_group: int = 64
  widen: int = 1
  stem: str = 'imagenet'
  zero_init_residual: bool = False
  dtype: Dtype = jnp.float32

  @property
  def num_features(self) -> int:
    return self.width_per_group * self.widen * 2 ** (len(self.stage_sizes) - 1) * self.block.expansion

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = x.astype(self.dtype)
    width = self.width_per_group * self.widen
    if self.stem == 'imagenet':
      x = _conv(width, 7, 2, 3, self.dtype, 'conv1')(x)
    elif self.stem == 'cifar':
      # The authors' 1-pixel pad + their 3x3 conv's padding 1 (module docstring): 32 -> 34.
      x = _conv(width, 3, 1, 2, self.dtype, 'conv1',
                kernel_init=torch_default_kernel_init)(x)
    else:
      raise ValueError(f"unknown stem {self.stem!r}; expected 'imagenet' or 'cifar'")
    x = nn.relu(BatchNorm(use_running_average=not train, dtype=self.dtype, name='bn1')(x))
    if self.stem == 'imagenet':
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    in_channels = width
    for i, num_blocks in enumerate(self.stage_sizes):
      planes = width * 2 ** i
      for j in range(num_blocks):
        stride = 2 if (i > 0 and j == 0) else 1
        out_channels = planes * self.block.expansion
        extra = {'base_width': self.width_per_group} if self.block is Bottleneck else {}
        x = self.block(planes=planes, stride=stride,
                       downsample=(stride != 1 or in_channels != out_channels),
                       zero_init_residual=self.zero_init_residual, train=train,
                       dtype=self.dtype, name=f'layer{i + 1}_{j}', **extra)(x)
        in_channels = out_channels
    return jnp.mean(x, axis=(1, 2))


class ResNetArchitecture(NamedTuple):
  """A torchvision / SwAV ResNet: its block, blocks per stage and width multiplier."""
  block: Any  # BasicBlock or Bottleneck
  stages: tuple[int, int, int, int]
  widen: int  # SwAV's resnet50w2 / w4


ARCHITECTURES = {
    'resnet18': ResNetArchitecture(BasicBlock, (2, 2, 2, 2), 1),
    'resnet34': ResNetArchitecture(BasicBlock, (3, 4, 6, 3), 1),
    'resnet50': ResNetArchitecture(Bottleneck, (3, 4, 6, 3), 1),
    'resnet101': ResNetArchitecture(Bottleneck, (3, 4, 23, 3), 1),
    'resnet200': ResNetArchitecture(Bottleneck, (3, 24, 36, 3), 1),
    'resnet50w2': ResNetArchitecture(Bottleneck, (3, 4, 6, 3), 2),
    'resnet50w4': ResNetArchitecture(Bottleneck, (3, 4, 6, 3), 4),
}


def create_resnet(arch: str, *, width_per_group: int = 64, stem: str = 'imagenet',
                  zero_init_residual: bool = False, dtype: Dtype = jnp.float32) -> ResNet:
  if arch not in ARCHITECTURES:
    raise ValueError(f'unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}')
  block, stages, widen = ARCHITECTURES[arch]
  return ResNet(block=block, stage_sizes=stages, width_per_group=width_per_group, widen=widen,
                stem=stem, zero_init_residual=zero_init_residual, dtype=dtype)
