"""layers.conv_general_dilated and the CPU forms of resa_jax/models/cpu_conv.py: XLA's
values in every form (the matmul weight gradient in float64, oneDNN's kernels in
float32, on one device and split over a mesh), and the form chosen by measurement.

The reference is `lax.conv_general_dilated` and its own autodiff, computed in the same
process; the shapes cover every convolution the encoders build (the ResNet 3x3 /
stride-2 / 1x1 downsample / 7x7 stem / CIFAR stem with its pad, the ViTC stem).
"""

import functools
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jax.sharding import NamedSharding, PartitionSpec as P

from resa_jax.models import cpu_conv, layers, onednn

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
  """The matmul form on, whatever this CPU would choose (the float64 tests check it)."""
  monkeypatch.setenv('RESA_CPU_CONV', 'matmul')


def test_the_form_is_the_one_predicted_fastest_unless_set(monkeypatch):
  monkeypatch.delenv('RESA_CPU_CONV')
  forms = cpu_conv.offered(jnp.float32)
  assert forms[-2:] == ('matmul', 'xla') and 'onednn' not in cpu_conv.offered(jnp.float64)
  assert 'onednn' not in cpu_conv.offered(jnp.float32, num_devices=8)
  monkeypatch.setattr(cpu_conv, 'offered', lambda dtype, num_devices=1: (
      ('onednn', 'matmul', 'xla') if dtype == jnp.float32 else ('matmul', 'xla')))
  for fastest in ('onednn', 'matmul', 'xla'):
    times = {form: {'small': 1.0, 'large': 2.0} for form in cpu_conv.BACKENDS}
    times[fastest] = {'small': 0.5, 'large': 1.0}
    monkeypatch.setattr(cpu_conv, 'measured', lambda times=times: times)
    assert cpu_conv.backend(jnp.float32) == fastest
    assert cpu_conv.backend(jnp.float64) == (fastest if fastest != 'onednn' else 'matmul')
  # A library call's fixed cost decides small convolutions, its speed large ones: each
  # form's line through its two measured times, at the convolution's size.
  times = {'onednn': {'small': 1e-3, 'large': 0.02}, 'matmul': {'small': 1e-4, 'large': 0.06},
           'xla': {'small': 2e-4, 'large': 0.05}}
  monkeypatch.setattr(cpu_conv, 'measured', lambda: times)
  small, large = (cpu_conv.work(x, w, x[:3] + w[3:]) for x, w in cpu_conv.CALIBRATION.values())
  assert cpu_conv.backend(jnp.float32, small) == 'matmul'
  assert cpu_conv.backend(jnp.float32, large) == 'onednn'
  assert cpu_conv.predicted_seconds(times['xla'], (small + large) / 2) == pytest.approx(
      (2e-4 + 0.05) / 2)
  for form in cpu_conv.BACKENDS:  # set: used where offered, else XLA's
    monkeypatch.setenv('RESA_CPU_CONV', form)
    assert cpu_conv.backend(jnp.float64) == ('xla' if form == 'onednn' else form)
  monkeypatch.setenv('RESA_CPU_CONV', 'fast')
  with pytest.raises(ValueError, match='RESA_CPU_CONV must be one of onednn, matmul, xla'):
    cpu_conv.backend()


def test_the_measured_times_are_kept_per_machine(tmp_path, monkeypatch):
  monkeypatch.setenv('RESA_CACHE_DIR', str(tmp_path))
  monkeypatch.setattr(cpu_conv, '_time_form', lambda form, x_shape, w_shape: (
      3.0 if form == 'xla' else 2.0) * x_shape[0])
  cpu_conv.measured.cache_clear()
  try:
    times = cpu_conv.measured()
    assert set(times) == set(cpu_conv.offered(jnp.float32))
    assert times['xla'] == {'small': 6.0, 'large': 48.0}  # batch 2 and 16
    import json  # pylint: disable=g-import-not-at-top
    records = json.loads((tmp_path / 'cpu_conv.json').read_text())
    assert list(records) == [onednn.machine()] and records[onednn.machine()] == times
    monkeypatch.setattr(cpu_conv, '_time_form', lambda *_: 9.0)  # read, not measured again
    cpu_conv.measured.cache_clear()
    assert cpu_conv.measured() == times
  finally:
    cpu_conv.measured.cache_clear()


