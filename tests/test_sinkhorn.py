"""Properties of resa_jax.sinkhorn beyond the reference vectors."""

import functools

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
      mesh=mesh, in_specs=P('data'), out_specs=sk.SinkhornOutput(P('data'), P(), P(), P())))(scores)
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
    scores = jnp.asarray(_scores(shape, seed=10))
    terms, row_sum, safe = sk._bounded_shift_terms(scores / epsilon, 3, None)
    assert bool(safe), (shape, epsilon)
    fast = terms / row_sum[:, None]
    # Both are float32 renderings of the same iteration: compare each with float64.
    want = exp_domain_sinkhorn(_scores(shape, seed=10), epsilon, 3)
    exact = np.asarray(sk._exact_assignment(scores, jnp.float32(epsilon), 3, None))
    np.testing.assert_allclose(np.asarray(fast), want, atol=5e-6)
    np.testing.assert_allclose(exact, want, atol=5e-6)


def test_underflowing_sum_falls_back_to_exact_shifts():
  scores = _nearly_empty_row_scores()
  *_, safe = sk._bounded_shift_terms(jnp.asarray(scores) / 0.005, 3, None)
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


def log_domain_sinkhorn(scores, epsilon, num_iters):
  """The same iteration in float64 log domain (exact max shifts): an oracle where
  exp(S / epsilon) overflows even float64."""
  logits = np.asarray(scores, np.float64) / epsilon

  def lse(x, axis):
    shift = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(shift, axis) + np.log(np.exp(x - shift).sum(axis=axis))

  row_potential = np.zeros(logits.shape[0])
  for _ in range(num_iters):
    col_potential = -lse(logits + row_potential[:, None], 0) - np.log(logits.shape[1])
    row_potential = -lse(logits + col_potential[None, :], 1)
  return np.exp(logits + col_potential[None, :] + row_potential[:, None])


def _cosine_scores(rows, cols, seed, dim=16):
  rng = np.random.default_rng(seed)
  a, b = rng.normal(size=(rows, dim)), rng.normal(size=(cols, dim))
  a /= np.linalg.norm(a, axis=1, keepdims=True)
  b /= np.linalg.norm(b, axis=1, keepdims=True)
  return (a @ b.T).astype(np.float32)


@pytest.mark.parametrize('epsilon', [1e-10, 1e-20, 1e-30])
@pytest.mark.parametrize('shape', [(16, 16), (12, 40), (40, 12), (64, 64)])
def test_tiny_epsilon_on_cosine_scores_is_an_assignment(shape, epsilon):
  """A regression: epsilon 1e-10 on cosine scores once returned all NaN (or rows summing to
  inf).  Now it is an assignment, eagerly, under jit and sharded."""
  scores = jnp.asarray(_cosine_scores(*shape, seed=11))
  devices = jax.devices()
  mesh = jax.sharding.Mesh(np.asarray(devices), ('data',))
  P = jax.sharding.PartitionSpec
  sharded = jax.jit(jax.shard_map(lambda s: sk.sinkhorn(s, epsilon, 3, axis_name='data'),
                                  mesh=mesh, in_specs=P('data'), out_specs=P('data')))
  results = [sk.sinkhorn(scores, epsilon, 3),
             jax.jit(lambda s: sk.sinkhorn(s, epsilon, 3))(scores),
             sk.sinkhorn_with_tolerance(scores, epsilon, max_iters=10).assignment]
  if shape[0] % len(devices) == 0:
    results.append(sharded(scores))
  for got in map(np.asarray, results):
    assert np.all(np.isfinite(got)) and np.all(got >= 0)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-6)


def test_tiny_epsilon_equals_float64_oracle_where_it_is_finite():
  # |S| / epsilon <= 600: exp() does not overflow float64, and float32 logits of
  # that size are resolved to about 1e-4.
  scores = _scores((24, 32), seed=12) * np.float32(6e-8)
  want = exp_domain_sinkhorn(scores, 1e-10, 3)
  assert np.all(np.isfinite(want))
  for got in (sk.sinkhorn(jnp.asarray(scores), 1e-10, 3),
              jax.jit(lambda s: sk.sinkhorn(s, 1e-10, 3))(jnp.asarray(scores))):
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4)


def test_tiny_epsilon_in_float64_equals_log_domain_oracle():
  """Cosine scores at epsilon 1e-10 overflow every exp-domain oracle; float64
  scores resolve the logits (1e10) to 1e-6, and the result is the exact one."""
  scores = _cosine_scores(24, 32, seed=13).astype(np.float64)
  with jax.enable_x64(True):
    got = np.asarray(sk.sinkhorn(jnp.asarray(scores), 1e-10, 3))
  want = log_domain_sinkhorn(scores, 1e-10, 3)
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(log_domain_sinkhorn(scores, 0.05, 3),
                             exp_domain_sinkhorn(scores, 0.05, 3), rtol=1e-12)  # the oracle


