"""resa_loss, the EMA update and the momentum schedule against independent numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resa_jax import losses


def _normalized(rng, shape):
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def numpy_resa_loss(z_online, z_target, assignment, tau):
  total, count = 0.0, 0
  for q in range(z_online.shape[0]):
    for v in range(z_target.shape[0]):
      if q == v:
        continue
      logits = z_online[q].astype(np.float64) @ z_target[v].T.astype(np.float64) / tau
      logits -= logits.max(1, keepdims=True)
      log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
      total += -(assignment * log_probs).sum(1).mean()
      count += 1
  return total / count


def test_resa_loss_multicrop_and_rectangular():
  rng = np.random.default_rng(0)
  z_online, z_target = _normalized(rng, (5, 6, 8)), _normalized(rng, (2, 12, 8))
  assignment = rng.dirichlet(np.ones(12), size=6).astype(np.float32)
  got = losses.resa_loss(jnp.asarray(z_online), jnp.asarray(z_target), jnp.asarray(assignment), 0.4)
  np.testing.assert_allclose(float(got), numpy_resa_loss(z_online, z_target, assignment, 0.4),
                             rtol=1e-6)


def test_resa_loss_bfloat16_inputs_computed_in_float32():
  rng = np.random.default_rng(1)
  z_online, z_target = _normalized(rng, (2, 8, 16)), _normalized(rng, (2, 8, 16))
  assignment = rng.dirichlet(np.ones(8), size=8).astype(np.float32)
  zo, zt = jnp.asarray(z_online, jnp.bfloat16), jnp.asarray(z_target, jnp.bfloat16)
  got = losses.resa_loss(zo, zt, jnp.asarray(assignment), 0.4)
  assert got.dtype == jnp.float32
  want = numpy_resa_loss(np.asarray(zo.astype(jnp.float32)), np.asarray(zt.astype(jnp.float32)),
                         assignment, 0.4)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_resa_loss_gradient_only_to_online():
  rng = np.random.default_rng(2)
  z_online, z_target = _normalized(rng, (2, 4, 3)), _normalized(rng, (2, 4, 3))
  assignment = jnp.asarray(rng.dirichlet(np.ones(4), size=4), jnp.float32)
  g_online, g_target = jax.grad(losses.resa_loss, argnums=(0, 1))(
      jnp.asarray(z_online), jnp.asarray(z_target), assignment)
  assert float(jnp.abs(g_online).sum()) > 0
  assert float(jnp.abs(g_target).sum()) == 0


def test_ema_update_and_schedule():
  target = {'a': jnp.ones(3), 'b': {'c': jnp.zeros(2)}}
  online = {'a': jnp.zeros(3), 'b': {'c': jnp.full(2, 10.0)}}
  out = losses.ema_update(target, online, 0.9)
  np.testing.assert_allclose(np.asarray(out['a']), 0.9)
  np.testing.assert_allclose(np.asarray(out['b']['c']), 1.0)
  total = 1000
  steps = np.arange(0, total + 1, 50)
  got = np.asarray([float(losses.ema_momentum_schedule(s, total, 0.996)) for s in steps])
  want = 1 - (1 - 0.996) * (np.cos(np.pi * steps / total) + 1) / 2
  np.testing.assert_allclose(got, want, atol=1e-7)
  assert got[0] == np.float32(0.996) and got[-1] == 1.0
  assert float(losses.ema_momentum_schedule(2 * total, total)) == 1.0


def test_l2_normalize_matches_torch_convention():
  x = jnp.asarray([[3.0, 4.0], [0.0, 0.0]])
  np.testing.assert_allclose(np.asarray(losses.l2_normalize(x)), [[0.6, 0.8], [0.0, 0.0]])


def test_the_functions_refuse_what_they_cannot_read():
  """One-line errors for shapes, dtypes and ranges outside each function's domain, the
  way resa_jax.sinkhorn refuses its own; traced values are not range-checked."""
  rng = np.random.default_rng(3)
  z_online, z_target = _normalized(rng, (3, 4, 8)), _normalized(rng, (2, 6, 8))
  assignment = rng.dirichlet(np.ones(6), size=4).astype(np.float32)
  bad_loss_inputs = [
      ((z_online[0], z_target, assignment, 0.4), ValueError, r'z_online \(V, b, e\)'),
      ((z_online, z_target[..., :4], assignment, 0.4), ValueError, r'\(2, 6, 4\)'),
      ((z_online, z_target, assignment.T, 0.4), ValueError, r'assignment \(b, B\)'),
      ((z_online, z_target, assignment, 0.0), ValueError, r'temperature must be finite and '
       r'in \(0, inf\], got 0.0'),
      ((z_online, z_target, assignment, float('nan')), ValueError, 'temperature'),
      ((z_online, z_target, assignment, 'hot'), TypeError, 'temperature must be a real'),
      ((z_online.astype(np.int32), z_target, assignment, 0.4), TypeError, 'floating-point'),
  ]
  for args, error, words in bad_loss_inputs:
    with pytest.raises(error, match=words):
      losses.resa_loss(*args)
  traced = jax.jit(losses.resa_loss)(z_online, z_target, assignment, 0.4)  # tau traced
  np.testing.assert_allclose(float(traced), numpy_resa_loss(z_online, z_target, assignment, 0.4),
                             rtol=1e-6)

  params = {'w': jnp.ones((2, 3)), 'b': jnp.zeros(3)}
  with pytest.raises(ValueError, match='same structure'):
    losses.ema_update(params, {'w': params['w']}, 0.99)
  with pytest.raises(ValueError, match=r'same shapes; 1 differ, first \(3,\) and \(4,\)'):
    losses.ema_update(params, {'w': params['w'], 'b': jnp.zeros(4)}, 0.99)
  with pytest.raises(ValueError, match=r'momentum must be finite and in \[0, 1\], got 1.5'):
    losses.ema_update(params, params, 1.5)
  for total, words in ((0, 'total_steps must be a positive int, got 0'),
                       (2.5, 'got 2.5')):
    with pytest.raises(ValueError, match=words):
      losses.ema_momentum_schedule(0, total)
  with pytest.raises(ValueError, match=r'base must be finite and in \[0, 1\], got -0.1'):
    losses.ema_momentum_schedule(0, 10, base=-0.1)
  assert float(losses.ema_momentum_schedule(0, np.int64(10))) == np.float32(0.996)
