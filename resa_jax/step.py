"""TrainState, learning-rate schedule, optimizer and the pure ReSA train step.

One step (docs/method.md, 'The algorithm'), all inside one jit-compiled function:

1. online forward of every view, each view separately for ResNets (BatchNorm
   statistics per view, running statistics updated view after view, as PyTorch
   does), each run of same-size views as one batch for ViTs (their ForwardWrapper;
   `forward_views`);
2. EMA update of the momentum encoder and projector with the pre-step online
   parameters, then the momentum forward of views 0 and 1;
3. Sinkhorn of the normalised online weak-view encodings against the normalised
   momentum weak-view encodings of the whole global batch;
4. the ReSA cross-entropy of the online embeddings against the momentum ones;
5. the optax update.

Sharding: the views are global arrays sharded along the batch over the mesh's data
axis, the state is replicated and donated.  The networks run under plain jax.jit
on the global batch, so every BatchNorm reduces over the global batch (SyncBN, the
all-reduce is XLA's).  Steps 3-4 run under `jax.shard_map`: each device scores its
own rows against the all-gathered momentum encodings, Sinkhorn's column sums are
psum'd, and the per-device losses are averaged -- the explicit form of the
authors' all_gather + all_reduce.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from resa_jax import losses
from resa_jax import models
from resa_jax import sharding
from resa_jax import sinkhorn as sinkhorn_lib

ONLINE_EMA_PARTS = ('encoder', 'projector')  # the momentum network has no predictor


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; a pytree, replicated over the mesh."""
  step: jax.Array  # int32 scalar
  params: Any  # {'encoder', 'projector'[, 'predictor']}
  batch_stats: Any  # BatchNorm running statistics of the online network
  momentum_params: Any  # {'encoder', 'projector'}
  momentum_batch_stats: Any
  opt_state: Any


# ------------------------------------------------------------ schedules ----

