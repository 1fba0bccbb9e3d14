"""Parity with the authors' PyTorch code, second set of reference files.

* The CIFAR ResNet-18 encoder (`cifar_resnet18_encoder.pth`, `cifar_vectors.npz`):
  eval- and train-mode features and the stem BN's updated running statistics, 1e-4
  relative, through `resa_jax.convert` and `stem='cifar'` (which keeps the authors'
  extra 1-pixel pad: 32 px in, 34 px out of conv1).
* N training steps of the whole model (`resa_full_checkpoint.pth` -> `train_steps.npz`,
  `train_steps_final.pth`) in float64 under JAX x64, through `step.train_step`: every
  loss to 1e-8 relative, every parameter, BN statistic and momentum parameter of the
  final state to 1e-6 relative (max abs difference / max abs value, per tensor).

Files are read from $RESA_REFERENCE_DIR (conftest.py); every input, hyper-parameter
and expected value comes from them, and the architecture is read off the state dicts,
so any set of files in the documented format is checked.  Only the method's constants
that the files do not hold (temperature, Sinkhorn epsilon and iterations) come from
configs/default.py.
"""

import functools
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from resa_jax.configs import default
from resa_jax import models, sharding
from resa_jax import step as step_lib
from resa_jax.models import resnet


def _require(reference_dir, *names):
  missing = [n for n in names if not (reference_dir / n).exists()]
  if missing:
    pytest.skip(f'{", ".join(missing)} not in the reference folder')
  pytest.importorskip('torch')
  from resa_jax import convert
  return convert


def relative_error(got, want) -> float:
  """max |got - want| / max |want| (0 if both are all zero)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  scale = float(np.abs(want).max()) if want.size else 0.0
  diff = float(np.abs(got - want).max()) if want.size else 0.0
  return diff / scale if scale > 0 else diff


def encoder_arch(encoder_sd) -> tuple[str, int]:
  """(architecture name, width_per_group) of a torchvision-style encoder state dict."""
  stages = tuple(len({k.split('.')[1] for k in encoder_sd if k.startswith(f'layer{i}.')})
                 for i in range(1, 5))
  bottleneck = any(re.fullmatch(r'layer\d+\.\d+\.conv3\.weight', k) for k in encoder_sd)
  for name, (block, sizes, widen) in models.ARCHITECTURES.items():
    if tuple(sizes) == stages and (block is resnet.Bottleneck) == bottleneck and widen == 1:
      return name, int(encoder_sd['conv1.weight'].shape[0])
  raise AssertionError(f'no architecture with stages {stages} (bottleneck: {bottleneck})')


def head_sizes(projector_sd) -> dict:
  """mlp_layers, mlp_dim, emb_dim of a projector Sequential (Linear at 0, 3, 6, ...)."""
  linear = sorted((k for k in projector_sd if re.fullmatch(r'\d+\.weight', k)
                   and projector_sd[k].ndim == 2), key=lambda k: int(k.split('.')[0]))
  return dict(mlp_layers=len(linear), mlp_dim=int(projector_sd[linear[0]].shape[0]),
              emb_dim=int(projector_sd[linear[-1]].shape[0]))


def nhwc(x):
  return np.moveaxis(np.asarray(x), -3, -1)  # (..., C, H, W) -> (..., H, W, C)


# ------------------------------------------------------------ CIFAR stem ----

def test_cifar_stem_conv1_has_pytorch_default_init():
  """The swapped-in CIFAR conv1 has PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  (fan_in = 3 * 3 * 3), the other convolutions Kaiming-normal with fan_out."""
  encoder = models.create_resnet('resnet18', width_per_group=16, stem='cifar')
  params = encoder.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)['params']
  stem = np.asarray(params['conv1']['kernel'])  # (3, 3, 3, 16) HWIO
  bound = 1 / np.sqrt(27)
  assert np.abs(stem).max() <= bound
  np.testing.assert_allclose(stem.std(), bound / np.sqrt(3), rtol=0.1)  # uniform's std
  inner = np.asarray(params['layer1_0']['conv1']['kernel'])  # 3x3, 16 -> 16
  np.testing.assert_allclose(inner.std(), np.sqrt(2 / (9 * 16)), rtol=0.1)


@pytest.fixture(scope='module')
def cifar_case(reference_dir):
  convert = _require(reference_dir, 'cifar_resnet18_encoder.pth', 'cifar_vectors.npz')
  state_dict = convert.load_torch_state_dict(reference_dir / 'cifar_resnet18_encoder.pth')
  encoder_sd = convert.split_subnets(state_dict)['encoder']
  arch, width = encoder_arch(encoder_sd)
  encoder = models.create_resnet(arch, width_per_group=width, stem='cifar')
  with np.load(reference_dir / 'cifar_vectors.npz') as data:
    vectors = {k: data[k] for k in data.files}
  images = jnp.asarray(nhwc(vectors['images']), jnp.float32)
  template = jax.eval_shape(lambda: encoder.init(jax.random.key(0), images, train=False))
  variables = convert.convert_subnet('encoder', encoder_sd, template)
  return dict(encoder=encoder, variables=variables, images=images, vectors=vectors)


def test_cifar_stem_keeps_the_authors_extra_pad(cifar_case):
  """conv1 maps an S px image to S + 2 px (32 -> 34), the stages then halve with
  padding 1 (34/17/9/5), as the authors' ResNet with its ConstantPad2d(1)."""
  c = cifar_case
  _, state = c['encoder'].apply(
      c['variables'], c['images'], train=False, capture_intermediates=True,
      mutable=['intermediates'])
  captured = state['intermediates']
  size = c['images'].shape[1]
  conv1 = captured['conv1']['__call__'][0]
  assert conv1.shape[1:3] == (size + 2, size + 2)
  expected = size + 2
  for i, num_blocks in enumerate(c['encoder'].stage_sizes):
    if i > 0:
      expected = (expected - 1) // 2 + 1  # 3x3 stride-2 conv, padding 1
    out = captured[f'layer{i + 1}_{num_blocks - 1}']['__call__'][0]
    assert out.shape[1:3] == (expected, expected), (i + 1, out.shape)


