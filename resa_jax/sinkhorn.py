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
* The potentials are updated without writing ``L`` back: each iteration reads the
  ``(b, B)`` matrix twice (one max pass and one exp-sum pass per logsumexp, fused
  by XLA) and writes only vectors.
* float32 throughout: ``bfloat16`` (or any float) scores are cast up first, so the
  result equals the float32 answer on the bfloat16-rounded inputs.
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
    assignment: (..., b, B) float32, rows sum to 1.
    error: (...) float32, the L1 distance between the column marginal of
      ``assignment / N`` and the uniform ``1 / B`` (0 at convergence), measured
      before the final row normalisation.
    num_iters: (...) int32, iterations performed.
  """
  assignment: jax.Array
  error: jax.Array
  num_iters: jax.Array


def _logsumexp_over_rows(x: jax.Array, axis_name: Optional[str]) -> jax.Array:
  """log sum_i exp(x_i.) over axis -2 (rows), across devices when axis_name is set.

  (..., b, B) -> (..., B).  The shift by the (global) column max keeps exp() in
  range; it is a stop_gradient'ed constant, as in jax.nn.logsumexp.
  """
  col_max = jnp.max(jax.lax.stop_gradient(x), axis=-2)
  if axis_name is not None:
    col_max = jax.lax.pmax(col_max, axis_name)
  col_max = jnp.where(jnp.isfinite(col_max), col_max, 0.0)
  sums = jnp.sum(jnp.exp(x - col_max[..., None, :]), axis=-2)
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  return jnp.log(sums) + col_max


def _global_rows(x: jax.Array, axis_name: Optional[str]) -> jax.Array:
  """N: the number of rows over all devices, as a float32 scalar."""
  n = jnp.asarray(x.shape[-2], jnp.float32)
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
      the global targets.  Any float dtype; computed in float32.
    epsilon: entropic regularisation (the softmax temperature of the scores).
      Any positive value is safe, the computation never forms exp(S/epsilon).
    num_iters: number of (column, row) normalisation pairs; ReSA uses 3.  With 0
      the result is the row-wise softmax of scores / epsilon (no balancing; the
      reference would return unnormalised rows there).
    axis_name: mesh axis over which the rows are sharded (under shard_map).

  Returns:
    (..., b, B) float32 assignment; every row sums to 1.  Identical to the
    reference iteration (module docstring) up to float32 rounding.
  """
  if num_iters < 0:
    raise ValueError(f'num_iters must be >= 0, got {num_iters}')
  logits = scores.astype(jnp.float32) / jnp.float32(epsilon)  # (..., b, B)
  log_num_cols = jnp.log(jnp.float32(logits.shape[-1]))
  row_potential = jnp.zeros(logits.shape[:-1], jnp.float32)  # f: (..., b)
  col_potential = jnp.zeros(logits.shape[:-2] + logits.shape[-1:], jnp.float32)  # g
  for _ in range(num_iters):
    col_potential = _column_potential(logits, row_potential, log_num_cols, axis_name)
    row_potential = _row_potential(logits, col_potential)
  # The last row normalisation, exp(L + f + g), written as a softmax: it shifts by
  # the row max before exp, so rows sum to 1 to float32 rounding even when
  # |L| = |S| / epsilon is in the hundreds.
  return jax.nn.softmax(logits + col_potential[..., None, :], axis=-1)


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
  logits = scores.astype(jnp.float32) / jnp.float32(epsilon)
  log_num_cols = jnp.log(jnp.float32(logits.shape[-1]))
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
          jnp.zeros(batch_shape + logits.shape[-1:], jnp.float32),
          jnp.full(batch_shape, jnp.inf, jnp.float32),
          jnp.zeros((), jnp.int32))
  row_potential, col_potential, error, iters = jax.lax.while_loop(cond, body, init)
  assignment = jax.nn.softmax(logits + col_potential[..., None, :], axis=-1)
  return SinkhornOutput(assignment, error, jnp.broadcast_to(iters, batch_shape))
