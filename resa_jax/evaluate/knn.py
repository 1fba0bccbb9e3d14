"""k-nearest-neighbour classifiers on fixed features: DINO's weighted vote and the
majority vote, chunked and sharded.

k-nearest neighbours (`nearest_neighbours`, `knn_weighted`, `knn_majority`)
  Every train row j gets a score against a query x, larger = nearer:
    cosine     score = <x/|x|, y_j/|y_j|>                 (the cosine similarity)
    euclidean  score = 2 <x, y_j> - |y_j|^2 = |x|^2 - |x - y_j|^2
  (the |x|^2 term is the same for every j, so it never changes the ranking).
  The k highest scores are found with a running top-k: the train bank is cut into
  chunks of `train_chunk_size` rows, and after each chunk the k best so far are
  merged with the chunk's scores, so memory is O(queries x train_chunk_size).  The
  queries are processed `chunk_size` at a time.  With a `mesh`, the bank is split
  row-wise over all of the mesh's devices; every device finds its own k best
  (same running top-k), the (queries, k) candidates of all devices are gathered
  and merged by one more top-k.
  Ties.  Neighbours are ranked by (score descending, train index ascending): of
  two train rows at the same distance the one with the smaller index comes
  first.  `lax.top_k` puts the lower position first among equal values, and every
  merge concatenates candidates in increasing train-index order (the k best so
  far before the new chunk, device 0 before device 1), so the rule holds on one
  device and on many, and both give the same neighbours.
  Weighted vote (DINO; docs/method.md, 'Evaluation protocols', ImageNet): features
  L2-normalised, the k nearest vote with weight exp(similarity / temperature).  The
  weights are computed as exp((s - s_max) / temperature) with s_max the query's
  largest similarity: a common factor per query, so the ranking of the classes is
  the same, and no temperature can overflow float32.  Classes are ranked by (votes
  descending, class index ascending); a class with no vote ranks behind every class
  with one, which matters for top-5 when fewer than 5 classes got votes.
  Majority vote (W-MSE / INTL / the ReSA CIFAR code; docs/method.md, 'Evaluation
  protocols', CIFAR): raw features, Euclidean distance, k = 5, each neighbour one
  vote; equal counts go to the smallest class index (what
  `torch.unique(..., return_counts=True)` followed by `argmax` does in those codes,
  and what scikit-learn's KNeighborsClassifier does).

Numerics: features float32, every ranking matmul at `precision=HIGHEST` (no TF32 or
bfloat16 passes on GPUs and TPUs), counts accumulated as integers on the host.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P
import numpy as np

from resa_jax import losses
from resa_jax import sharding
from resa_jax.evaluate import common

HIGHEST = lax.Precision.HIGHEST


def _running_topk(queries, bank, bank_bias, bank_labels, *, k, scale, chunk,
                  index_offset, varying_axes=()):
  """The k highest scores of `queries` against `bank`, in chunks of the bank.

  score[q, j] = scale * <queries[q], bank[j]> - bank_bias[j]; padding rows of the
  bank carry bias +inf (score -inf).  Shapes: queries (Q, d), bank (n, d) with
  n % chunk == 0, bank_bias and bank_labels (n,).  Returns scores (Q, k) float32,
  global train indices (Q, k) int32 (local index + `index_offset`) and the
  neighbours' labels (Q, k) int32, sorted by (score desc, index asc).
  """
  num_queries = queries.shape[0]
  num_rows, dim = bank.shape
  num_chunks = num_rows // chunk

  def merge(best, xs):
    best_scores, best_indices, best_labels = best  # each (Q, k)
    bank_chunk, bias_chunk, labels_chunk, chunk_start = xs
    scores = scale * jnp.matmul(queries, bank_chunk.T, precision=HIGHEST)
    scores = scores - bias_chunk[None, :]  # (Q, chunk)
    indices = jnp.broadcast_to(
        chunk_start + jnp.arange(chunk, dtype=jnp.int32), scores.shape)
    labels = jnp.broadcast_to(labels_chunk, scores.shape)
    # The best-so-far come first: they have the lower train indices (tie rule).
    all_scores = jnp.concatenate([best_scores, scores], axis=1)  # (Q, k + chunk)
    new_scores, position = lax.top_k(all_scores, k)
    pick = lambda a, b: jnp.take_along_axis(
        jnp.concatenate([a, b], axis=1), position, axis=1)
    return (new_scores, pick(best_indices, indices), pick(best_labels, labels)), None

  init = (jnp.full((num_queries, k), -jnp.inf, jnp.float32),
          jnp.full((num_queries, k), -1, jnp.int32),
          jnp.full((num_queries, k), -1, jnp.int32))
  if varying_axes:  # inside shard_map the carry differs from device to device
    init = tuple(lax.pcast(x, varying_axes, to='varying') for x in init)
  chunk_starts = index_offset + chunk * jnp.arange(num_chunks, dtype=jnp.int32)
  xs = (bank.reshape(num_chunks, chunk, dim), bank_bias.reshape(num_chunks, chunk),
        bank_labels.reshape(num_chunks, chunk), chunk_starts)
  best, _ = lax.scan(merge, init, xs)
  return best


def _query_scale(metric: str) -> float:
  return {'cosine': 1.0, 'euclidean': 2.0}[metric]


def _make_neighbour_fn(mesh: Mesh | None, *, k: int, metric: str, chunk: int):
  """A jitted fn (queries (Q, d), bank, bias, labels) -> (scores, indices, labels)."""
  scale = _query_scale(metric)

  def prepare(queries):
    queries = queries.astype(jnp.float32)
    return losses.l2_normalize(queries) if metric == 'cosine' else queries

  if mesh is None:
    def single(queries, bank, bias, labels):
      return _running_topk(prepare(queries), bank, bias, labels, k=k, scale=scale,
                           chunk=chunk, index_offset=0)
    return jax.jit(single)

  axes = tuple(mesh.axis_names)

  def per_device(queries, bank, bias, labels):
    offset = lax.axis_index(axes) * bank.shape[0]
    local = _running_topk(prepare(queries), bank, bias, labels, k=k, scale=scale,
                          chunk=chunk, index_offset=offset, varying_axes=axes)
    # (Q, devices * k), device order = train-index order (tie rule).
    scores, indices, labels = (lax.all_gather(x, axes, axis=1, tiled=True,
                                              to='invarying')
                               for x in local)
    scores, position = lax.top_k(scores, k)
    take = lambda x: jnp.take_along_axis(x, position, axis=1)
    return scores, take(indices), take(labels)

  sharded = jax.shard_map(
      per_device, mesh=mesh, in_specs=(P(), P(axes), P(axes), P(axes)),
      out_specs=P())
  return jax.jit(sharded)


class _Bank:
  """The train features on device(s), padded, with their per-row score bias."""

  def __init__(self, features, labels, *, metric, train_chunk_size, mesh):
    if metric not in ('cosine', 'euclidean'):
      raise ValueError(f'metric must be cosine or euclidean, got {metric!r}')
    features = np.asarray(features, np.float32)
    labels = np.asarray(labels).astype(np.int32)
    if features.ndim != 2 or labels.shape != (features.shape[0],):
      raise ValueError(f'bad train shapes {features.shape}, {labels.shape}')
    self.num_rows = features.shape[0]
    num_shards = 1 if mesh is None else mesh.devices.size
    rows_per_shard = -(-self.num_rows // num_shards)
    self.chunk = min(train_chunk_size, rows_per_shard)
    rows_per_shard = -(-rows_per_shard // self.chunk) * self.chunk
    padded_rows = rows_per_shard * num_shards
    spec = P(tuple(mesh.axis_names)) if mesh is not None else P()
    bank = sharding.place_padded(features, padded_rows, 0.0, mesh, spec)
    self.labels = sharding.place_padded(labels, padded_rows, -1, mesh, spec)
    valid = sharding.place(np.arange(padded_rows) < self.num_rows, mesh, spec)

    @jax.jit
    def prepare(bank, valid):
      if metric == 'cosine':
        bank = losses.l2_normalize(bank)
        bias = jnp.zeros(bank.shape[:1], jnp.float32)
      else:
        bias = jnp.sum(bank * bank, axis=1)
      return bank, jnp.where(valid, bias, jnp.inf)

    self.features, self.bias = prepare(bank, valid)
    self.mesh = mesh
    self.metric = metric


def _iter_neighbours(bank: _Bank, test_features, *, k: int, chunk_size: int):
  """Yields (start, stop, scores, indices, labels) per chunk of test queries.

  The device arrays have `chunk_size` rows; rows past `stop - start` are padding.
  """
  test_features = np.asarray(test_features, np.float32)
  if k > bank.num_rows:
    raise ValueError(f'k = {k} exceeds the {bank.num_rows} train rows')
  neighbour_fn = _make_neighbour_fn(bank.mesh, k=k, metric=bank.metric,
                                    chunk=bank.chunk)
  num_test = test_features.shape[0]
  chunk_size = min(chunk_size, num_test)
  for start in range(0, num_test, chunk_size):
    stop = min(start + chunk_size, num_test)
    queries = sharding.place(sharding.pad_rows(test_features[start:stop], chunk_size), bank.mesh, P())
    yield (start, stop) + tuple(neighbour_fn(queries, bank.features, bank.bias,
                                             bank.labels))


def nearest_neighbours(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    k: int,
    *,
    metric: str = 'cosine',
    chunk_size: int = 1024,
    train_chunk_size: int = 16384,
    mesh: Mesh | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The k nearest train rows of every test row (see the module docstring).

  Args:
    train_features: (N, d); train_labels: (N,) ints; test_features: (M, d).
    k: number of neighbours, k <= N.
    metric: 'cosine' (L2-normalised features) or 'euclidean' (raw features).
    chunk_size: test queries per step.
    train_chunk_size: train rows per step of the running top-k (per device).
    mesh: shard the train bank over all of this mesh's devices.

  Returns:
    scores (M, k) float32 (cosine similarity, or |x|^2 - squared distance for
    'euclidean'), train indices (M, k) int32 and their labels (M, k) int32,
    nearest first, equal scores by increasing train index.
  """
  bank = _Bank(train_features, train_labels, metric=metric,
               train_chunk_size=train_chunk_size, mesh=mesh)
  num_test = len(test_features)
  scores = np.zeros((num_test, k), np.float32)
  indices = np.zeros((num_test, k), np.int32)
  labels = np.zeros((num_test, k), np.int32)
  for start, stop, s, i, l in _iter_neighbours(bank, test_features, k=k,
                                               chunk_size=chunk_size):
    n = stop - start
    scores[start:stop] = sharding.to_numpy(s)[:n]
    indices[start:stop] = sharding.to_numpy(i)[:n]
    labels[start:stop] = sharding.to_numpy(l)[:n]
  return scores, indices, labels