def test_cifar_eval_features_match_reference(cifar_case):
  c = cifar_case
  got = jax.jit(lambda v, x: c['encoder'].apply(v, x, train=False))(c['variables'], c['images'])
  error = relative_error(got, c['vectors']['eval_features'])
  print(f'\nCIFAR eval features: relative error {error:.2e}')
  assert error <= 1e-4


def test_cifar_train_features_and_stem_bn_stats_match_reference(cifar_case):
  """Train mode: BN batch statistics; the stem BN's running mean/var after the forward
  (momentum 0.1 in PyTorch terms, unbiased variance)."""
  c = cifar_case
  got, updates = jax.jit(lambda v, x: c['encoder'].apply(v, x, train=True,
                                                         mutable=['batch_stats']))(
      c['variables'], c['images'])
  stem_bn = updates['batch_stats']['bn1']
  errors = {'train features': relative_error(got, c['vectors']['train_features']),
            'bn1 running mean': relative_error(stem_bn['mean'],
                                               c['vectors']['train_running_mean_bn1']),
            'bn1 running var': relative_error(stem_bn['var'],
                                              c['vectors']['train_running_var_bn1'])}
  print('\nCIFAR ' + ', '.join(f'{k}: {v:.2e}' for k, v in errors.items()))
  for name, error in errors.items():
    assert error <= 1e-4, (name, error)


# ------------------------------------------------- N float64 train steps ----

def _networks_for(convert, state_dict, dtype):
  """(config, online, momentum) for a full checkpoint, sizes read off its tensors."""
  groups = convert.split_subnets(state_dict)
  arch, width = encoder_arch(groups['encoder'])
  config = default.get_config()
  config.update(ml_collections.ConfigDict(dict(
      arch=arch, width_per_group=width, stem='imagenet', zero_init_residual=False,
      predictor='predictor' in groups, dtype=dtype, **head_sizes(groups['projector']))))
  return (config, *models.create_networks(config))


