"""The paper's clustering analysis: silhouette (local quality and its stability), and
the agreement of a k-means partition with the labels (ARI, NMI), with its figures.

Clustering analysis (`silhouette_samples`, `kmeans`, `clustering_metrics`,
`clustering_analysis`; the paper's evidence, docs/method.md, 'Evaluation protocols')
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
  the labels by scikit-learn's adjusted Rand index (Hubert & Arabie) and normalised
  mutual information (arithmetic-mean normalisation).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Callable, Mapping

from absl import logging
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from resa_jax import losses
from resa_jax import plots
from resa_jax import reporting
from resa_jax import sharding
from resa_jax.evaluate import kmeans as kmeans_lib

HIGHEST = lax.Precision.HIGHEST


def _encode(labels) -> tuple[np.ndarray, int]:
  """Arbitrary labels -> codes 0..C-1 (N,) and C."""
  classes, codes = np.unique(np.asarray(labels), return_inverse=True)
  return codes.reshape(-1).astype(np.int32), len(classes)


@functools.partial(jax.jit, static_argnames=('metric',))
def _silhouette_chunk(rows, row_indices, row_codes, features, sq_norms, one_hot,
                      counts, *, metric):
  """Silhouette values of a chunk of rows. rows (Q, d), features (N, d)."""
  dots = jnp.matmul(rows, features.T, precision=HIGHEST)  # (Q, N)
  if metric == 'cosine':
    distances = jnp.clip(1.0 - dots, 0.0, 2.0)
  else:
    row_sq = jnp.sum(rows * rows, axis=1, keepdims=True)
    distances = jnp.sqrt(jnp.maximum(row_sq + sq_norms[None, :] - 2.0 * dots, 0.0))
  is_self = row_indices[:, None] == jnp.arange(features.shape[0])[None, :]
  distances = jnp.where(is_self, 0.0, distances)
  sums = jnp.matmul(distances, one_hot, precision=HIGHEST)  # (Q, C)
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
    x = np.asarray(losses.l2_normalize(jnp.asarray(x)))
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
    rows = jnp.asarray(sharding.pad_rows(x[start:stop], chunk_size))
    # Padding rows get index -1 (no self) and code 0; their values are dropped.
    row_indices = jnp.asarray(sharding.pad_rows(np.arange(start, stop, dtype=np.int32),
                                        chunk_size, -1))
    row_codes = jnp.asarray(sharding.pad_rows(codes[start:stop], chunk_size, 0))
    chunk_values = _silhouette_chunk(rows, row_indices, row_codes, features_dev,
                                     sq_norms, one_hot, counts, metric=metric)
    values[start:stop] = np.asarray(chunk_values)[:stop - start]
  return values


def clustering_metrics(
    features: np.ndarray,
    labels: np.ndarray,
    metric: str = 'cosine',
    seed: int = 0,
    *,
    num_inits: int = 3,
) -> dict[str, float]:
  """The paper's clustering measures of `features` (N, d) against `labels` (N,).

  silhouette_mean / silhouette_std: mean and (population) standard deviation of
  the per-sample silhouette against the true labels, distances by `metric`.
  ari / nmi: agreement of the labels with a k-means partition, k = the number of
  distinct labels; k-means runs on L2-normalised
  features for the cosine metric, on raw features for the Euclidean one.
  """
  from sklearn import metrics  # pylint: disable=g-import-not-at-top
  codes, num_classes = _encode(labels)
  silhouettes = silhouette_samples(features, codes, metric=metric)
  x = np.asarray(features, np.float32)
  if metric == 'cosine':
    x = np.asarray(losses.l2_normalize(jnp.asarray(x)))
  _, assignment, _ = kmeans_lib.kmeans(x, num_classes, num_inits=num_inits,
                            seed=seed)
  return {
      'silhouette_mean': float(silhouettes.mean(dtype=np.float64)),
      'silhouette_std': float(silhouettes.std(dtype=np.float64)),
      'ari': float(metrics.adjusted_rand_score(codes, assignment)),
      'nmi': float(metrics.normalized_mutual_info_score(codes, assignment)),
  }

_METRIC_NAMES = ('silhouette_mean', 'silhouette_std', 'ari', 'nmi')


# Each measure's panel: (title, y-axis label).
_PANELS = {
    'silhouette_mean': ('silhouette mean (local quality)', 'mean silhouette vs the labels'),
    'silhouette_std': ('silhouette std (stability; lower: more stable)', 'std of the silhouette'),
    'ari': ('ARI: k-means vs the labels', 'adjusted Rand index'),
    'nmi': ('NMI: k-means vs the labels', 'normalised mutual information'),
}


def _samples(num_samples: int, source: str) -> str:
  return f'{num_samples:,} {source + " " if source else ""}samples'


def _bars_figure(results, *, metric: str, num_samples: int, source: str = ''):
  """clustering.png's Figure: a bar per representation (and label granularity) in one
  panel per measure, each bar labelled with its value."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  representations = list(results)
  granularities = list(next(iter(results.values())))
  figure = Figure(figsize=(4.2 * len(_METRIC_NAMES), 4.4), layout='constrained')
  axes = figure.subplots(1, len(_METRIC_NAMES))
  width = 0.8 / len(granularities)
  positions = np.arange(len(representations))
  for ax, metric_name in zip(axes, _METRIC_NAMES):
    for g, granularity in enumerate(granularities):
      values = [results[r][granularity][metric_name] for r in representations]
      bars = ax.bar(positions + (g - (len(granularities) - 1) / 2) * width, values, width,
                    color=f'C{g}', label=f'{granularity} labels')
      ax.bar_label(bars, fmt='%.3f', fontsize=7, padding=2)
    ax.set_xticks(positions, representations, rotation=20, ha='right')
    ax.set(title=_PANELS[metric_name][0], ylabel=_PANELS[metric_name][1],
           xlabel='representation')
    ax.axhline(0.0, color='black', linewidth=0.6)
    ax.margins(y=0.15)  # room for the value labels
  kmeans_on = 'L2-normalised' if metric == 'cosine' else 'raw'
  figure.suptitle(
      f'Clustering per layer: silhouette mean and std ({metric} distance, against the '
      f'{" and ".join(granularities)} labels); ARI and NMI (k-means on {kmeans_on} '
      f'features, k = number of classes)\n{_samples(num_samples, source)}')
  if len(granularities) > 1:
    figure.legend(handles=axes[0].get_legend_handles_labels()[0], loc='outside lower center',
                  ncols=len(granularities), frameon=False)
  return figure


