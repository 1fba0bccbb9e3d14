"""Linear classifiers: the CIFAR probe on fixed features, and a linear head trained on
the encoder (the ImageNet probe with the encoder frozen; fine-tuning for the
semi-supervised protocol, whose subsets are `resa_jax/data/subsets.py`'s).

Linear probe on fixed features (`linear_probe_features`; docs/method.md, 'Evaluation
protocols', CIFAR)
  A linear layer W x + b (no BatchNorm) on the raw features, as in the authors'
  CIFAR code.  Adam with
  PyTorch's `weight_decay` semantics, i.e. an L2 term added to the gradient
  before the moment estimates: `add_decayed_weights` then `scale_by_adam`, on
  weight and bias alike.  Learning rate lr * gamma^epoch with
  gamma = (final_lr / lr)^(1 / epochs), constant within an epoch
  (PyTorch `ExponentialLR` stepped once per epoch).  Each epoch is a fresh
  permutation cut into floor(N / batch_size) full batches (the few rows left over
  sit that epoch out; a new permutation is drawn next epoch).  PyTorch's default
  `nn.Linear` initialisation, U(-1/sqrt(d), 1/sqrt(d)) for weight and bias.  The
  whole run is one jit-compiled `lax.scan` over epochs of `lax.scan`s over batches.

Linear head on the encoder (`train_classifier`; docs/method.md, 'Evaluation
protocols', ImageNet and semi-supervised; the authors' eval_linear.py): see its
docstring.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from typing import Any, Iterable, Mapping

from absl import logging
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import optax

from resa_jax import progress as progress_lib
from resa_jax import reporting
from resa_jax import sharding
from resa_jax.evaluate import common

HIGHEST = lax.Precision.HIGHEST


def _features_optimizer(lr: float, final_lr: float, weight_decay: float, epochs: int,
                        steps_per_epoch: int) -> optax.GradientTransformation:
  """Adam with PyTorch's L2 `weight_decay`, lr x gamma^epoch (ExponentialLR per epoch)."""
  gamma = (final_lr / lr) ** (1.0 / epochs)
  schedule = optax.exponential_decay(init_value=lr, transition_steps=steps_per_epoch,
                                     decay_rate=gamma, staircase=True)
  return optax.chain(
      optax.add_decayed_weights(weight_decay),  # PyTorch Adam's L2 term
      optax.scale_by_adam(),
      optax.scale_by_learning_rate(schedule))


def _torch_linear_init(key, dim: int, num_classes: int) -> dict:
  """nn.Linear's default: weight and bias U(-1/sqrt(dim), 1/sqrt(dim))."""
  kernel_key, bias_key = jax.random.split(key)
  bound = 1.0 / math.sqrt(dim)
  return {'kernel': jax.random.uniform(kernel_key, (dim, num_classes), jnp.float32,
                                       -bound, bound),
          'bias': jax.random.uniform(bias_key, (num_classes,), jnp.float32, -bound, bound)}


def _linear_logits(params, features):
  return jnp.matmul(features, params['kernel'], precision=HIGHEST) + params['bias']