@pytest.mark.parametrize('epsilon', [1e-2, 1e-3, 1e-4, 1e-5])
def test_accuracy_is_that_of_float32_logits(epsilon):
  """The docstring's accuracy: relative error about 1e-7 max|S| / epsilon."""
  scores = _cosine_scores(128, 128, seed=14)
  got = np.asarray(jax.jit(lambda s: sk.sinkhorn(s, epsilon, 3))(jnp.asarray(scores)))
  want = log_domain_sinkhorn(scores, epsilon, 3)
  np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-6)
  large = want > 1e-3
  assert np.max(np.abs(got - want)[large] / want[large]) < 5e-7 / epsilon


def _with(scores, index, value):
  scores = np.array(scores)
  scores[index] = value
  return jnp.asarray(scores)


def _all_solvers(scores, num_iters=3):
  devices = jax.devices()
  mesh = jax.sharding.Mesh(np.asarray(devices), ('data',))
  P = jax.sharding.PartitionSpec
  results = {
      'eager': sk.sinkhorn(scores, 0.05, num_iters),
      'jit': jax.jit(lambda s: sk.sinkhorn(s, 0.05, num_iters))(scores),
      'tolerance': sk.sinkhorn_with_tolerance(scores, 0.05).assignment,
  }
  if scores.shape[-2] % len(devices) == 0:
    results['sharded'] = jax.jit(jax.shard_map(
        lambda s: sk.sinkhorn(s, 0.05, num_iters, axis_name='data'), mesh=mesh,
        in_specs=P('data'), out_specs=P('data')))(scores)
  return {name: np.asarray(out) for name, out in results.items()}


@pytest.mark.parametrize('index,value', [((3, 5), np.nan), ((3, 5), np.inf),
                                         ((3, slice(None)), -np.inf),
                                         ((slice(None), 5), -np.inf)],
                         ids=['nan', '+inf', '-inf row', '-inf column'])
@pytest.mark.parametrize('num_iters', [1, 3])
def test_invalid_scores_give_all_nan(index, value, num_iters):
  """NaN or +inf anywhere, or a row or column with no finite score: the whole
  problem is NaN (on every device), not some rows."""
  scores = _with(_scores((16, 24), seed=15), index, value)
  for name, got in _all_solvers(scores, num_iters).items():
    assert np.all(np.isnan(got)), name


def test_invalid_scores_spoil_only_their_problem_or_row():
  scores = np.stack([_scores((8, 8), seed=16), _scores((8, 8), seed=17)])
  scores[1, 2, 3] = np.nan
  got = np.asarray(sk.sinkhorn(jnp.asarray(scores), 0.05, 3))
  assert np.all(np.isnan(got[1])) and not np.any(np.isnan(got[0]))
  np.testing.assert_allclose(got[0], np.asarray(sk.sinkhorn(jnp.asarray(scores[0]), 0.05, 3)),
                             atol=1e-6)
  tol = np.asarray(sk.sinkhorn_with_tolerance(jnp.asarray(scores), 0.05).assignment)
  assert np.all(np.isnan(tol[1])) and not np.any(np.isnan(tol[0]))
  # num_iters = 0 is a softmax per row: only the NaN row is NaN.
  rows = np.asarray(sk.sinkhorn(jnp.asarray(scores[1]), 0.05, 0))
  assert np.all(np.isnan(rows[2])) and not np.any(np.isnan(np.delete(rows, 2, axis=0)))


def test_minus_inf_scores_are_forbidden_pairs():
  scores = _scores((16, 24), seed=18)
  mask = np.random.default_rng(19).uniform(size=scores.shape) < 0.4
  mask[np.arange(16), np.arange(16)] = False  # every row and column keeps a finite score
  mask[np.arange(8), np.arange(16, 24)] = False
  masked = np.where(mask, -np.inf, scores).astype(np.float32)
  want = exp_domain_sinkhorn(masked, 0.05, 3)
  for name, got in _all_solvers(jnp.asarray(masked)).items():
    if name == 'tolerance':
      got = np.asarray(sk.sinkhorn_with_tolerance(jnp.asarray(masked), 0.05, tol=0.0,
                                                  max_iters=3).assignment)
    assert np.all(got[mask] == 0), name
    np.testing.assert_allclose(got, want, atol=2e-6, err_msg=name)
  grad = jax.grad(lambda s: jnp.sum(jnp.sin(sk.sinkhorn(s, 0.05, 3))))(jnp.asarray(masked))
  assert np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize('epsilon', [0.0, -0.05, float('nan'), float('inf'), -float('inf'),
                                     np.float32(0), np.float64(-1e-3), jnp.float32(0.0)])
