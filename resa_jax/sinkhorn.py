"""Log-domain Sinkhorn-Knopp for soft self-assignment (ReSA / SwAV style).

This module imports nothing but jax and can be copied into any JAX project.

Problem
-------
Given a score matrix ``S`` of shape ``(b, B)`` -- rows are this device's samples,
columns are the global set of targets (e.g. the momentum encodings of the whole
global batch) -- find the soft assignment

    P = diag(u) exp(S / epsilon) diag(v),         P: (b, B)

whose rows each sum to 1 (every sample is fully assigned) and whose columns each
receive the same mass N / B, where N is the global number of rows (all devices'
``b`` added up).  Sinkhorn-Knopp alternates the two normalisations.  ReSA uses a
fixed, small number of iterations (3) starting from the column normalisation, as
in the authors' code (which follows SwAV's ``distributed_sinkhorn`` on the
transposed matrix ``Q = exp(S / epsilon).T``):

    Q /= sum(Q)
    repeat num_iters:  Q /= row sums of Q  (over all devices);  Q /= K
                       Q /= column sums of Q;                    Q /= N
    Q *= N;  return Q.T

with ``K = B`` (rows of ``Q``) and ``N`` the global number of columns of ``Q``.

Numerical choices
-----------------
* Log domain.  ``exp(S / epsilon)`` overflows float32 as soon as
  ``max|S| / epsilon > 88`` (e.g. epsilon = 0.01 on cosine scores); the reference
  then returns NaN.  We never form ``exp(S / epsilon)``: we keep ``L = S / epsilon``
  and two potential vectors ``f`` (b,) and ``g`` (B,) with ``log P = L + f + g``, and
  each normalisation is a ``logsumexp`` that updates one potential.  Every scalar
  division of the reference (by the total sum, by ``K``, by ``N``) is a constant
  shift of a potential; constants on ``g`` are cancelled exactly by the next row
  normalisation, so they are dropped, and the result is the same fixed point
  iteration, not an approximation of it.
* One pass over the ``(b, B)`` matrix per normalisation.  A logsumexp needs a
  shift at least as large as its inputs; rather than a max pass, each
  normalisation after the first takes the bound that the previous one guarantees
  (after a row step every entry of ``P`` is at most 1, after a column step at most
  ``1 / B``), so ``num_iters`` iterations read the matrix ``2 * num_iters + 2``
  times (one extra max pass at the start, one write at the end) instead of
  ``4 * num_iters + 1`` times, and write only vectors in between.
* An exact path for the rest, inside a ``lax.cond`` (so only then does it cost
  more; under ``vmap`` a cond runs both branches).  A bound can leave a nearly
  empty row or column with a sum that underflows, and a large ``L`` is a coarse
  number: XLA recomputes ``S / epsilon`` in each kernel and may round it
  differently there (a multiply by the reciprocal, fused into an FMA or not),
  by 1 ulp, which at ``|L| = 1e10`` (epsilon 1e-10 on cosine scores) is 1e3 and
  turns every ``exp`` into 0 or inf.  So if any sum leaves [1e-30, 1e30] or a
  potential exceeds 2**20 (tiny epsilon, extreme or non-finite scores), the call
  recomputes in score units: potentials ``F = epsilon f``, ``G = epsilon g`` and
  terms ``exp((S + F + G - max) / epsilon)``, every shift the exact max.  Dividing
  by epsilon after the shift rounds a number that is 0 at the max, whatever
  epsilon is.
* Rows sum to 1 to float32 rounding for any epsilon: the last step divides the
  very terms of each row (one array) by their sum.
* Accuracy is that of float32 logits: entries carry a relative error of about
  ``1e-7 max|S| / epsilon`` (3e-6 on cosine scores at epsilon 0.05, 1e-3 at
  1e-4).  Below epsilon ~ ``1e-7 max|S|`` float32 cannot resolve logit
  differences of order 1: the result is still an assignment (finite, rows sum
  to 1, close to a hard one as epsilon -> 0) but not the exact one; use float64
  scores there.
* float32 throughout for float32 and narrower inputs: ``bfloat16`` (or float16)
  scores are cast up first, so the result equals the float32 answer on the
  bfloat16-rounded inputs.  float64 scores (under JAX x64) stay float64: the
  computation runs in ``promote_types(scores.dtype, float32)``, so a float64 model
  can be checked against a float64 reference to float64 rounding.

Domain
------
Checked before anything is computed, at trace time under ``jit`` (ValueError;
TypeError for a wrong type):

* ``scores``: real, of shape ``(..., b, B)`` with ``b, B >= 1``.
* ``epsilon``: a scalar, finite and at least the smallest normal number of the
  compute dtype (1.2e-38 in float32; XLA flushes smaller ones to 0).  A
  traced epsilon (e.g. a ``jit`` argument) is only known at run time and, as in
  ``jax.numpy`` and ott-jax, is not checked then: an invalid one makes the
  assignment all NaN, which ``checkify.checkify(..., errors=checkify.nan_checks)``
  or ``jax_debug_nans`` turn into an error.
* ``num_iters``: a static Python int >= 0 (the iterations are unrolled; under
  ``jit`` pass it with ``static_argnames`` or ``functools.partial``).
* ``axis_name``: None, or an axis bound by the enclosing ``shard_map``.

Non-finite scores
-----------------
A score of ``-inf`` forbids its pair: that entry of ``P`` is exactly 0 (a mask),
as long as every row and every column keeps a finite score.  NaN and ``+inf``
scores have no meaning (``+inf`` would claim a whole row and column at once) and,
being values rather than shapes, cannot be rejected under ``jit``: a problem with
a NaN or ``+inf`` score, or with a row or column without a finite score, returns
all NaN -- its whole ``(b, B)`` assignment, on every device, since rows and
columns are coupled (``jax_debug_nans`` finds the source).  Each ``(b, B)``
matrix of a batch is a separate problem; with ``num_iters = 0`` (row softmax)
each row is.

Distributed use
---------------
Under ``jax.shard_map`` with the rows sharded over a mesh axis, pass that axis as
``axis_name``: column sums (a reduction over rows) are combined with
``lax.psum``/``lax.pmax`` across devices, row sums stay local, and each device
returns its own rows of exactly the single-device result on the concatenated
rows.  Every device must hold the same columns.

Gradients
---------
The fixed-iteration mode is a plain unrolled computation and can be
differentiated (``jax.grad`` / ``jax.jvp``) through every iteration.  ReSA itself
uses the assignment as a target under ``jax.lax.stop_gradient``.  The tolerance
mode runs a ``lax.while_loop``: forward-mode differentiation works, reverse-mode
does not (use the fixed mode for that).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

__all__ = ['sinkhorn', 'sinkhorn_with_tolerance', 'SinkhornOutput']


class SinkhornOutput(NamedTuple):
  """Result of `sinkhorn_with_tolerance`.

  Attributes:
    assignment: (..., b, B) float32 (float64 for float64 scores), rows sum to 1.
    error: (...) same dtype, the L1 distance between the column marginal of
      ``assignment / N`` and the uniform ``1 / B`` (0 at convergence), measured
      before the final row normalisation.
    num_iters: (...) int32, iterations performed.
    converged: (...) bool, ``error <= tol``: False when ``max_iters`` ran out
      first, and for an all-NaN (invalid) problem.
  """
  assignment: jax.Array
  error: jax.Array
  num_iters: jax.Array
  converged: jax.Array


def _shifted_sum(x, axis, axis_name=None, shift=None, epsilon=None):
  """(shift, sum exp((x - shift) / epsilon)) along `axis`; epsilon None means 1.

  epsilon * log(sum) + shift is epsilon * logsumexp(x / epsilon).  `shift` (x
  without `axis`) must bound x from above; None takes the exact max.  Over rows
  (axis -2) with `axis_name` set, both are global across devices.  The shift is a
  stop_gradient'ed constant, as the max in jax.nn.logsumexp.
  """
  across_devices = axis_name is not None and axis == -2
  if shift is None:
    shift = jnp.max(jax.lax.stop_gradient(x), axis=axis)
    if across_devices:
      shift = jax.lax.pmax(shift, axis_name)
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
  shift = jax.lax.stop_gradient(shift)
  x = x - jnp.expand_dims(shift, axis)
  sums = jnp.sum(jnp.exp(x if epsilon is None else x / epsilon), axis=axis)
  if across_devices:
    sums = jax.lax.psum(sums, axis_name)
  return shift, sums


def _log_sum(shift, sums, epsilon):
  """epsilon * logsumexp from `_shifted_sum`'s (shift, sums), in the units of x."""
  return shift + epsilon * jnp.log(sums)