@functools.partial(jax.jit, static_argnames=('ks', 'num_classes', 'top'))
def _weighted_vote_hits(scores, neighbour_labels, query_labels, valid, temperature,
                        *, ks, num_classes, top):
  """Top-1 / top-`top` hit counts of the weighted vote, one pair per k."""
  hits = {}
  for k in ks:
    # (Q, k); divided by the common factor exp(s_max / T), see module docstring.
    weights = jnp.exp((scores[:, :k] - scores[:, :1]) / temperature)
    one_hot = jax.nn.one_hot(neighbour_labels[:, :k], num_classes, dtype=jnp.float32)
    votes = jnp.einsum('qk,qkc->qc', weights, one_hot, precision=HIGHEST)
    top1, topk = common.top_k_hits(votes, query_labels, top)  # equal votes: lower class first
    hits[f'top1_k{k}'] = jnp.sum(top1 & valid)
    hits[f'top5_k{k}'] = jnp.sum(topk & valid)
  return hits


def knn_weighted(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    ks: Sequence[int] = common.DEFAULT_KNN_KS,
    temperature: float = 0.07,
    chunk_size: int = 1024,
    train_chunk_size: int = 16384,
    mesh: Mesh | None = None,
) -> dict[str, float]:
  """DINO's weighted kNN classifier (cosine similarity, weights exp(s / T)).

  Args:
    train_features: (N, d); train_labels: (N,) ints in [0, num_classes).
    test_features: (M, d); test_labels: (M,).
    num_classes: number of classes.
    ks: the numbers of neighbours to evaluate; one neighbour search serves all.
    temperature: T in exp(similarity / T).
    chunk_size: test queries per step.
    train_chunk_size: train rows per step of the running top-k (per device).
    mesh: shard the train bank over all of this mesh's devices; the neighbours,
      hence the accuracies, are the same as without a mesh.

  Returns:
    {'top1_k{k}': %, 'top5_k{k}': %} for every k in `ks` (top-5 is top-C when
    there are fewer than 5 classes).
  """
  ks = tuple(sorted(set(int(k) for k in ks)))
  train_labels = common.check_labels(train_labels, num_classes, 'train_labels')
  test_labels = common.check_labels(test_labels, num_classes, 'test_labels')
  bank = _Bank(train_features, train_labels, metric='cosine',
               train_chunk_size=train_chunk_size, mesh=mesh)
  top = min(5, num_classes)
  hits = {name: 0 for k in ks for name in (f'top1_k{k}', f'top5_k{k}')}
  for start, stop, scores, _, labels in _iter_neighbours(
      bank, test_features, k=max(ks), chunk_size=chunk_size):
    size = scores.shape[0]
    query_labels = sharding.pad_rows(test_labels[start:stop], size, -1)
    valid = np.arange(size) < stop - start
    chunk_hits = _weighted_vote_hits(
        scores, labels, sharding.place(query_labels, bank.mesh, P()),
        sharding.place(valid, bank.mesh, P()), jnp.float32(temperature), ks=ks,
        num_classes=num_classes, top=top)
    for name, value in chunk_hits.items():
      hits[name] += int(sharding.to_numpy(value))
  num_test = len(test_labels)
  return {name: 100.0 * count / num_test for name, count in hits.items()}