def _loss(conv, x, w, strides, padding):
  y = conv(x, w, strides, padding,
           dimension_numbers=lax.conv_dimension_numbers(x.shape, w.shape,
                                                        ('NHWC', 'HWIO', 'NHWC')))
  return jnp.sum(jnp.sin(y) * y), y  # a cotangent that is not all ones


def _xla_and_ours(x_shape, w_shape, strides, padding, dtype):
  """((x, w), XLA's (y, dx, dw), layers.conv_general_dilated's (y, dx, dw)) of `_loss`
  on random inputs of `dtype`, each jit-compiled."""
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, x_shape, dtype)
  w = jax.random.normal(kw, w_shape, dtype)
  results = []
  for conv in (lax.conv_general_dilated, layers.conv_general_dilated):
    grad = jax.jit(jax.grad(_loss, argnums=(1, 2), has_aux=True), static_argnums=(0, 3, 4))
    (gx, gw), y = grad(conv, x, w, strides, padding)
    results.append((y, gx, gw))
  return (x, w), results[0], results[1]


@pytest.mark.parametrize('x_shape,w_shape,strides,padding', CASES)
def test_values_and_gradients_match_xla_in_float64(x_shape, w_shape, strides, padding):
  with jax.enable_x64(True):
    _, ref, ours = _xla_and_ours(x_shape, w_shape, strides, padding, jnp.float64)
    for a, b in zip(ours, ref):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)


def test_matmul_weight_gradient_is_matmuls_and_bfloat16_gradients_keep_their_dtype():
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


needs_onednn = pytest.mark.skipif(not onednn.checked()[0],
                                  reason=f'no oneDNN form here: {onednn.checked()[1]}')


@needs_onednn
@pytest.mark.parametrize('x_shape,w_shape,strides,padding', CASES)
def test_onednn_values_and_gradients_match_xla_in_float32(x_shape, w_shape, strides, padding,
                                                          monkeypatch):
  monkeypatch.setenv('RESA_CPU_CONV', 'onednn')
  (x, w), ref, ours = _xla_and_ours(x_shape, w_shape, strides, padding, jnp.float32)
  # float32 sums of up to 196 products in two summation orders: 5e-6 of the largest value
  # seen (the 7x7 stem's input gradient, 1 device), 2e-5 allowed; a wrong tap or offset
  # is off by the size of a term.
  for a, b in zip(ours, ref):
    scale = float(np.max(np.abs(b)))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-5 * scale)
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda w: _loss(layers.conv_general_dilated, x, w,
                                                          strides, padding)[0]))(w))
  assert 'conv_general_dilated' not in jaxpr  # oneDNN's, not XLA's


@needs_onednn
@pytest.mark.skipif(jax.device_count() < 8, reason='needs 8 (simulated) devices')
def test_onednn_on_a_mesh_splits_the_batch_and_sums_the_weight_gradient(monkeypatch):
  """Over 8 devices each runs oneDNN on its rows: the output stays split along the batch,
  the weight gradient is the sum over the devices, and both equal XLA's."""
  monkeypatch.setenv('RESA_CPU_CONV', 'onednn')
  mesh = jax.make_mesh((8,), ('data',))
  kx, kw = jax.random.split(jax.random.key(3))
  x = jax.device_put(jax.random.normal(kx, (16, 10, 10, 8)), NamedSharding(mesh, P('data')))
  w = jax.device_put(jax.random.normal(kw, (3, 3, 8, 12)), NamedSharding(mesh, P()))
  results = []
  for conv in (lax.conv_general_dilated, layers.conv_general_dilated):
    loss = jax.jit(jax.value_and_grad(lambda x, w, conv=conv: _loss(conv, x, w, (2, 2),
                                                                     'SAME')[0], argnums=(0, 1)))
    results.append(loss(x, w))
  (value, (gx, gw)), (ref_value, (ref_gx, ref_gw)) = results
  assert gx.sharding.spec[0] == 'data' and gx.sharding.is_equivalent_to(x.sharding, 4)
  compiled = jax.jit(lambda x, w: layers.conv_general_dilated(
      x, w, (2, 2), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))).lower(x, w).compile()
  assert 'all-gather' not in compiled.as_text()  # no device gathers the batch
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for ours, ref in ((gx, ref_gx), (gw, ref_gw)):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=0,
                               atol=2e-5 * float(np.max(np.abs(ref))))