def _row_terms(x, epsilon=None, shift=None):
  """(shift, exp((x - shift) / epsilon), its row sums); shift None: the exact row max.

  Dividing the very terms by their own sum (one array, used twice) makes every
  row sum to 1 to float32 rounding however the compiler evaluates the terms.
  """
  if shift is None:
    shift = jnp.max(jax.lax.stop_gradient(x), axis=-1)
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
  shift = jax.lax.stop_gradient(shift)
  x = x - shift[..., :, None]
  terms = jnp.exp(x if epsilon is None else x / epsilon)
  return shift, terms, jnp.sum(terms, axis=-1)


def _global_rows(x: jax.Array, axis_name: Optional[str]) -> jax.Array:
  """N: the number of rows over all devices, as a scalar of x's dtype."""
  n = jnp.asarray(x.shape[-2], x.dtype)
  return jax.lax.psum(n, axis_name) if axis_name is not None else n


def sinkhorn(scores: jax.Array,
             epsilon: float = 0.05,
             num_iters: int = 3,
             *,
             axis_name: Optional[str] = None) -> jax.Array:
  """Soft self-assignment by `num_iters` Sinkhorn-Knopp iterations, log domain.

  Args:
    scores: (..., b, B) similarities, b, B >= 1; rows are this device's samples,
      columns the global targets.  Any real dtype; computed in float32 (float64
      scores in float64).
    epsilon: entropic regularisation (the softmax temperature of the scores),
      finite and > 0 (module docstring: Domain).  Any such value gives a finite
      assignment whose rows sum to 1, accurate to about 1e-7 max|S| / epsilon.
    num_iters: number of (column, row) normalisation pairs, a static int >= 0;
      ReSA uses 3.  With 0 the result is the row-wise softmax of scores /
      epsilon (no balancing; the reference would return unnormalised rows there).
    axis_name: mesh axis over which the rows are sharded (under shard_map).

  Returns:
    (..., b, B) float32 (float64) assignment; every row sums to 1.  The
    reference iteration (module docstring) up to the float32 (float64) rounding
    of S / epsilon.  All NaN for NaN or +inf scores; -inf scores get 0.
  """
  num_iters = _static_int('num_iters', num_iters, 0)
  scores, epsilon = _checked_inputs(scores, epsilon, axis_name)  # (..., b, B)
  if num_iters == 0:  # a softmax of each row: rows are independent problems
    _, terms, row_sum = _row_terms(scores, epsilon)
    return jnp.where(_invalid(row_sum)[..., :, None], jnp.nan, terms / row_sum[..., :, None])
  terms, row_sum, safe = _bounded_shift_terms(scores / epsilon, num_iters, axis_name)
  # `safe` is one scalar for the whole call (and, under shard_map, for all
  # devices), so every device takes the same branch.  The last division runs
  # inside the branch, which then writes the result itself (no copy).
  return jax.lax.cond(safe, lambda: terms / row_sum[..., :, None],
                      lambda: _exact_assignment(scores, epsilon, num_iters, axis_name))


