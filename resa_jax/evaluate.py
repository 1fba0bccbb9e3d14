"""Evaluation of learned representations: kNN, linear probes, semi-supervised
fine-tuning and the clustering analysis (SPEC section 3), library and command line.

    python -m resa_jax.evaluate --config=configs/fashion_mnist.py --checkpoint=WORKDIR \
        --eval=knn,linear,semi,clustering [--output=DIR] [--encoder=momentum|online] \
        [--linear_protocol=features|imagenet] [--semi_fraction=0.01] [--config.x=y ...]

The first part works on features that were computed once (SPEC section 3: the
momentum encoder in eval mode) and knows nothing of models, checkpoints or
augmentations: numpy arrays at the boundary, the heavy parts jit-compiled JAX,
chunked so that no N x M matrix has to exist at once.  The second part (from
"Models" on) loads checkpoints, extracts features over the evaluation pipeline,
trains the classifiers that need images (the ImageNet linear probe on a frozen
encoder, semi-supervised fine-tuning) and runs the command line; its docstrings
say what each protocol does.

Feature extraction
  `extract_features(feature_fn, iterator)` runs a jitted `(B, H, W, C) -> (B, d)`
  function (or one returning a dict of such arrays) over an input pipeline's
  batches and keeps the rows whose `mask` is True.

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

import dataclasses
import functools
import itertools
import json
import math
import os
import pathlib
import shutil
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
    label_keys: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    log_every: int = 50,
) -> tuple[Any, Any]:
  """Features and labels of every real example that `iterator` yields.

  Args:
    feature_fn: a (jitted) function mapping the batch's images (B, H, W, C) to
      features (B, d), or to a dict of such arrays (e.g. one per layer).  Called
      with `batch['image']` as the iterator gives it (typically a global array
      sharded over the batch axis; a global array that spans several processes
      is gathered, so every process gets all rows).
    iterator: yields dicts with 'image' (B, H, W, C), 'label' (B,) and 'mask'
      (B,), mask False on the padding rows that complete the last batch ('mask'
      may be absent: every row is real).  All must describe the same (global)
      batch.
    label_keys: None: return the 'label' array.  A sequence of keys (e.g.
      ('label', 'coarse_label')): return a dict of those label arrays.
    progress: optional callback `progress(num_batches, num_examples)` called after
      every batch, e.g. to print progress.
    log_every: an absl INFO line every `log_every` batches (0: never).

  Returns:
    features (N, d) float32 (or a dict of them, as `feature_fn` returns) and
    labels (N,) int64 (or a dict of them, per `label_keys`), N = number of
    mask-True rows, in the iterator's order.
  """
  keys = ('label',) if label_keys is None else tuple(label_keys)
  features_list, labels_list = [], []
  num_batches = num_examples = 0
  start = time.time()
  for batch in iterator:
    features = jax.tree.map(_to_numpy, feature_fn(batch['image']))
    labels = {k: _to_numpy(batch[k]) for k in keys}
    num_rows = labels[keys[0]].shape[0]
    if 'mask' in batch:
      mask = _to_numpy(batch['mask']).astype(bool)
    else:
      mask = np.ones(num_rows, bool)
    shapes = [f.shape for f in jax.tree.leaves(features)]
    if (any(len(s) != 2 or s[0] != num_rows for s in shapes) or mask.shape != (num_rows,)
        or any(l.shape != (num_rows,) for l in labels.values())):
      raise ValueError(
          f'batch shapes disagree: features {shapes}, labels '
          f'{[l.shape for l in labels.values()]}, mask {mask.shape}')
    features_list.append(jax.tree.map(lambda f: f[mask].astype(np.float32), features))
    labels_list.append({k: l[mask].astype(np.int64) for k, l in labels.items()})
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
  features = jax.tree.map(lambda *parts: np.concatenate(parts), *features_list)
  labels = {k: np.concatenate([l[k] for l in labels_list]) for k in keys}
  return features, (labels['label'] if label_keys is None else labels)


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


def save_figure(figure, path: str, dpi: int = 120) -> None:
  """Saves a matplotlib Figure as PNG atomically (no pyplot, no global backend)."""
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp_path = tempfile.mkstemp(dir=folder, suffix='.png.tmp')
  os.close(fd)
  try:
    figure.savefig(tmp_path, format='png', dpi=dpi, bbox_inches='tight')
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
  save_figure(figure, path)


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
  save_figure(figure, path)


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
# Models: checkpoints -> encoder variables -> feature functions.
# ---------------------------------------------------------------------------

EVALUATIONS = ('knn', 'linear', 'semi', 'clustering')
# Config fields that fix the shapes of the encoder and the projector.
_MODEL_FIELDS = ('arch', 'width_per_group', 'stem', 'mlp_layers', 'mlp_dim', 'emb_dim')
_EVAL_PARTS = ('encoder', 'projector')  # what evaluation uses of a network
_SUBSET_FILES = {0.01: '1percent.txt', 0.1: '10percent.txt'}


class EvaluationError(ValueError):
  """Input the evaluation cannot use: a missing checkpoint, one of another
  architecture, a bad flag.  The message is one line."""


@dataclasses.dataclass
class Model:
  """An encoder (and projector) ready for evaluation.

  net: an SSLNetwork without predictor (the momentum network's class, whichever
  encoder was chosen), so `net.apply(variables, x)` gives (encoding, embedding)
  and `method='encode'` the encoding.  variables: {'params', 'batch_stats'},
  each with 'encoder' and, when the checkpoint has one, 'projector'; replicated
  over the mesh.  source: what was loaded, for the result files.
  """
  net: Any
  variables: Any
  source: dict

  @property
  def has_projector(self) -> bool:
    return 'projector' in self.variables['params']


def _model_summary(config) -> str:
  return ', '.join(f'{k}={config[k]}' for k in _MODEL_FIELDS)


def _trained_config_note(workdir: pathlib.Path, config) -> str:
  """'; its config.json has width_per_group=8' when the training config differs."""
  path = workdir / 'config.json'
  try:
    trained = json.loads(path.read_text())
  except (OSError, ValueError):
    return ''
  differences = [f'{k}={trained[k]}' for k in _MODEL_FIELDS + ('predictor',)
                 if k in trained and trained[k] != config[k]]
  return f'; its config.json has {", ".join(differences)}' if differences else ''


def _checkpoint_steps(directory: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def _stored_shapes(step_dir: pathlib.Path) -> dict[str, tuple] | None:
  """{name: shape} of a TrainState saved by train.Checkpoints, None if unreadable."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  item = step_dir / 'default'
  if not item.is_dir():
    return None
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # orbax warns that train.Checkpoints wrote no
  try:                                  # step metadata file; the tree's is all we need
    with ocp.StandardCheckpointer() as checkpointer:
      metadata = checkpointer.metadata(item)
  except Exception:  # pylint: disable=broad-except  (restore_latest reports it)
    return None
  finally:
    logging.set_verbosity(verbosity)
  tree = getattr(metadata, 'item_metadata', metadata)
  from resa_jax import train  # pylint: disable=g-import-not-at-top
  return train.leaf_shapes(tree) if tree is not None else None