@pytest.mark.parametrize('solver', ['sinkhorn', 'tolerance'])
def test_static_epsilon_must_be_finite_and_positive(epsilon, solver):
  """A negative epsilon used to solve a different problem silently, 0 and NaN
  returned all NaN."""
  scores = jnp.asarray(_scores((8, 8)))
  fn = (lambda: sk.sinkhorn(scores, epsilon, 3)) if solver == 'sinkhorn' else (
      lambda: sk.sinkhorn_with_tolerance(scores, epsilon))
  with pytest.raises(ValueError, match='epsilon must be finite and > 0'):
    fn()


@pytest.mark.parametrize('epsilon', [1e-39, 1e39])
def test_static_epsilon_must_be_a_normal_number_of_the_compute_dtype(epsilon):
  with pytest.raises(ValueError, match='outside the normal range of float32'):
    sk.sinkhorn(jnp.asarray(_scores((8, 8))), epsilon, 3)
  with jax.enable_x64(True):  # a normal float64 is fine for float64 scores
    got = sk.sinkhorn(jnp.asarray(_scores((8, 8)), jnp.float64), epsilon, 3)
  assert np.all(np.isfinite(np.asarray(got)))


@pytest.mark.parametrize('epsilon', ['0.05', True, np.ones(2), [0.05]])
def test_epsilon_must_be_a_real_scalar(epsilon):
  with pytest.raises(TypeError, match='epsilon must be a real scalar'):
    sk.sinkhorn(jnp.asarray(_scores((8, 8))), epsilon, 3)


def test_traced_epsilon_is_not_checked_and_invalid_gives_nan():
  """As jax.numpy and ott-jax: a value seen only at run time is not checked; an
  invalid one is NaN everywhere, which checkify or jax_debug_nans report."""
  from jax.experimental import checkify
  scores = jnp.asarray(_scores((8, 8)))
  solve = jax.jit(lambda s, e: sk.sinkhorn(s, e, 3))
  np.testing.assert_allclose(np.asarray(solve(scores, 0.05)),
                             np.asarray(sk.sinkhorn(scores, 0.05, 3)), atol=1e-6)
  solve_tol = jax.jit(lambda s, e: sk.sinkhorn_with_tolerance(s, e).assignment)
  for bad in (0.0, -0.05, np.nan, np.inf, 1e-39):
    assert np.all(np.isnan(np.asarray(solve(scores, bad)))), bad
    assert np.all(np.isnan(np.asarray(solve_tol(scores, bad)))), bad
  batched = jax.vmap(lambda e: sk.sinkhorn(scores, e, 3))(jnp.asarray([0.05, -1.0]))
  assert not np.any(np.isnan(np.asarray(batched[0]))) and np.all(np.isnan(np.asarray(batched[1])))
  err, _ = jax.jit(checkify.checkify(lambda s, e: sk.sinkhorn(s, e, 3),
                                     errors=checkify.nan_checks))(scores, -0.05)
  assert err.get() is not None and 'nan generated' in err.get()
  with pytest.raises(ValueError, match='epsilon must be a scalar'):
    jax.jit(lambda s, e: sk.sinkhorn(s, e, 3))(scores, jnp.ones(2))


@pytest.mark.parametrize('shape', [(), (8,), (0, 8), (8, 0), (0, 8, 8)])
@pytest.mark.parametrize('solver', ['sinkhorn', 'tolerance'])
def test_scores_must_be_non_empty_matrices(shape, solver):
  scores = jnp.ones(shape)
  fn = sk.sinkhorn if solver == 'sinkhorn' else sk.sinkhorn_with_tolerance
  with pytest.raises(ValueError, match=r'scores must have shape \(\.\.\., b, B\) with b, B >= 1'):
    fn(scores, 0.05)


def test_scores_must_be_real():
  with pytest.raises(TypeError, match='scores must be real'):
    sk.sinkhorn(jnp.ones((4, 4), jnp.complex64), 0.05, 3)
  # Integer scores (and nested lists) are fine: computed in float32.
  np.testing.assert_allclose(np.asarray(sk.sinkhorn([[1, 0], [0, 1]], 0.5, 3)),
                             exp_domain_sinkhorn(np.eye(2), 0.5, 3), atol=1e-6)