def _checked_inputs(scores, epsilon, axis_name):
  """(S, epsilon) in the compute dtype (float32, or float64 for float64 scores),
  after the checks of the module docstring's Domain section."""
  scores = jnp.asarray(scores)
  if scores.ndim < 2 or scores.size == 0:
    raise ValueError(f'scores must have shape (..., b, B) with b, B >= 1 (and no empty batch '
                     f'dimension), got shape {scores.shape}')
  if jnp.issubdtype(scores.dtype, jnp.complexfloating):
    raise TypeError(f'scores must be real, got dtype {scores.dtype}')
  _check_axis_name(axis_name)
  dtype = jnp.promote_types(scores.dtype, jnp.float32)
  return scores.astype(dtype), _checked_epsilon(epsilon, dtype)


def _checked_epsilon(epsilon, dtype):
  """epsilon as a scalar of `dtype`; a ValueError unless it is finite and at least
  the smallest normal number of `dtype` (XLA flushes subnormals to 0).  A
  traced epsilon cannot be checked: an invalid one becomes NaN."""
  finfo = jnp.finfo(dtype)
  if isinstance(epsilon, jax.core.Tracer):
    if jnp.ndim(epsilon) != 0:
      raise ValueError(f'epsilon must be a scalar, got shape {jnp.shape(epsilon)}')
    epsilon = jnp.asarray(epsilon, dtype)
    return jnp.where((epsilon >= finfo.tiny) & (epsilon <= finfo.max), epsilon, jnp.nan)
  try:
    if isinstance(epsilon, (str, bytes, bool)) or getattr(epsilon, 'ndim', 0) != 0:
      raise TypeError
    value = float(epsilon)
  except TypeError:
    raise TypeError(f'epsilon must be a real scalar, got {epsilon!r}') from None
  if not 0 < value < float('inf'):
    raise ValueError(f'epsilon must be finite and > 0, got {value}')
  if not float(finfo.tiny) <= value <= float(finfo.max):
    raise ValueError(f'epsilon = {value:g} is outside the normal range of {dtype} '
                     f'[{float(finfo.tiny):.3g}, {float(finfo.max):.3g}]')
  return jnp.asarray(value, dtype)


