"""resa_jax.convert against independent PyTorch references (tests/torch_reference.py:
small ResNets in the authors' layout with random weights and random BatchNorm affine
parameters and running statistics).  Widths are tiny so that the whole file runs in
well under a minute on two CPU cores.

PyTorch runs in float64 on float32-representable weights and inputs, so the torch
numbers are an accurate reference for the float32 Flax model.
"""

from __future__ import annotations

import argparse
import copy
import re

import numpy as np
import pytest

torch = pytest.importorskip('torch')
from torch import nn  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from helpers import run_in_process  # noqa: E402
from resa_jax import convert  # noqa: E402
from torch_reference import (EMB_DIM, MLP_DIM, TorchResNet, assert_close,  # noqa: E402
                             assert_trees_equal, encoder_fn, encoder_variables, flax_bn_path,
                             float32_state_dict, full_checkpoint, images, networks, randomise)


# (arch, stem, width_per_group, image size): a BasicBlock ResNet with the CIFAR stem
# and a Bottleneck ResNet-50 (inner widths 1/2/4/8) with the ImageNet stem.
CASES = [('resnet18', 'cifar', 4, 16), ('resnet50', 'imagenet', 8, 64)]


@pytest.fixture(scope='module', params=CASES, ids=lambda c: f'{c[0]}-{c[1]}-w{c[2]}')
def encoder_case(request):
  arch, stem, wpg, size = request.param
  model = randomise(TorchResNet(arch, wpg, stem), seed=1).eval()
  state_dict = {k: v.numpy() for k, v in float32_state_dict(model).items()}
  model = model.double()
  online, momentum = networks(arch, stem, wpg)
  converted = convert.convert_state_dict(state_dict, online, momentum, image_size=size)
  return dict(arch=arch, stem=stem, wpg=wpg, size=size, model=model, state_dict=state_dict,
              online=online, momentum=momentum, converted=converted)


@pytest.fixture(scope='module')
def resnet18_case():
  """The CIFAR ResNet-18 (width 4) of `CASES`, for the tests that need only one model."""
  arch, stem, wpg, size = CASES[0]
  model = randomise(TorchResNet(arch, wpg, stem), seed=1).eval()
  state_dict = float32_state_dict(model)
  online, momentum = networks(arch, stem, wpg)
  return dict(arch=arch, stem=stem, wpg=wpg, size=size, model=model.double(),
              state_dict=state_dict, online=online, momentum=momentum,
              features=model_features(model.double(), size))


def model_features(model, size):
  x_torch, x_jax = images(4, size, seed=7)
  with torch.no_grad():
    return x_jax, model.eval()(x_torch).numpy()


# ------------------------------------------------ 1. numerical parity ----

def test_eval_features_match_torch(encoder_case):
  """Eval mode (BN running statistics): torch features == Flax features of the converted
  variables, 1e-5 relative; the plain encoder gives only the encoder subtrees."""
  c = encoder_case
  assert set(c['converted']) == {'params', 'batch_stats'}
  assert set(c['converted']['params']) == {'encoder'}
  x_torch, x_jax = images(4, c['size'], seed=2)
  with torch.no_grad():
    want = c['model'].eval()(x_torch).numpy()
  assert want.shape == (4, c['model'].num_features) == (4, c['online'].encoder.num_features)
  got = encoder_fn(c['online'].encoder, False)(encoder_variables(c['converted']), x_jax)
  assert_close(got, want, err_msg='eval features')


def test_train_forward_and_running_stats_match_torch(encoder_case):
  """Train mode (BN batch statistics): same features; after one forward every BN's
  running mean/var (PyTorch: momentum 0.1, unbiased variance) equals Flax's
  returned `batch_stats`, and they did move away from the checkpoint's values.

  Batch statistics make a deep float32 network less well conditioned than eval mode:
  PyTorch's own float32 forward of the ResNet-50 here is ~3e-5 (relative to the
  largest feature) off its float64 forward.  The tolerance is therefore 1e-5 or
  5x PyTorch's own float32 error, whichever is larger.
  """
  c = encoder_case
  model = copy.deepcopy(c['model']).train()
  x_torch, x_jax = images(4, c['size'], seed=3)
  with torch.no_grad():
    want = model(x_torch).numpy()
    torch32 = copy.deepcopy(model).float()(x_torch.float()).double().numpy()
  float32_error = float(np.abs(torch32 - want).max() / np.abs(want).max())
  rtol = max(1e-5, 5 * float32_error)
  variables = encoder_variables(c['converted'])
  got, updated = encoder_fn(c['online'].encoder, True)(variables, x_jax)
  assert_close(got, want, rtol=rtol, err_msg=f'train features (torch float32 error '
                                              f'{float32_error:.1e})')
  stats = updated['batch_stats']
  bn_modules = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
  assert len(bn_modules) == len(jax.tree.leaves(stats)) // 2
  for name, bn in bn_modules:
    node, old = stats, variables['batch_stats']
    for part in flax_bn_path(name):
      node, old = node[part], old[part]
    assert not np.allclose(np.asarray(node['var']), np.asarray(old['var'])), name
    assert_close(node['mean'], bn.running_mean.numpy(), rtol=rtol, err_msg=f'{name}.running_mean')
    assert_close(node['var'], bn.running_var.numpy(), rtol=rtol, err_msg=f'{name}.running_var')


