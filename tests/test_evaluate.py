"""Tests of resa_jax.evaluate against independent numpy / scikit-learn references."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as sk_metrics
from sklearn.cluster import KMeans
from sklearn.neighbors import KNeighborsClassifier

from resa_jax import evaluate
from resa_jax import reporting
from resa_jax import sharding


def _clustered_data(rng, num_rows, dim, num_classes, spread=1.0, labels=None):
  """Features = class centre + Gaussian noise, so kNN accuracies are far from 0."""
  centres = rng.normal(size=(num_classes, dim))
  if labels is None:
    labels = rng.integers(0, num_classes, size=num_rows)
  features = centres[labels] + spread * rng.normal(size=(num_rows, dim))
  return features.astype(np.float32), labels


def _train_test(rng, num_train, num_test, dim, num_classes, spread):
  """Train and test sets drawn around the same class centres."""
  features, labels = _clustered_data(rng, num_train + num_test, dim, num_classes,
                                     spread)
  return (features[:num_train], labels[:num_train], features[num_train:],
          labels[num_train:])


def _brute_force_weighted_knn(train_x, train_y, test_x, test_y, num_classes, ks, t):
  """DINO rule in float64 numpy, ties by index / class index (stable sorts)."""
  normalize = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  sims = normalize(test_x.astype(np.float64)) @ normalize(train_x.astype(np.float64)).T
  order = np.argsort(-sims, axis=1, kind='stable')
  result = {}
  for k in ks:
    top1 = top5 = 0
    for q in range(len(test_x)):
      votes = np.zeros(num_classes)
      for j in order[q, :k]:
        votes[train_y[j]] += np.exp(sims[q, j] / t)
      ranked = np.argsort(-votes, kind='stable')[:min(5, num_classes)]
      top1 += ranked[0] == test_y[q]
      top5 += test_y[q] in ranked
    result[f'top1_k{k}'] = 100.0 * top1 / len(test_x)
    result[f'top5_k{k}'] = 100.0 * top5 / len(test_x)
  return result


def test_weighted_knn_matches_brute_force():
  rng = np.random.default_rng(0)
  num_classes, ks = 7, (1, 5, 10, 20)
  train_x, train_y, test_x, test_y = _train_test(rng, 403, 157, 16, num_classes, 2.0)
  expected = _brute_force_weighted_knn(train_x, train_y, test_x, test_y, num_classes,
                                       ks, 0.07)
  # Chunk sizes that divide neither 157 test rows nor 403 train rows.
  got = evaluate.knn_weighted(train_x, train_y, test_x, test_y, num_classes, ks=ks,
                              chunk_size=50, train_chunk_size=64)
  assert got.keys() == expected.keys()
  for name in expected:
    assert got[name] == pytest.approx(expected[name], abs=1e-9), name
  # Non-trivial: better than chance, worse than perfect.
  assert 100.0 / num_classes + 20 < got['top1_k20'] < 100.0


def test_nearest_neighbours_order_and_ties():
  rng = np.random.default_rng(1)
  base = rng.normal(size=(30, 8)).astype(np.float32)
  # Rows 30..59 duplicate rows 0..29, and rows 60..89 are rows 0..29 scaled by 4
  # (exactly the same cosine similarities in float, a power-of-2 scale): ties
  # must go to the lower train index.
  train = np.concatenate([base, base, 4.0 * base])
  labels = np.arange(90) % 5
  queries = rng.normal(size=(11, 8)).astype(np.float32)
  scores, indices, neighbour_labels = evaluate.nearest_neighbours(
      train, labels, queries, k=9, metric='cosine', chunk_size=4, train_chunk_size=7)
  sims = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
      base / np.linalg.norm(base, axis=1, keepdims=True)).T
  nearest_base = np.argsort(-sims, axis=1, kind='stable')[:, :3]  # (11, 3)
  expected = np.stack([nearest_base + offset for offset in (0, 30, 60)], axis=2)
  np.testing.assert_array_equal(indices, expected.reshape(11, 9))
  np.testing.assert_array_equal(neighbour_labels, labels[indices])
  np.testing.assert_allclose(scores, np.repeat(
      np.take_along_axis(sims, nearest_base, 1), 3, axis=1), atol=1e-6)


def test_sharded_knn_equals_single_device():
  mesh = sharding.create_mesh()
  assert mesh.devices.size == 8
  rng = np.random.default_rng(2)
  num_classes = 10
  # 1001 train rows: not a multiple of 8, so the last device holds padding.
  train_x, train_y, test_x, test_y = _train_test(rng, 1001, 123, 32, num_classes, 3.0)
  common = dict(chunk_size=40, train_chunk_size=50)
  for metric in ('cosine', 'euclidean'):
    single = evaluate.nearest_neighbours(train_x, train_y, test_x, 20, metric=metric,
                                         **common)
    sharded = evaluate.nearest_neighbours(train_x, train_y, test_x, 20, metric=metric,
                                          mesh=mesh, **common)
    np.testing.assert_array_equal(sharded[1], single[1])
    np.testing.assert_array_equal(sharded[2], single[2])
    np.testing.assert_array_equal(sharded[0], single[0])
    # Neighbours from many devices: not all from the first shard.
    # 150 (padded) rows per device; the real rows lie on devices 0-6.
    assert len(np.unique(single[1] // 150)) == 7
  single = evaluate.knn_weighted(train_x, train_y, test_x, test_y, num_classes,
                                 **common)
  sharded = evaluate.knn_weighted(train_x, train_y, test_x, test_y, num_classes,
                                  mesh=mesh, **common)
  assert sharded == single
  assert evaluate.knn_majority(train_x, train_y, test_x, test_y, num_classes,
                               mesh=mesh, **common) == evaluate.knn_majority(
                                   train_x, train_y, test_x, test_y, num_classes,
                                   **common)


def test_majority_knn_matches_sklearn():
  rng = np.random.default_rng(3)
  num_classes = 6
  train_x, train_y, test_x, test_y = _train_test(rng, 500, 211, 12, num_classes, 2.5)
  classifier = KNeighborsClassifier(n_neighbors=5, algorithm='brute')
  classifier.fit(train_x.astype(np.float64), train_y)
  expected = 100.0 * np.mean(classifier.predict(test_x.astype(np.float64)) == test_y)
  got = evaluate.knn_majority(train_x, train_y, test_x, test_y, num_classes, k=5,
                              chunk_size=64, train_chunk_size=77)
  assert got == pytest.approx(expected, abs=1e-9)
  assert 30 < got < 100


def test_majority_knn_tie_goes_to_smallest_class():
  # Query at 0; neighbours at distances 1, 2, 3, 4 with classes 3, 1, 3, 1: two
  # votes each, class 1 wins although class 3 holds the nearest neighbour.
  train_x = np.array([[1.0], [2.0], [3.0], [4.0], [50.0]], np.float32)
  train_y = np.array([3, 1, 3, 1, 0])
  test_x = np.zeros((1, 1), np.float32)
  assert evaluate.knn_majority(train_x, train_y, test_x, np.array([1]), 4, k=4) == 100.0
  assert evaluate.knn_majority(train_x, train_y, test_x, np.array([3]), 4, k=4) == 0.0
  # k = 3: classes 3, 1, 3, majority 3.
  assert evaluate.knn_majority(train_x, train_y, test_x, np.array([3]), 4, k=3) == 100.0


@pytest.mark.parametrize('metric', ['cosine', 'euclidean'])
def test_silhouette_matches_sklearn(metric):
  rng = np.random.default_rng(4)
  features, labels = _clustered_data(rng, 301, 10, 5, spread=1.5)
  labels = labels * 10 + 3  # arbitrary label values
  labels[17] = 999  # a singleton class: silhouette 0
  expected = sk_metrics.silhouette_samples(features.astype(np.float64), labels,
                                           metric=metric)
  got = evaluate.silhouette_samples(features, labels, metric=metric, chunk_size=64)
  assert got[17] == 0.0
  np.testing.assert_allclose(got, expected, atol=2e-5)
  assert 0.05 < got.mean() < 0.9


def test_kmeans_against_sklearn():
  rng = np.random.default_rng(6)
  features, labels = _clustered_data(rng, 600, 8, 6, spread=0.3)
  _, assignment, inertia = evaluate.kmeans(features, 6, seed=0, chunk_size=128)
  assert sk_metrics.adjusted_rand_score(labels, assignment) == 1.0
  reference = KMeans(6, n_init=3, random_state=0).fit(features.astype(np.float64))
  assert inertia == pytest.approx(reference.inertia_, rel=1e-4)
  # Unstructured data: a local optimum, but not much worse than sklearn's.
  noise = rng.normal(size=(500, 5)).astype(np.float32)
  _, assignment, inertia = evaluate.kmeans(noise, 10, seed=1, chunk_size=100)
  reference = KMeans(10, n_init=3, random_state=0).fit(noise.astype(np.float64))
  assert inertia < 1.05 * reference.inertia_
  # Inertia agrees with the returned partition.
  centres = np.stack([noise[assignment == c].mean(0) for c in range(10)])
  assert inertia == pytest.approx(
      float(((noise - centres[assignment]) ** 2).sum()), rel=1e-4)


def test_clustering_metrics_separate_structure_from_noise():
  rng = np.random.default_rng(7)
  features, labels = _clustered_data(rng, 400, 16, 5, spread=0.5)
  clustered = evaluate.clustering_metrics(features, labels)
  assert set(clustered) == {'silhouette_mean', 'silhouette_std', 'ari', 'nmi'}
  assert clustered['silhouette_mean'] > 0.5
  assert clustered['ari'] > 0.95 and clustered['nmi'] > 0.95
  noise = evaluate.clustering_metrics(rng.normal(size=(400, 16)), labels)
  assert abs(noise['silhouette_mean']) < 0.05
  assert abs(noise['ari']) < 0.05 and noise['nmi'] < 0.1
  expected = sk_metrics.silhouette_samples(features.astype(np.float64), labels,
                                           metric='cosine')
  assert clustered['silhouette_mean'] == pytest.approx(expected.mean(), abs=1e-5)
  assert clustered['silhouette_std'] == pytest.approx(expected.std(), abs=1e-5)


def test_linear_probe_separable_vs_random_labels():
  rng = np.random.default_rng(8)
  num_classes = 10
  train_x, train_y, test_x, test_y = _train_test(rng, 2000, 500, 32, num_classes, 0.5)
  kwargs = dict(epochs=40, batch_size=256)
  separable = evaluate.linear_probe_features(train_x, train_y, test_x, test_y,
                                             num_classes, **kwargs)
  assert separable['top1_last'] >= 99.0 and separable['top5_last'] == 100.0
  # Measured after every epoch: the best is the maximum, the last the final epoch's.
  by_epoch = separable['top1_by_epoch']
  assert len(by_epoch) == 40 and by_epoch[-1] == separable['top1_last']
  assert separable['top1_best'] == max(by_epoch) >= separable['top1_last']
  assert by_epoch[separable['best_epoch'] - 1] == max(by_epoch)
  assert by_epoch.index(max(by_epoch)) == separable['best_epoch'] - 1  # the first best
  assert by_epoch[0] < by_epoch[-1]  # it learns over the epochs
  random_train_y = rng.integers(0, num_classes, size=len(train_y))
  random_test_y = rng.integers(0, num_classes, size=len(test_y))
  shuffled = evaluate.linear_probe_features(train_x, random_train_y, test_x,
                                            random_test_y, num_classes, **kwargs)
  assert shuffled['top1_last'] < 25.0
  assert shuffled['top5_last'] < 70.0


def test_linear_probe_records_its_batch_and_prints_progress(capsys):
  """A batch above the train set is the train set, and linear.json says so; the one
  compiled run prints progress lines (examples/s, ETA) as its epochs end."""
  rng = np.random.default_rng(3)
  train_x, train_y, test_x, test_y = _train_test(rng, 200, 50, 8, 4, 0.5)
  result = evaluate.linear_probe_features(train_x, train_y, test_x, test_y, 4, epochs=20,
                                          batch_size=1000)
  assert result['batch_size'] == 200
  lines = [l for l in capsys.readouterr().out.splitlines()
           if l.startswith('linear probe training: ')]
  assert lines[-1].startswith('linear probe training: 4000/4000 examples (100%), ')
  assert 2 <= len(lines) <= 11 and 'examples/s' in lines[-1]
  assert all('examples/s' in l and 'ETA' in l for l in lines[:-1])


def test_clustering_analysis_writes_files(tmp_path):
  rng = np.random.default_rng(9)
  fine = rng.integers(0, 6, size=240)
  coarse = fine // 2
  encoding, _ = _clustered_data(rng, 240, 12, 6, spread=0.5, labels=fine)
  embedding = rng.normal(size=(240, 8)).astype(np.float32)
  printed = []
  results = evaluate.clustering_analysis(
      {'encoding': encoding, 'embedding': embedding}, {'fine': fine, 'coarse': coarse},
      tmp_path, tsne=True, tsne_samples=120, print_fn=printed.append)
  saved = json.loads((tmp_path / 'clustering.json').read_text())
  assert saved['results'] == results
  assert set(results) == {'encoding', 'embedding'}
  assert set(results['encoding']) == {'fine', 'coarse'}
  assert results['encoding']['fine']['ari'] > results['embedding']['fine']['ari'] + 0.5
  for name in ('clustering.png', 'tsne.png'):
    assert (tmp_path / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert 'encoding' in printed[0] and 'silhouette_mean' in printed[0]
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      'clustering.json', 'clustering.png', 'tsne.png']


def test_write_json_atomic_and_numpy(tmp_path):
  path = tmp_path / 'sub' / 'result.json'
  reporting.write_json(
      path, {'a': np.float32(1.5), 'b': np.arange(3), 'c': [np.int64(2)]})
  assert json.loads(path.read_text()) == {'a': 1.5, 'b': [0, 1, 2], 'c': [2]}
  with pytest.raises(TypeError):
    reporting.write_json(path, {'bad': object()})
  # The failed write left the old file and no temporary file behind.
  assert json.loads(path.read_text())['a'] == 1.5
  assert [p.name for p in path.parent.iterdir()] == ['result.json']


def test_extract_features_drops_padding():
  rng = np.random.default_rng(10)
  images = rng.normal(size=(10, 4, 4, 3)).astype(np.float32)
  labels = np.arange(10)
  feature_fn = jax.jit(lambda x: jnp.mean(x, axis=(1, 2)))  # (B, 3)

  def batches():
    for start in range(0, 12, 4):  # 3 batches of 4, the last with 2 padding rows
      index = np.arange(start, start + 4)
      mask = index < 10
      index = np.minimum(index, 9)
      yield {'image': images[index], 'label': labels[index], 'mask': mask}

  calls = []
  features, got_labels = evaluate.extract_features(
      feature_fn, batches(), progress=lambda b, n: calls.append((b, n)))
  np.testing.assert_allclose(features, images.mean(axis=(1, 2)), rtol=1e-6)
  np.testing.assert_array_equal(got_labels, labels)
  assert features.dtype == np.float32 and features.shape == (10, 3)
  assert calls == [(1, 4), (2, 8), (3, 10)]


def test_extract_features_dict_outputs_and_extra_labels():
  rng = np.random.default_rng(11)
  images = rng.normal(size=(6, 2, 2, 1)).astype(np.float32)
  fine, coarse = np.arange(6), np.arange(6) // 3
  feature_fn = jax.jit(lambda x: {'flat': x.reshape(x.shape[0], -1),
                                  'sum': jnp.sum(x, axis=(1, 2))})
  batches = []
  for start in (0, 4):  # the second batch ends with 2 padding rows
    index = np.minimum(np.arange(start, start + 4), 5)
    batches.append({'image': images[index], 'label': fine[index],
                    'coarse_label': coarse[index], 'mask': np.arange(start, start + 4) < 6})
  features, labels = evaluate.extract_features(
      feature_fn, batches, label_keys=('label', 'coarse_label'))
  np.testing.assert_array_equal(features['flat'], images.reshape(6, 4))
  np.testing.assert_allclose(features['sum'], images.sum(axis=(1, 2)), rtol=1e-6)
  np.testing.assert_array_equal(labels['label'], fine)
  np.testing.assert_array_equal(labels['coarse_label'], coarse)
  with pytest.raises(ValueError, match='shapes disagree'):
    evaluate.extract_features(lambda x: x[:, 0, 0, :][:2], batches)
