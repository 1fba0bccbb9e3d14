"""The training loop's kNN evaluator: the weighted kNN (DINO's) of a feature function on
the eval split against a bounded memory bank, and on the CIFAR datasets the authors'
5-NN majority vote.  `train.py` calls it before training (the baselines) and every
`knn_every_epochs`; `resa_jax.evaluate`'s kNN (evaluate/knn.py, run.py) is the full
protocol on a checkpoint.  Evaluation is in float32 whatever the training precision
(`eval_config`), as the authors evaluate without autocast.
"""

from __future__ import annotations

import itertools


def eval_config(config):
  """`config` with dtype float32: the authors evaluate in float32 (no autocast) whatever
  the training precision.  The same object when it already is float32."""
  if config.dtype == 'float32':
    return config
  config = config.copy_and_resolve_references()
  config.dtype = 'float32'
  return config


def knn_accuracies(config, mesh, feature_fn, num_classes: int,
                   source=None) -> dict[str, float]:
  """{'knn_top1': weighted kNN (DINO) top-1 in %, k = config.knn_k, T =
  config.knn_temperature} and, on the CIFAR datasets, {'knn5_euclidean_top1': the
  authors' CIFAR metric, a 5-NN majority vote on Euclidean distances of raw features}.

  The memory bank is config.eval_train_split (its first knn_max_train_examples
  examples when that is > 0), the queries config.eval_split, both without
  augmentation.  `feature_fn` maps a global image batch to (B, D) features.  `source`:
  the open `data.Source` of config.dataset (opened here when None).
  """
  # Imported here: importing this module (train.py does) must not import JAX's data
  # path, so that the workdir's refusals come first.
  from resa_jax import data  # pylint: disable=g-import-not-at-top
  from resa_jax.evaluate import features, knn  # pylint: disable=g-import-not-at-top
  source = source or data.open_source(config)
  bank_batches = data.eval_iterator(config, mesh, config.eval_train_split,
                                    resize_method='bicubic', source=source)
  limit = config.knn_max_train_examples
  if limit > 0:  # stop reading the split once the bank is full
    bank_batches = itertools.islice(bank_batches, -(-limit // config.batch_size))
  bank, bank_labels = features.extract_features(feature_fn, bank_batches)
  if limit > 0:
    bank, bank_labels = bank[:limit], bank_labels[:limit]
  queries, query_labels = features.extract_features(
      feature_fn, data.eval_iterator(config, mesh, config.eval_split, resize_method='bicubic',
                                     source=source))
  result = knn.knn_weighted(bank, bank_labels, queries, query_labels, num_classes,
                            ks=(config.knn_k,), temperature=config.knn_temperature)
  accuracies = {'knn_top1': float(result[f'top1_k{config.knn_k}'])}
  if config.dataset in data.CIFAR_DATASETS:
    accuracies['knn5_euclidean_top1'] = knn.knn_majority(bank, bank_labels, queries,
                                                         query_labels, num_classes, k=5)
  return accuracies
