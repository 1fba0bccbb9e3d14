"""Small PyTorch ResNets and heads in the authors' layout, the independent reference of
the conversion tests (tests/test_convert.py, tests/test_convert_cli.py,
tests/test_refusals.py).

torchvision-style names, SwAV-style `width_per_group`, a 1-pixel zero pad in front of
every stem, ImageNet stem as that pad + 7x7 stride-2 conv with padding 2 + max-pool,
CIFAR stem as that pad + 3x3 stride-1 conv with padding 1 without max-pool, as the
authors' CIFAR code swaps it in, strides on the 3x3 convs; random weights and random
BatchNorm affine parameters and running statistics.  Importing it needs torch.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch
from torch import nn

from resa_jax import models

MLP_DIM, EMB_DIM = 16, 8


# ------------------------------------------------- PyTorch reference model ----

class TorchBasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride, downsample, base_width):
    super().__init__()
    del base_width  # a BasicBlock's width is `planes`
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU()
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + identity)


class TorchBottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride, downsample, base_width):
    super().__init__()
    width = int(planes * (base_width / 64.0))
    self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU()
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(out + identity)


TORCH_ARCHS = {'resnet18': (TorchBasicBlock, (2, 2, 2, 2)),
               'resnet50': (TorchBottleneck, (3, 4, 6, 3))}


class TorchResNet(nn.Module):
  """The authors' ResNet trunk (no classifier): NCHW images -> pooled features."""

  def __init__(self, arch, width_per_group, stem):
    super().__init__()
    block, layers = TORCH_ARCHS[arch]
    width = width_per_group
    self.stem = stem
    # The authors' forward pads by 1 whatever conv1 is: with the 7x7 conv's padding 2
    # that is padding 3; the CIFAR code's swapped-in 3x3 conv keeps the pad (padding 2).
    self.padding = nn.ConstantPad2d(1, 0.0)
    if stem == 'imagenet':
      self.conv1 = nn.Conv2d(3, width, 7, 2, 2, bias=False)
      self.maxpool = nn.MaxPool2d(3, 2, 1)
    else:
      self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
      self.maxpool = nn.Identity()
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU()
    inplanes = width
    for i, n in enumerate(layers):
      planes = width * 2 ** i
      blocks = []
      for j in range(n):
        stride = 2 if (i > 0 and j == 0) else 1
        downsample = None
        if stride != 1 or inplanes != planes * block.expansion:
          downsample = nn.Sequential(
              nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
              nn.BatchNorm2d(planes * block.expansion))
        blocks.append(block(inplanes, planes, stride, downsample, width_per_group))
        inplanes = planes * block.expansion
      setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
    self.num_features = inplanes

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(self.padding(x)))))
    for i in range(4):
      x = getattr(self, f'layer{i + 1}')(x)
    return x.mean(dim=(2, 3))


def torch_projector(in_dim, mlp_dim, emb_dim):
  return nn.Sequential(nn.Linear(in_dim, mlp_dim), nn.BatchNorm1d(mlp_dim), nn.ReLU(),
                       nn.Linear(mlp_dim, mlp_dim), nn.BatchNorm1d(mlp_dim), nn.ReLU(),
                       nn.Linear(mlp_dim, emb_dim), nn.BatchNorm1d(emb_dim, affine=False))


def torch_predictor(emb_dim, mlp_dim):
  return nn.Sequential(nn.Linear(emb_dim, mlp_dim), nn.BatchNorm1d(mlp_dim), nn.ReLU(),
                       nn.Linear(mlp_dim, emb_dim))


def randomise(module, seed):
  """Random float32 weights and random BN affine parameters / running statistics."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, (nn.Conv2d, nn.Linear)):
        fan_in = m.weight[0].numel()
        m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=gen)
        if m.bias is not None:
          m.bias.uniform_(-0.5, 0.5, generator=gen)
      elif isinstance(m, nn.modules.batchnorm._BatchNorm):  # pylint: disable=protected-access
        if m.affine:
          m.weight.uniform_(0.5, 1.5, generator=gen)
          m.bias.uniform_(-0.5, 0.5, generator=gen)
        m.running_mean.uniform_(-0.5, 0.5, generator=gen)
        m.running_var.uniform_(0.5, 2.0, generator=gen)
        m.num_batches_tracked.fill_(11)
  return module


def float32_state_dict(module, prefix=''):
  return {prefix + k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).clone()
          for k, v in module.state_dict().items()}


def flax_bn_path(torch_module_name):
  """'layer2.0.downsample.1' -> ('layer2_0', 'downsample_bn') (the documented naming)."""
  name = re.sub(r'^layer(\d+)\.(\d+)', r'layer\1_\2', torch_module_name)
  name = name.replace('downsample.0', 'downsample_conv').replace('downsample.1', 'downsample_bn')
  return tuple(name.split('.'))


# -------------------------------------------------------------- Flax side ----

def networks(arch, stem, width_per_group, predictor=False):
  config = ml_collections.ConfigDict(dict(
      arch=arch, width_per_group=width_per_group, stem=stem, zero_init_residual=False,
      mlp_layers=3, mlp_dim=MLP_DIM, emb_dim=EMB_DIM, predictor=predictor, dtype='float32'))
  return models.create_networks(config)


_JIT_CACHE = {}


def encoder_fn(encoder, train):
  """A cached jitted encoder forward (eval: features; train: features, batch_stats)."""
  key = (encoder, train)
  if key not in _JIT_CACHE:
    if train:
      _JIT_CACHE[key] = jax.jit(lambda v, x: encoder.apply(v, x, train=True,
                                                           mutable=['batch_stats']))
    else:
      _JIT_CACHE[key] = jax.jit(lambda v, x: encoder.apply(v, x, train=False))
  return _JIT_CACHE[key]


def encoder_variables(converted, prefix=''):
  return {'params': converted[prefix + 'params']['encoder'],
          'batch_stats': converted[prefix + 'batch_stats']['encoder']}


def assert_close(got, want, rtol=1e-5, err_msg=''):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape, err_msg)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(np.abs(want).max()),
                             err_msg=err_msg)


def assert_trees_equal(a, b):
  a_flat, a_def = jax.tree_util.tree_flatten_with_path(a)
  b_flat, b_def = jax.tree_util.tree_flatten_with_path(b)
  assert a_def == b_def
  for (path, x), (_, y) in zip(a_flat, b_flat):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=jax.tree_util.keystr(path))


def images(n, size, seed):
  """(NCHW float64 torch tensor, NHWC float32 jax array) with the same values."""
  x = np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)
  return torch.from_numpy(x).double(), jnp.asarray(x.transpose(0, 2, 3, 1))


def full_checkpoint(c):
  """{'epoch', 'state_dict'} in the authors' DDP layout, from fresh torch modules
  (online and momentum networks differ), and those modules (float64, eval mode)."""
  encoder = randomise(TorchResNet(c['arch'], c['wpg'], c['stem']), seed=11)
  dim = encoder.num_features
  nets = {'encoder': encoder,
          'projector': randomise(torch_projector(dim, MLP_DIM, EMB_DIM), seed=12),
          'predictor': randomise(torch_predictor(EMB_DIM, MLP_DIM), seed=13),
          'momentum_encoder': randomise(TorchResNet(c['arch'], c['wpg'], c['stem']), seed=14),
          'momentum_projector': randomise(torch_projector(dim, MLP_DIM, EMB_DIM), seed=15)}
  state = {}
  for name, net in nets.items():
    state.update(float32_state_dict(net, prefix=f'module.{name}.'))
  return {'epoch': 7, 'state_dict': state}, {k: v.double().eval() for k, v in nets.items()}