def _tree_errors(got, want, prefix):
  """{'prefix/a/b': relative error} for every leaf of `want` (looked up in `got`)."""
  errors = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(want):
    node = got
    for key in path:
      node = node[key.key]
    errors[prefix + '/' + '/'.join(k.key for k in path)] = relative_error(node, leaf)
  return errors


@pytest.mark.slow
def test_train_steps_match_reference_in_float64(reference_dir):
  """N steps of step.train_step from the full checkpoint, as the reference's run:
  online views one after the other, EMA with the file's fixed m, momentum forward,
  Sinkhorn, loss, torch.optim.SGD (weight decay added to the gradient, momentum
  buffer = gradient at the first step, no dampening) with the file's lr, momentum
  and weight decay.  Float64 under JAX x64, only inside this test."""
  convert = _require(reference_dir, 'resa_full_checkpoint.pth', 'train_steps.npz',
                     'train_steps_final.pth')
  with np.load(reference_dir / 'train_steps.npz') as data:
    run = {k: data[k] for k in data.files}
  initial_sd = convert.load_torch_state_dict(reference_dir / 'resa_full_checkpoint.pth')
  final_sd = convert.load_torch_state_dict(reference_dir / 'train_steps_final.pth')
  image_size = run['views'].shape[-1]

  with jax.enable_x64(True):
    config, online, momentum = _networks_for(convert, initial_sd, 'float64')
    config.update(ml_collections.ConfigDict(dict(
        optimizer='sgd', weight_decay=float(run['weight_decay']),
        sgd_momentum=float(run['momentum']))))
    schedule = optax.constant_schedule(float(run['lr']))
    tx = step_lib.create_optimizer(config, schedule)
    variables = convert.convert_state_dict(initial_sd, online, momentum, image_size)
    assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(variables))
    state = step_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=variables['params'],
        batch_stats=variables['batch_stats'], momentum_params=variables['momentum_params'],
        momentum_batch_stats=variables['momentum_batch_stats'],
        opt_state=tx.init(variables['params']))
    step_fn = jax.jit(functools.partial(
        step_lib.train_step, online_net=online, momentum_net=momentum, tx=tx,
        mesh=sharding.create_mesh(jax.devices()[:1]), config=config, lr_schedule=schedule,
        total_steps=len(run['losses']),
        fixed_ema_momentum=jnp.asarray(run['ema_momentum'], jnp.float64)))
    losses = []
    for views in run['views']:  # (V, B, C, H, W) per step
      state, metrics = step_fn(state, tuple(jnp.asarray(nhwc(v), jnp.float64) for v in views))
      losses.append(float(metrics['loss']))
    state = jax.device_get(state)
    want = convert.convert_state_dict(final_sd, online, momentum, image_size)
  assert jnp.zeros(()).dtype == jnp.float32, 'x64 leaked out of the test'

  loss_errors = np.abs(np.asarray(losses) - run['losses']) / np.abs(run['losses'])
  errors = {}
  for collection in ('params', 'batch_stats', 'momentum_params', 'momentum_batch_stats'):
    # The same leaves on both sides: nothing of the final state goes unchecked.
    assert (jax.tree.structure(getattr(state, collection)) ==
            jax.tree.structure(want[collection])), collection
    errors.update(_tree_errors(getattr(state, collection), want[collection], collection))
  worst = sorted(errors, key=errors.get, reverse=True)
  per_collection = {}
  for name in worst:  # the worst tensor of each collection
    per_collection.setdefault(name.split('/')[0], name)
  print(f'\ntrain steps: loss relative errors {", ".join(f"{e:.1e}" for e in loss_errors)}; '
        f'{len(errors)} tensors, worst ' +
        '; '.join(f'{name} {errors[name]:.2e}' for name in per_collection.values()))
  for t, error in enumerate(loss_errors):
    assert error <= 1e-8, f'step {t}: loss {losses[t]!r} vs {run["losses"][t]!r}'
  failing = {name: errors[name] for name in worst if errors[name] > 1e-6}
  assert not failing, f'{len(failing)} tensors off by more than 1e-6: {failing}'
