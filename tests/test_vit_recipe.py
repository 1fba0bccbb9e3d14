"""The authors' ViT recipe as configs: they validate, their lr schedule and AdamW are the
authors' (winci-ai/resa main.py, src/utils.py, args.py; configs/imagenet_vit_small.py
names the commits), and the ViT linear-probe defaults of `python -m resa_jax.evaluate`.

The references are the authors' formulas written out in NumPy; the only training is two
steps of a linear head on a tiny ViT."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resa_jax import models
from resa_jax import step as step_lib
from resa_jax import validation
from resa_jax.evaluate import common
from resa_jax.evaluate import linear
from resa_jax.evaluate import run
from resa_jax.models import vit

VIT_CONFIGS = ('imagenet_vit_small', 'imagenet_vitc_small', 'imagenet_vitc_base',
               'imagenet_vit_small_multicrop')
IMAGENET_TRAIN = 1_281_167


def _config(name):
  return importlib.import_module(f'resa_jax.configs.{name}').get_config()


@pytest.mark.parametrize('name', VIT_CONFIGS)
def test_vit_configs_validate_and_hold_the_authors_values(name):
  config = _config(name)
  validation.validate_config(config)
  assert models.is_vit(config.arch)
  assert (config.optimizer, config.base_lr, config.weight_decay) == ('adamw', 5e-4, 0.1)
  assert (config.warmup_epochs, config.final_lr_ratio, config.num_epochs) == (40, 1e-3, 300)
  assert (config.batch_size, config.temperature, config.ema_momentum) == (1024, 0.4, 0.996)
  assert config.get('grad_clip') is None and config.get('drop_path', 0.0) == 0.0
  assert config.predictor and config.dtype == 'bfloat16'
  views = 1 + sum(config.crops_nmb)
  assert views == (8 if name.endswith('multicrop') else 2)


def _their_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs):
  """src/utils.py `cosine_scheduler` of the authors (float64, one value per step)."""
  warmup_iters = warmup_epochs * niter_per_ep
  warmup = np.linspace(0, base_value, warmup_iters)
  iters = np.arange(epochs * niter_per_ep - warmup_iters)
  cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
  return np.concatenate((warmup, cosine))


def test_lr_schedule_is_the_authors():
  config = _config('imagenet_vit_small')
  steps_per_epoch = IMAGENET_TRAIN // config.batch_size  # their drop_last loader: 1251
  total = int(config.num_epochs) * steps_per_epoch
  ours = step_lib.learning_rate_schedule(config, steps_per_epoch, total)
  peak = 5e-4 * 1024 / 256  # their args.lr * batch_size * world_size / 256
  # build_optimizer (adamw): final_lr = lr * 0.001.
  theirs = _their_cosine_scheduler(peak, peak * 0.001, 300, steps_per_epoch, 40)
  assert len(theirs) == total
  warmup = 40 * steps_per_epoch
  # optax computes the warm-up as peak - peak (1 - step / W) in float32: absolute
  # errors up to about peak x 2^-23.
  atol = peak * 2.0 ** -22
  for step in (0, 1, 777, warmup // 2, warmup - 1):
    # Theirs is np.linspace(0, lr, W) (lr at step W - 1), ours lr * step / W: the two
    # differ by a factor (W - 1) / W during the warm-up only.
    np.testing.assert_allclose(float(ours(step)), peak * step / warmup, rtol=1e-6, atol=atol)
    np.testing.assert_allclose(float(ours(step)), theirs[step], rtol=1.01 / (warmup - 1),
                               atol=atol)
  for step in (warmup, warmup + 1, warmup + 12_345, total // 2, total - 1000, total - 2,
               total - 1):
    np.testing.assert_allclose(float(ours(step)), theirs[step], rtol=1e-5, atol=1e-9,
                               err_msg=f'step {step}')
  np.testing.assert_allclose(float(ours(total)), 2e-6, rtol=1e-5)  # cosine's end


def _vit_params():
  """A params tree with the paths create_optimizer keys on (ViT names, a frozen patch
  conv and position table, LayerNorm and bias leaves, a head)."""
  rng = np.random.default_rng(0)
  leaf = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return {'encoder': {'patch_embed': {'proj': {'kernel': leaf(2, 2, 3, 4), 'bias': leaf(4)}},
                      'pos_embed': leaf(1, 5, 4), 'cls_token': leaf(1, 1, 4),
                      'blocks_0': {'norm1': {'scale': leaf(4), 'bias': leaf(4)},
                                   'attn': {'qkv': {'kernel': leaf(4, 12), 'bias': leaf(12)}}},
                      'norm': {'scale': leaf(4), 'bias': leaf(4)}},
          'projector': {'seq_0': {'kernel': leaf(4, 6), 'bias': leaf(6)}},
          'predictor': {'seq_0': {'scale': leaf(6), 'bias': leaf(6)}}}


def test_adamw_is_torch_adamw_on_every_trainable_parameter():
  """One step against torch.optim.AdamW's update written out (betas 0.9 / 0.999, eps
  1e-8, decoupled decay p *= 1 - lr wd on every parameter with a gradient, biases and
  norms included); the frozen leaves (requires_grad=False) do not move."""
  config = _config('imagenet_vit_small')
  lr, wd = 2e-3, config.weight_decay
  tx = step_lib.create_optimizer(config, optax.constant_schedule(lr))
  params = _vit_params()
  grads = jax.tree.map(lambda p: jnp.asarray(
      np.random.default_rng(p.size).normal(size=p.shape), jnp.float32), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  labels = models.parameter_labels(params)
  frozen = 0
  for (path, p), g, q, label in zip(jax.tree_util.tree_leaves_with_path(params),
                                    jax.tree.leaves(grads), jax.tree.leaves(new),
                                    jax.tree.leaves(labels)):
    p, g, q = (np.asarray(x, np.float64) for x in (p, g, q))
    if label == 'frozen':
      frozen += 1
      np.testing.assert_array_equal(q, p, err_msg=jax.tree_util.keystr(path))
      continue
    m_hat = (1 - 0.9) * g / (1 - 0.9)  # first step: bias-corrected moments
    v_hat = (1 - 0.999) * g * g / (1 - 0.999)
    want = p * (1 - lr * wd) - lr * m_hat / (np.sqrt(v_hat) + 1e-8)
    np.testing.assert_allclose(q, want, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))
  assert frozen == 3  # patch conv kernel and bias, pos_embed


@pytest.mark.parametrize('arch, batch, overrides, want', [
    ('vit_small', 1024, {}, (0.03, 4, False)),
    ('vitc_small', 1024, {}, (0.03, 4, False)),
    ('vit_base', 1024, {}, (0.03, 1, True)),
    ('vitc_base', 256, {}, (0.03, 1, True)),
    ('vit_small', 1024, dict(linear_n_last_blocks=2, linear_avgpool_patchtokens=True,
                             linear_lr=0.1), (0.1, 2, True)),
    ('vitc_base', 1024, dict(linear_avgpool_patchtokens=False), (0.03, 1, False)),
    ('resnet50', 1024, {}, (40.0, None, None)),
    ('resnet50', 256, {}, (10.0, None, None)),
])
def test_linear_probe_recipe(arch, batch, overrides, want):
  config = _config('imagenet_vit_small')
  config.arch, config.batch_size = arch, batch
  recipe = run.linear_probe_recipe(config, run.Options(evaluations=(), **overrides), None)
  assert (recipe['base_lr'], recipe['n_last_blocks'], recipe['avgpool_patchtokens']) == want


def test_linear_probe_recipe_misfits():
  config = _config('imagenet_vit_small')
  with pytest.raises(common.EvaluationError, match='has 12 blocks'):
    run.linear_probe_recipe(config, run.Options(evaluations=(), linear_n_last_blocks=13), None)
  config.arch = 'resnet50'
  with pytest.raises(common.EvaluationError, match='for ViT encoders'):
    run.linear_probe_recipe(config, run.Options(evaluations=(), linear_n_last_blocks=4), None)
  with pytest.raises(ValueError, match='linear_n_last_blocks'):
    run.Options(evaluations=(), linear_n_last_blocks=0).check()


def test_vit_probe_input_is_the_encoders_linear_features(monkeypatch):
  """The probe's `net.apply` method on the evaluation network (encoder + ViT projector)
  gives what the encoder's own `linear_features` gives, (B, (n + 1) D)."""
  monkeypatch.setitem(vit.ARCHITECTURES, 'vit_small', vit.ViTArchitecture(32, 3, 2, False))
  config = _config('imagenet_vit_small')
  config.update(dict(mlp_dim=16, emb_dim=8, dtype='float32'))
  _, net = models.create_networks(config)
  images = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
  variables = net.init(jax.random.key(0), images, train=False)
  got = net.apply(variables, images, method=linear.vit_probe_input(2, True))
  encoder = models.create_encoder(config)
  want = encoder.apply({'params': variables['params']['encoder']}, images, 2, True,
                       method=vit.VisionTransformer.linear_features)
  assert got.shape == (2, 3 * 32)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # The last D values of the class-token part are the encoding (the class token, final norm).
  encoding = net.apply(variables, images, method='encode')
  np.testing.assert_allclose(np.asarray(got[:, 32:64]), np.asarray(encoding), rtol=1e-6,
                             atol=1e-6)