# ----------------------------------------- 2. plain encoder state dicts ----

PLAIN_LAYOUTS = {
    'plain': lambda sd: sd,
    'module': lambda sd: {'module.' + k: v for k, v in sd.items()},
    'state_dict': lambda sd: {'epoch': 3, 'state_dict': sd},
    'state_dict+module': lambda sd: {'state_dict': {'module.' + k: v for k, v in sd.items()}},
    'module.encoder': lambda sd: {'state_dict': {'module.encoder.' + k: v for k, v in sd.items()}},
}


def test_plain_encoder_layouts_convert_to_same_features(resnet18_case, tmp_path):
  """A torchvision-style encoder state dict with an `fc` classifier, saved as {k: v},
  with a `module.` prefix, inside {'state_dict': ...} and with `module.encoder.`,
  converts to identical variables, whose features match torch."""
  c = resnet18_case
  sd = dict(c['state_dict'])
  sd['fc.weight'] = torch.randn(10, c['model'].num_features)
  sd['fc.bias'] = torch.randn(10)
  results = {}
  for name, layout in PLAIN_LAYOUTS.items():
    path = tmp_path / f'{name.replace(".", "_")}.pth'
    torch.save(layout(sd), path)
    loaded = convert.load_torch_state_dict(path)
    results[name] = convert.convert_state_dict(loaded, c['online'], c['momentum'], c['size'])
  first = results.pop('plain')
  for name, result in results.items():
    assert set(result) == {'params', 'batch_stats'}, name
    assert_trees_equal(result, first)
  x_jax, want = c['features']
  got = encoder_fn(c['online'].encoder, False)(encoder_variables(first), x_jax)
  assert_close(got, want, err_msg='plain encoder features')


@pytest.mark.parametrize('dtype', ['float16', 'bfloat16'])
def test_half_precision_checkpoint_converts(resnet18_case, tmp_path, dtype):
  """A checkpoint saved in float16 / bfloat16 converts to float32 variables holding
  exactly the stored values."""
  c = resnet18_case
  torch_dtype = getattr(torch, dtype)
  sd = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in c['state_dict'].items()}
  path = tmp_path / 'half.pth'
  torch.save(sd, path)
  result = convert.convert_state_dict(convert.load_torch_state_dict(path), c['online'],
                                      c['momentum'], c['size'])
  want = convert.convert_state_dict({k: v.float().numpy() for k, v in sd.items()},
                                    c['online'], c['momentum'], c['size'])
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(result))
  assert_trees_equal(result, want)


# ------------------------------------------------------ 3. clear errors ----

def expect_error(fn, *patterns):
  """Runs fn, expects a one-line ConversionError matching every regex in `patterns`."""
  with pytest.raises(convert.ConversionError) as info:
    fn()
  message = str(info.value)
  assert message and '\n' not in message, repr(message)
  for pattern in patterns:
    assert re.search(pattern, message), (pattern, message)
  return message


def numpy_sd(sd):
  return {k: v.numpy() for k, v in sd.items()}