def learning_rate_schedule(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0, then cosine to final_lr_ratio x peak (the authors' recipe).

  peak = base_lr * batch_size / 256.
  """
  peak = config.base_lr * config.batch_size / 256
  warmup = min(int(config.warmup_epochs * steps_per_epoch), total_steps)
  cosine = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1),
                                       alpha=config.final_lr_ratio)
  if warmup == 0:
    return cosine
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), cosine], [warmup])


def create_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """SGD momentum with L2 weight decay on all parameters (torch.optim.SGD), or AdamW."""
  if config.optimizer == 'sgd':
    tx = optax.chain(optax.add_decayed_weights(config.weight_decay),
                     optax.sgd(schedule, momentum=config.sgd_momentum))
  elif config.optimizer == 'adamw':
    tx = optax.adamw(schedule, weight_decay=config.weight_decay)
  else:
    raise ValueError(f"unknown optimizer {config.optimizer!r}; expected 'sgd' or 'adamw'")
  if config.get('grad_clip'):
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip), tx)
  if models.is_vit(config.arch):
    # Their frozen ViT parameters (requires_grad=False) are outside the optimizer: no
    # update, no weight decay, not in the clipped norm.
    tx = optax.multi_transform({'trainable': tx, 'frozen': optax.set_to_zero()},
                               models.parameter_labels)
  return tx


# --------------------------------------------------------------- state ----

def create_train_state(rng, online_net, momentum_net, tx, image_shape) -> TrainState:
  """Initialises the online network; the momentum network starts as its copy."""
  x = jnp.zeros((2,) + tuple(image_shape), jnp.float32)
  variables = online_net.init(rng, x, train=False)
  # A ViT without a conv stem has no BatchNorm, hence no 'batch_stats' collection.
  params, batch_stats = variables['params'], variables.get('batch_stats', {})
  # ViT heads have no BatchNorm: copy the parts a collection has.
  copy = lambda tree: jax.tree.map(jnp.array, {k: tree[k] for k in ONLINE_EMA_PARTS if k in tree})
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    momentum_params=copy(params), momentum_batch_stats=copy(batch_stats),
                    opt_state=tx.init(params))


# ------------------------------------------------------------- forward ----

def _same_size_runs(views) -> list[tuple[int, int]]:
  """[start, end) of each run of consecutive views with one shape (their idx_crops)."""
  runs, start = [], 0
  for k in range(1, len(views) + 1):
    if k == len(views) or views[k].shape != views[start].shape:
      runs.append((start, k))
      start = k
  return runs


def forward_views(net, params, batch_stats, views, train: bool = True, rng=None,
                  together: bool = False):
  """Runs `net` on the views, threading BatchNorm running statistics.

  together=False runs each view on its own: the authors' ResNets, whose BatchNorm
  normalises each view with its own statistics ("do not concate different views if BN
  is in the model").  together=True runs each run of consecutive same-size views as one
  batch, as their ViT ForwardWrapper does (`torch.cat` per crop size): the ViTC stem's
  BatchNorm then normalises over both 224 px views with one running-statistics update,
  and the heads see the run at once.  The run is interleaved row by row
  ((B, ...) x n -> (B n, ...), view k of row j at j n + k), so each device keeps its own
  rows and the order, hence the drop-path draws, is the same on any mesh.

  `rng`: the key of a ViT's drop path (call k, in order, draws with fold_in(rng, k));
  None: none.  Returns (encodings [h_k], embeddings [z_k], new batch_stats), one per
  view; h, z not normalised.
  """
  encodings, embeddings = [], []
  runs = _same_size_runs(views) if together else [(k, k + 1) for k in range(len(views))]
  for call, (start, end) in enumerate(runs):
    n = end - start
    x = views[start] if n == 1 else jnp.stack(views[start:end], axis=1).reshape(
        -1, *views[start].shape[1:])  # (B n, H, W, C)
    rngs = {} if rng is None else {'drop_path': jax.random.fold_in(rng, call)}
    (h, z), updates = net.apply({'params': params, 'batch_stats': batch_stats}, x,
                                train=train, mutable=['batch_stats'], rngs=rngs)
    batch_stats = updates.get('batch_stats', {})
    for outputs, y in ((encodings, h), (embeddings, z)):
      y = y.reshape(-1, n, *y.shape[1:])  # (B, n, d)
      outputs.extend(y[:, k] for k in range(n))
  return encodings, embeddings, batch_stats


def _resa_objective(weak_encoding, weak_momentum_encoding, z_online, z_momentum, *,
                    axis_name, epsilon, num_iters, temperature):
  """Per-device part of the loss; inputs are this device's rows of the global batch.

  weak_encoding, weak_momentum_encoding: (b, d) normalised; z_online (V, b, e);
  z_momentum (2, b, e).  Returns (loss, mean row entropy, assignment (b, B)).
  """
  targets_h = jax.lax.all_gather(weak_momentum_encoding, axis_name, tiled=True)  # (B, d)
  targets_z = jax.lax.all_gather(z_momentum, axis_name, axis=1, tiled=True)  # (2, B, e)
  scores = weak_encoding @ targets_h.T  # (b, B)
  assignment = sinkhorn_lib.sinkhorn(scores, epsilon, num_iters, axis_name=axis_name)
  loss = losses.resa_loss(z_online, targets_z, assignment, temperature)
  entropy = -jnp.mean(jnp.sum(assignment * jnp.log(jnp.maximum(assignment, 1e-30)), axis=-1))
  return (jax.lax.pmean(loss, axis_name), jax.lax.pmean(entropy, axis_name), assignment)


def resa_loss_and_aux(params, state: TrainState, views, momentum: jax.Array, *, online_net,
                      momentum_net, mesh, config):
  """The ReSA loss of one global batch; aux carries new statistics and metrics."""
  axis = mesh.axis_names[0]
  # Drop path draws from (seed, step): no key in the state, the same on any mesh.
  rng = (jax.random.fold_in(jax.random.key(config.seed), state.step)
         if config.get('drop_path', 0.0) > 0 else None)
  together = models.is_vit(config.arch)  # their ForwardWrapper: ViTs batch same-size views
  h_online, z_online, batch_stats = forward_views(online_net, params, state.batch_stats, views,
                                                  rng=rng, together=together)
  # The loss side runs in float32 (float64 for a float64 model): at_least_float32.
  weak_encoding = jax.lax.stop_gradient(losses.l2_normalize(losses.at_least_float32(h_online[0])))

  # EMA first (with the pre-step online parameters), then the momentum forward.
  online_part = jax.lax.stop_gradient({k: params[k] for k in ONLINE_EMA_PARTS})
  momentum_params = losses.ema_update(state.momentum_params, online_part, momentum)
  h_momentum, z_momentum, momentum_batch_stats = forward_views(
      momentum_net, momentum_params, state.momentum_batch_stats, views[:2], together=together)
  weak_momentum_encoding = losses.l2_normalize(losses.at_least_float32(h_momentum[0]))
  z_online = jnp.stack([losses.l2_normalize(losses.at_least_float32(z)) for z in z_online])
  z_momentum = jnp.stack([losses.l2_normalize(losses.at_least_float32(z)) for z in z_momentum])
  z_momentum, weak_momentum_encoding = jax.lax.stop_gradient((z_momentum, weak_momentum_encoding))

  objective = jax.shard_map(
      functools.partial(_resa_objective, axis_name=axis, epsilon=config.sinkhorn_epsilon,
                        num_iters=config.sinkhorn_iters, temperature=config.temperature),
      mesh=mesh, in_specs=(P(axis), P(axis), P(None, axis), P(None, axis)),
      out_specs=(P(), P(), P(axis)))
  loss, entropy, assignment = objective(weak_encoding, weak_momentum_encoding, z_online,
                                        z_momentum)
  aux = dict(batch_stats=batch_stats, momentum_params=momentum_params,
             momentum_batch_stats=momentum_batch_stats, entropy=entropy, assignment=assignment)
  return loss, aux


def train_step(state: TrainState, views, *, online_net, momentum_net, tx, mesh, config,
               lr_schedule: Callable, total_steps: int, fixed_ema_momentum=None):
  """One ReSA step: (state, views) -> (new state, metrics).  Pure; jit it.

  The EMA momentum m follows the cosine schedule from `config.ema_momentum` to 1 over
  `total_steps`, unless `fixed_ema_momentum` gives one m for every step (as the
  authors' reference run of a few steps does; the schedule is computed in float32,
  a fixed m keeps its own dtype, e.g. float64).  `views`: see `check_views`.
  """
  check_views(views, mesh.size)
  if fixed_ema_momentum is None:
    momentum = losses.ema_momentum_schedule(state.step, total_steps, config.ema_momentum)
  else:
    momentum = jnp.asarray(fixed_ema_momentum)
  grad_fn = jax.value_and_grad(resa_loss_and_aux, has_aux=True)
  (loss, aux), grads = grad_fn(state.params, state, tuple(views), momentum,
                               online_net=online_net, momentum_net=momentum_net, mesh=mesh,
                               config=config)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=aux['batch_stats'],
                            momentum_params=aux['momentum_params'],
                            momentum_batch_stats=aux['momentum_batch_stats'],
                            opt_state=opt_state)
  metrics = dict(loss=loss, lr=lr_schedule(state.step), ema_momentum=momentum,
                 assignment_entropy=aux['entropy'], grad_norm=optax.tree.norm(grads),
                 # Health counters: the loop stops on any non-finite value (before saving).
                 nonfinite_fraction=nonfinite_fraction(grads),
                 state_finite=(nonfinite_fraction(new_state) == 0).astype(jnp.float32))
  return new_state, metrics


def check_views(views, num_devices: int) -> None:
  """ValueError / TypeError (one line) unless `views` are what a step takes: two or more
  floating-point arrays (B, S_k, S_k, C) (weak view first, then the strong ones; what
  `resa_jax.data` makes from `config.crops_*`), one B (`sharding.check_batch_size`) and
  one C.  Shapes only: free under jit, where it runs when the step is traced."""
  shapes = [tuple(jnp.shape(v)) for v in views]
  if (len(shapes) < 2 or any(len(shape) != 4 or shape[1] != shape[2] for shape in shapes)
      or len({(shape[0], shape[3]) for shape in shapes}) != 1 or 0 in shapes[0]):
    raise ValueError('the step takes two or more views (B, S, S, C), a weak one and strong '
                     f'ones, of one batch size B and channel count C; got {shapes}')
  dtypes = sorted({str(jnp.result_type(v)) for v in views})
  if not all(jnp.issubdtype(d, jnp.floating) for d in dtypes):
    raise TypeError(f'the views must be normalised floating-point images, got {dtypes} '
                    '(uint8 images become views through resa_jax.data.device_views)')
  sharding.check_batch_size(shapes[0][0], num_devices)


def nonfinite_fraction(tree) -> jax.Array:
  """Fraction (float32 scalar) of the floating-point entries of `tree` that are NaN or Inf."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  count = sum((jnp.sum(~jnp.isfinite(x), dtype=jnp.int32) for x in leaves), jnp.int32(0))
  return count.astype(jnp.float32) / max(sum(x.size for x in leaves), 1)


def make_train_step(config, *, online_net, momentum_net, tx, mesh, lr_schedule, total_steps):
  """jax.jit(train_step) with the views sharded on the batch, the state replicated and
  donated (the caller must not reuse the state it passes in)."""
  replicated = sharding.replicated_sharding(mesh)
  step = functools.partial(train_step, online_net=online_net, momentum_net=momentum_net, tx=tx,
                           mesh=mesh, config=config, lr_schedule=lr_schedule,
                           total_steps=total_steps)
  return jax.jit(step, in_shardings=(replicated, sharding.batch_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


def abstract_train_state(config, image_channels: int) -> TrainState:
  """ShapeDtypeStructs of the TrainState `config` trains (nothing is computed)."""
  from resa_jax import models  # pylint: disable=g-import-not-at-top
  online_net, momentum_net = models.create_networks(config)
  tx = create_optimizer(config, learning_rate_schedule(config, 1, 1))
  size = int(config.crops_size[0])
  return jax.eval_shape(lambda: create_train_state(
      jax.random.key(0), online_net, momentum_net, tx, (size, size, image_channels)))