def _abstract_train_state(config, image_channels: int):
  """ShapeDtypeStructs of train.create_train_state for `config` (nothing computed)."""
  from resa_jax import models, train  # pylint: disable=g-import-not-at-top
  online_net, momentum_net = models.create_networks(config)
  tx = train.create_optimizer(config, train.learning_rate_schedule(config, 1, 1))
  size = int(config.crops_size[0])
  return jax.eval_shape(lambda: train.create_train_state(
      jax.random.key(0), online_net, momentum_net, tx, (size, size, image_channels)))


def restore_train_state(config, checkpoint_dir, mesh: Mesh, image_channels: int):
  """(TrainState, step): the newest readable checkpoint of a training run.

  `checkpoint_dir` is `<workdir>/checkpoints`.  The template comes from
  train.create_train_state with `config`; before restoring, the stored shapes of
  the newest step are compared with it, so a checkpoint of another architecture
  is an EvaluationError that names the first parameter that differs.
  """
  from resa_jax import train  # pylint: disable=g-import-not-at-top
  checkpoint_dir = pathlib.Path(checkpoint_dir).absolute()
  steps = _checkpoint_steps(checkpoint_dir) if checkpoint_dir.is_dir() else []
  if not steps:
    raise EvaluationError(f'no checkpoint in {checkpoint_dir}')
  try:
    abstract = _abstract_train_state(config, image_channels)
  except Exception as e:  # pylint: disable=broad-except  (e.g. a zero-width layer)
    raise EvaluationError(f'cannot build the model of --config ({_model_summary(config)}): '
                          f'{type(e).__name__}: {_first_line(e)}') from e
  stored = _stored_shapes(checkpoint_dir / str(steps[-1]))
  if stored is not None:
    where = f'the checkpoint in {checkpoint_dir} (step {steps[-1]})'
    roots = ('params', 'batch_stats', 'momentum_params', 'momentum_batch_stats')
    is_model = lambda name: name.split('/', 1)[0] in roots
    expected = train.leaf_shapes(abstract)
    model_part = lambda shapes, want: {k: v for k, v in shapes.items() if is_model(k) == want}
    mismatch = train.first_shape_difference(model_part(stored, True), model_part(expected, True))
    if mismatch:
      raise EvaluationError(
          f'{where} is of another architecture than --config ({_model_summary(config)}): '
          f'{mismatch}' + _trained_config_note(checkpoint_dir.parent, config))
    mismatch = train.first_shape_difference(model_part(stored, False),
                                            model_part(expected, False))
    if mismatch:
      raise EvaluationError(
          f'{where} has an optimizer state that --config (optimizer={config.optimizer}, '
          f'grad_clip={config.get("grad_clip")}) does not make: {mismatch}')
  replicated = NamedSharding(mesh, P())
  template = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), abstract)
  checkpoints = train.Checkpoints(checkpoint_dir, int(config.keep_checkpoints))
  try:
    state, step = checkpoints.restore_latest(template)
  finally:
    checkpoints.close()
  if step is None:
    raise EvaluationError(
        f'no readable checkpoint in {checkpoint_dir} (steps {steps}); does --config '
        'match the training run (optimizer, architecture)?')
  return state, int(step)


def _select_parts(params, batch_stats) -> dict:
  return {'params': {k: params[k] for k in _EVAL_PARTS if k in params},
          'batch_stats': {k: batch_stats[k] for k in _EVAL_PARTS if k in batch_stats}}


def load_model(config, checkpoint, mesh: Mesh, *, encoder: str = 'momentum',
               image_channels: int = 3) -> Model:
  """The encoder (and projector) of a checkpoint, for evaluation.

  Args:
    config: the model fields (arch, width_per_group, stem, mlp_layers, mlp_dim,
      emb_dim, dtype) say what the checkpoint must hold.
    checkpoint: a training workdir (its newest readable TrainState in
      `checkpoints/`), the `checkpoints/` folder itself, or a folder written by
      `python -m resa_jax.convert` (the authors' weights).
    mesh: the variables are replicated over it.
    encoder: 'momentum' (SPEC section 3: features are the momentum encoder's) or
      'online'.  A converted checkpoint without a momentum network falls back to
      its online encoder (said in `source['encoder']`).
    image_channels: input channels of the encoder's first convolution.

  Raises:
    EvaluationError: missing checkpoint, or one of another architecture.
  """
  from resa_jax import convert, models  # pylint: disable=g-import-not-at-top
  if encoder not in ('momentum', 'online'):
    raise EvaluationError(f"--encoder must be 'momentum' or 'online', got {encoder!r}")
  path = pathlib.Path(checkpoint).absolute()
  if not path.exists():
    raise EvaluationError(f'checkpoint {path} does not exist')
  _, net = models.create_networks(config)  # no predictor: encoder + projector
  prefix = 'momentum_' if encoder == 'momentum' else ''
  if (path / convert.METADATA_FILE).is_file():
    try:
      converted, metadata = convert.load_converted(path)
    except Exception as e:  # pylint: disable=broad-except
      raise EvaluationError(f'cannot read the converted checkpoint {path}: '
                            f'{type(e).__name__}: {_first_line(e)}') from e
    differences = [f'{k}={metadata[k]} (--config: {config[k]})' for k in _MODEL_FIELDS
                   if k in metadata and metadata[k] != config[k]]
    if differences:
      raise EvaluationError(f'{path} was converted for another architecture than '
                            f'--config: {", ".join(differences)}')
    used = encoder
    if prefix + 'params' not in converted:
      prefix, used = '', f'online (the checkpoint has no {encoder} network)'
    selected = _select_parts(converted.get(prefix + 'params', {}),
                             converted.get(prefix + 'batch_stats', {}))
    if 'encoder' not in selected['params']:
      raise EvaluationError(f'{path} holds no encoder weights')
    size = int(config.crops_size[0])
    expected = jax.eval_shape(lambda: net.init(
        jax.random.key(0), jnp.zeros((2, size, size, image_channels)), train=False))
    expected = _select_parts(expected['params'], expected['batch_stats'])
    parts = set(selected['params'])
    expected = {c: {k: v for k, v in t.items() if k in parts} for c, t in expected.items()}
    from resa_jax import train  # pylint: disable=g-import-not-at-top
    mismatch = train.first_shape_difference(train.leaf_shapes(selected),
                                            train.leaf_shapes(expected))
    if mismatch:
      raise EvaluationError(f'the checkpoint in {path} is of another architecture than '
                            f'--config ({_model_summary(config)}): {mismatch}')
    variables = jax.tree.map(lambda x: _place(np.asarray(x), mesh, P()), selected)
    source = {'kind': 'converted', 'path': str(path), 'step': None, 'encoder': used,
              'origin': metadata.get('source')}
  else:
    checkpoint_dir = path / 'checkpoints' if (path / 'checkpoints').is_dir() else path
    if not _checkpoint_steps(checkpoint_dir):
      raise EvaluationError(
          f'{path} is neither a training workdir with checkpoints nor a converted '
          f'checkpoint (no checkpoints/ and no {convert.METADATA_FILE})')
    state, step = restore_train_state(config, checkpoint_dir, mesh, image_channels)
    variables = _select_parts(getattr(state, prefix + 'params'),
                              getattr(state, prefix + 'batch_stats'))
    source = {'kind': 'workdir', 'path': str(path), 'step': step, 'encoder': encoder}
  return Model(net=net, variables=variables, source=source)