def _check_axis_name(axis_name):
  if axis_name is None:
    return
  try:
    jax.lax.axis_size(axis_name)
  except (NameError, ValueError) as error:
    raise ValueError(
        f'axis_name={axis_name!r} is not bound here: call this inside jax.shard_map over '
        f'a mesh whose axis {axis_name!r} shards the rows, e.g. jax.shard_map(lambda s: '
        f'sinkhorn(s, axis_name={axis_name!r}), mesh=mesh, in_specs=P({axis_name!r}), '
        f'out_specs=P({axis_name!r})); on one device pass axis_name=None') from error


def _static_int(name, value, minimum):
  """`value` as a Python int >= minimum; a clear error for traced or non-int values."""
  if isinstance(value, jax.core.Tracer):
    raise TypeError(f'{name} must be a static Python int, got a traced value: under jax.jit '
                    f'pass it via static_argnums / static_argnames, or bind it with '
                    f'functools.partial')
  if isinstance(value, bool) or not hasattr(value, '__index__'):
    raise TypeError(f'{name} must be an int, got {value!r}')
  if value.__index__() < minimum:
    raise ValueError(f'{name} must be >= {minimum}, got {value}')
  return value.__index__()


def _log_num_cols(x):
  return jnp.log(jnp.asarray(x.shape[-1], x.dtype))


# A sum of exp() terms below 1e-30 has lost (or is about to lose) float32 precision
# (the smallest normal float32 is 1.2e-38), one above 1e30 is about to overflow
# (the largest is 3.4e38), and a float32 logit above 2**20 is only known to 1/16:
# the fast path then defers to the exact one.
_MAX_ABS_LOG_SUM = 69.0  # -log(1e-30)
_MAX_ABS_POTENTIAL = 2.0 ** 20


