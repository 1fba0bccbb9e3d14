"""Evaluation of learned representations on fixed features.

Everything here works on features that were computed once (SPEC section 3: the
momentum encoder in eval mode), so no function below knows about models,
checkpoints or augmentations.  The functions take and return numpy arrays at the
boundary; the heavy parts are jit-compiled JAX, chunked so that no N x M matrix
has to exist at once.

Feature extraction
  `extract_features(feature_fn, iterator)` runs a jitted `(B, H, W, C) -> (B, d)`
  function over an input pipeline's batches and keeps the rows whose `mask` is True.

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
  Weighted vote (DINO; SPEC section 3, ImageNet): features L2-normalised, the k
  nearest vote with weight exp(similarity / temperature).  The weights are
  computed as exp((s - s_max) / temperature) with s_max the query's largest
  similarity: a common factor per query, so the ranking of the classes is the
  same, and no temperature can overflow float32.  Classes are ranked by
  (votes descending, class index ascending); a class with no vote ranks behind
  every class with one, which matters for top-5 when fewer than 5 classes got
  votes.
  Majority vote (W-MSE / INTL / the ReSA CIFAR code; SPEC section 3, CIFAR): raw
  features, Euclidean distance, k = 5, each neighbour one vote; equal counts go to
  the smallest class index (what `torch.unique(..., return_counts=True)` followed by
  `argmax` does in those codes, and what scikit-learn's KNeighborsClassifier does).

Linear probe on fixed features (`linear_probe_features`; SPEC section 3, CIFAR)
  A linear layer W x + b (no BatchNorm) on the raw features, as in the authors'
  CIFAR code (`standardize=True` is an option, off by default).  Adam with
  PyTorch's `weight_decay` semantics, i.e. an L2 term added to the gradient
  before the moment estimates: `add_decayed_weights` then `scale_by_adam`, on
  weight and bias alike.  Learning rate lr * gamma^epoch with
  gamma = (final_lr / lr)^(1 / epochs), constant within an epoch
  (PyTorch `ExponentialLR` stepped once per epoch).  Each epoch is a fresh
  permutation cut into floor(N / batch_size) full batches (the few rows left over
  sit that epoch out; a new permutation is drawn next epoch).  PyTorch's default
  `nn.Linear` initialisation, U(-1/sqrt(d), 1/sqrt(d)) for weight and bias.  The
  whole run is one jit-compiled `lax.scan` over epochs of `lax.scan`s over batches.

Clustering analysis (`silhouette_samples`, `kmeans`, `adjusted_rand_index`,
`normalized_mutual_info`, `clustering_metrics`, `clustering_analysis`; the paper's
evidence, SPEC section 3)
  Silhouette of sample i against the TRUE labels:
    a_i = mean distance from i to the other members of its class,
    b_i = smallest mean distance from i to the members of another class,
    s_i = (b_i - a_i) / max(a_i, b_i),   s_i = 0 when i is alone in its class.
  The mean over samples measures local clustering quality, the standard deviation
  its stability.  Distances are cosine (1 - cosine similarity, clipped to [0, 2])
  or Euclidean, computed `chunk_size` rows at a time; the per-class sums of a
  chunk's (rows, N) distance matrix are one matmul with the (N, classes) one-hot
  label matrix.  A sample's distance to itself is set to exactly 0.
  Global clustering: k-means with k = number of classes (greedy k-means++ seeding, then
  Lloyd iterations until no assignment changes; the best of `num_inits` runs by
  inertia), implemented in JAX so that it runs on the accelerator; for the cosine
  metric it runs on L2-normalised features.  The k-means partition is compared with
  the labels by the adjusted Rand index (Hubert & Arabie) and the normalised mutual
  information (arithmetic-mean normalisation, scikit-learn's default), both
  computed from the contingency table in float64.

Numerics.  Features are cast to float32.  Every matmul that ranks or measures
distances uses `precision=HIGHEST`, so GPUs and TPUs do not silently use
TF32/bfloat16 passes; results then agree with a float32 CPU computation to
rounding.  Counts are accumulated as integers on the host.

Result files are written with `write_json` (a temporary file, then `os.replace`,
so a reader never sees half a file).
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

from absl import logging
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import optax

_HIGHEST = lax.Precision.HIGHEST
_EPS = 1e-12


# ---------------------------------------------------------------------------
# Small helpers.
# ---------------------------------------------------------------------------

def write_json(path, obj: Any) -> None:
  """Writes `obj` as JSON to `path` atomically (temporary file + `os.replace`).

  Numpy scalars and arrays are converted to Python numbers and lists.  The parent
  folder is created if needed.  Local file systems only (`os.replace`).
  """
  path = os.path.abspath(os.fspath(path))
  folder = os.path.dirname(path)
  os.makedirs(folder, exist_ok=True)
  fd, tmp_path = tempfile.mkstemp(
      dir=folder, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'w') as f:
      json.dump(obj, f, indent=2, default=_json_default)
      f.write('\n')
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp_path, 0o644)  # mkstemp creates 0600 files.
    os.replace(tmp_path, path)
  except BaseException:
    if os.path.exists(tmp_path):
      os.unlink(tmp_path)
    raise


def _json_default(x):
  if isinstance(x, (np.generic, jax.Array)) and np.ndim(x) == 0:
    return np.asarray(x).item()
  if isinstance(x, (np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  raise TypeError(f'not JSON serialisable: {type(x).__name__}')


def _to_numpy(x) -> np.ndarray:
  """Host copy of an array; a global array spanning several processes is gathered."""
  if isinstance(x, jax.Array):
    if x.is_fully_addressable:
      return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _pad_rows(x: np.ndarray, num_rows: int, value=0) -> np.ndarray:
  """Pads the leading axis of `x` to `num_rows` with `value`."""
  if x.shape[0] == num_rows:
    return x
  pad = np.full((num_rows - x.shape[0],) + x.shape[1:], value, dtype=x.dtype)
  return np.concatenate([x, pad], axis=0)


def _place_padded(x: np.ndarray, num_rows: int, value, mesh: Mesh | None,
                  spec: P) -> jax.Array:
  """`_place` of `x` padded to `num_rows` rows, without a padded host copy.

  The train bank can be most of the host's memory (ImageNet: 1.28M x 2048
  float32 = 10 GB), so the padding is added on device or per shard.
  """
  if mesh is None:
    pad = [(0, num_rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(jnp.asarray(x), pad, constant_values=value)

  def shard(index):
    start, stop, _ = index[0].indices(num_rows)
    block = x[min(start, x.shape[0]):min(stop, x.shape[0])]
    return _pad_rows(block, stop - start, value)[(slice(None),) + tuple(index[1:])]

  sharding = NamedSharding(mesh, spec)
  return jax.make_array_from_callback((num_rows,) + x.shape[1:], sharding, shard)


def _l2_normalize(x: jax.Array) -> jax.Array:
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, _EPS)


def _place(x: np.ndarray, mesh: Mesh | None, spec: P) -> jax.Array:
  """Puts a host array on the default device, or on `mesh` with partition `spec`.

  `make_array_from_callback` works when the mesh spans several processes too
  (every process holds the whole host array and hands out its own slices).
  """
  if mesh is None:
    return jnp.asarray(x)
  sharding = NamedSharding(mesh, spec)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


# ---------------------------------------------------------------------------
# Feature extraction.
# ---------------------------------------------------------------------------

def extract_features(
    feature_fn: Callable[[Any], Any],
    iterator: Iterable[Mapping[str, Any]],
    *,
    progress: Callable[[int, int], None] | None = None,
    log_every: int = 50,
) -> tuple[np.ndarray, np.ndarray]:
  """Features and labels of every real example that `iterator` yields.

  Args:
    feature_fn: a (jitted) function mapping the batch's images (B, H, W, C) to
      features (B, d).  Called with `batch['image']` as the iterator gives it
      (typically a global array sharded over the batch axis).
    iterator: yields dicts with 'image' (B, H, W, C), 'label' (B,) and 'mask'
      (B,), mask False on the padding rows that complete the last batch ('mask'
      may be absent: every row is real).  All three must describe the same
      (global) batch.
    progress: optional callback `progress(num_batches, num_examples)` called after
      every batch, e.g. to drive a progress bar.
    log_every: an absl INFO line every `log_every` batches (0: never).

  Returns:
    features (N, d) float32 and labels (N,) int64, N = number of mask-True rows,
    in the iterator's order.
  """
  features_list, labels_list = [], []
  num_batches = num_examples = 0
  start = time.time()
  for batch in iterator:
    features = _to_numpy(feature_fn(batch['image']))
    labels = _to_numpy(batch['label'])
    if 'mask' in batch:
      mask = _to_numpy(batch['mask']).astype(bool)
    else:
      mask = np.ones(labels.shape[0], bool)
    if features.ndim != 2 or not (features.shape[0] == labels.shape[0] ==
                                  mask.shape[0]):
      raise ValueError(
          f'batch shapes disagree: features {features.shape}, labels '
          f'{labels.shape}, mask {mask.shape}')
    features_list.append(features[mask].astype(np.float32))
    labels_list.append(labels[mask].astype(np.int64))
    num_batches += 1
    num_examples += int(mask.sum())
    if progress is not None:
      progress(num_batches, num_examples)
    if log_every and num_batches % log_every == 0:
      logging.info('extract_features: %d batches, %d examples, %.1f s',
                   num_batches, num_examples, time.time() - start)
  if not features_list:
    raise ValueError('the iterator yielded no batch')
  logging.info('extract_features: done, %d examples in %d batches, %.1f s',
               num_examples, num_batches, time.time() - start)
  return np.concatenate(features_list), np.concatenate(labels_list)


# ---------------------------------------------------------------------------
# k-nearest neighbours.
# ---------------------------------------------------------------------------

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
    scores = scale * jnp.matmul(queries, bank_chunk.T, precision=_HIGHEST)
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
    return _l2_normalize(queries) if metric == 'cosine' else queries

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
    bank = _place_padded(features, padded_rows, 0.0, mesh, spec)
    self.labels = _place_padded(labels, padded_rows, -1, mesh, spec)
    valid = _place(np.arange(padded_rows) < self.num_rows, mesh, spec)

    @jax.jit
    def prepare(bank, valid):
      if metric == 'cosine':
        bank = _l2_normalize(bank)
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
    queries = _place(_pad_rows(test_features[start:stop], chunk_size), bank.mesh, P())
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
    scores[start:stop] = _to_numpy(s)[:n]
    indices[start:stop] = _to_numpy(i)[:n]
    labels[start:stop] = _to_numpy(l)[:n]
  return scores, indices, labels


def _check_labels(labels, num_classes: int, name: str) -> np.ndarray:
  labels = np.asarray(labels).astype(np.int32)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f'{name} outside [0, {num_classes})')
  return labels


@functools.partial(jax.jit, static_argnames=('ks', 'num_classes', 'top'))
def _weighted_vote_hits(scores, neighbour_labels, query_labels, valid, temperature,
                        *, ks, num_classes, top):
  """Top-1 / top-`top` hit counts of the weighted vote, one pair per k."""
  hits = {}
  for k in ks:
    # (Q, k); divided by the common factor exp(s_max / T), see module docstring.
    weights = jnp.exp((scores[:, :k] - scores[:, :1]) / temperature)
    one_hot = jax.nn.one_hot(neighbour_labels[:, :k], num_classes, dtype=jnp.float32)
    votes = jnp.einsum('qk,qkc->qc', weights, one_hot, precision=_HIGHEST)
    _, ranked = lax.top_k(votes, top)  # equal votes: lower class index first
    is_label = ranked == query_labels[:, None]
    hits[f'top1_k{k}'] = jnp.sum(is_label[:, 0] & valid)
    hits[f'top5_k{k}'] = jnp.sum(jnp.any(is_label, axis=1) & valid)
  return hits


def knn_weighted(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    ks: Sequence[int] = (5, 10, 20),
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
  train_labels = _check_labels(train_labels, num_classes, 'train_labels')
  test_labels = _check_labels(test_labels, num_classes, 'test_labels')
  bank = _Bank(train_features, train_labels, metric='cosine',
               train_chunk_size=train_chunk_size, mesh=mesh)
  top = min(5, num_classes)
  hits = {name: 0 for k in ks for name in (f'top1_k{k}', f'top5_k{k}')}
  for start, stop, scores, _, labels in _iter_neighbours(
      bank, test_features, k=max(ks), chunk_size=chunk_size):
    size = scores.shape[0]
    query_labels = _pad_rows(test_labels[start:stop], size, -1)
    valid = np.arange(size) < stop - start
    chunk_hits = _weighted_vote_hits(
        scores, labels, _place(query_labels, bank.mesh, P()),
        _place(valid, bank.mesh, P()), jnp.float32(temperature), ks=ks,
        num_classes=num_classes, top=top)
    for name, value in chunk_hits.items():
      hits[name] += int(_to_numpy(value))
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
  train_labels = _check_labels(train_labels, num_classes, 'train_labels')
  test_labels = _check_labels(test_labels, num_classes, 'test_labels')
  bank = _Bank(train_features, train_labels, metric='euclidean',
               train_chunk_size=train_chunk_size, mesh=mesh)
  hits = 0
  for start, stop, _, _, labels in _iter_neighbours(
      bank, test_features, k=k, chunk_size=chunk_size):
    size = labels.shape[0]
    query_labels = _pad_rows(test_labels[start:stop], size, -1)
    valid = np.arange(size) < stop - start
    hits += int(_to_numpy(_majority_vote_hits(
        labels, _place(query_labels, bank.mesh, P()), _place(valid, bank.mesh, P()),
        k=k, num_classes=num_classes)))
  return 100.0 * hits / len(test_labels)


# ---------------------------------------------------------------------------
# Linear probe on fixed features.
# ---------------------------------------------------------------------------

def linear_probe_features(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    num_classes: int,
    epochs: int = 500,
    batch_size: int = 1000,
    lr: float = 1e-2,
    final_lr: float = 1e-6,
    weight_decay: float = 5e-6,
    seed: int = 0,
    standardize: bool = False,
) -> dict[str, float]:
  """The CIFAR linear-probe protocol on fixed features (see the module docstring).

  Args:
    train_x: (N, d) features; train_y: (N,) ints in [0, num_classes).
    test_x: (M, d); test_y: (M,).
    num_classes: number of classes.
    epochs, batch_size, lr, final_lr, weight_decay: the protocol (SPEC section 3).
      If N < batch_size the batch is the whole train set.
    seed: initialisation and shuffling.
    standardize: standardise every feature with the train mean and std first
      (off: the authors use raw features).

  Returns:
    {'top1': %, 'top5': %} on the test set (top-5 is top-C if C < 5).
  """
  x = np.asarray(train_x, np.float32)
  x_test = np.asarray(test_x, np.float32)
  if standardize:
    mean, std = x.mean(0), x.std(0)
    x = (x - mean) / np.maximum(std, 1e-6)
    x_test = (x_test - mean) / np.maximum(std, 1e-6)
  y = _check_labels(train_y, num_classes, 'train_y')
  y_test = _check_labels(test_y, num_classes, 'test_y')
  num_train, dim = x.shape
  batch_size = min(batch_size, num_train)
  steps_per_epoch = num_train // batch_size
  gamma = (final_lr / lr) ** (1.0 / epochs)
  schedule = optax.exponential_decay(
      init_value=lr, transition_steps=steps_per_epoch, decay_rate=gamma,
      staircase=True)
  optimizer = optax.chain(
      optax.add_decayed_weights(weight_decay),  # PyTorch Adam's L2 term.
      optax.scale_by_adam(),
      optax.scale_by_learning_rate(schedule))

  init_key, shuffle_key = jax.random.split(jax.random.PRNGKey(seed))
  kernel_key, bias_key = jax.random.split(init_key)
  bound = 1.0 / math.sqrt(dim)
  params = {
      'kernel': jax.random.uniform(kernel_key, (dim, num_classes), jnp.float32,
                                   -bound, bound),
      'bias': jax.random.uniform(bias_key, (num_classes,), jnp.float32,
                                 -bound, bound),
  }

  def logits_fn(params, features):
    return jnp.matmul(features, params['kernel'], precision=_HIGHEST) + params['bias']

  def loss_fn(params, features, labels):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_fn(params, features), labels).mean()

  @jax.jit
  def train(params, x, y, shuffle_key):
    def step(carry, batch_indices):
      params, opt_state = carry
      loss, grads = jax.value_and_grad(loss_fn)(params, x[batch_indices],
                                                y[batch_indices])
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    def epoch(carry, epoch_index):
      order = jax.random.permutation(jax.random.fold_in(shuffle_key, epoch_index),
                                     num_train)
      batches = order[:steps_per_epoch * batch_size].reshape(steps_per_epoch,
                                                             batch_size)
      carry, losses = lax.scan(step, carry, batches)
      return carry, losses.mean()

    (params, _), epoch_losses = lax.scan(
        epoch, (params, optimizer.init(params)), jnp.arange(epochs))
    return params, epoch_losses

  start = time.time()
  params, epoch_losses = train(params, jnp.asarray(x), jnp.asarray(y), shuffle_key)
  logits = np.asarray(jax.jit(logits_fn)(params, jnp.asarray(x_test)))
  logging.info('linear probe: %d epochs, final train loss %.4f, %.1f s', epochs,
               float(epoch_losses[-1]), time.time() - start)
  top = min(5, num_classes)
  # Stable sort on -logits: equal logits rank the lower class index first.
  ranked = np.argsort(-logits, axis=1, kind='stable')[:, :top]
  is_label = ranked == y_test[:, None]
  return {'top1': 100.0 * float(is_label[:, 0].mean()),
          'top5': 100.0 * float(is_label.any(axis=1).mean())}


# ---------------------------------------------------------------------------
# Clustering analysis.
# ---------------------------------------------------------------------------

def _encode(labels) -> tuple[np.ndarray, int]:
  """Arbitrary labels -> codes 0..C-1 (N,) and C."""
  classes, codes = np.unique(np.asarray(labels), return_inverse=True)
  return codes.reshape(-1).astype(np.int32), len(classes)


@functools.partial(jax.jit, static_argnames=('metric',))
def _silhouette_chunk(rows, row_indices, row_codes, features, sq_norms, one_hot,
                      counts, *, metric):
  """Silhouette values of a chunk of rows. rows (Q, d), features (N, d)."""
  dots = jnp.matmul(rows, features.T, precision=_HIGHEST)  # (Q, N)
  if metric == 'cosine':
    distances = jnp.clip(1.0 - dots, 0.0, 2.0)
  else:
    row_sq = jnp.sum(rows * rows, axis=1, keepdims=True)
    distances = jnp.sqrt(jnp.maximum(row_sq + sq_norms[None, :] - 2.0 * dots, 0.0))
  is_self = row_indices[:, None] == jnp.arange(features.shape[0])[None, :]
  distances = jnp.where(is_self, 0.0, distances)
  sums = jnp.matmul(distances, one_hot, precision=_HIGHEST)  # (Q, C)
  own = jax.nn.one_hot(row_codes, counts.shape[0], dtype=bool)  # (Q, C)
  own_count = counts[row_codes]
  intra = jnp.sum(jnp.where(own, sums, 0.0), axis=1) / jnp.maximum(own_count - 1, 1)
  inter = jnp.min(jnp.where(own, jnp.inf, sums / counts[None, :]), axis=1)
  denominator = jnp.maximum(intra, inter)
  values = jnp.where(denominator > 0, (inter - intra) / denominator, 0.0)
  return jnp.where(own_count > 1, values, 0.0)


def silhouette_samples(features: np.ndarray, labels: np.ndarray,
                       metric: str = 'cosine', chunk_size: int = 1024) -> np.ndarray:
  """Per-sample silhouette values (N,) of `features` (N, d) grouped by `labels`.

  Same definition and conventions as `sklearn.metrics.silhouette_samples`
  (singleton classes get 0); needs 2 <= number of classes <= N - 1.
  `metric`: 'cosine' or 'euclidean'.
  """
  if metric not in ('cosine', 'euclidean'):
    raise ValueError(f'metric must be cosine or euclidean, got {metric!r}')
  x = np.asarray(features, np.float32)
  codes, num_classes = _encode(labels)
  num_samples = x.shape[0]
  if not 2 <= num_classes <= num_samples - 1:
    raise ValueError(f'need 2 <= classes <= N - 1, got {num_classes} for N = '
                     f'{num_samples}')
  if metric == 'cosine':
    x = np.asarray(_l2_normalize(jnp.asarray(x)))
  else:
    # Distances do not change under translation; centring reduces the
    # cancellation in |x|^2 + |y|^2 - 2<x, y>.
    x = x - x.mean(axis=0, dtype=np.float64).astype(np.float32)
  features_dev = jnp.asarray(x)
  sq_norms = jnp.sum(features_dev * features_dev, axis=1)
  one_hot = jax.nn.one_hot(jnp.asarray(codes), num_classes, dtype=jnp.float32)
  counts = jnp.asarray(np.bincount(codes, minlength=num_classes), jnp.float32)
  chunk_size = min(chunk_size, num_samples)
  values = np.zeros(num_samples, np.float32)
  for start in range(0, num_samples, chunk_size):
    stop = min(start + chunk_size, num_samples)
    rows = jnp.asarray(_pad_rows(x[start:stop], chunk_size))
    # Padding rows get index -1 (no self) and code 0; their values are dropped.
    row_indices = jnp.asarray(_pad_rows(np.arange(start, stop, dtype=np.int32),
                                        chunk_size, -1))
    row_codes = jnp.asarray(_pad_rows(codes[start:stop], chunk_size, 0))
    chunk_values = _silhouette_chunk(rows, row_indices, row_codes, features_dev,
                                     sq_norms, one_hot, counts, metric=metric)
    values[start:stop] = np.asarray(chunk_values)[:stop - start]
  return values


def _pairwise_sq_distances(x, centres, x_sq):
  """(n, K) squared distances, clipped at 0."""
  centre_sq = jnp.sum(centres * centres, axis=1)
  dots = jnp.matmul(x, centres.T, precision=_HIGHEST)
  return jnp.maximum(x_sq[:, None] + centre_sq[None, :] - 2.0 * dots, 0.0)


@functools.partial(jax.jit, static_argnames=('num_clusters', 'max_iter'))
def _kmeans_single(key, x_chunks, sq_chunks, weight_chunks, *, num_clusters,
                   max_iter):
  """One k-means++ seeding + Lloyd run on row chunks (M, chunk, d)."""
  dim = x_chunks.shape[-1]
  x = x_chunks.reshape(-1, dim)  # (N_pad, d)
  weights = weight_chunks.reshape(-1)  # 1 for real rows, 0 for padding

  # Greedy k-means++ (Arthur & Vassilvitskii, section 5; scikit-learn's default):
  # draw `trials` candidates with probability proportional to the squared
  # distance to the nearest centre chosen so far, keep the one that lowers the
  # total of those distances most.  Plain k-means++ (one draw) too often puts two
  # centres in one well separated cluster.
  trials = 2 + int(math.log(num_clusters))

  x_sq = sq_chunks.reshape(-1)

  def sq_distance_to(points):  # (m, d) -> (m, N_pad)
    return _pairwise_sq_distances(x, points, x_sq).T

  first_key, key = jax.random.split(key)
  first = jax.random.categorical(first_key, jnp.log(weights))
  centres = jnp.zeros((num_clusters, dim), x.dtype).at[0].set(x[first])
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
  x_chunks = jnp.asarray(_pad_rows(x, padded)).reshape(num_chunks, chunk_size, -1)
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


def _contingency(labels_true, labels_pred) -> np.ndarray:
  """(classes, clusters) table of co-occurrence counts, float64."""
  true_codes, num_true = _encode(labels_true)
  pred_codes, num_pred = _encode(labels_pred)
  if true_codes.shape != pred_codes.shape:
    raise ValueError('the two labelings have different lengths')
  table = np.zeros((num_true, num_pred), np.float64)
  np.add.at(table, (true_codes, pred_codes), 1.0)
  return table


def adjusted_rand_index(labels_true, labels_pred) -> float:
  """Hubert & Arabie's adjusted Rand index of two labelings of the same samples.

  With n_ij the contingency table, a_i, b_j its row and column sums and
  C(m) = m (m - 1) / 2:  index = sum C(n_ij), expected = sum C(a_i) sum C(b_j) /
  C(n), maximum = (sum C(a_i) + sum C(b_j)) / 2, ARI = (index - expected) /
  (maximum - expected); 1 when maximum == expected (e.g. both labelings put
  everything in one cluster, or every sample alone).
  """
  table = _contingency(labels_true, labels_pred)
  pairs = lambda m: m * (m - 1.0) / 2.0
  index = pairs(table).sum()
  rows, cols = pairs(table.sum(1)).sum(), pairs(table.sum(0)).sum()
  expected = rows * cols / pairs(table.sum())
  maximum = (rows + cols) / 2.0
  if maximum == expected:
    return 1.0
  return float((index - expected) / (maximum - expected))


def normalized_mutual_info(labels_true, labels_pred) -> float:
  """Mutual information / arithmetic mean of the two entropies (natural log).

  1 when both labelings have a single cluster; 0 when the mutual information is 0.
  """
  table = _contingency(labels_true, labels_pred)
  if table.shape[0] == table.shape[1] == 1:
    return 1.0
  n = table.sum()
  p_joint = table / n
  p_true, p_pred = p_joint.sum(1), p_joint.sum(0)
  nonzero = p_joint > 0
  mutual_info = np.sum(p_joint[nonzero] * np.log(
      p_joint[nonzero] / np.outer(p_true, p_pred)[nonzero]))
  mutual_info = max(float(mutual_info), 0.0)
  if mutual_info == 0.0:
    return 0.0
  entropy = lambda p: -np.sum(p[p > 0] * np.log(p[p > 0]))
  normaliser = max((entropy(p_true) + entropy(p_pred)) / 2.0, np.finfo(float).eps)
  return float(mutual_info / normaliser)


def clustering_metrics(
    features: np.ndarray,
    labels: np.ndarray,
    num_clusters: int | None = None,
    metric: str = 'cosine',
    seed: int = 0,
    *,
    num_inits: int = 3,
) -> dict[str, float]:
  """The paper's clustering measures of `features` (N, d) against `labels` (N,).

  silhouette_mean / silhouette_std: mean and (population) standard deviation of
  the per-sample silhouette against the true labels, distances by `metric`.
  ari / nmi: agreement of the labels with a k-means partition, k = `num_clusters`
  (default: the number of distinct labels); k-means runs on L2-normalised
  features for the cosine metric, on raw features for the Euclidean one.
  """
  codes, num_classes = _encode(labels)
  silhouettes = silhouette_samples(features, codes, metric=metric)
  x = np.asarray(features, np.float32)
  if metric == 'cosine':
    x = np.asarray(_l2_normalize(jnp.asarray(x)))
  _, assignment, _ = kmeans(x, num_clusters or num_classes, num_inits=num_inits,
                            seed=seed)
  return {
      'silhouette_mean': float(silhouettes.mean(dtype=np.float64)),
      'silhouette_std': float(silhouettes.std(dtype=np.float64)),
      'ari': adjusted_rand_index(codes, assignment),
      'nmi': normalized_mutual_info(codes, assignment),
  }


_METRIC_NAMES = ('silhouette_mean', 'silhouette_std', 'ari', 'nmi')


def _save_figure(figure, path: str) -> None:
  """Saves a matplotlib Figure as PNG atomically (no pyplot, no global backend)."""
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp_path = tempfile.mkstemp(dir=folder, suffix='.png.tmp')
  os.close(fd)
  try:
    figure.savefig(tmp_path, format='png', dpi=120, bbox_inches='tight')
    os.chmod(tmp_path, 0o644)
    os.replace(tmp_path, path)
  except BaseException:
    if os.path.exists(tmp_path):
      os.unlink(tmp_path)
    raise


def _plot_bars(results, path: str) -> None:
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  representations = list(results)
  granularities = list(next(iter(results.values())))
  figure = Figure(figsize=(4.0 * len(_METRIC_NAMES), 3.6))
  axes = figure.subplots(1, len(_METRIC_NAMES))
  width = 0.8 / len(granularities)
  positions = np.arange(len(representations))
  for ax, metric_name in zip(axes, _METRIC_NAMES):
    for g, granularity in enumerate(granularities):
      values = [results[r][granularity][metric_name] for r in representations]
      ax.bar(positions + (g - (len(granularities) - 1) / 2) * width, values, width,
             label=granularity)
    ax.set_xticks(positions)
    ax.set_xticklabels(representations, rotation=20, ha='right')
    ax.set_title(metric_name)
    ax.axhline(0.0, color='black', linewidth=0.5)
  axes[0].legend(title='labels')
  figure.tight_layout()
  _save_figure(figure, path)


def _plot_tsne(named_features, labels, path: str, *, num_samples: int, metric: str,
               seed: int) -> None:
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from sklearn.manifold import TSNE  # pylint: disable=g-import-not-at-top
  num_rows = len(next(iter(named_features.values())))
  rng = np.random.default_rng(seed)
  subset = np.sort(rng.permutation(num_rows)[:min(num_samples, num_rows)])
  figure = Figure(figsize=(4.0 * len(labels), 4.0 * len(named_features)))
  axes = figure.subplots(len(named_features), len(labels), squeeze=False)
  for row, (name, features) in enumerate(named_features.items()):
    perplexity = min(30.0, (len(subset) - 1) / 3.0)
    embedding = TSNE(n_components=2, metric=metric, init='pca', perplexity=perplexity,
                     random_state=seed).fit_transform(
                         np.asarray(features, np.float32)[subset])
    for col, (granularity, granularity_labels) in enumerate(labels.items()):
      ax = axes[row, col]
      codes, _ = _encode(np.asarray(granularity_labels)[subset])
      ax.scatter(embedding[:, 0], embedding[:, 1], c=codes, s=3, cmap='tab20')
      ax.set_title(f'{name} / {granularity}')
      ax.set_xticks([])
      ax.set_yticks([])
  figure.tight_layout()
  _save_figure(figure, path)


def clustering_analysis(
    named_features: Mapping[str, np.ndarray],
    labels: Mapping[str, np.ndarray],
    out_dir,
    *,
    metric: str = 'cosine',
    seed: int = 0,
    num_inits: int = 3,
    tsne: bool = False,
    tsne_samples: int = 2000,
    print_fn: Callable[[str], None] | None = print,
) -> dict[str, dict[str, dict[str, float]]]:
  """`clustering_metrics` for every (representation, label granularity).

  Args:
    named_features: {'encoding': (N, d_h), 'embedding': (N, d_z), ...}, all of the
      same N samples.
    labels: {'fine': (N,), 'coarse': (N,)}, e.g. CIFAR-100 classes and superclasses.
    out_dir: writes clustering.json, clustering.png (a bar chart per metric) and,
      with `tsne`, tsne.png (a t-SNE map of `tsne_samples` random samples per
      representation, coloured by each granularity's labels).
    metric, seed, num_inits: as in `clustering_metrics`.
    print_fn: prints the table (None: silent).

  Returns:
    {representation: {granularity: {silhouette_mean, silhouette_std, ari, nmi}}}.
  """
  if not named_features or not labels:
    raise ValueError('need at least one representation and one labeling')
  num_rows = ({len(v) for v in named_features.values()}
              | {len(v) for v in labels.values()})
  if len(num_rows) != 1:
    raise ValueError(f'representations and labels disagree on N: {sorted(num_rows)}')
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)

  results = {}
  for name, features in named_features.items():
    results[name] = {}
    for granularity, granularity_labels in labels.items():
      start = time.time()
      results[name][granularity] = clustering_metrics(
          features, granularity_labels, metric=metric, seed=seed, num_inits=num_inits)
      logging.info('clustering %s / %s: %s (%.1f s)', name, granularity,
                   results[name][granularity], time.time() - start)

  if print_fn is not None:
    header = f'{"representation":<20} {"labels":<10}' + ''.join(
        f' {m:>15}' for m in _METRIC_NAMES)
    lines = [header, '-' * len(header)]
    for name, by_granularity in results.items():
      for granularity, values in by_granularity.items():
        lines.append(f'{name:<20} {granularity:<10}' + ''.join(
            f' {values[m]:>15.4f}' for m in _METRIC_NAMES))
    print_fn('\n'.join(lines))

  write_json(os.path.join(out_dir, 'clustering.json'), {
      'metric': metric,
      'seed': seed,
      'num_samples': num_rows.pop(),
      'results': results,
  })
  _plot_bars(results, os.path.join(out_dir, 'clustering.png'))
  if tsne:
    _plot_tsne(named_features, labels, os.path.join(out_dir, 'tsne.png'),
               num_samples=tsne_samples, metric=metric, seed=seed)
  return results


# ---------------------------------------------------------------------------
# Command line: `python -m resa_jax.evaluate` (checkpoint and model loading,
# feature extraction over TFDS splits, then the protocols above).  Added later by
# the lead engineer; nothing below this line yet.
# ---------------------------------------------------------------------------
