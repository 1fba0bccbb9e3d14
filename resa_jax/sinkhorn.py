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
  ``4 * num_iters + 1`` times, and write only vectors in between.  A bound can
  leave a nearly empty row or column with a sum that underflows; if any sum falls
  below 1e-30 (only with a tiny epsilon or extreme scores) the call recomputes
  with an exact max before every logsumexp, inside a ``lax.cond`` (so only then
  does it cost more; under ``vmap`` a cond runs both branches).
* float32 throughout for float32 and narrower inputs: ``bfloat16`` (or float16)
  scores are cast up first, so the result equals the float32 answer on the
  bfloat16-rounded inputs.  float64 scores (under JAX x64) stay float64: the
  computation runs in ``promote_types(scores.dtype, float32)``, so a float64 model
  can be checked against a float64 reference to float64 rounding.
* Rows sum to 1 up to float32 rounding after every call, because the last step is
  a row normalisation (a softmax of ``L + g`` along each row).

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
  """
  assignment: jax.Array
  error: jax.Array
  num_iters: jax.Array


def _shifted_sum(x, axis, axis_name=None, shift=None):
  """(shift, sum exp(x - shift)) along `axis`: logsumexp(x) = log(sum) + shift.

  `shift` (x without `axis`) must bound x from above; None takes the exact max.
  Over rows (axis -2) with `axis_name` set, both are global across devices.  The
  shift is a stop_gradient'ed constant, as the max in jax.nn.logsumexp.
  """
  across_devices = axis_name is not None and axis == -2
  if shift is None:
    shift = jnp.max(jax.lax.stop_gradient(x), axis=axis)
    if across_devices:
      shift = jax.lax.pmax(shift, axis_name)
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
  shift = jax.lax.stop_gradient(shift)
  sums = jnp.sum(jnp.exp(x - jnp.expand_dims(shift, axis)), axis=axis)
  if across_devices:
    sums = jax.lax.psum(sums, axis_name)
  return shift, sums


def _logsumexp_over_rows(x: jax.Array, axis_name: Optional[str]) -> jax.Array:
  """log sum_i exp(x_i.) over axis -2 (rows), across devices when axis_name is set."""
  shift, sums = _shifted_sum(x, -2, axis_name)
  return jnp.log(sums) + shift


def _global_rows(x: jax.Array, axis_name: Optional[str]) -> jax.Array:
  """N: the number of rows over all devices, as a scalar of x's dtype."""
  n = jnp.asarray(x.shape[-2], x.dtype)
  return jax.lax.psum(n, axis_name) if axis_name is not None else n


def _column_potential(logits, row_potential, log_num_cols, axis_name):
  """g such that every column of exp(logits + f + g) sums to 1 / B (up to a constant).

  The reference normalises the columns of P to sum to 1 / K = 1 / B each; the
  total-sum and the 1/N factors are constants cancelled by the next row step.
  """
  return -_logsumexp_over_rows(logits + row_potential[..., :, None], axis_name) - log_num_cols


def _row_potential(logits, col_potential):
  """f such that every row of exp(logits + f + g) sums to 1."""
  return -jax.nn.logsumexp(logits + col_potential[..., None, :], axis=-1)


def sinkhorn(scores: jax.Array,
             epsilon: float = 0.05,
             num_iters: int = 3,
             *,
             axis_name: Optional[str] = None) -> jax.Array:
  """Soft self-assignment by `num_iters` Sinkhorn-Knopp iterations, log domain.

  Args:
    scores: (..., b, B) similarities; rows are this device's samples, columns
      the global targets.  Any float dtype; computed in float32 (float64 scores
      in float64).
    epsilon: entropic regularisation (the softmax temperature of the scores).
      Any positive value is safe, the computation never forms exp(S/epsilon).
    num_iters: number of (column, row) normalisation pairs; ReSA uses 3.  With 0
      the result is the row-wise softmax of scores / epsilon (no balancing; the
      reference would return unnormalised rows there).
    axis_name: mesh axis over which the rows are sharded (under shard_map).

  Returns:
    (..., b, B) float32 (float64) assignment; every row sums to 1.  Identical to
    the reference iteration (module docstring) up to float32 (float64) rounding.
  """
  if num_iters < 0:
    raise ValueError(f'num_iters must be >= 0, got {num_iters}')
  logits = _logits(scores, epsilon)  # (..., b, B)
  if num_iters == 0:
    return jax.nn.softmax(logits, axis=-1)
  *fast, safe = _bounded_shift_potentials(logits, num_iters, axis_name)
  # `safe` is one scalar for the whole call (and, under shard_map, for all
  # devices), so every device takes the same branch.  Only vectors go through the
  # cond; the exact branch recomputes the logits from `scores` itself.
  col_potential, row_shift, row_sum = jax.lax.cond(
      safe, lambda: tuple(fast),
      lambda: _max_shift_potentials(_logits(scores, epsilon), num_iters, axis_name))
  return _assignment(logits, col_potential, row_shift, row_sum)