def _is_projector_batchnorm(module, method_name: str) -> bool:
  path = tuple(getattr(module, 'path', ()))
  return (method_name == '__call__' and len(path) == 2 and path[0] == 'projector'
          and path[1].startswith('bn'))


def make_feature_fn(model: Model, mesh: Mesh, *, layers: bool = False):
  """A function: global image batch (B, H, W, C) -> {name: (B, d) float32}, eval mode.

  Names: 'encoding' (the encoder's pooled output h); with `layers` and a
  projector, also 'projector_hidden{i}' (after BN + ReLU of the i-th
  Linear-BN-ReLU block, i < mlp_layers - 1) and 'embedding' (the projector's
  output z, before normalisation).  Jit-compiled with the variables replicated
  and the batch sharded over the mesh's data axis (so the output is too).
  """
  net = model.net
  with_layers = layers and model.has_projector

  def features(variables, images):
    if not with_layers:
      h = net.apply(variables, images, train=False, method='encode')
      return {'encoding': h.astype(jnp.float32)}
    (h, z), state = net.apply(variables, images, train=False,
                              capture_intermediates=_is_projector_batchnorm,
                              mutable=['intermediates'])
    captured = state['intermediates']['projector']
    out = {'encoding': h}
    for i in range(net.mlp_layers - 1):
      out[f'projector_hidden{i}'] = jax.nn.relu(captured[f'bn{i}']['__call__'][0])
    out['embedding'] = z
    return {k: v.astype(jnp.float32) for k, v in out.items()}

  replicated = NamedSharding(mesh, P())
  batch = NamedSharding(mesh, P(mesh.axis_names[0]))
  jitted = jax.jit(features, in_shardings=(replicated, batch), out_shardings=batch)
  return lambda images: jitted(model.variables, images)


# ---------------------------------------------------------------------------
# Progress lines.
# ---------------------------------------------------------------------------

def _first_line(error) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def _format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f'{hours}h{minutes:02d}m{seconds:02d}s' if hours else f'{minutes}m{seconds:02d}s'


def _say(text: str) -> None:
  """Prints on the first process only (every process runs the same program)."""
  if jax.process_index() == 0:
    print(text, flush=True)


class _Progress:
  """Prints 'label: done/total unit (pct), rate, ETA' about every 10% or `every_s`."""

  def __init__(self, label: str, total: int, unit: str = 'batches', every_s: float = 30.0,
               print_fn: Callable[[str], None] | None = None):
    self.label, self.total, self.unit, self.every_s = label, max(int(total), 1), unit, every_s
    self.print_fn = print_fn or (lambda line: print(line, flush=True))
    self.start = self.last = time.time()
    self.next_fraction = 0.1

  def __call__(self, done: int, *_) -> None:
    now = time.time()
    fraction = done / self.total
    if done < self.total and fraction < self.next_fraction and now - self.last < self.every_s:
      return
    while self.next_fraction <= fraction:
      self.next_fraction += 0.1
    self.last = now
    elapsed = now - self.start
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = ''
    if rate and done < self.total:
      eta = f', ETA {_format_seconds((self.total - done) / rate)}'
    if jax.process_index() == 0:
      self.print_fn(f'{self.label}: {done}/{self.total} {self.unit} ({100 * fraction:.0f}%), '
                    f'{rate:.1f} {self.unit}/s, {_format_seconds(elapsed)}{eta}')


