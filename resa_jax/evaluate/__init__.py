"""Evaluation of learned representations (docs/method.md, 'Evaluation protocols'): a
library and a command line.

    python -m resa_jax.evaluate --checkpoint=WORKDIR --eval=knn,linear,semi,clustering

Which file holds what, from the bottom up (each imports only those above it, and
none imports the trainer):

  common.py           EvaluationError, label checks, the one top-k ranking, defaults
  features.py         `make_feature_fn` (images -> encoding / projector layers /
                      embedding), `extract_features`, `extract_split`
  knn.py              `nearest_neighbours`, `knn_weighted` (DINO), `knn_majority`
                      (5-NN Euclidean): chunked, sharded over the mesh
  linear.py           `linear_probe_features` (CIFAR protocol), `train_classifier`
                      (ImageNet probe on the frozen encoder; fine-tuning)
  kmeans.py           k-means in JAX (greedy k-means++, Lloyd)
  clustering.py       silhouette, ARI, NMI, `clustering_metrics`,
                      `clustering_analysis` and its figures
  model.py            `load_model`: a workdir's or a converted checkpoint's encoder
  checkpoint_config.py  `config_for_checkpoint`: the model the checkpoint records,
                      the data and the rest from --config
  run.py              `Options`, `run_evaluations`: the protocols on one checkpoint
                      (their inputs, the semi-supervised subsets included, come
                      from the front door of resa_jax/data)
  __main__.py         the flags

The first five work on arrays computed once and know nothing of checkpoints or
augmentations: numpy at the boundary, the heavy parts jit-compiled JAX, chunked so
that no N x M matrix has to exist at once.  Every matmul that ranks or measures
distances uses `precision=HIGHEST`, so GPUs and TPUs do not silently use
TF32/bfloat16 passes.  Result files are written atomically (`reporting.write_json`).
"""

from resa_jax.evaluate.clustering import clustering_analysis
from resa_jax.evaluate.clustering import clustering_metrics
from resa_jax.evaluate.clustering import silhouette_samples
from resa_jax.evaluate.common import EvaluationError
from resa_jax.evaluate.features import extract_features
from resa_jax.evaluate.features import make_feature_fn
from resa_jax.evaluate.kmeans import kmeans
from resa_jax.evaluate.knn import knn_majority
from resa_jax.evaluate.knn import knn_weighted
from resa_jax.evaluate.knn import nearest_neighbours
from resa_jax.evaluate.linear import linear_probe_features
from resa_jax.evaluate.linear import train_classifier
from resa_jax.evaluate.model import load_model
from resa_jax.evaluate.model import Model
from resa_jax.evaluate.run import Options
from resa_jax.evaluate.run import run_evaluations

__all__ = ['clustering_analysis', 'clustering_metrics', 'EvaluationError',
           'extract_features', 'kmeans', 'knn_majority', 'knn_weighted', 'linear_probe_features',
           'load_model', 'make_feature_fn', 'Model', 'nearest_neighbours',
           'Options', 'run_evaluations', 'silhouette_samples',
           'train_classifier']