@pytest.mark.parametrize('num_iters,error,message', [
    (-1, ValueError, 'num_iters must be >= 0, got -1'),
    (2.0, TypeError, 'num_iters must be an int, got 2.0'),
    (True, TypeError, 'num_iters must be an int, got True'),
])
def test_num_iters_must_be_an_int_at_least_zero(num_iters, error, message):
  with pytest.raises(error, match=message):
    sk.sinkhorn(jnp.asarray(_scores((4, 4))), 0.05, num_iters)


def test_traced_num_iters_names_the_fix():
  scores = jnp.asarray(_scores((4, 4)))
  with pytest.raises(TypeError, match='num_iters must be a static Python int.*static_argnums / '
                     'static_argnames, or bind it with functools.partial'):
    jax.jit(sk.sinkhorn)(scores, 0.05, 3)
  # The fixes the message names work, and NumPy ints are ints.
  want = np.asarray(sk.sinkhorn(scores, 0.05, 3))
  for got in (jax.jit(sk.sinkhorn, static_argnames='num_iters')(scores, 0.05, num_iters=3),
              jax.jit(functools.partial(sk.sinkhorn, num_iters=3))(scores, 0.05),
              sk.sinkhorn(scores, 0.05, np.int64(3))):
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)


@pytest.mark.parametrize('solver', ['sinkhorn', 'tolerance'])
def test_unbound_axis_name_names_the_axis_and_the_fix(solver):
  devices = jax.devices()
  mesh = jax.sharding.Mesh(np.asarray(devices), ('data',))
  P = jax.sharding.PartitionSpec
  scores = jnp.asarray(_scores((2 * len(devices), 8)))

  def call(s, axis_name):
    if solver == 'sinkhorn':
      return sk.sinkhorn(s, 0.05, 3, axis_name=axis_name)
    return sk.sinkhorn_with_tolerance(s, 0.05, axis_name=axis_name).assignment

  message = (r"axis_name='batch' is not bound here: call this inside jax.shard_map over a mesh "
             r"whose axis 'batch' shards the rows, e\.g\. jax\.shard_map\(.*in_specs=P\('batch'\)"
             r".*on one device pass axis_name=None")
  with pytest.raises(ValueError, match=message):  # jax itself raised a bare AssertionError
    jax.jit(jax.shard_map(lambda s: call(s, 'batch'), mesh=mesh, in_specs=P('data'),
                          out_specs=P('data')))(scores)
  with pytest.raises(ValueError, match=message):  # outside shard_map
    call(scores, 'batch')


@pytest.mark.parametrize('kwargs,message', [
    (dict(tol=-1e-3), 'tol must be >= 0'), (dict(tol=float('nan')), 'tol must be >= 0'),
    (dict(max_iters=0), 'max_iters must be >= 1'), (dict(min_iters=-1), 'min_iters must be >= 0'),
])
def test_tolerance_arguments_are_checked_when_static(kwargs, message):
  scores = jnp.asarray(_scores((8, 8)))
  with pytest.raises(ValueError, match=message):
    sk.sinkhorn_with_tolerance(scores, 0.05, **kwargs)
  # They may be traced.
  out = jax.jit(lambda s, t, n: sk.sinkhorn_with_tolerance(s, 0.05, tol=t, max_iters=n))(
      scores, 1e-3, 5000)
  assert float(out.error) <= 1e-3


def test_tolerance_mode_says_whether_it_converged():
  scores = jnp.asarray(_scores((32, 48), seed=20))
  solve = jax.jit(lambda s, n: sk.sinkhorn_with_tolerance(s, 0.05, tol=1e-4, max_iters=n))
  done = solve(scores, 500)
  assert done.converged.dtype == jnp.bool_ and bool(done.converged)
  assert float(done.error) <= 1e-4 and int(done.num_iters) < 500
  capped = solve(scores, 3)
  assert not bool(capped.converged) and int(capped.num_iters) == 3 and float(capped.error) > 1e-4
  # Per problem of a batch: one converges within the cap, the other does not.
  easy = np.full((32, 48), 0.5, np.float32)  # uniform: exact after one iteration
  batch = sk.sinkhorn_with_tolerance(jnp.stack([jnp.asarray(easy), scores]), 0.05, tol=1e-4,
                                     max_iters=3)
  np.testing.assert_array_equal(np.asarray(batch.converged), [True, False])
  # An invalid (all-NaN) problem has not converged.
  invalid = sk.sinkhorn_with_tolerance(_with(scores, (0, 0), np.nan), 0.05)
  assert not bool(invalid.converged) and np.isnan(float(invalid.error))