def extract_split(config, mesh: Mesh, feature_fn, split: str, *, batch_size: int,
                  num_examples: int, label_keys: Sequence[str] = ('label',)):
  """`extract_features` over one pass of `split` (the evaluation pipeline), with progress."""
  from resa_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  iterator = input_pipeline.create_eval_iterator(config, mesh, split, batch_size=batch_size)
  processes = jax.process_count()  # every process pads its share to the same batches
  num_batches = -(-(-(-num_examples // processes)) // (batch_size // processes))
  progress = _Progress(f'features of {split!r}', num_batches)
  return extract_features(feature_fn, iterator, label_keys=label_keys, progress=progress)


# ---------------------------------------------------------------------------
# A linear classifier on the encoder: the ImageNet linear probe (frozen) and
# semi-supervised fine-tuning (SPEC section 3; the authors' eval_linear.py).
# ---------------------------------------------------------------------------

def epoch_lr_factor(schedule: str, epoch, epochs: int):
  """The learning-rate multiplier of an epoch (constant within the epoch).

  'step': 0.1 ** (number of milestones <= epoch), milestones at 60% and 80% of
  `epochs` (epochs 60 and 80 of 100, PyTorch's MultiStepLR); 'cosine':
  (1 + cos(pi * epoch / epochs)) / 2 (CosineAnnealingLR stepped per epoch,
  eta_min 0).  Works on Python numbers and jnp arrays.
  """
  if schedule == 'step':
    milestones = (round(0.6 * epochs), round(0.8 * epochs))
    return 0.1 ** sum((epoch >= m) * 1 for m in milestones)
  if schedule == 'cosine':
    return 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / epochs))
  raise ValueError(f"schedule must be 'step' or 'cosine', got {schedule!r}")


def train_classifier(
    model: Model,
    mesh: Mesh,
    train_batches: Iterable[Mapping[str, Any]],
    eval_batches: Iterable[Mapping[str, Any]],
    *,
    num_classes: int,
    steps_per_epoch: int,
    epochs: int,
    head_lr: float,
    encoder_lr: float | None = None,
    schedule: str = 'step',
    seed: int = 0,
    label: str = 'classifier',
) -> dict[str, Any]:
  """Trains a linear classifier on the encoder, then measures it on `eval_batches`.

  Frozen encoder (`encoder_lr` None; the ImageNet linear probe): the encoder runs
  in eval mode (BatchNorm running statistics), without gradient; only the linear
  layer learns.  Fine-tuning (`encoder_lr` set; semi-supervised): the encoder
  runs in train mode (BatchNorm over the global batch, running statistics
  updated) and learns with its own learning rate.  Both: SGD momentum 0.9, no
  weight decay, learning rates per epoch as `epoch_lr_factor(schedule)`,
  classifier initialised N(0, 0.01) with zero bias, cross-entropy; as the
  authors' eval_linear.py.  One jit-compiled step per batch, the batch sharded
  over the mesh, everything else replicated.

  Args:
    train_batches: endless iterator of {'image': (B, H, W, C), 'label': (B,)}.
    eval_batches: one pass of {'image', 'label', 'mask'} (the evaluation pipeline).
    head_lr, encoder_lr: learning rates already scaled by batch / 256.

  Returns:
    {'top1', 'top5' (%), 'train_loss' (mean of the last epoch), 'num_eval',
    'steps', 'epochs'}.
  """
  finetune = encoder_lr is not None
  net = model.net
  encoder_variables = {'params': {'encoder': model.variables['params']['encoder']},
                       'batch_stats': {'encoder': model.variables['batch_stats']['encoder']}}
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(mesh.axis_names[0]))

  train_batches = iter(train_batches)
  first = next(train_batches, None)
  if first is None:
    raise EvaluationError(f'{label}: the training input is empty')
  image_shape = first['image'].shape[1:]
  dim = jax.eval_shape(
      lambda v: net.apply(v, jnp.zeros((1,) + tuple(image_shape), first['image'].dtype),
                          train=False, method='encode'), encoder_variables).shape[-1]
  init_head = lambda key: {
      'kernel': 0.01 * jax.random.normal(key, (dim, num_classes), jnp.float32),
      'bias': jnp.zeros((num_classes,), jnp.float32)}
  params = {'head': jax.jit(init_head, out_shardings=replicated)(jax.random.key(seed))}
  frozen = {}
  if finetune:
    params['encoder'] = encoder_variables['params']['encoder']
  else:
    frozen = encoder_variables['params']['encoder']
  batch_stats = encoder_variables['batch_stats']['encoder']

  def lr(base):
    return lambda count: base * epoch_lr_factor(schedule, count // steps_per_epoch, epochs)

  if finetune:
    tx = optax.multi_transform(
        {'head': optax.sgd(lr(head_lr), momentum=0.9),
         'encoder': optax.sgd(lr(encoder_lr), momentum=0.9)},
        {'head': 'head', 'encoder': 'encoder'})
  else:
    tx = optax.sgd(lr(head_lr), momentum=0.9)
  opt_state = jax.jit(tx.init, out_shardings=replicated)(params)

  def logits_fn(params, batch_stats, frozen, images, train):
    encoder_params = params['encoder'] if finetune else frozen
    variables = {'params': {'encoder': encoder_params}, 'batch_stats': {'encoder': batch_stats}}
    if train and finetune:
      h, updates = net.apply(variables, images, train=True, method='encode',
                             mutable=['batch_stats'])
      batch_stats = updates['batch_stats']['encoder']
    else:
      h = lax.stop_gradient(net.apply(variables, images, train=False, method='encode'))
    logits = h.astype(jnp.float32) @ params['head']['kernel'] + params['head']['bias']
    return logits, batch_stats

  def train_step(params, batch_stats, opt_state, frozen, images, labels):
    def loss_fn(params):
      logits, new_stats = logits_fn(params, batch_stats, frozen, images, train=True)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, new_stats
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  def eval_step(params, batch_stats, frozen, images, labels, mask):
    logits, _ = logits_fn(params, batch_stats, frozen, images, train=False)
    _, ranked = lax.top_k(logits, min(5, num_classes))  # equal logits: lower class first
    is_label = ranked == labels[:, None]
    return (jnp.sum(is_label[:, 0] & mask), jnp.sum(jnp.any(is_label, axis=1) & mask),
            jnp.sum(mask))

  step_fn = jax.jit(train_step, in_shardings=(replicated,) * 4 + (batch_sharding,) * 2,
                    out_shardings=replicated)
  eval_fn = jax.jit(eval_step, in_shardings=(replicated,) * 3 + (batch_sharding,) * 3,
                    out_shardings=replicated)

  total_steps = epochs * steps_per_epoch
  progress = _Progress(f'{label} training', total_steps, 'steps', every_s=60.0)
  batches = itertools.chain([first], train_batches)
  epoch_losses, train_loss = [], math.nan
  start = time.time()
  for step in range(total_steps):
    batch = next(batches, None)
    if batch is None:
      raise EvaluationError(f'{label}: the training input ended after {step} steps')
    params, batch_stats, opt_state, loss = step_fn(params, batch_stats, opt_state, frozen,
                                                   batch['image'], batch['label'])
    epoch_losses.append(loss)
    progress(step + 1)
    if (step + 1) % steps_per_epoch == 0:
      epoch = (step + 1) // steps_per_epoch
      train_loss = float(np.mean([_to_numpy(l) for l in epoch_losses]))
      epoch_losses = []
      factor = float(epoch_lr_factor(schedule, epoch - 1, epochs))
      _say(f'{label}: epoch {epoch}/{epochs} loss {train_loss:.4f} '
           f'lr {head_lr * factor:.4g} (head)'
           + (f' {encoder_lr * factor:.4g} (encoder)' if finetune else '')
           + f', {_format_seconds(time.time() - start)}')
  hits1 = hits5 = count = 0
  for batch in eval_batches:
    h1, h5, n = eval_fn(params, batch_stats, frozen, batch['image'], batch['label'],
                        batch['mask'])
    hits1, hits5, count = (hits1 + int(_to_numpy(h1)), hits5 + int(_to_numpy(h5)),
                           count + int(_to_numpy(n)))
  if count == 0:
    raise ValueError('the evaluation split is empty')
  return {'top1': 100.0 * hits1 / count, 'top5': 100.0 * hits5 / count,
          'train_loss': train_loss, 'num_eval': count, 'steps': total_steps,
          'epochs': epochs}


# ---------------------------------------------------------------------------
# Labelled subsets for semi-supervised fine-tuning.
# ---------------------------------------------------------------------------

def imagenet_subset_file_names(fraction: float) -> list[str]:
  """The file names (e.g. 'n01440764_10026.JPEG') of the 1% or 10% ImageNet subset.

  The lists of SimCLR / SwAV / the ReSA authors, shipped in resa_jax/data.
  """
  import importlib.resources  # pylint: disable=g-import-not-at-top
  if fraction not in _SUBSET_FILES:
    raise EvaluationError(f'the ImageNet subsets are 1% and 10% (--semi_fraction=0.01 '
                          f'or 0.1), not {fraction}')
  text = importlib.resources.files('resa_jax').joinpath(
      'data', _SUBSET_FILES[fraction]).read_text()
  return [line.strip() for line in text.splitlines() if line.strip()]


def file_name_filter(file_names: Sequence[str]):
  """A tf.data predicate: record -> whether record['file_name'] is in `file_names`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(
          tf.constant(list(file_names), tf.string),
          tf.ones([len(file_names)], tf.int32)), default_value=0)
  return lambda record: table.lookup(record['file_name']) > 0


def balanced_subset(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
  """Sorted indices of a class-balanced subset: round(fraction * n_c) (at least 1)
  random examples of each class c, drawn with a seeded generator (deterministic)."""
  if not 0 < fraction <= 1:
    raise EvaluationError(f'--semi_fraction must be in (0, 1], got {fraction}')
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  chosen = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    count = max(1, int(round(fraction * len(members))))
    chosen.append(rng.permutation(members)[:count])
  return np.sort(np.concatenate(chosen))


def _subset_records(config, fraction: float, seed: int):
  """(records, size, source): the labelled subset of config.eval_train_split.

  records: tf.data.Dataset of {'image': encoded, 'label': int32} over the whole
  subset (every process), in file order.  ImageNet (imagenet2012): the shipped
  1% / 10% lists, matched on TFDS's 'file_name' feature.  Other datasets:
  `balanced_subset` of the split's labels.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from resa_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  source = input_pipeline.open_source(config)  # pylint: disable=protected-access
  split = config.eval_train_split
  if config.dataset == 'imagenet2012':
    names = imagenet_subset_file_names(fraction)
    # pylint: disable-next=protected-access
    builder = input_pipeline.prepared_builder('imagenet2012', config)
    records = builder.as_dataset(split=split, shuffle_files=False,
                                 decoders={'image': tfds.decode.SkipDecoding()})
    records = records.filter(file_name_filter(names)).map(
        lambda ex: {'image': ex['image'], 'label': tf.cast(ex['label'], tf.int32)})
    return records, len(names), source
  records = source.read(split, 0, 1, None, True)
  labels = np.concatenate(list(
      records.map(lambda r: r['label']).batch(8192).as_numpy_iterator()))
  keep = balanced_subset(labels, fraction, seed)
  table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(tf.constant(keep, tf.int64),
                                          tf.ones([len(keep)], tf.int32)), default_value=0)
  records = records.enumerate().filter(lambda i, r: table.lookup(i) > 0).map(
      lambda i, r: {'image': r['image'], 'label': r['label']})
  return records, len(keep), source


