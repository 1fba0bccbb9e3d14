"""What every evaluation shares: its error type, label checks and the one top-k ranking."""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

EVALUATIONS = ('knn', 'linear', 'semi', 'clustering')
# The k of the weighted kNN (DINO reports 20); the CLI's and the library's default.
DEFAULT_KNN_KS = (5, 10, 15, 20, 25)


class EvaluationError(ValueError):
  """Input the evaluation cannot use: a missing checkpoint, one of another
  architecture, a bad flag.  The message is one line."""


def check_labels(labels, num_classes: int, name: str) -> np.ndarray:
  """`labels` as int32, or ValueError if one is outside [0, num_classes)."""
  labels = np.asarray(labels).astype(np.int32)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f'{name} outside [0, {num_classes})')
  return labels


def top_k_hits(scores: jax.Array, labels: jax.Array, top: int) -> tuple[jax.Array, jax.Array]:
  """Whether each row's label is its best class, and among its `top` best.

  scores (Q, C), labels (Q,) -> two bool (Q,).  Classes are ranked by (score
  descending, class index ascending): `lax.top_k` puts the lower index first among
  equal values, so ties never depend on the device or the chunking.
  """
  _, ranked = lax.top_k(scores, top)
  is_label = ranked == labels[:, None]
  return is_label[:, 0], jnp.any(is_label, axis=1)