def _logits(scores, epsilon):
  """L = S / epsilon in the compute dtype: float32, or float64 for float64 scores."""
  dtype = jnp.promote_types(scores.dtype, jnp.float32)
  return scores.astype(dtype) / jnp.asarray(epsilon, dtype)


def _log_num_cols(logits):
  return jnp.log(jnp.asarray(logits.shape[-1], logits.dtype))


# A sum of exp() terms below this has lost (or is about to lose) float32 precision
# (the smallest normal float32 is 1.2e-38): the fast path then defers to the exact one.
_TINY_SUM = 1e-30


def _bounded_shift_potentials(logits, num_iters, axis_name):
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
  an exact column max.  This is the same iteration as `_max_shift_potentials`
  (equal up to float32 rounding).  A bound is not the max: when a row or column
  holds almost no mass its shifted sum can underflow, so the function also
  returns `safe`, False as soon as any sum is below _TINY_SUM.

  Returns:
    (g (..., B), the last row step's shift (..., b) and shifted sum (..., b),
    safe: a bool scalar, the same on every device); the assignment is
    exp(L + g - shift) / sum.
  """
  log_num_cols = _log_num_cols(logits)
  smallest = []
  row_potential = jnp.zeros_like(logits[..., 0])  # f: (..., b)
  col_shift = None  # the first column step (f = 0) takes the exact column max
  for _ in range(num_iters):
    col_shift, col_sum = _shifted_sum(logits + row_potential[..., :, None], -2, axis_name,
                                      col_shift)
    smallest.append(jnp.min(col_sum))
    col_potential = -(jnp.log(col_sum) + col_shift) - log_num_cols  # g: (..., B)
    # Row step, shifted by -f - log B of the previous row step.
    row_shift, row_sum = _shifted_sum(logits + col_potential[..., None, :], -1,
                                      shift=-row_potential - log_num_cols)
    smallest.append(jnp.min(row_sum))
    row_potential = -(jnp.log(row_sum) + row_shift)
    col_shift = -col_potential  # the next column step's bound
  unsafe = jnp.sum((jnp.stack(smallest) < _TINY_SUM).astype(jnp.int32))
  if axis_name is not None:
    unsafe = jax.lax.psum(unsafe, axis_name)
  return col_potential, row_shift, row_sum, unsafe == 0


def _max_shift_potentials(logits, num_iters, axis_name):
  """The same iteration with every logsumexp shifted by its exact max (two passes each).

  Returns what `_bounded_shift_potentials` returns, without `safe`; the last row
  step's shift is the row max, so the assignment is the softmax of L + g.
  """
  log_num_cols = _log_num_cols(logits)
  row_potential = jnp.zeros_like(logits[..., 0])  # f: (..., b)
  col_potential = None
  for _ in range(num_iters):
    col_potential = _column_potential(logits, row_potential, log_num_cols, axis_name)
    row_potential = _row_potential(logits, col_potential)
  row_max, row_sum = _shifted_sum(logits + col_potential[..., None, :], -1)
  return col_potential, row_max, row_sum


def _assignment(logits, col_potential, row_shift, row_sum):
  """The last row normalisation, written out: dividing by the very sum of the very
  terms makes every row sum to 1 to float32 rounding, however large |L| is."""
  return jnp.exp(logits + col_potential[..., None, :] - row_shift[..., :, None]) / row_sum[..., :, None]


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
  error is global, so all devices run the same number of iterations.

  Runs a `lax.while_loop` (jit- and vmap-able; forward-mode differentiable only).

  Returns:
    SinkhornOutput(assignment (..., b, B), error (...), num_iters (...)).
  """
  logits = _logits(scores, epsilon)
  log_num_cols = _log_num_cols(logits)
  num_rows = _global_rows(logits, axis_name)
  batch_shape = logits.shape[:-2]

  def marginal_error(row_potential, col_potential):
    # After a row step rows are exact; measure how far the columns are.
    log_p = logits + row_potential[..., :, None] + col_potential[..., None, :]
    col_mass = jnp.exp(_logsumexp_over_rows(log_p, axis_name)) / num_rows  # (..., B)
    return jnp.sum(jnp.abs(col_mass - 1.0 / logits.shape[-1]), axis=-1)

  def body(carry):
    row_potential, _, _, it = carry
    col_potential = _column_potential(logits, row_potential, log_num_cols, axis_name)
    row_potential = _row_potential(logits, col_potential)
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
  assignment = jax.nn.softmax(logits + col_potential[..., None, :], axis=-1)
  return SinkhornOutput(assignment, error, jnp.broadcast_to(iters, batch_shape))