def create_subset_train_iterator(config, mesh: Mesh, fraction: float, *, batch_size: int,
                                 seed: int = 0, cache_file: str = ''):
  """(endless iterator, subset size): augmented labelled batches of a subset.

  The subset of `_subset_records`; each process takes every process_count-th
  record.  The records are cached (in memory, or in `cache_file`, so ImageNet is
  read once) and reshuffled every pass with a fixed seed; each image gets
  RandomResizedCrop(crops_size[0], scale 0.08-1) + horizontal flip, normalised,
  with a stateless seed of (seed, process, example counter).  Yields
  {'image': (B, S, S, C) config.dtype, 'label': (B,) int32} as global arrays
  sharded over the mesh.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from resa_jax import augment, sharding  # pylint: disable=g-import-not-at-top
  from resa_jax.input_pipeline import check_batch_size  # pylint: disable=g-import-not-at-top
  check_batch_size(batch_size, mesh.size)
  records, size, source = _subset_records(config, fraction, seed)
  process_count, process_index = jax.process_count(), jax.process_index()
  if size < batch_size:
    raise EvaluationError(f'the {fraction:g} subset has {size} examples, fewer than one '
                          f'batch of {batch_size}; lower --semi_batch_size')
  if process_count > 1:
    records = records.shard(process_count, process_index)
  crop = int(config.crops_size[0])
  dtype = tf.dtypes.as_dtype(config.dtype)
  base_seed = tf.constant([seed, 7919 * (process_index + 1)], tf.int64)

  def make_example(counter, record):
    crop_seed, flip_seed = augment.split_seed(
        tf.random.experimental.stateless_fold_in(base_seed, counter), 2)
    view = augment.random_resized_crop(source.decode(record['image']), crop_seed, crop,
                                       (0.08, 1.0), method='bilinear')
    view = augment.random_flip(view, flip_seed, 0.5)
    return {'image': tf.cast(augment.normalize(view, source.mean, source.std), dtype),
            'label': record['label']}

  ds = records.cache(cache_file)
  ds = ds.shuffle(min(int(config.shuffle_buffer), size), seed=seed,
                  reshuffle_each_iteration=True).repeat().enumerate()
  ds = ds.map(make_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size // process_count, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

  def batches():
    for batch in ds.as_numpy_iterator():
      yield sharding.shard_host_batch(mesh, batch)

  return batches(), size


# ---------------------------------------------------------------------------
# The command line: `python -m resa_jax.evaluate`.
# ---------------------------------------------------------------------------

def parse_evaluations(text: str) -> list[str]:
  """'knn,clustering' -> ['knn', 'clustering']; EvaluationError on an unknown name."""
  names = [n.strip() for n in text.split(',') if n.strip()]
  unknown = [n for n in names if n not in EVALUATIONS]
  if unknown or not names:
    raise EvaluationError(f'unknown evaluation {", ".join(unknown) or repr(text)}; '
                          f'expected a comma-separated list of {", ".join(EVALUATIONS)}')
  return list(dict.fromkeys(names))


def default_linear_protocol(config) -> str:
  """'imagenet' for ImageNet-sized data (variable image size), else 'features'."""
  return 'imagenet' if config.dataset in ('imagenet2012', 'imagenet100') else 'features'


@dataclasses.dataclass
class Options:
  """What the command line asks for (flags of the same names)."""
  evaluations: Sequence[str]
  encoder: str = 'momentum'
  batch_size: int = 0  # feature extraction / evaluation; 0: config.batch_size
  knn_ks: Sequence[int] = (5, 10, 15, 20, 25)
  linear_protocol: str = ''  # '': default_linear_protocol(config)
  linear_epochs: int = -1  # -1: 500 (features) / 100 (imagenet)
  linear_batch_size: int = -1  # -1: 1000 (features) / 256 (imagenet)
  # ImageNet protocol, x batch / 256; -1: 40 if pretrained with batch >= 1024, else 10.
  linear_lr: float = -1.0
  semi_fraction: float = 0.01
  semi_epochs: int = 20
  semi_batch_size: int = 256
  semi_encoder_lr: float = 0.0002  # x batch / 256
  semi_head_lr: float = 40.0  # x batch / 256
  clustering_samples: int = 10_000
  clustering_metric: str = 'cosine'
  tsne: bool = False
  save_features: bool = False
  seed: int = 0

  def check(self) -> None:
    """EvaluationError (one line) on a bad combination; cheap, before any work."""
    if self.encoder not in ('momentum', 'online'):
      raise EvaluationError(f"--encoder must be 'momentum' or 'online', got {self.encoder!r}")
    if self.linear_protocol not in ('', 'features', 'imagenet'):
      raise EvaluationError("--linear_protocol must be 'features' or 'imagenet', got "
                            f'{self.linear_protocol!r}')
    if self.clustering_metric not in ('cosine', 'euclidean'):
      raise EvaluationError("--clustering_metric must be 'cosine' or 'euclidean', got "
                            f'{self.clustering_metric!r}')
    if not self.knn_ks or min(self.knn_ks) < 1:
      raise EvaluationError(f'--knn_ks must be positive, got {list(self.knn_ks)}')
    if self.batch_size < 0 or self.semi_batch_size < 1 or self.semi_epochs < 1:
      raise EvaluationError('--batch_size must be >= 0, --semi_batch_size and '
                            '--semi_epochs positive')
    if not 0 < self.semi_fraction <= 1:
      raise EvaluationError(f'--semi_fraction must be in (0, 1], got {self.semi_fraction}')
    if self.clustering_samples < 3:
      raise EvaluationError('--clustering_samples must be at least 3')


class _Evaluation:
  """One checkpoint under evaluation: the model, the data, the features (extracted
  once per split, on first use) and one method per protocol."""

  def __init__(self, config, mesh: Mesh, model: Model, info, options: Options, output):
    self.config, self.mesh, self.model, self.info = config, mesh, model, info
    self.options, self.output = options, pathlib.Path(output)
    self.batch_size = options.batch_size or int(config.batch_size)
    self.label_keys = ('label', 'coarse_label') if info.num_coarse_classes else ('label',)
    # The eval split's features serve kNN, the probe and the clustering analysis: its
    # projector layers are extracted with it when the analysis is asked for.
    self.layers = 'clustering' in options.evaluations
    self._features = {}

  def features(self, which: str):
    """(features {name: (N, d)}, labels {key: (N,)}) of 'train' (eval_train_split)
    or 'test' (eval_split)."""
    if which not in self._features:
      config, info = self.config, self.info
      split, num_examples, layers = {
          'train': (config.eval_train_split, info.num_eval_train_examples, False),
          'test': (config.eval_split, info.num_eval_examples, self.layers)}[which]
      features, labels = extract_split(
          config, self.mesh, make_feature_fn(self.model, self.mesh, layers=layers), split,
          batch_size=self.batch_size, num_examples=num_examples,
          label_keys=self.label_keys)
      if self.options.save_features and jax.process_index() == 0:
        self.output.mkdir(parents=True, exist_ok=True)
        np.savez(self.output / f'features_{split}.npz', **features, **labels)
      self._features[which] = (features, labels)
    return self._features[which]

  def _eval_batches(self):
    from resa_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    return input_pipeline.create_eval_iterator(self.config, self.mesh, self.config.eval_split,
                                               batch_size=self.batch_size)

  def knn(self) -> dict:
    (train, train_labels), (test, test_labels) = self.features('train'), self.features('test')
    train_x, train_y = train['encoding'], train_labels['label']
    test_x, test_y = test['encoding'], test_labels['label']
    ks = sorted({k for k in self.options.knn_ks if k <= len(train_y)})
    temperature = float(self.config.knn_temperature)
    mesh = self.mesh if self.mesh.size > 1 else None
    weighted = knn_weighted(train_x, train_y, test_x, test_y, self.info.num_classes, ks=ks,
                            temperature=temperature, mesh=mesh)
    majority = knn_majority(train_x, train_y, test_x, test_y, self.info.num_classes, k=5,
                            mesh=mesh)
    _say('kNN weighted (DINO, cosine, T=%g): ' % temperature + ', '.join(
        f'k={k} top-1 {weighted[f"top1_k{k}"]:.2f} top-5 {weighted[f"top5_k{k}"]:.2f}'
        for k in ks) + f'; 5-NN majority (Euclidean) top-1 {majority:.2f}')
    return {'weighted': {'metric': 'cosine', 'temperature': temperature, 'ks': ks, **weighted},
            'majority': {'metric': 'euclidean', 'k': 5, 'top1': majority},
            'num_train': len(train_y), 'num_test': len(test_y)}

  def linear(self) -> dict:
    protocol = self.options.linear_protocol or default_linear_protocol(self.config)
    return self._linear_features() if protocol == 'features' else self._linear_imagenet()

  def _linear_features(self) -> dict:
    """SPEC section 3, CIFAR: Adam on fixed features of un-augmented images."""
    options = self.options
    epochs = options.linear_epochs if options.linear_epochs > 0 else 500
    batch_size = options.linear_batch_size if options.linear_batch_size > 0 else 1000
    (train, train_labels), (test, test_labels) = self.features('train'), self.features('test')
    result = linear_probe_features(
        train['encoding'], train_labels['label'], test['encoding'], test_labels['label'],
        self.info.num_classes, epochs=epochs, batch_size=batch_size, seed=options.seed)
    _say(f'linear probe (fixed features, {epochs} epochs): top-1 {result["top1"]:.2f} '
         f'top-5 {result["top5"]:.2f}')
    return {'protocol': 'features', 'optimizer': 'adam', 'lr': 1e-2, 'final_lr': 1e-6,
            'weight_decay': 5e-6, 'epochs': epochs, 'batch_size': batch_size,
            'num_train': len(train_labels['label']), 'num_test': len(test_labels['label']),
            **result}

  def _linear_imagenet(self) -> dict:
    """SPEC section 3, ImageNet: frozen encoder, augmented images, SGD, steps at 60/80."""
    from resa_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    options, config = self.options, self.config
    epochs = options.linear_epochs if options.linear_epochs > 0 else 100
    batch_size = options.linear_batch_size if options.linear_batch_size > 0 else 256
    base_lr = (options.linear_lr if options.linear_lr > 0
               else 40.0 if config.batch_size >= 1024 else 10.0)
    steps_per_epoch = self.info.num_eval_train_examples // batch_size
    if steps_per_epoch < 1:
      raise EvaluationError(f'{config.eval_train_split} has fewer examples than one batch of '
                            f'{batch_size}; lower --linear_batch_size')
    result = train_classifier(
        self.model, self.mesh,
        input_pipeline.create_linear_probe_train_iterator(config, self.mesh,
                                                          batch_size=batch_size),
        self._eval_batches(), num_classes=self.info.num_classes,
        steps_per_epoch=steps_per_epoch, epochs=epochs,
        head_lr=base_lr * batch_size / 256, schedule='step', seed=options.seed,
        label='linear probe')
    _say(f'linear probe (frozen encoder, {epochs} epochs): top-1 {result["top1"]:.2f} '
         f'top-5 {result["top5"]:.2f}')
    return {'protocol': 'imagenet', 'optimizer': 'sgd', 'momentum': 0.9, 'weight_decay': 0.0,
            'base_lr': base_lr, 'batch_size': batch_size,
            'lr_milestones': [round(0.6 * epochs), round(0.8 * epochs)], **result}

  def semi(self) -> dict:
    """SPEC section 3: fine-tune encoder and classifier on a labelled subset."""
    options, config = self.options, self.config
    cache_dir = ''
    if config.dataset == 'imagenet2012':  # read ImageNet once, then the cache
      cache_dir = str(self.output / f'.semi_cache_{jax.process_index()}')
      os.makedirs(cache_dir, exist_ok=True)
    try:
      batches, subset_size = create_subset_train_iterator(
          config, self.mesh, options.semi_fraction, batch_size=options.semi_batch_size,
          seed=options.seed, cache_file=os.path.join(cache_dir, 'records') if cache_dir else '')
      _say(f'semi-supervised: {subset_size} labelled examples '
           f'({100 * options.semi_fraction:g}% of {config.eval_train_split!r})')
      scale = options.semi_batch_size / 256
      result = train_classifier(
          self.model, self.mesh, batches, self._eval_batches(),
          num_classes=self.info.num_classes,
          steps_per_epoch=max(1, subset_size // options.semi_batch_size),
          epochs=options.semi_epochs, head_lr=options.semi_head_lr * scale,
          encoder_lr=options.semi_encoder_lr * scale, schedule='cosine', seed=options.seed,
          label='semi-supervised')
    finally:
      if cache_dir:
        shutil.rmtree(cache_dir, ignore_errors=True)
    _say(f'semi-supervised ({100 * options.semi_fraction:g}% labels, {options.semi_epochs} '
         f'epochs): top-1 {result["top1"]:.2f} top-5 {result["top5"]:.2f}')
    return {'fraction': options.semi_fraction, 'num_labelled': subset_size,
            'optimizer': 'sgd', 'momentum': 0.9, 'weight_decay': 0.0, 'schedule': 'cosine',
            'batch_size': options.semi_batch_size,
            'base_lr_encoder': options.semi_encoder_lr, 'base_lr_head': options.semi_head_lr,
            **result}

  def clustering(self) -> dict:
    """The paper's analysis on a random subset of the eval split, every representation."""
    options = self.options
    features, labels = self.features('test')
    num_rows = len(labels['label'])
    rng = np.random.default_rng(options.seed)
    subset = np.sort(rng.permutation(num_rows)[:min(options.clustering_samples, num_rows)])
    order = (['encoding'] + sorted(k for k in features if k.startswith('projector_'))
             + (['embedding'] if 'embedding' in features else []))
    named = {k: features[k][subset] for k in order}
    if 'coarse_label' in labels:
      granularities = {'fine': labels['label'][subset], 'coarse': labels['coarse_label'][subset]}
    else:
      granularities = {'class': labels['label'][subset]}
    _say(f'clustering analysis of {len(subset)} {self.config.eval_split!r} examples: '
         f'{", ".join(named)} x {", ".join(granularities)}')
    tables = None
    if jax.process_index() == 0:  # local computations: the other processes skip them
      tables = clustering_analysis(named, granularities, self.output,
                                   metric=options.clustering_metric, seed=options.seed,
                                   tsne=options.tsne, print_fn=_say)
    return {'metric': options.clustering_metric, 'seed': options.seed,
            'split': self.config.eval_split, 'num_samples': len(subset),
            'representations': order, 'granularities': list(granularities),
            'results': tables, 'png': 'clustering.png',
            'tsne_png': 'tsne.png' if options.tsne else None}