def _bounded_shift_terms(logits, num_iters, axis_name):
  """The fixed-iteration Sinkhorn with one pass over (b, B) per normalisation.

  A logsumexp needs a shift c >= max(x) so that exp(x - c) <= 1.  Instead of a
  max pass, every normalisation after the first uses the bound that the previous
  one guarantees:
    * after a row step, every row of exp(L + f + g) sums to 1, so each entry is
      <= 1 and L + f <= -g: the next column step shifts column j by -g_j;
    * after a column step, every column sums to 1 / B, so L + g <= -f_prev - log B:
      the next row step shifts row i by -f_prev_i - log B.
  The shifts are constants for differentiation (stop_gradient'ed wherever they
  appear), as the max in jax.nn.logsumexp.  Only the first column step pays for
  an exact column max.  This is the same iteration as `_exact_assignment`
  (equal up to float32 rounding).  A bound is not the max, and L is not exact:
  the function also returns `safe`, False as soon as any sum is outside
  [1e-30, 1e30] or a final potential above 2**20 in magnitude (NaN included).

  Returns:
    (terms (..., b, B) and their row sums (..., b) of the last row step, the
    assignment being terms / sums; safe: a bool scalar, the same on every device).
  """
  log_num_cols = _log_num_cols(logits)
  log_sums = []  # log of every sum, for `safe`
  row_potential = jnp.zeros_like(logits[..., 0])  # f: (..., b)
  col_shift = None  # the first column step (f = 0) takes the exact column max
  for it in range(num_iters):
    col_shift, col_sum = _shifted_sum(logits + row_potential[..., :, None], -2, axis_name,
                                      col_shift)
    log_col_sum = jnp.log(col_sum)
    col_potential = -(log_col_sum + col_shift) - log_num_cols  # g: (..., B)
    # Row step, shifted by -f - log B of the previous row step.
    row_shift, terms, row_sum = _row_terms(logits + col_potential[..., None, :],
                                           shift=-row_potential - log_num_cols)
    log_row_sum = jnp.log(row_sum)
    log_sums += [log_col_sum, log_row_sum]
    if it + 1 < num_iters:
      row_potential = -(log_row_sum + row_shift)
      col_shift = -col_potential  # the next column step's bound
  # The potentials grow over the iterations: the last ones bound the logits that
  # matter.  One reduction over all the vectors, each scaled by its limit.
  checked = jnp.concatenate([x.ravel() / _MAX_ABS_LOG_SUM for x in log_sums] +
                            [x.ravel() / _MAX_ABS_POTENTIAL for x in (col_potential, row_shift)])
  checked = jnp.where(jnp.isnan(checked), jnp.inf, jnp.abs(checked))
  unsafe = (jnp.max(checked) > 1).astype(jnp.int32)
  if axis_name is not None:
    unsafe = jax.lax.psum(unsafe, axis_name)
  return terms, row_sum, unsafe == 0


def _exact_assignment(scores, epsilon, num_iters, axis_name):
  """The same iteration, robust for any epsilon: in score units, exact max shifts.

  Potentials are kept as F = epsilon f, G = epsilon g (score units) and every
  logsumexp is shifted by its exact max before the division by epsilon, so each
  exp() argument is rounded relative to a value <= 0 that is 0 at the max.  With
  exact max shifts a sum is at least 1 unless the input is not finite: a problem
  (one (b, B) matrix, across devices) with a NaN, inf or zero sum is all NaN.

  Returns:
    (..., b, B) assignment.
  """
  eps_log_num_cols = epsilon * _log_num_cols(scores)
  row_potential = jnp.zeros_like(scores[..., 0])  # F: (..., b)
  invalid = []  # (...) int32 per step: how many sums are NaN, inf or 0
  for it in range(num_iters):
    shift, col_sum = _shifted_sum(scores + row_potential[..., :, None], -2, axis_name,
                                  epsilon=epsilon)
    col_potential = -_log_sum(shift, col_sum, epsilon) - eps_log_num_cols
    shift, terms, row_sum = _row_terms(scores + col_potential[..., None, :], epsilon)
    invalid += [jnp.sum(_invalid(col_sum), axis=-1), jnp.sum(_invalid(row_sum), axis=-1)]
    if it + 1 < num_iters:
      row_potential = -_log_sum(shift, row_sum, epsilon)
  invalid = sum(invalid)
  if axis_name is not None:
    invalid = jax.lax.psum(invalid, axis_name)
  assignment = terms / row_sum[..., :, None]
  return jnp.where((invalid > 0)[..., None, None], jnp.nan, assignment)


def _invalid(sums):
  """int32, 1 where a sum shifted by its exact max is NaN, inf or 0 (never for finite
  input with a finite score in every row and column: the max term is exp(0) = 1)."""
  return jnp.logical_not((sums > 0) & (sums < jnp.inf)).astype(jnp.int32)