def _train_on_features(params, optimizer, x, y, x_test, y_test, shuffle_key, *, epochs: int,
                       batch_size: int, top: int, progress=None):
  """One jit-compiled lax.scan over epochs of a scan over full batches of a fresh
  permutation, the test set measured after every epoch (the authors validate every
  epoch).  Returns (params, per epoch: mean loss, top-1 hits, top-`top` hits).

  `progress(epochs done)` is called on the host as each epoch ends on the device."""
  num_train = x.shape[0]
  steps_per_epoch = num_train // batch_size

  def loss_fn(params, features, labels):
    return optax.softmax_cross_entropy_with_integer_labels(
        _linear_logits(params, features), labels).mean()

  def step(carry, batch_indices):
    params, opt_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, x[batch_indices], y[batch_indices])
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  def epoch(carry, epoch_index):
    order = jax.random.permutation(jax.random.fold_in(shuffle_key, epoch_index), num_train)
    batches = order[:steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)
    carry, step_losses = lax.scan(step, carry, batches)
    top1, topk = common.top_k_hits(_linear_logits(carry[0], x_test), y_test, top)
    if progress is not None:
      jax.debug.callback(lambda e: progress(int(e) + 1), epoch_index, ordered=True)
    return carry, (step_losses.mean(), jnp.sum(top1), jnp.sum(topk))

  (params, _), per_epoch = lax.scan(epoch, (params, optimizer.init(params)),
                                    jnp.arange(epochs))
  return params, per_epoch


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
) -> dict[str, float]:
  """The CIFAR linear-probe protocol on fixed features (see the module docstring).

  Args:
    train_x: (N, d) features; train_y: (N,) ints in [0, num_classes).
    test_x: (M, d); test_y: (M,).
    num_classes: number of classes.
    epochs, batch_size, lr, final_lr, weight_decay: the protocol (docs/method.md,
      'Evaluation protocols').
      If N < batch_size the batch is the whole train set.
    seed: initialisation and shuffling.

  Returns:
    `best_and_last` of the test accuracies (%) after every epoch: 'top1_last',
    'top5_last', 'top1_best', 'top5_best', 'best_epoch', 'top1_by_epoch' (top-5 is
    top-C if C < 5); 'batch_size', the batch used (min(batch_size, N)).  A progress
    line (examples/s, ETA) about every 10% of the epochs.
  """
  x = np.asarray(train_x, np.float32)
  y = common.check_labels(train_y, num_classes, 'train_y')
  y_test = common.check_labels(test_y, num_classes, 'test_y')
  num_train, dim = x.shape
  batch_size = min(batch_size, num_train)
  optimizer = _features_optimizer(lr, final_lr, weight_decay, epochs, num_train // batch_size)
  init_key, shuffle_key = jax.random.split(jax.random.PRNGKey(seed))
  start = time.time()
  examples_per_epoch = (num_train // batch_size) * batch_size
  progress = progress_lib.Progress('linear probe training', epochs * examples_per_epoch,
                                'examples')
  train = jax.jit(functools.partial(
      _train_on_features, optimizer=optimizer, epochs=epochs, batch_size=batch_size,
      top=min(5, num_classes), progress=lambda epoch: progress(epoch * examples_per_epoch)))
  _, (epoch_losses, top1, topk) = train(
      _torch_linear_init(init_key, dim, num_classes), x=jnp.asarray(x), y=jnp.asarray(y),
      x_test=jnp.asarray(test_x, jnp.float32), y_test=jnp.asarray(y_test),
      shuffle_key=shuffle_key)
  logging.info('linear probe: %d epochs, final train loss %.4f, %.1f s', epochs,
               float(epoch_losses[-1]), time.time() - start)
  return {**best_and_last(100.0 * np.asarray(top1) / len(y_test),
                         100.0 * np.asarray(topk) / len(y_test)), 'batch_size': batch_size}


def best_and_last(top1_by_epoch, top5_by_epoch) -> dict:
  """The result of a probe measured after every epoch, under separate names: the last
  epoch's, and the best epoch's (by top-1; the first of equal ones), as the authors
  report it."""
  top1_by_epoch = [float(v) for v in top1_by_epoch]
  top5_by_epoch = [float(v) for v in top5_by_epoch]
  best = int(np.argmax(top1_by_epoch))
  return {'top1_last': top1_by_epoch[-1], 'top5_last': top5_by_epoch[-1],
          'top1_best': top1_by_epoch[best], 'top5_best': top5_by_epoch[best],
          'best_epoch': best + 1, 'top1_by_epoch': top1_by_epoch}


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


def vit_probe_input(n_last_blocks: int, avgpool_patchtokens: bool):
  """An `SSLNetwork.apply` method: the authors' ViT linear-probe input, eval mode
  (`VisionTransformer.linear_features`: the class tokens of the last `n_last_blocks`
  blocks, with `avgpool_patchtokens` the last block's mean patch token), (B, n' D).
  With the mean token theirs interleaves [cls_0, mean_0, cls_1, ...] (and fails for
  n > 1); ours concatenates: the same features in another fixed order."""
  def method(net, images, train=False):
    del train  # frozen encoder: always eval mode, as their eval_linear.py
    return net.encoder.linear_features(images, n_last_blocks, avgpool_patchtokens)
  return method


def _classifier_functions(net, mesh: Mesh, *, finetune: bool, num_classes: int, tx,
                          encode='encode'):
  """The jitted train and eval steps of a linear head on `net`'s encoder.

  train: (params, batch_stats, opt_state, frozen, images, labels) -> (params,
  batch_stats, opt_state, loss); eval: (params, batch_stats, frozen, images,
  labels, mask) -> (top-1 hits, top-5 hits, count).  `params` holds 'head' (and
  'encoder' when fine-tuning); `frozen` the encoder parameters otherwise.  `encode`:
  the `net.apply` method giving the head's input with the encoder frozen.
  """

  def logits_fn(params, batch_stats, frozen, images, train):
    encoder_params = params['encoder'] if finetune else frozen
    variables = {'params': {'encoder': encoder_params}, 'batch_stats': {'encoder': batch_stats}}
    if train and finetune:
      h, updates = net.apply(variables, images, train=True, method='encode',
                             mutable=['batch_stats'])
      batch_stats = updates['batch_stats']['encoder']
    else:
      h = lax.stop_gradient(net.apply(variables, images, train=False, method=encode))
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
    top1, top5 = common.top_k_hits(logits, labels, min(5, num_classes))
    return jnp.sum(top1 & mask), jnp.sum(top5 & mask), jnp.sum(mask)

  replicated, batch = sharding.replicated_sharding(mesh), sharding.batch_sharding(mesh)
  return (jax.jit(train_step, in_shardings=(replicated,) * 4 + (batch,) * 2,
                  out_shardings=replicated),
          jax.jit(eval_step, in_shardings=(replicated,) * 3 + (batch,) * 3,
                  out_shardings=replicated))


def _classifier_optimizer(*, head_lr, encoder_lr, schedule, steps_per_epoch, epochs):
  """SGD momentum 0.9, no weight decay, lr per epoch as `epoch_lr_factor(schedule)`;
  the encoder gets its own lr when fine-tuned (`encoder_lr` set)."""
  def lr(base):
    return lambda count: base * epoch_lr_factor(schedule, count // steps_per_epoch, epochs)
  if encoder_lr is None:
    return optax.sgd(lr(head_lr), momentum=0.9)
  return optax.multi_transform(
      {'head': optax.sgd(lr(head_lr), momentum=0.9),
       'encoder': optax.sgd(lr(encoder_lr), momentum=0.9)},
      {'head': 'head', 'encoder': 'encoder'})


def _count_hits(eval_fn, params, batch_stats, frozen, eval_batches) -> tuple[int, int, int]:
  """(top-1 hits, top-5 hits, examples) over one pass of `eval_batches`."""
  hits1 = hits5 = count = 0
  for batch in eval_batches:
    h1, h5, n = (int(sharding.to_numpy(v)) for v in eval_fn(
        params, batch_stats, frozen, batch['image'], batch['label'], batch['mask']))
    hits1, hits5, count = hits1 + h1, hits5 + h5, count + n
  if count == 0:
    raise ValueError('the evaluation split is empty')
  return hits1, hits5, count


def _fit(step_fn, carry, frozen, batches, *, steps_per_epoch: int, epochs: int,
         batch_size: int, label: str, lr_note, schedule: str, measure):
  """Runs epochs x steps_per_epoch steps of `step_fn` with a progress line (images/s of
  finished steps, ETA), and after every epoch `measure(params, batch_stats)` -> (top-1 %,
  top-5 %) and a line.

  Returns (mean loss of the last epoch, [top-1 per epoch], [top-5 per epoch]).
  """
  params, batch_stats, opt_state = carry
  total_steps = epochs * steps_per_epoch
  progress = progress_lib.Progress(f'{label} training', total_steps * batch_size, 'images',
                                every_s=60.0)
  epoch_losses, train_loss, top1_by_epoch, top5_by_epoch = [], math.nan, [], []
  start = time.time()
  for step in range(total_steps):
    batch = next(batches, None)
    if batch is None:
      raise common.EvaluationError(f'{label}: the training input ended after {step} steps')
    params, batch_stats, opt_state, loss = step_fn(params, batch_stats, opt_state, frozen,
                                                   batch['image'], batch['label'])
    epoch_losses.append(loss)
    progress((step + 1) * batch_size, ready=loss)
    if (step + 1) % steps_per_epoch == 0:
      epoch = (step + 1) // steps_per_epoch
      train_loss = float(np.mean([sharding.to_numpy(l) for l in epoch_losses]))
      epoch_losses = []
      factor = float(epoch_lr_factor(schedule, epoch - 1, epochs))
      top1, top5 = measure(params, batch_stats)
      top1_by_epoch.append(top1)
      top5_by_epoch.append(top5)
      reporting.say(f'{label}: epoch {epoch}/{epochs} loss {train_loss:.4f} '
                    f'{lr_note(factor)}, top-1 {top1:.2f} top-5 {top5:.2f}, '
                    f'{progress_lib.format_duration(time.time() - start)}')
  return train_loss, top1_by_epoch, top5_by_epoch


def _init_head(key, *, dim: int, num_classes: int) -> dict:
  """The authors' linear head: weight N(0, 0.01^2), bias 0."""
  return {'kernel': 0.01 * jax.random.normal(key, (dim, num_classes), jnp.float32),
          'bias': jnp.zeros((num_classes,), jnp.float32)}


def train_classifier(
    model,
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
    encode='encode',
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
    model: an `evaluate.model.Model` (its `net` and encoder variables are used).
    train_batches: endless iterator of {'image': (B, H, W, C), 'label': (B,)}.
    eval_batches: a function giving one pass of {'image', 'label', 'mask'} (the
      evaluation pipeline); called after every epoch, as the authors validate.
    head_lr, encoder_lr: learning rates already scaled by batch / 256.
    encode: the `net.apply` method giving the head's input with the encoder frozen:
      'encode' (the encoding), or `vit_probe_input(...)` (the authors' ViT probe).

  Returns:
    `best_and_last` of the per-epoch accuracies ('top1_last', 'top5_last',
    'top1_best', 'top5_best', 'best_epoch', 'top1_by_epoch'), 'train_loss' (mean of
    the last epoch), 'num_eval', 'steps', 'epochs'.
  """
  finetune, net = encoder_lr is not None, model.net
  encoder_params = model.variables['params']['encoder']
  batch_stats = model.variables['batch_stats'].get('encoder', {})  # {}: a BN-free ViT
  train_batches = iter(train_batches)
  first = next(train_batches, None)
  if first is None:
    raise common.EvaluationError(f'{label}: the training input is empty')
  dim = jax.eval_shape(lambda v: net.apply(
      v, jnp.zeros((1,) + tuple(first['image'].shape[1:]), first['image'].dtype), train=False,
      method='encode' if finetune else encode), {'params': {'encoder': encoder_params},
                         'batch_stats': {'encoder': batch_stats}}).shape[-1]
  replicated = sharding.replicated_sharding(mesh)
  params = {'head': jax.jit(functools.partial(_init_head, dim=dim, num_classes=num_classes),
                            out_shardings=replicated)(jax.random.key(seed))}
  params, frozen = (({**params, 'encoder': encoder_params}, {}) if finetune
                    else (params, encoder_params))
  tx = _classifier_optimizer(head_lr=head_lr, encoder_lr=encoder_lr, schedule=schedule,
                             steps_per_epoch=steps_per_epoch, epochs=epochs)
  opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
  step_fn, eval_fn = _classifier_functions(net, mesh, finetune=finetune,
                                           num_classes=num_classes, tx=tx, encode=encode)

  counted = []

  def measure(params, batch_stats):
    hits1, hits5, count = _count_hits(eval_fn, params, batch_stats, frozen, eval_batches())
    counted.append(count)
    return 100.0 * hits1 / count, 100.0 * hits5 / count

  train_loss, top1_by_epoch, top5_by_epoch = _fit(
      step_fn, (params, batch_stats, opt_state), frozen, itertools.chain([first], train_batches),
      steps_per_epoch=steps_per_epoch, epochs=epochs, batch_size=first['image'].shape[0],
      label=label,
      lr_note=lambda factor: f'lr {head_lr * factor:.4g} (head)' + (
          f' {encoder_lr * factor:.4g} (encoder)' if finetune else ''),
      schedule=schedule, measure=measure)
  return {**best_and_last(top1_by_epoch, top5_by_epoch), 'train_loss': train_loss,
          'num_eval': counted[-1], 'steps': epochs * steps_per_epoch, 'epochs': epochs}