def run_evaluations(config, checkpoint, output, options: Options, mesh: Mesh | None = None):
  """Loads the checkpoint and runs `options.evaluations` in order; returns the summary.

  Writes <output>/<evaluation>.json after each evaluation (clustering also
  clustering.png and, with `tsne`, tsne.png), and <output>/summary.json with all
  results and what was evaluated.  Raises EvaluationError / ValueError on bad input.
  """
  from resa_jax import input_pipeline, sharding, train  # pylint: disable=g-import-not-at-top
  options.check()
  evaluations = parse_evaluations(','.join(options.evaluations))
  train.validate_config(config)
  mesh = sharding.create_mesh() if mesh is None else mesh
  info = input_pipeline.dataset_info(config)
  if info.num_classes <= 0:
    raise EvaluationError(f'{config.dataset} has no labels to evaluate with')
  if 'semi' in evaluations and config.dataset == 'imagenet2012':
    imagenet_subset_file_names(options.semi_fraction)  # fail now on a fraction without list
  start = time.time()
  model = load_model(config, checkpoint, mesh, encoder=options.encoder,
                     image_channels=int(info.image_shape[-1]) if info.image_shape else 3)
  source = model.source
  _say(f'evaluating the {source["encoder"]} encoder of {source["path"]}'
       + (f' (step {source["step"]})' if source['step'] is not None else ' (converted)')
       + f' on {config.dataset}, {mesh.size} device(s): {", ".join(evaluations)}')
  run = _Evaluation(config, mesh, model, info, options, output)
  summary = {'checkpoint': source, 'dataset': config.dataset,
             'model': {k: config[k] for k in _MODEL_FIELDS}, 'devices': mesh.size,
             'platform': jax.devices()[0].platform, 'results': {}}
  for name in evaluations:
    _say(f'--- {name}')
    section_start = time.time()
    result = getattr(run, name)()
    result['wall_time_sec'] = time.time() - section_start
    summary['results'][name] = result
    summary['wall_time_sec'] = time.time() - start
    if jax.process_index() == 0:
      write_json(run.output / f'{name}.json',
                 {'checkpoint': source, 'dataset': config.dataset, **result})
      write_json(run.output / 'summary.json', summary)
  _say(f'results in {run.output} ({_format_seconds(time.time() - start)})')
  return summary


