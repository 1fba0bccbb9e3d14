"""The sharded ReSA train step: 1 device vs 8 simulated devices, and its metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from resa_jax import models
from resa_jax import step as step_lib


def _views(batch, seed=0, sizes=(16, 16, 8), dtype=jnp.float32):  # weak, strong, small crop
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=(batch, s, s, 3)), dtype) for s in sizes)


def _run(config, devices, num_steps=2, sizes=(16, 16, 8), view_dtype=None):
  mesh = jax.sharding.Mesh(np.asarray(devices), ('data',))
  online, momentum = models.create_networks(config)
  total_steps, steps_per_epoch = 4, 2
  schedule = step_lib.learning_rate_schedule(config, steps_per_epoch, total_steps)
  tx = step_lib.create_optimizer(config, schedule)
  state = step_lib.create_train_state(jax.random.key(0), online, momentum, tx, (16, 16, 3))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  state = jax.device_put(state, replicated)
  step = step_lib.make_train_step(config, online_net=online, momentum_net=momentum, tx=tx, mesh=mesh,
                               lr_schedule=schedule, total_steps=total_steps)
  history = []
  for i in range(num_steps):
    views = jax.device_put(_views(config.batch_size, seed=i, sizes=sizes,
                                  dtype=view_dtype or jnp.dtype(config.dtype)), batch)
    state, metrics = step(state, views)
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history


def _assert_trees_close(a, b, rtol, atol, what):
  paths_a = jax.tree_util.tree_leaves_with_path(a)
  leaves_b = jax.tree.leaves(b)
  assert len(paths_a) == len(leaves_b)
  for (path, x), y in zip(paths_a, leaves_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                               err_msg=f'{what} {jax.tree_util.keystr(path)}')


# 1 device against 8: the same steps up to the order of the cross-device reductions
# (BatchNorm statistics, Sinkhorn sums, gradients).  Compared in float64: in float32 that
# order shows at 2e-3 (relative) in the gradient norm on some CPUs (XLA:CPU's unoptimised
# pipeline on an AVX-512 VM), at 1e-6 on others, so no float32 tolerance is both tight
# and CPU-independent.  Measured in float64 on an AVX-512 VM (2026-12-04): the ResNet's
# largest relative difference over metrics and state is 2e-14; the tiny ViT's 5e-9 in
# the gradient norm and 7e-8 in the class token after 2 steps (its attention gradients
# are sums of nearly cancelling terms; the k part of the qkv bias has a zero gradient in
# exact arithmetic).  The tolerances keep about 50x over those.
RTOL_F64, ATOL_F64 = 1e-12, 1e-14
VIT_RTOL_F64, VIT_ATOL_F64 = 5e-6, 1e-12


def _one_and_eight_devices(config, sizes=(16, 16, 8)):
  """(state, metrics history) of 2 float64 steps on 1 and on 8 devices."""
  config.dtype = 'float64'
  with jax.enable_x64(True):
    return (_run(config, jax.devices()[:1], sizes=sizes),
            _run(config, jax.devices()[:8], sizes=sizes))


def _assert_same_steps(one, eight, names=('params', 'momentum_params', 'batch_stats',
                                           'momentum_batch_stats'), rtol=RTOL_F64,
                       atol=ATOL_F64):
  (state1, hist1), (state8, hist8) = one, eight
  for m1, m8 in zip(hist1, hist8):
    for key in m1:
      np.testing.assert_allclose(m1[key], m8[key], rtol=rtol, atol=atol, err_msg=key)
  for name in names:  # each leaf relative to its own scale (max |x|)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(getattr(state1, name)),
                            jax.tree.leaves(getattr(state8, name))):
      x, y = np.asarray(x), np.asarray(y)
      np.testing.assert_allclose(x, y, rtol=0, atol=atol + rtol * float(np.max(np.abs(y))),
                                 err_msg=f'{name} {jax.tree_util.keystr(path)}')


@pytest.mark.slow
@pytest.mark.skipif(len(jax.devices()) < 8, reason='needs 8 (simulated) devices')
def test_one_device_equals_eight_devices():
  one, eight = _one_and_eight_devices(tiny_config())
  _assert_same_steps(one, eight)
  assert int(eight[0].step) == 2
  assert jax.tree.leaves(eight[0].params)[0].dtype == np.float64


@pytest.mark.slow  # ViT steps compiled: 15-25 s (fast ViT tests: test_vit_recipe.py)
@pytest.mark.skipif(len(jax.devices()) < 8, reason='needs 8 (simulated) devices')
@pytest.mark.parametrize('arch', ['vit_tiny', 'vitc_tiny'])
def test_one_device_equals_eight_devices_vit(arch, monkeypatch):
  """A shrunken ViT (dim 32, 2 blocks, 2 heads; the ViTC's stem BN is SyncBN) with
  their ViT heads, on 32 / 32 / 16 px views (2x2 and 1x1 patches, resized tables)."""
  from resa_jax.models import vit
  monkeypatch.setitem(vit.ARCHITECTURES, arch,
                      vit.ARCHITECTURES[arch]._replace(dim=32, depth=2, heads=2))
  # SGD, not AdamW: the k part of the qkv bias has a zero gradient in exact arithmetic
  # (it shifts a softmax row by a constant), and Adam would scale its rounding noise up
  # to lr-sized, device-count-dependent steps.
  config = tiny_config(arch=arch)
  one, eight = _one_and_eight_devices(config, sizes=(32, 32, 16))
  _assert_same_steps(one, eight, rtol=VIT_RTOL_F64, atol=VIT_ATOL_F64)
  state8 = eight[0]
  assert bool(state8.batch_stats) == vit.ARCHITECTURES[arch].conv_stem  # BN only in the conv stem
  # Their requires_grad=False parameters do not move (weight decay included).
  with jax.enable_x64(True):
    init = step_lib.create_train_state(jax.random.key(0), *models.create_networks(config),
                                       step_lib.create_optimizer(config, lambda _: 0.0),
                                       (16, 16, 3))
  frozen = models.parameter_labels(init.params)
  moved = jax.tree.map(lambda a, b, f: (f == 'frozen', bool(np.any(np.asarray(a) != b))),
                       init.params, state8.params, frozen)
  flags = jax.tree.leaves(moved, is_leaf=lambda x: isinstance(x, tuple))
  assert any(f for f, _ in flags) and not any(m for f, m in flags if f)
  assert all(m for f, m in flags if not f)


@pytest.mark.slow  # ViT steps compiled: 15-25 s (fast ViT tests: test_vit_recipe.py)
@pytest.mark.skipif(len(jax.devices()) < 8, reason='needs 8 (simulated) devices')
def test_vit_drop_path_draws_per_step_the_same_on_any_mesh(monkeypatch):
  """Drop path in the online ViT (keys from (seed, step), no key in the state): the
  same steps on 1 and 8 devices, and not the steps without it."""
  from resa_jax.models import vit
  monkeypatch.setitem(vit.ARCHITECTURES, 'vit_tiny', vit.ViTArchitecture(32, 2, 2, False))
  sizes = (32, 32, 16)
  config = tiny_config(arch='vit_tiny', drop_path=0.5)
  online, momentum = models.create_networks(config)
  assert online.encoder.drop_path_rate == 0.5 and momentum.encoder.drop_path_rate == 0.0
  one, eight = _one_and_eight_devices(config, sizes=sizes)
  _assert_same_steps(one, eight, names=('params',), rtol=VIT_RTOL_F64, atol=VIT_ATOL_F64)
  hist1 = one[1]
  plain_config = tiny_config(arch='vit_tiny')
  plain_config.dtype = 'float64'
  with jax.enable_x64(True):
    _, plain = _run(plain_config, jax.devices()[:1], sizes=sizes)
  assert hist1[0]['loss'] != plain[0]['loss']
  assert abs(float(hist1[0]['loss']) - float(plain[0]['loss'])) > 1e-4


def test_step_metrics_and_learning_signal():
  config = tiny_config(batch_size=8, warmup_epochs=1)  # 2 steps of warm-up
  state, hist = _run(config, jax.devices()[:2], num_steps=3)
  for m in hist:
    assert np.isfinite(m['loss']) and m['loss'] > 0
    assert 0 <= m['assignment_entropy'] <= np.log(8) + 1e-5
    assert m['grad_norm'] > 0
  # Warm-up: lr grows linearly from 0 (peak 0.3 * 8 / 256 after 2 steps).
  np.testing.assert_allclose([m['lr'] for m in hist], [0.0, 0.3 * 8 / 256 / 2, 0.3 * 8 / 256],
                             rtol=1e-6)
  np.testing.assert_allclose(hist[0]['ema_momentum'], 0.996, rtol=1e-7)
  assert hist[1]['ema_momentum'] > hist[0]['ema_momentum']


@pytest.mark.slow  # ViT steps compiled: 15-25 s (fast ViT tests: test_vit_recipe.py)
def test_vit_views_of_one_size_run_as_one_batch_like_their_forward_wrapper(monkeypatch):
  """forward_views(together=True), what the step uses for ViTs: the two 32 px views go
  through the ViTC (BatchNorm in its stem) as one torch.cat-ed batch, the 16 px view on
  its own after them; the reference concatenates in torch's order (view-major), so the
  row-by-row interleaving cannot hide a difference.  Per view (the ResNet way) differs."""
  from resa_jax.models import vit
  monkeypatch.setitem(vit.ARCHITECTURES, 'vitc_tiny', vit.ViTArchitecture(32, 2, 2, True))
  config = tiny_config(arch='vitc_tiny')
  online, _ = models.create_networks(config)
  views = _views(4, sizes=(32, 32, 16))
  variables = online.init(jax.random.key(0), views[0], train=False)
  params, stats = variables['params'], variables['batch_stats']
  h, z, new_stats = step_lib.forward_views(online, params, stats, views, together=True)

  def apply(x, stats):
    (h, z), updates = online.apply({'params': params, 'batch_stats': stats}, x, train=True,
                                   mutable=['batch_stats'])
    return h, z, updates['batch_stats']
  h01, z01, ref_stats = apply(jnp.concatenate(views[:2]), stats)
  h2, z2, ref_stats = apply(views[2], ref_stats)
  want_h, want_z = (h01[:4], h01[4:], h2), (z01[:4], z01[4:], z2)
  for got, want in zip(h + z, want_h + want_z):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  _assert_trees_close(new_stats, ref_stats, 1e-6, 1e-6, 'batch_stats')
  h_alone, _, _ = step_lib.forward_views(online, params, stats, views, together=False)
  assert float(jnp.max(jnp.abs(h_alone[0] - h[0]))) > 1e-3


def test_the_step_refuses_views_it_cannot_read():
  """The jitted step checks its views when it is traced: too few, of two batch sizes,
  unnormalised uint8, a batch that does not divide over the devices; one line each."""
  config = tiny_config(batch_size=8)
  views = _views(8)
  cases = [
      (views[:1], ValueError, 'two or more views'),
      ((views[0], views[1][:4], views[2]), ValueError, r'one batch size B .* got \[\(8, 16'),
      (tuple(v[..., :1] if i else v for i, v in enumerate(views)), ValueError, 'channel count'),
      (tuple(v.astype(jnp.uint8) for v in views), TypeError, r"\['uint8'\].*device_views"),
      (tuple(v[:6] for v in views), ValueError,
       r'batch size 6 must be a positive multiple of the number of devices \(4\)'),
  ]
  for bad, error, words in cases:
    with pytest.raises(error, match=words):
      step_lib.check_views(bad, 4)
  with pytest.raises(TypeError, match='floating-point images'):  # reached under jit
    _run(config, jax.devices()[:2], num_steps=1, view_dtype=jnp.uint8)