@functools.partial(jax.jit, static_argnames=('k', 'num_classes'))
def _majority_vote_hits(neighbour_labels, query_labels, valid, *, k, num_classes):
  counts = jnp.sum(jax.nn.one_hot(neighbour_labels[:, :k], num_classes,
                                  dtype=jnp.int32), axis=1)  # (Q, C)
  predictions = jnp.argmax(counts, axis=1)  # equal counts: smallest class index
  return jnp.sum((predictions == query_labels) & valid)


def knn_majority(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    k: int = 5,
    chunk_size: int = 1024,
    train_chunk_size: int = 16384,
    mesh: Mesh | None = None,
) -> float:
  """Majority-vote kNN on raw features with Euclidean distance (W-MSE / INTL rule).

  Equal distances: the smaller train index is nearer; equal vote counts: the
  smallest class index wins.  Returns top-1 accuracy in %.
  """
  train_labels = common.check_labels(train_labels, num_classes, 'train_labels')
  test_labels = common.check_labels(test_labels, num_classes, 'test_labels')
  bank = _Bank(train_features, train_labels, metric='euclidean',
               train_chunk_size=train_chunk_size, mesh=mesh)
  hits = 0
  for start, stop, _, _, labels in _iter_neighbours(
      bank, test_features, k=k, chunk_size=chunk_size):
    size = labels.shape[0]
    query_labels = sharding.pad_rows(test_labels[start:stop], size, -1)
    valid = np.arange(size) < stop - start
    hits += int(sharding.to_numpy(_majority_vote_hits(
        labels, sharding.place(query_labels, bank.mesh, P()), sharding.place(valid, bank.mesh, P()),
        k=k, num_classes=num_classes)))
  return 100.0 * hits / len(test_labels)