def sinkhorn_with_tolerance(scores: jax.Array,
                            epsilon: float = 0.05,
                            *,
                            tol: float = 1e-3,
                            max_iters: int = 100,
                            min_iters: int = 1,
                            axis_name: Optional[str] = None) -> SinkhornOutput:
  """Sinkhorn-Knopp iterated until the column marginal error is below `tol`.

  Same iteration as `sinkhorn`; stops after the first iteration (at least
  `min_iters`) whose column marginals are within `tol` (L1 distance of the column
  sums of P / N to the uniform 1 / B), or after `max_iters`.  Under shard_map the
  error is global, so all devices run the same number of iterations.  Every
  logsumexp is shifted by its exact max, on L = S / epsilon, so a logit that
  overflows float32 (|S| > 4 at the smallest epsilon) counts as an infinite score.

  Runs a `lax.while_loop` (jit- and vmap-able; forward-mode differentiable only).

  Args:
    scores, epsilon, axis_name: as for `sinkhorn`.
    tol: the error to reach, >= 0 (0: run `max_iters` iterations).
    max_iters: at most this many iterations, >= 1.
    min_iters: at least this many, >= 0.  tol, max_iters and min_iters may be
      traced; when they are not, they are checked (ValueError).

  Returns:
    SinkhornOutput(assignment (..., b, B), error (...), num_iters (...),
    converged (...)).
  """
  for name, value, minimum in (('max_iters', max_iters, 1), ('min_iters', min_iters, 0)):
    if not isinstance(value, jax.core.Tracer):
      _static_int(name, value, minimum)
  if not isinstance(tol, jax.core.Tracer) and not float(tol) >= 0:
    raise ValueError(f'tol must be >= 0, got {tol}')
  scores, epsilon = _checked_inputs(scores, epsilon, axis_name)
  # The loop body reads L from one stored copy (a while_loop operand), so every
  # pass sees bitwise the same logits, and every shift is an exact max: no
  # score units needed (module docstring, exact path).
  logits = scores / epsilon
  log_num_cols = _log_num_cols(logits)
  num_rows = _global_rows(logits, axis_name)
  batch_shape = logits.shape[:-2]

  def log_sum(x, axis):
    shift, sums = _shifted_sum(x, axis, axis_name)
    return jnp.log(sums) + shift

  def marginal_error(row_potential, col_potential):
    # After a row step rows are exact; measure how far the columns are.
    log_p = logits + row_potential[..., :, None] + col_potential[..., None, :]
    col_mass = jnp.exp(log_sum(log_p, -2)) / num_rows  # (..., B)
    return jnp.sum(jnp.abs(col_mass - 1.0 / logits.shape[-1]), axis=-1)

  def body(carry):
    row_potential, _, _, it = carry
    col_potential = -log_sum(logits + row_potential[..., :, None], -2) - log_num_cols
    row_potential = -log_sum(logits + col_potential[..., None, :], -1)
    return row_potential, col_potential, marginal_error(row_potential, col_potential), it + 1

  def cond(carry):
    *_, err, it = carry
    return (it < max_iters) & ((it < min_iters) | jnp.any(err > tol))

  # zeros_like keeps the row potential 'varying' over axis_name under shard_map.
  init = (jnp.zeros_like(logits[..., 0]),
          jnp.zeros(batch_shape + logits.shape[-1:], logits.dtype),
          jnp.full(batch_shape, jnp.inf, logits.dtype),
          jnp.zeros((), jnp.int32))
  row_potential, col_potential, error, iters = jax.lax.while_loop(cond, body, init)
  _, terms, row_sum = _row_terms(logits + col_potential[..., None, :])
  assignment = terms / row_sum[..., :, None]
  # A NaN error means a NaN or infinite potential somewhere (module docstring).
  assignment = jnp.where(jnp.isnan(error)[..., None, None], jnp.nan, assignment)
  return SinkhornOutput(assignment, error, jnp.broadcast_to(iters, batch_shape), error <= tol)