def test_the_onednn_form_is_not_offered_where_it_cannot_be_built(tmp_path, monkeypatch):
  monkeypatch.setenv('RESA_CACHE_DIR', str(tmp_path))  # nothing built here yet
  monkeypatch.setenv('CXX', 'false')  # a compiler that always fails
  onednn._library.cache_clear()
  onednn.checked.cache_clear()
  try:
    ready, reason = onednn.built()
    assert not ready and 'cannot build or load onednn.cc with oneDNN' in reason
    assert onednn.checked() == (False, reason)
    assert cpu_conv.offered(jnp.float32) == ('matmul', 'xla')
    monkeypatch.setenv('RESA_CPU_CONV', 'onednn')
    assert cpu_conv.backend() == 'xla'
  finally:
    onednn._library.cache_clear()
    onednn.checked.cache_clear()


def test_the_check_finds_wrong_values_and_failures():
  """The check the oneDNN form passes before it is offered compares values, not only
  that a form runs: a form 0.1% off, one with its images shifted, and one that raises
  all fail it; XLA's and the matmul form pass."""
  for form in ('xla', 'matmul'):
    assert onednn.check_against_xla(functools.partial(cpu_conv.conv, form), repeats=1) == ''

  def scaled(x, w, strides, padding):
    return cpu_conv.conv('xla', x, w * 1.001, strides, padding)

  def shifted(x, w, strides, padding):
    return jnp.roll(cpu_conv.conv('xla', x, w, strides, padding), 1, axis=0)

  def failing(x, w, strides, padding):
    raise RuntimeError('no kernel for this shape')

  for broken, message in ((scaled, 'the output differs from XLA'),
                          (shifted, 'the output differs from XLA'),
                          (failing, 'no kernel for this shape')):
    assert message in onednn.check_against_xla(broken, repeats=1)


@pytest.mark.parametrize('command,reason', [
    ('import os; os.abort()', 'the check ended with signal SIGABRT'),
    ('import json; print(json.dumps({"failed": "the weight gradient differs"}))',
     'the weight gradient differs'),
    ('print("nothing")', 'the check printed no result'),
])
def test_the_onednn_form_is_offered_only_after_its_check_passes_in_a_process(
    command, reason, tmp_path, monkeypatch):
  """A check that crashes (oneDNN 2.6.3's strided 1x1 kernels corrupted the heap on
  8-channel inputs) or finds a difference keeps the form off, and the verdict is kept
  per machine."""
  class Built:  # onednn.cc as built where oneDNN runs AVX-512 kernels
    ResaOneDnnAvx512 = staticmethod(lambda: 1)
  monkeypatch.setattr(onednn, '_library', lambda: (Built, ''))
  monkeypatch.setenv('RESA_CACHE_DIR', str(tmp_path))
  monkeypatch.setattr(onednn, '_CHECK_COMMAND', (sys.executable, '-c', command))
  onednn.checked.cache_clear()
  try:
    ready, why = onednn.checked()
    assert not ready and reason in why and why.startswith('the oneDNN form failed its check')
    assert cpu_conv.offered(jnp.float32) == ('matmul', 'xla')
    monkeypatch.setattr(onednn, '_CHECK_COMMAND', (sys.executable, '-c', 'raise SystemExit'))
    onednn.checked.cache_clear()
    assert onednn.checked() == (ready, why)  # kept: not run again
  finally:
    onednn.checked.cache_clear()