def test_error_other_architecture(resnet18_case):
  """resnet18 weights into a resnet50 (and back), or with another width: the error
  names a checkpoint key and, for a shape clash, both shapes in PyTorch layout."""
  c = resnet18_case
  sd18 = numpy_sd(c['state_dict'])
  net50 = networks('resnet50', c['stem'], 16)
  expect_error(lambda: convert.convert_state_dict(sd18, *net50, image_size=c['size']),
               r"'(layer\d\.\d\.)?(conv|bn)\d\.(weight|bias|running_mean|running_var)'")
  sd50 = numpy_sd(float32_state_dict(randomise(TorchResNet('resnet50', 16, 'cifar'), 5)))
  net18 = networks('resnet18', c['stem'], 16)
  expect_error(lambda: convert.convert_state_dict(sd50, *net18, image_size=c['size']),
               r"'layer1\.0\.(conv|bn)\d\.\w+' has shape \([\d, ]+\), the model expects")
  # A conv kernel of the wrong size: both shapes in (O, I, H, W).
  bad = dict(sd18, **{'conv1.weight': np.zeros((c['wpg'], 3, 5, 5), np.float32)})
  expect_error(lambda: convert.convert_state_dict(bad, c['online'], c['momentum'], c['size']),
               re.escape(f"'conv1.weight' has shape ({c['wpg']}, 3, 5, 5), the model expects "
                         f"({c['wpg']}, 3, 3, 3)"))
  wide = networks(c['arch'], c['stem'], 2 * c['wpg'])
  message = expect_error(lambda: convert.convert_state_dict(sd18, *wide, image_size=c['size']),
                         r"'[\w.]+' has shape \([\d, ]+\)", 'expects')
  # The expected shape is given in the checkpoint's (PyTorch) layout.
  key, got, want = re.search(r"'([\w.]+)' has shape (\([\d, ]+\)).*expects (\([\d, ]+\))",
                             message).groups()
  assert got == str(tuple(sd18[key].shape))
  want = eval(want)  # pylint: disable=eval-used
  assert len(want) == sd18[key].ndim and want != sd18[key].shape
  if sd18[key].ndim == 4:
    assert want[2:] == sd18[key].shape[2:]  # same kernel size, (O, I, H, W) order


def test_error_missing_key(resnet18_case):
  """A checkpoint without one of the model's keys: the error names that key."""
  c = resnet18_case
  sd = numpy_sd(c['state_dict'])
  for key in ('layer3.0.downsample.1.running_var', 'layer4.1.conv2.weight', 'bn1.bias'):
    partial = {k: v for k, v in sd.items() if k != key}
    expect_error(lambda: convert.convert_state_dict(partial, c['online'], c['momentum'],
                                                    c['size']),
                 re.escape(repr(key)), 'missing')


def test_error_unexpected_key(resnet18_case):
  """An extra key the model does not use (encoder-only, or in a full checkpoint, also
  outside the known sub-networks): the error names it."""
  c = resnet18_case
  sd = numpy_sd(c['state_dict'])
  extra = dict(sd, **{'layer1.0.conv3.weight': np.zeros((4, 4, 1, 1), np.float32)})
  expect_error(lambda: convert.convert_state_dict(extra, c['online'], c['momentum'], c['size']),
               re.escape("'layer1.0.conv3.weight'"))
  full = {f'module.{net}.{k}': v for net in ('encoder', 'momentum_encoder') for k, v in sd.items()}
  expect_error(lambda: convert.convert_state_dict(
      dict(full, **{'module.momentum_encoder.layer5.0.bn1.weight': np.ones(4, np.float32)}),
      c['online'], c['momentum'], c['size']), re.escape("'layer5.0.bn1.weight'"))
  expect_error(lambda: convert.convert_state_dict(
      dict(full, **{'module.queue': np.zeros((4, 8), np.float32)}),
      c['online'], c['momentum'], c['size']), re.escape("'module.queue'"))


def test_error_predictor_not_in_model(resnet18_case):
  """A full checkpoint with a predictor for a model built without one."""
  c = resnet18_case
  full, _ = full_checkpoint(c)
  expect_error(lambda: convert.convert_state_dict(numpy_sd(full['state_dict']), c['online'],
                                                  c['momentum'], c['size']),
               r'predictor')


