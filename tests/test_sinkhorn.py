"""Properties of resa_jax.sinkhorn beyond the reference vectors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resa_jax import sinkhorn as sk


def exp_domain_sinkhorn(scores, epsilon, num_iters, dtype=np.float64):
  """The reference iteration (SwAV / ReSA), in numpy, as an independent oracle."""
  q = np.exp(np.asarray(scores, dtype) / epsilon).T  # (B, b)
  num_rows, num_cols = q.shape
  q = q / q.sum()
  for _ in range(num_iters):
    q = q / q.sum(axis=1, keepdims=True) / num_rows
    q = q / q.sum(axis=0, keepdims=True) / num_cols
  return (q * num_cols).T


def _scores(shape, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, size=shape).astype(np.float32)


@pytest.mark.parametrize('shape,epsilon,num_iters', [((16, 16), 0.05, 3), ((12, 40), 0.1, 5),
                                                     ((40, 12), 0.05, 1)])
def test_matches_float64_oracle(shape, epsilon, num_iters):
  scores = _scores(shape)
  got = sk.sinkhorn(jnp.asarray(scores), epsilon, num_iters)
  np.testing.assert_allclose(np.asarray(got), exp_domain_sinkhorn(scores, epsilon, num_iters),
                             atol=2e-6)


def test_zero_iterations_is_row_softmax():
  scores = _scores((8, 8))
  got = sk.sinkhorn(jnp.asarray(scores), 0.5, 0)
  want = np.exp(scores / 0.5) / np.exp(scores / 0.5).sum(1, keepdims=True)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


@pytest.mark.parametrize('epsilon', [0.01, 0.005])
def test_small_epsilon_is_finite_where_exp_domain_overflows(epsilon):
  scores = _scores((64, 64), seed=1)
  with np.errstate(over='ignore', invalid='ignore'):
    reference32 = exp_domain_sinkhorn(scores, epsilon, 3, dtype=np.float32)
  assert not np.all(np.isfinite(reference32)), 'the float32 exp-domain reference should overflow'
  got = np.asarray(sk.sinkhorn(jnp.asarray(scores), epsilon, 3))
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
  # Iterated to convergence, the column marginal is the uniform N / B as well.
  out = sk.sinkhorn_with_tolerance(jnp.asarray(scores), epsilon, tol=1e-3, max_iters=20000)
  converged = np.asarray(out.assignment)
  assert np.all(np.isfinite(converged)) and float(out.error) <= 1e-3
  np.testing.assert_allclose(converged.sum(axis=1), 1.0, atol=1e-5)
  assert np.abs(converged.sum(axis=0) / 64 - 1 / 64).sum() <= 1.1e-3
  # And it is the same iteration as the (float64, which does not overflow here) oracle.
  if np.abs(scores).max() / epsilon < np.log(np.finfo(np.float64).max):
    np.testing.assert_allclose(got, exp_domain_sinkhorn(scores, epsilon, 3), atol=1e-5)


def test_float64_inputs_stay_float64_under_x64():
  """With JAX x64, float64 scores are computed in float64 (for float64 parity runs),
  both by the fixed-iteration and by the tolerance solver."""
  scores = np.random.default_rng(3).uniform(-1, 1, size=(12, 20))
  with jax.enable_x64(True):
    got = sk.sinkhorn(jnp.asarray(scores, jnp.float64), 0.05, 3)
    out = sk.sinkhorn_with_tolerance(jnp.asarray(scores, jnp.float64), 0.05, tol=1e-9,
                                     max_iters=5000)
  assert got.dtype == jnp.float64 and out.assignment.dtype == out.error.dtype == jnp.float64
  np.testing.assert_allclose(np.asarray(got), exp_domain_sinkhorn(scores, 0.05, 3),
                             rtol=1e-12, atol=0)
  assert float(out.error) <= 1e-9
  np.testing.assert_allclose(np.asarray(out.assignment).sum(axis=1), 1.0, rtol=0, atol=1e-12)


def test_bfloat16_inputs_give_float32_answer_on_rounded_inputs():
  scores = _scores((32, 32), seed=2)
  rounded = jnp.asarray(scores).astype(jnp.bfloat16)
  got = sk.sinkhorn(rounded, 0.05, 3)
  assert got.dtype == jnp.float32
  want = exp_domain_sinkhorn(np.asarray(rounded.astype(jnp.float32)), 0.05, 3)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_vmap_and_leading_dims_equal_loop():
  scores = jnp.asarray(_scores((3, 10, 14), seed=3))
  looped = jnp.stack([sk.sinkhorn(s, 0.1, 3) for s in scores])
  np.testing.assert_allclose(np.asarray(jax.vmap(lambda s: sk.sinkhorn(s, 0.1, 3))(scores)),
                             np.asarray(looped), atol=1e-6)
  np.testing.assert_allclose(np.asarray(sk.sinkhorn(scores, 0.1, 3)), np.asarray(looped),
                             atol=1e-6)


def test_gradient_by_unrolling_matches_finite_differences():
  scores = jnp.asarray(_scores((6, 9), seed=4), jnp.float32)
  weights = jnp.asarray(np.random.default_rng(5).normal(size=(6, 9)), jnp.float32)
  f = lambda s: jnp.sum(weights * sk.sinkhorn(s, 0.5, 3))
  grad = jax.grad(f)(scores)
  direction = jnp.asarray(np.random.default_rng(6).normal(size=(6, 9)), jnp.float32)
  h = 1e-2
  fd = (f(scores + h * direction) - f(scores - h * direction)) / (2 * h)
  np.testing.assert_allclose(float(jnp.sum(grad * direction)), float(fd), rtol=2e-2, atol=1e-4)


def test_tolerance_mode():
  scores = jnp.asarray(_scores((32, 48), seed=7))
  out = jax.jit(lambda s: sk.sinkhorn_with_tolerance(s, 0.05, tol=1e-4, max_iters=500))(scores)
  assert float(out.error) <= 1e-4
  assert 3 < int(out.num_iters) < 500
  # Its result is the fixed-iteration result with the same number of iterations.
  fixed = sk.sinkhorn(scores, 0.05, int(out.num_iters))
  np.testing.assert_allclose(np.asarray(out.assignment), np.asarray(fixed), atol=1e-5)
  col_mass = np.asarray(out.assignment).sum(0) / 32
  np.testing.assert_allclose(np.abs(col_mass - 1 / 48).sum(), float(out.error), atol=1e-5)
  capped = sk.sinkhorn_with_tolerance(scores, 0.05, tol=0.0, max_iters=4)
  assert int(capped.num_iters) == 4 and float(capped.error) > 0


def test_sharded_rows_equal_single_device():
  devices = jax.devices()
  mesh = jax.sharding.Mesh(np.asarray(devices), ('data',))
  P = jax.sharding.PartitionSpec
  n = len(devices)
  scores = jnp.asarray(_scores((4 * n, 4 * n), seed=8))

  def sharded(fn):
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P('data'), out_specs=P('data')))

  got = sharded(lambda s: sk.sinkhorn(s, 0.05, 3, axis_name='data'))(scores)
  np.testing.assert_allclose(np.asarray(got), np.asarray(sk.sinkhorn(scores, 0.05, 3)), atol=1e-6)
  tol_out = jax.jit(jax.shard_map(
      lambda s: sk.sinkhorn_with_tolerance(s, 0.05, tol=1e-3, axis_name='data'),
      mesh=mesh, in_specs=P('data'), out_specs=sk.SinkhornOutput(P('data'), P(), P())))(scores)
  single = sk.sinkhorn_with_tolerance(scores, 0.05, tol=1e-3)
  assert int(tol_out.num_iters) == int(single.num_iters)
  np.testing.assert_allclose(np.asarray(tol_out.assignment), np.asarray(single.assignment),
                             atol=1e-5)


def _nearly_empty_row_scores(n=16):
  """Scores where row 0 is far below every column's best row: at epsilon 0.005 its
  mass after the first column step is ~exp(-300), below float32's range."""
  scores = np.random.default_rng(9).uniform(0.5, 1.0, size=(n, n)).astype(np.float32)
  scores[0] = -1.0
  return scores