def test_linear_probe_trains_on_a_bn_free_vit(monkeypatch, capsys):
  """train_classifier with the ViT probe input on a tiny plain ViT (no batch_stats at
  all): the head is sized for the (n + 1) D input and learns without error; its
  progress lines count images."""
  from resa_jax.evaluate import model as model_lib
  monkeypatch.setitem(vit.ARCHITECTURES, 'vit_small', vit.ViTArchitecture(16, 2, 2, False))
  config = _config('imagenet_vit_small')
  config.update(dict(mlp_dim=16, emb_dim=8, dtype='float32'))
  _, net = models.create_networks(config)
  rng = np.random.default_rng(2)
  batch = lambda: {'image': rng.normal(size=(4, 16, 16, 3)).astype(np.float32),
                   'label': rng.integers(0, 3, size=(4,)).astype(np.int32),
                   'mask': np.ones((4,), bool)}
  variables = net.init(jax.random.key(0), batch()['image'], train=False)
  assert 'batch_stats' not in variables
  model = model_lib.Model(net=net, variables={'params': variables['params'], 'batch_stats': {}},
                          source={})
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ('data',))
  eval_set = [batch()]
  result = linear.train_classifier(
      model, mesh, iter(lambda: batch(), None), lambda: iter(eval_set), num_classes=3,
      steps_per_epoch=2, epochs=1, head_lr=0.1, encode=linear.vit_probe_input(2, True))
  assert np.isfinite(result['train_loss']) and result['num_eval'] == 4 and result['steps'] == 2
  out = capsys.readouterr().out
  assert 'classifier training: 8/8 images (100%), ' in out and 'images/s' in out