def test_error_not_a_checkpoint(tmp_path):
  """Random bytes, a zip that is not a checkpoint, a pickle of a non-mapping and a
  missing file: one-line errors naming the file."""
  rng = np.random.default_rng(0)
  junk = tmp_path / 'junk.pth'
  junk.write_bytes(rng.bytes(512))
  fake_zip = tmp_path / 'zip.pth'
  fake_zip.write_bytes(b'PK\x03\x04' + rng.bytes(512))
  for message in (
      expect_error(lambda: convert.load_torch_state_dict(junk), re.escape(str(junk)),
                   'cannot read'),
      expect_error(lambda: convert.load_torch_state_dict(fake_zip), re.escape(str(fake_zip)),
                   'cannot read')):
    # Short, and without torch's advice to load untrusted files with weights_only=False.
    assert len(message) < 400 and 'arbitrary code' not in message, message
  namespace = tmp_path / 'namespace.pth'  # as the authors' checkpoints keep their args
  torch.save({'state_dict': {'w': torch.zeros(2)}, 'args': argparse.Namespace(lr=0.3)},
             namespace)
  expect_error(lambda: convert.load_torch_state_dict(namespace), re.escape(str(namespace)),
               'objects other than tensors and plain containers')
  listing = tmp_path / 'list.pth'
  torch.save([torch.zeros(2)], listing)
  expect_error(lambda: convert.load_torch_state_dict(listing), 'list', 'not a state dict')
  missing = tmp_path / 'nope' / 'missing.pth'
  expect_error(lambda: convert.load_torch_state_dict(missing), 'not found',
               re.escape(str(missing)))


# ------------------------------------------------------------------ 4. CLI ----

def cli_args(c, checkpoint, out, arch=None):
  return ['--checkpoint', checkpoint, '--arch', arch or c['arch'], '--stem', c['stem'],
          '--width_per_group', c['wpg'], '--mlp_dim', MLP_DIM, '--emb_dim', EMB_DIM,
          '--out', out]


def test_cli_encoder_checkpoint_round_trip(resnet18_case, tmp_path, monkeypatch, capsys):
  """The CLI on a plain encoder .pth writes an orbax checkpoint that `load_converted`
  reads back equal to `convert_state_dict`, with the options in the metadata."""
  c = resnet18_case
  ckpt, out = tmp_path / 'enc.pth', tmp_path / 'out'
  torch.save({'state_dict': {'module.' + k: v for k, v in c['state_dict'].items()}}, ckpt)
  proc = run_in_process('resa_jax.convert', *cli_args(c, ckpt, out), monkeypatch=monkeypatch,
                        capsys=capsys)
  assert proc.code == 0, proc.stderr
  variables, meta = convert.load_converted(out)
  want = convert.convert_state_dict(convert.load_torch_state_dict(ckpt), c['online'],
                                    c['momentum'], c['size'])
  assert_trees_equal(variables, want)
  assert (meta['arch'], meta['stem'], meta['width_per_group'], meta['predictor']) == (
      c['arch'], c['stem'], c['wpg'], False)


def test_cli_full_checkpoint_round_trip_matches_torch(resnet18_case, tmp_path, monkeypatch,
                                                      capsys):
  """A full DDP checkpoint (encoder, projector, predictor, momentum encoder and
  projector) through the CLI: read back equal to `convert_state_dict`, and the online
  (h, predictor(projector(h))) and momentum (h, projector(h)) outputs in eval mode
  match the torch modules."""
  c = resnet18_case
  full, nets = full_checkpoint(c)
  ckpt, out = tmp_path / 'full.pth', tmp_path / 'out'
  torch.save(full, ckpt)
  proc = run_in_process('resa_jax.convert', *cli_args(c, ckpt, out), monkeypatch=monkeypatch,
                        capsys=capsys)
  assert proc.code == 0, proc.stderr
  variables, meta = convert.load_converted(out)
  assert meta['predictor'] is True and meta['mlp_dim'] == MLP_DIM
  online, momentum = networks(c['arch'], c['stem'], c['wpg'], predictor=True)
  want = convert.convert_state_dict(convert.load_torch_state_dict(ckpt), online, momentum,
                                    c['size'])
  assert set(want) == {'params', 'batch_stats', 'momentum_params', 'momentum_batch_stats'}
  assert set(want['params']) == {'encoder', 'projector', 'predictor'}
  assert_trees_equal(variables, want)

  x_torch, x_jax = images(6, c['size'], seed=4)
  with torch.no_grad():
    h = nets['encoder'](x_torch)
    want_online = (h, nets['predictor'](nets['projector'](h)))
    hm = nets['momentum_encoder'](x_torch)
    want_momentum = (hm, nets['momentum_projector'](hm))
  for prefix, net, expected in (('', online, want_online), ('momentum_', momentum, want_momentum)):
    got = jax.jit(lambda v, x, net=net: net.apply(v, x, train=False))(
        {'params': variables[prefix + 'params'],
         'batch_stats': variables[prefix + 'batch_stats']}, x_jax)
    for name, g, w in zip(('h', 'z'), got, expected):
      assert_close(g, w.numpy(), err_msg=f'{prefix}{name}')
