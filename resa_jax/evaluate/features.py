"""Features of a split: the encoder feature function, and running it over an input.

`make_feature_fn(net, mesh)` is the one way the project turns images into features
(training's periodic kNN, every evaluation): the encoding, and on request each
projector hidden layer and the embedding, in eval mode, float32.  `extract_features`
runs such a function over an input pipeline's batches and keeps the rows whose
`mask` is True; `extract_split` does it over one pass of a config's split, with a
progress line.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Mapping, Sequence

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from resa_jax import progress as progress_lib
from resa_jax import sharding


def extract_features(
    feature_fn: Callable[[Any], Any],
    iterator: Iterable[Mapping[str, Any]],
    *,
    label_keys: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
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
    features = jax.tree.map(sharding.to_numpy, feature_fn(batch['image']))
    labels = {k: sharding.to_numpy(batch[k]) for k in keys}
    num_rows = labels[keys[0]].shape[0]
    if 'mask' in batch:
      mask = sharding.to_numpy(batch['mask']).astype(bool)
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
  if not features_list:
    raise ValueError('the iterator yielded no batch')
  logging.info('extract_features: done, %d examples in %d batches, %.1f s',
               num_examples, num_batches, time.time() - start)
  features = jax.tree.map(lambda *parts: np.concatenate(parts), *features_list)
  labels = {k: np.concatenate([l[k] for l in labels_list]) for k in keys}
  return features, (labels['label'] if label_keys is None else labels)


def _is_projector_batchnorm(module, method_name: str) -> bool:
  path = tuple(getattr(module, 'path', ()))
  return (method_name == '__call__' and len(path) == 2 and path[0] == 'projector'
          and path[1].startswith('bn'))


def make_feature_fn(net, mesh: Mesh, *, layers: bool = False):
  """The one encoder feature function: jit (variables, images (B, H, W, C)) ->
  {name: (B, d) float32}, eval mode.

  `net` is an SSLNetwork (encoder + projector) and `variables` its {'params',
  'batch_stats'} (with 'projector' or without).  Names: 'encoding' (the encoder's
  pooled output h); with `layers` and a projector in the variables, also
  'projector_hidden{i}' (after BN + ReLU of the i-th Linear-BN-ReLU block,
  i < mlp_layers - 1) and 'embedding' (the projector's output z, before
  normalisation).  The variables are replicated and the batch sharded over the
  mesh's data axis (so the output is too).
  """

  def features(variables, images):
    if not (layers and 'projector' in variables['params']):  # static: the tree's keys
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

  batch = sharding.batch_sharding(mesh)
  return jax.jit(features, in_shardings=(sharding.replicated_sharding(mesh), batch),
                 out_shardings=batch)


def extract_split(config, mesh: Mesh, feature_fn, split: str, *, batch_size: int,
                  num_examples: int, label_keys: Sequence[str] = ('label',),
                  resize_method: str = 'bicubic', source=None):
  """`extract_features` over one pass of `split` (the evaluation pipeline), with progress.

  ImageNet-sized images are resized with `resize_method` (bicubic, as the authors' kNN).
  `source`: the open `data.Source` (opened again when None).
  """
  from resa_jax import data  # pylint: disable=g-import-not-at-top
  iterator = data.eval_iterator(config, mesh, split, batch_size=batch_size,
                                resize_method=resize_method, source=source)
  num_batches = data.eval_num_batches(num_examples, batch_size, jax.process_count())
  progress = progress_lib.Progress(f'features of {split!r}', num_batches)
  return extract_features(feature_fn, iterator, label_keys=label_keys, progress=progress)