def test_small_image_vit_config_has_patches_of_its_patch_size_and_stores_its_table():
  """configs/fashion_mnist_vit.py: 28 px in p px patches is (28 / p)^2 tokens, the position
  table stored for the 28 px global crop (no interpolation in training); the conv stem
  refuses any patch size but 16."""
  config = _config('fashion_mnist_vit')
  validation.validate_config(config)
  encoder = models.create_encoder(config)
  images = jnp.zeros((2, 28, 28, 1), jnp.float32)
  variables = encoder.init(jax.random.key(0), images, train=False)
  dim, p = vit.ARCHITECTURES[config.arch].dim, config.patch_size
  grid = 28 // p
  assert variables['params']['pos_embed'].shape == (1, 1 + grid * grid, dim)
  assert variables['params']['patch_embed']['proj']['kernel'].shape == (p, p, 1, dim)
  tokens = encoder.apply(variables, images, False, method=vit.VisionTransformer.tokens)
  assert tokens.shape == (2, 1 + grid * grid, dim)
  np.testing.assert_allclose(np.asarray(tokens[0, 1:] - tokens[0, 1]),  # a constant image:
                             np.asarray(variables['params']['pos_embed'][0, 1:]
                                        - variables['params']['pos_embed'][0, 1]), atol=1e-6)
  config.arch = 'vitc_tiny'
  with pytest.raises(ValueError, match='patches of 16'):
    validation.validate_config(config)
