"""layers.conv_general_dilated: XLA's values, and on CPU a matmul weight gradient.

The reference is `lax.conv_general_dilated` and its own autodiff, computed in the same
process; the shapes cover every convolution the encoders build (the ResNet 3x3 /
stride-2 / 1x1 downsample / 7x7 stem / CIFAR stem with its pad, the ViTC stem).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from resa_jax.models import layers

CASES = [  # (input NHWC, kernel HWIO, strides, padding)
    ((2, 9, 9, 4), (3, 3, 4, 5), (1, 1), ((1, 1), (1, 1))),
    ((2, 9, 8, 4), (3, 3, 4, 6), (2, 2), ((1, 1), (1, 1))),   # odd/even sizes, stride 2
    ((3, 10, 10, 6), (1, 1, 6, 8), (2, 2), ((0, 0), (0, 0))),  # downsample
    ((2, 17, 17, 3), (7, 7, 3, 4), (2, 2), ((3, 3), (3, 3))),  # ImageNet stem
    ((2, 8, 8, 3), (3, 3, 3, 4), (1, 1), ((2, 2), (2, 2))),    # CIFAR stem and its pad
    ((2, 12, 12, 3), (3, 3, 3, 4), (1, 1), 'SAME'),
    ((2, 12, 12, 3), (4, 4, 3, 4), (4, 4), 'VALID'),
]


@pytest.fixture(autouse=True)
def matmul_weight_gradient(monkeypatch):
  """The matmul form on, whatever this CPU would choose (it is what these tests check)."""
  monkeypatch.setenv('RESA_CPU_CONV_MATMUL', '1')


def test_the_form_is_chosen_by_the_cpu_unless_set(monkeypatch):
  for flags, expected in ((True, False), (False, True)):
    monkeypatch.setattr(layers, '_cpu_has_avx512', lambda flags=flags: flags)
    monkeypatch.delenv('RESA_CPU_CONV_MATMUL')
    assert layers.cpu_matmul_weight_gradient() is expected
    for setting in ('0', '1'):
      monkeypatch.setenv('RESA_CPU_CONV_MATMUL', setting)
      assert layers.cpu_matmul_weight_gradient() is (setting == '1')


def _loss(conv, x, w, strides, padding):
  y = conv(x, w, strides, padding,
           dimension_numbers=lax.conv_dimension_numbers(x.shape, w.shape,
                                                        ('NHWC', 'HWIO', 'NHWC')))
  return jnp.sum(jnp.sin(y) * y), y  # a cotangent that is not all ones


@pytest.mark.parametrize('x_shape,w_shape,strides,padding', CASES)
def test_values_and_gradients_match_xla_in_float64(x_shape, w_shape, strides, padding):
  with jax.enable_x64(True):
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, x_shape, jnp.float64)
    w = jax.random.normal(kw, w_shape, jnp.float64)
    results = []
    for conv in (lax.conv_general_dilated, layers.conv_general_dilated):
      grad = jax.jit(jax.grad(_loss, argnums=(1, 2), has_aux=True), static_argnums=(0, 3, 4))
      (gx, gw), y = grad(conv, x, w, strides, padding)
      results.append((y, gx, gw))
    for ours, ref in zip(results[1], results[0]):
      np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-12, atol=1e-12)


def test_cpu_weight_gradient_is_matmuls_and_bfloat16_gradients_keep_their_dtype():
  x = jnp.ones((2, 6, 6, 3), jnp.bfloat16)
  w = jnp.full((3, 3, 3, 4), 0.5, jnp.bfloat16)
  def weight_gradient(conv):
    loss = lambda w: _loss(conv, x, w, (1, 1), ((1, 1), (1, 1)))[0]  # noqa: E731
    return str(jax.make_jaxpr(jax.grad(loss))(w))
  # XLA's weight gradient is a convolution; ours is one matmul per kernel offset.
  assert weight_gradient(lax.conv_general_dilated).count('dot_general') == 0
  assert weight_gradient(layers.conv_general_dilated).count('dot_general') == 9
  gw = jax.grad(lambda w: _loss(layers.conv_general_dilated, x, w, (1, 1), 'SAME')[0])(w)
  ref = jax.grad(lambda w: _loss(lax.conv_general_dilated, x, w, (1, 1), 'SAME')[0])(w)
  assert gw.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(gw, np.float32), np.asarray(ref, np.float32), rtol=2e-2)


def test_unusual_convolutions_fall_back_to_xla():
  x = jnp.ones((1, 6, 6, 4))
  w = jnp.ones((3, 3, 2, 4))
  conv = lambda w: layers.conv_general_dilated(  # noqa: E731
      x, w, (1, 1), 'SAME', feature_group_count=2,
      dimension_numbers=lax.conv_dimension_numbers(x.shape, w.shape, ('NHWC', 'HWIO', 'NHWC')))
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda w: conv(w).sum()))(w))
  assert jaxpr.count('conv_general_dilated[') == 2 and 'dot_general' not in jaxpr


def test_flax_conv_with_it_has_the_same_parameters_and_outputs():
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  plain = nn.Conv(4, (3, 3), strides=2, padding=((1, 1), (1, 1)), use_bias=False)
  ours = nn.Conv(4, (3, 3), strides=2, padding=((1, 1), (1, 1)), use_bias=False,
                 conv_general_dilated=layers.conv_general_dilated)
  variables = plain.init(jax.random.key(2), x)
  assert jax.tree.structure(ours.init(jax.random.key(2), x)) == jax.tree.structure(variables)
  grads = [jax.grad(lambda v, m=m: jnp.sum(m.apply(v, x) ** 2))(variables) for m in (plain, ours)]
  np.testing.assert_allclose(grads[1]['params']['kernel'], grads[0]['params']['kernel'],
                             rtol=1e-5, atol=1e-5)