def test_bounded_shift_path_equals_max_shift_path_on_ordinary_scores():
  for shape, epsilon in [((16, 16), 0.05), ((24, 40), 0.1), ((64, 64), 0.01)]:
    logits = jnp.asarray(_scores(shape, seed=10)) / epsilon
    *potentials, safe = sk._bounded_shift_potentials(logits, 3, None)
    assert bool(safe), (shape, epsilon)
    fast = sk._assignment(logits, *potentials)
    # Both are float32 renderings of the same iteration: compare each with float64.
    want = exp_domain_sinkhorn(_scores(shape, seed=10), epsilon, 3)
    exact = np.asarray(sk._assignment(logits, *sk._max_shift_potentials(logits, 3, None)))
    np.testing.assert_allclose(np.asarray(fast), want, atol=5e-6)
    np.testing.assert_allclose(exact, want, atol=5e-6)


def test_underflowing_sum_falls_back_to_exact_shifts():
  scores = _nearly_empty_row_scores()
  *_, safe = sk._bounded_shift_potentials(jnp.asarray(scores) / 0.005, 3, None)
  assert not bool(safe), 'the case must exercise the fallback'
  got = np.asarray(jax.jit(lambda s: sk.sinkhorn(s, 0.005, 3))(jnp.asarray(scores)))
  want = exp_domain_sinkhorn(scores, 0.005, 3)  # float64 does not underflow here
  assert np.all(np.isfinite(want)) and want[0].max() > 0.01
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


def test_sharded_fallback_equals_single_device():
  devices = jax.devices()
  mesh = jax.sharding.Mesh(np.asarray(devices), ('data',))
  P = jax.sharding.PartitionSpec
  scores = jnp.asarray(_nearly_empty_row_scores(2 * len(devices)))
  # Only device 0 holds the nearly empty row: all devices must still take the fallback.
  got = jax.jit(jax.shard_map(lambda s: sk.sinkhorn(s, 0.005, 3, axis_name='data'), mesh=mesh,
                              in_specs=P('data'), out_specs=P('data')))(scores)
  np.testing.assert_allclose(np.asarray(got), exp_domain_sinkhorn(np.asarray(scores), 0.005, 3),
                             atol=1e-5)
