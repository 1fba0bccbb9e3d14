"""The ReSA objective, the EMA update and the EMA-momentum schedule.

Small pure functions; the train step (train.py) composes them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def at_least_float32(x: jax.Array) -> jax.Array:
  """x in float32 if narrower (bfloat16, float16), else unchanged (float32, float64).

  The loss side of the step (normalisation, scores, Sinkhorn, cross-entropy) runs in
  float32 under mixed precision, and in float64 for a float64 model.
  """
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along `axis`, as torch.nn.functional.normalize."""
  norm = jnp.linalg.norm(x, axis=axis, keepdims=True)
  return x / jnp.maximum(norm, eps)


def resa_loss(z_online: jax.Array,
              z_target: jax.Array,
              assignment: jax.Array,
              temperature: float = 0.4) -> jax.Array:
  """ReSA's self-assignment cross-entropy.

  Args:
    z_online: (V, b, e) L2-normalised online embeddings of all views of this
      device's samples (0 weak, 1 strong, 2.. extra crops).
    z_target: (T, B, e) L2-normalised momentum embeddings of views 0..T-1 (T = 2
      in ReSA) of the global batch; no gradient flows into them.
    assignment: (b, B) Sinkhorn assignment of the weak view; rows sum to 1.
    temperature: softmax temperature tau of the embedding similarities.

  Returns:
    The mean, over the pairs (q, v) with q != v, of
    mean_i [ -sum_j A_ij log softmax_j(z_q,i . z_v,j / tau) ]; a float32 scalar.
    Logits and log-softmax are computed in float32 whatever the input dtype
    (float64 when the inputs are float64: `at_least_float32`).
  """
  _check_loss_inputs(z_online, z_target, assignment, temperature)
  num_views, num_targets = z_online.shape[0], z_target.shape[0]
  z_target = jax.lax.stop_gradient(z_target)
  assignment = jax.lax.stop_gradient(assignment)
  # All (q, v) similarities at once: (V, T, b, B).
  logits = jnp.einsum('qie,vje->qvij', at_least_float32(z_online),
                      at_least_float32(z_target)) / temperature
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  per_pair = -jnp.mean(jnp.sum(at_least_float32(assignment) * log_probs, axis=-1), axis=-1)
  off_diagonal = ~jnp.eye(num_views, num_targets, dtype=bool)  # exclude q == v
  return jnp.sum(jnp.where(off_diagonal, per_pair, 0.0)) / jnp.sum(off_diagonal)


def _check_loss_inputs(z_online, z_target, assignment, temperature) -> None:
  """ValueError / TypeError (one line) for inputs `resa_loss` cannot read correctly."""
  shapes = tuple(tuple(jnp.shape(x)) for x in (z_online, z_target, assignment))
  if (len(shapes[0]) != 3 or len(shapes[1]) != 3 or len(shapes[2]) != 2
      or shapes[0][2] != shapes[1][2] or shapes[2] != (shapes[0][1], shapes[1][1])
      or 0 in shapes[0] + shapes[1]):
    raise ValueError('resa_loss takes z_online (V, b, e), z_target (T, B, e) and assignment '
                     f'(b, B), none empty; got shapes {shapes[0]}, {shapes[1]}, {shapes[2]}')
  dtypes = [jnp.result_type(x) for x in (z_online, z_target, assignment)]
  if not all(jnp.issubdtype(d, jnp.floating) for d in dtypes):
    raise TypeError(f'resa_loss takes floating-point arrays, got {[str(d) for d in dtypes]}')
  _check_concrete_range('temperature', temperature, 0.0, math.inf, low_open=True)


def _check_concrete_range(name, value, low, high, *, low_open=False) -> None:
  """ValueError unless `value` (when not traced: a traced value is the caller's to
  bound) is a finite real number in [low, high] ((low, high] with `low_open`)."""
  if isinstance(value, jax.core.Tracer):
    return
  try:
    number = float(value)
  except (TypeError, ValueError):
    raise TypeError(f'{name} must be a real number, got {value!r}') from None
  inside = (low < number if low_open else low <= number) and number <= high
  if not (math.isfinite(number) and inside):
    bounds = f'{"(" if low_open else "["}{low:g}, {high:g}]'
    raise ValueError(f'{name} must be finite and in {bounds}, got {value!r}')


def ema_update(target_params, online_params, momentum):
  """theta_m <- m * theta_m + (1 - m) * theta, leaf by leaf (same tree structure);
  `momentum` in [0, 1].  ValueError for trees of different structures or leaf shapes,
  or a momentum outside [0, 1] (when it is not traced)."""
  if jax.tree.structure(target_params) != jax.tree.structure(online_params):
    raise ValueError('ema_update takes two trees of the same structure, got '
                     f'{jax.tree.structure(target_params)} and '
                     f'{jax.tree.structure(online_params)}')
  mismatched = [(jnp.shape(t), jnp.shape(o)) for t, o in zip(
      jax.tree.leaves(target_params), jax.tree.leaves(online_params))
                if jnp.shape(t) != jnp.shape(o)]
  if mismatched:
    raise ValueError(f'ema_update takes leaves of the same shapes; {len(mismatched)} differ, '
                     f'first {mismatched[0][0]} and {mismatched[0][1]}')
  _check_concrete_range('momentum', momentum, 0.0, 1.0)
  return jax.tree.map(lambda t, o: t * momentum + o * (1.0 - momentum),
                      target_params, online_params)


def ema_momentum_schedule(step, total_steps: int, base: float = 0.996, final: float = 1.0):
  """Cosine schedule from `base` at step 0 to `final` at `total_steps` (BYOL/ReSA).

  m(step) = final - (final - base) * (cos(pi * step / total_steps) + 1) / 2.
  Works on Python numbers and on traced jax scalars.  `total_steps` is a positive
  int, `base` and `final` in [0, 1] (ValueError otherwise).
  """
  if (isinstance(total_steps, (bool, jax.core.Tracer)) or not hasattr(total_steps, '__index__')
      or total_steps < 1):
    raise ValueError(f'total_steps must be a positive int, got {total_steps!r}')
  _check_concrete_range('base', base, 0.0, 1.0)
  _check_concrete_range('final', final, 0.0, 1.0)
  progress = jnp.minimum(jnp.asarray(step, jnp.float32) / total_steps, 1.0)
  return final - (final - base) * (jnp.cos(math.pi * progress) + 1.0) / 2.0
