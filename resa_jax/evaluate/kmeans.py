"""k-means in JAX, so that the clustering analysis runs on the accelerator.

Greedy k-means++ seeding, then Lloyd iterations until no assignment changes (or
`max_iter`); the best of `num_inits` runs by inertia.  Rows are processed in chunks
(memory O(chunk_size x K)); distances are squared Euclidean at `precision=HIGHEST`.
"""

from __future__ import annotations

import functools
import math

from absl import logging
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from resa_jax import sharding

HIGHEST = lax.Precision.HIGHEST


def _pairwise_sq_distances(x, centres, x_sq):
  """(n, K) squared distances, clipped at 0."""
  centre_sq = jnp.sum(centres * centres, axis=1)
  dots = jnp.matmul(x, centres.T, precision=HIGHEST)
  return jnp.maximum(x_sq[:, None] + centre_sq[None, :] - 2.0 * dots, 0.0)


def _kmeans_plus_plus(key, x, x_sq, weights, num_clusters: int):
  """Greedy k-means++ seeding (Arthur & Vassilvitskii, section 5; scikit-learn's default).

  Draws `trials` candidates with probability proportional to the squared distance
  to the nearest centre chosen so far and keeps the one that lowers the total of
  those distances most.  Plain k-means++ (one draw) too often puts two centres in
  one well separated cluster.  x (N_pad, d), weights 1 for real rows, 0 for padding.
  """
  trials = 2 + int(math.log(num_clusters))

  def sq_distance_to(points):  # (m, d) -> (m, N_pad)
    return _pairwise_sq_distances(x, points, x_sq).T

  first_key, key = jax.random.split(key)
  first = jax.random.categorical(first_key, jnp.log(weights))
  centres = jnp.zeros((num_clusters, x.shape[-1]), x.dtype).at[0].set(x[first])
  closest = sq_distance_to(x[first][None])[0]

  def seed_one(j, state):
    centres, closest, key = state
    key, sub = jax.random.split(key)
    mass = closest * weights
    # Fewer distinct points than clusters: fall back to uniform draws.
    mass = jnp.where(jnp.sum(mass) > 0, mass, weights)
    candidates = jax.random.categorical(sub, jnp.log(mass), shape=(trials,))
    new_closest = jnp.minimum(closest[None], sq_distance_to(x[candidates]))
    best = jnp.argmin(jnp.sum(new_closest * weights, axis=1))
    centres = centres.at[j].set(x[candidates[best]])
    return centres, new_closest[best], key

  centres, _, _ = lax.fori_loop(1, num_clusters, seed_one, (centres, closest, key))
  return centres


@functools.partial(jax.jit, static_argnames=('num_clusters', 'max_iter'))
def _kmeans_single(key, x_chunks, sq_chunks, weight_chunks, *, num_clusters,
                   max_iter):
  """One k-means++ seeding + Lloyd run on row chunks (M, chunk, d)."""
  x = x_chunks.reshape(-1, x_chunks.shape[-1])  # (N_pad, d)
  weights = weight_chunks.reshape(-1)  # 1 for real rows, 0 for padding
  centres = _kmeans_plus_plus(key, x, sq_chunks.reshape(-1), weights, num_clusters)

  def assign(centres):
    def one_chunk(args):
      xc, sq = args
      d2 = _pairwise_sq_distances(xc, centres, sq)
      return jnp.argmin(d2, axis=1).astype(jnp.int32), jnp.min(d2, axis=1)
    assignment, d2 = lax.map(one_chunk, (x_chunks, sq_chunks))
    return assignment.reshape(-1), jnp.sum(d2.reshape(-1) * weights)

  def update(centres, assignment):
    sums = jax.ops.segment_sum(x * weights[:, None], assignment, num_clusters)
    counts = jax.ops.segment_sum(weights, assignment, num_clusters)
    # An empty cluster keeps its centre.
    return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None],
                     centres)

  def lloyd_step(state):
    iteration, centres, assignment, _, _ = state
    centres = update(centres, assignment)
    new_assignment, inertia = assign(centres)
    changed = jnp.any((new_assignment != assignment) & (weights > 0))
    return iteration + 1, centres, new_assignment, inertia, changed

  def not_converged(state):
    iteration, _, _, _, changed = state
    return changed & (iteration < max_iter)

  assignment, inertia = assign(centres)
  state = (jnp.int32(0), centres, assignment, inertia, jnp.bool_(True))
  iterations, centres, assignment, inertia, _ = lax.while_loop(
      not_converged, lloyd_step, state)
  return centres, assignment, inertia, iterations


def kmeans(
    features: np.ndarray,
    num_clusters: int,
    *,
    num_inits: int = 3,
    max_iter: int = 300,
    seed: int = 0,
    chunk_size: int = 4096,
) -> tuple[np.ndarray, np.ndarray, float]:
  """Euclidean k-means: greedy k-means++ seeding, Lloyd until no assignment changes.

  Args:
    features: (N, d).
    num_clusters: K <= N.
    num_inits: independent seedings; the run with the lowest inertia is kept.
    max_iter: cap on Lloyd iterations per run.
    seed: PRNG seed.
    chunk_size: rows per step of the assignment (memory O(chunk_size x K)).

  Returns:
    centres (K, d) float32, assignments (N,) int32, inertia (sum of squared
    distances to the assigned centres).
  """
  x = np.asarray(features, np.float32)
  num_rows = x.shape[0]
  if not 1 <= num_clusters <= num_rows:
    raise ValueError(f'need 1 <= num_clusters <= N, got {num_clusters}, N = {num_rows}')
  chunk_size = min(chunk_size, num_rows)
  num_chunks = -(-num_rows // chunk_size)
  padded = num_chunks * chunk_size
  x_chunks = jnp.asarray(sharding.pad_rows(x, padded)).reshape(num_chunks, chunk_size, -1)
  sq_chunks = jnp.sum(x_chunks * x_chunks, axis=-1)
  weight_chunks = jnp.asarray(
      (np.arange(padded) < num_rows).astype(np.float32).reshape(num_chunks,
                                                                chunk_size))
  best = None
  for init in range(num_inits):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), init)
    centres, assignment, inertia, iterations = _kmeans_single(
        key, x_chunks, sq_chunks, weight_chunks, num_clusters=num_clusters,
        max_iter=max_iter)
    inertia = float(inertia)
    logging.info('kmeans: init %d, %d Lloyd iterations, inertia %.6g', init,
                 int(iterations), inertia)
    if best is None or inertia < best[2]:
      best = (centres, assignment, inertia)
  centres, assignment, inertia = best
  return np.asarray(centres), np.asarray(assignment)[:num_rows], inertia