def _define_flags():
  """The command-line flags (defined only when this module runs as a script)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  defaults = Options(evaluations=())
  config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py); '
                                  'its model fields must match the checkpoint.',
                                  lock_config=True)
  flags.DEFINE_string('checkpoint', None, 'A training workdir (its newest checkpoint), its '
                      'checkpoints/ folder, or a converted checkpoint (python -m '
                      'resa_jax.convert).')
  flags.DEFINE_string('eval', 'knn,linear,clustering',
                      f'Comma-separated evaluations among {", ".join(EVALUATIONS)}.')
  flags.DEFINE_string('output', None, 'Folder for the result files (default: '
                      '<checkpoint>/eval).')
  flags.DEFINE_string('encoder', defaults.encoder, "'momentum' (SPEC) or 'online'.")
  flags.DEFINE_integer('batch_size', defaults.batch_size, 'Global batch of feature '
                       'extraction and evaluation; 0: config.batch_size.')
  flags.DEFINE_list('knn_ks', [str(k) for k in defaults.knn_ks], 'k of the weighted kNN.')
  flags.DEFINE_string('linear_protocol', defaults.linear_protocol,
                      "'features' (CIFAR: Adam on fixed features) or 'imagenet' (frozen "
                      'encoder, augmented images, SGD); default: imagenet for ImageNet '
                      'datasets, features otherwise.')
  flags.DEFINE_integer('linear_epochs', defaults.linear_epochs,
                       '-1: 500 (features) or 100 (imagenet).')
  flags.DEFINE_integer('linear_batch_size', defaults.linear_batch_size,
                       '-1: 1000 (features) or 256 (imagenet).')
  flags.DEFINE_float('linear_lr', defaults.linear_lr, 'ImageNet protocol base lr (x batch '
                     '/ 256); -1: 40 if config.batch_size >= 1024 else 10.')
  flags.DEFINE_float('semi_fraction', defaults.semi_fraction, 'Labelled fraction: 0.01 or '
                     '0.1 for ImageNet (the shipped lists), any in (0, 1] elsewhere '
                     '(class-balanced, seeded).')
  flags.DEFINE_integer('semi_epochs', defaults.semi_epochs, 'Fine-tuning epochs.')
  flags.DEFINE_integer('semi_batch_size', defaults.semi_batch_size, 'Fine-tuning batch.')
  flags.DEFINE_float('semi_encoder_lr', defaults.semi_encoder_lr, 'x batch / 256.')
  flags.DEFINE_float('semi_head_lr', defaults.semi_head_lr, 'x batch / 256.')
  flags.DEFINE_integer('clustering_samples', defaults.clustering_samples,
                       'Random examples of the eval split for the clustering analysis.')
  flags.DEFINE_string('clustering_metric', defaults.clustering_metric,
                      "Silhouette distance: 'cosine' or 'euclidean'.")
  flags.DEFINE_bool('tsne', defaults.tsne, 'Also write tsne.png.')
  flags.DEFINE_bool('save_features', defaults.save_features, 'Also write the extracted '
                    'features and labels of each split to features_<split>.npz.')
  flags.DEFINE_integer('seed', defaults.seed, 'Seed of subsets, initialisations, shuffles.')
  flags.DEFINE_string('coordinator_address', None, 'Multi-host: host:port of process 0.')
  flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
  flags.DEFINE_integer('process_id', None, 'Multi-host: index of this process.')
  return flags.FLAGS


def _fail(message: str, code: int = 2):
  import sys  # pylint: disable=g-import-not-at-top
  print(f'error: {" ".join(str(message).split())}', file=sys.stderr, flush=True)
  sys.exit(code)


def _parse_flags(argv):
  """absl flag parsing with a one-line error (exit 2) instead of usage text."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    _fail(lines[0].rstrip(':') + (f': {lines[-1]}' if len(lines) > 1 else ''))
  except Exception as e:  # pylint: disable=broad-except  (a config file that fails to load)
    _fail(f'cannot load the config: {type(e).__name__}: {_first_line(e)}')
  return rest