def _plot_bars(results, path: str, *, metric: str, num_samples: int, source: str = '') -> None:
  plots.save_figure(_bars_figure(results, metric=metric, num_samples=num_samples,
                                     source=source), path)


def _tsne_figure(named_features, labels, *, num_samples: int, metric: str, seed: int,
                 source: str = ''):
  """tsne.png's Figure: a t-SNE map of `num_samples` random rows per representation
  (rows), coloured by each granularity's labels (columns)."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from sklearn.manifold import TSNE  # pylint: disable=g-import-not-at-top
  num_rows = len(next(iter(named_features.values())))
  rng = np.random.default_rng(seed)
  subset = np.sort(rng.permutation(num_rows)[:min(num_samples, num_rows)])
  perplexity = min(30.0, (len(subset) - 1) / 3.0)
  figure = Figure(figsize=(max(4.0 * len(labels), 5.5), 4.0 * len(named_features) + 0.8),
                  layout='constrained')
  axes = figure.subplots(len(named_features), len(labels), squeeze=False)
  for row, (name, features) in enumerate(named_features.items()):
    embedding = TSNE(n_components=2, metric=metric, init='pca', perplexity=perplexity,
                     random_state=seed).fit_transform(
                         np.asarray(features, np.float32)[subset])
    for col, (granularity, granularity_labels) in enumerate(labels.items()):
      ax = axes[row, col]
      codes, _ = _encode(np.asarray(granularity_labels)[subset])
      ax.scatter(embedding[:, 0], embedding[:, 1], c=codes, s=3, cmap='tab20')
      ax.set(title=f'{name}, coloured by {granularity} label', xlabel='t-SNE 1',
             ylabel='t-SNE 2', xticks=[], yticks=[])
  figure.suptitle(f't-SNE of {_samples(len(subset), source)} drawn at random\n'
                  f'({metric} distance, perplexity {perplexity:.3g}); colour = label')
  return figure


def _plot_tsne(named_features, labels, path: str, *, num_samples: int, metric: str,
               seed: int, source: str = '') -> None:
  plots.save_figure(_tsne_figure(named_features, labels, num_samples=num_samples,
                                     metric=metric, seed=seed, source=source), path)


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
    source: str = '',
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
    source: what the samples are, for the figures' titles, e.g. 'cifar10 test'.
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

  num_samples = num_rows.pop()
  reporting.write_json(os.path.join(out_dir, 'clustering.json'), {
      'metric': metric,
      'seed': seed,
      'num_samples': num_samples,
      'results': results,
  })
  if not plots.available():
    print_fn('matplotlib is not installed: no clustering.png or tsne.png')
    return results
  _plot_bars(results, os.path.join(out_dir, 'clustering.png'), metric=metric,
             num_samples=num_samples, source=source)
  if tsne:
    _plot_tsne(named_features, labels, os.path.join(out_dir, 'tsne.png'),
               num_samples=tsne_samples, metric=metric, seed=seed, source=source)
  return results
