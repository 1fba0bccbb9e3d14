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


def ema_update(target_params, online_params, momentum):
  """theta_m <- m * theta_m + (1 - m) * theta, leaf by leaf (same tree structure)."""
  return jax.tree.map(lambda t, o: t * momentum + o * (1.0 - momentum),
                      target_params, online_params)


def ema_momentum_schedule(step, total_steps: int, base: float = 0.996, final: float = 1.0):
  """Cosine schedule from `base` at step 0 to `final` at `total_steps` (BYOL/ReSA).

  m(step) = final - (final - base) * (cos(pi * step / total_steps) + 1) / 2.
  Works on Python numbers and on traced jax scalars.
  """
  progress = jnp.minimum(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 1.0)
  return final - (final - base) * (jnp.cos(math.pi * progress) + 1.0) / 2.0