def _main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags_ = flags.FLAGS
  if len(argv) > 1:
    _fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if not flags_['verbosity'].present:  # orbax and TF are chatty at INFO
    logging.set_verbosity(logging.WARNING)
  try:
    evaluations = parse_evaluations(flags_.eval)
    if flags_.config is None:
      raise EvaluationError('--config is required, e.g. --config=configs/fashion_mnist.py')
    if not flags_.checkpoint:
      raise EvaluationError('--checkpoint is required (a training workdir or a converted '
                            'checkpoint)')
    if not os.path.exists(flags_.checkpoint):
      raise EvaluationError(f'checkpoint {flags_.checkpoint} does not exist')
    try:
      knn_ks = [int(k) for k in flags_.knn_ks]
    except ValueError as e:
      raise EvaluationError(f'--knn_ks must be integers, got {flags_.knn_ks}') from e
    options = Options(
        evaluations=evaluations, encoder=flags_.encoder, batch_size=flags_.batch_size,
        knn_ks=knn_ks, linear_protocol=flags_.linear_protocol,
        linear_epochs=flags_.linear_epochs, linear_batch_size=flags_.linear_batch_size,
        linear_lr=flags_.linear_lr, semi_fraction=flags_.semi_fraction,
        semi_epochs=flags_.semi_epochs, semi_batch_size=flags_.semi_batch_size,
        semi_encoder_lr=flags_.semi_encoder_lr, semi_head_lr=flags_.semi_head_lr,
        clustering_samples=flags_.clustering_samples,
        clustering_metric=flags_.clustering_metric, tsne=flags_.tsne,
        save_features=flags_.save_features, seed=flags_.seed)
    options.check()
    output = flags_.output or os.path.join(flags_.checkpoint, 'eval')
    from resa_jax import sharding  # pylint: disable=g-import-not-at-top
    sharding.initialize_distributed(flags_.coordinator_address, flags_.num_processes,
                                    flags_.process_id)
    run_evaluations(flags_.config, flags_.checkpoint, output, options)
  except ValueError as e:  # EvaluationError, bad config, missing data, conversion errors
    _fail(_first_line(e))


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(_main, flags_parser=_parse_flags)
