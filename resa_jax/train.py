"""TrainState, the pure ReSA train step, and the training loop.

One step (SPEC.md section 1), all inside one jit-compiled function:

1. online forward of every view, each view separately (BatchNorm statistics per
   view, running statistics updated view after view, as PyTorch does);
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
  return tx


# --------------------------------------------------------------- state ----

def create_train_state(rng, online_net, momentum_net, tx, image_shape) -> TrainState:
  """Initialises the online network; the momentum network starts as its copy."""
  x = jnp.zeros((2,) + tuple(image_shape), jnp.float32)
  variables = online_net.init(rng, x, train=False)
  params, batch_stats = variables['params'], variables['batch_stats']
  copy = lambda tree: jax.tree.map(jnp.array, {k: tree[k] for k in ONLINE_EMA_PARTS})
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    momentum_params=copy(params), momentum_batch_stats=copy(batch_stats),
                    opt_state=tx.init(params))


# ------------------------------------------------------------- forward ----

def forward_views(net, params, batch_stats, views, train: bool = True):
  """Runs `net` on each view separately, threading BatchNorm running statistics.

  Returns (encodings [h_k], embeddings [z_k], new batch_stats); h, z not normalised.
  """
  encodings, embeddings = [], []
  for view in views:
    (h, z), updates = net.apply({'params': params, 'batch_stats': batch_stats}, view,
                                train=train, mutable=['batch_stats'])
    batch_stats = updates['batch_stats']
    encodings.append(h)
    embeddings.append(z)
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
  h_online, z_online, batch_stats = forward_views(online_net, params, state.batch_stats, views)
  # The loss side runs in float32 (float64 for a float64 model): at_least_float32.
  weak_encoding = jax.lax.stop_gradient(losses.l2_normalize(losses.at_least_float32(h_online[0])))

  # EMA first (with the pre-step online parameters), then the momentum forward.
  online_part = jax.lax.stop_gradient({k: params[k] for k in ONLINE_EMA_PARTS})
  momentum_params = losses.ema_update(state.momentum_params, online_part, momentum)
  h_momentum, z_momentum, momentum_batch_stats = forward_views(
      momentum_net, momentum_params, state.momentum_batch_stats, views[:2])
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
  a fixed m keeps its own dtype, e.g. float64).
  """
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


def nonfinite_fraction(tree) -> jax.Array:
  """Fraction (float32 scalar) of the floating-point entries of `tree` that are NaN or Inf."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  count = sum((jnp.sum(~jnp.isfinite(x), dtype=jnp.int32) for x in leaves), jnp.int32(0))
  return count.astype(jnp.float32) / max(sum(x.size for x in leaves), 1)


def make_train_step(config, *, online_net, momentum_net, tx, mesh, lr_schedule, total_steps,
                    state_sharding=None, donate: bool = True):
  """jax.jit(train_step) with the views sharded on the batch and the state replicated."""
  replicated = jax.sharding.NamedSharding(mesh, P())
  batch = jax.sharding.NamedSharding(mesh, P(mesh.axis_names[0]))
  step = functools.partial(train_step, online_net=online_net, momentum_net=momentum_net, tx=tx,
                           mesh=mesh, config=config, lr_schedule=lr_schedule,
                           total_steps=total_steps)
  state_sharding = replicated if state_sharding is None else state_sharding
  return jax.jit(step, in_shardings=(state_sharding, batch),
                 out_shardings=(state_sharding, replicated),
                 donate_argnums=(0,) if donate else ())


# ================================================================ the loop ====
# Everything below is host-side orchestration around `train_step`.

import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

from absl import logging  # noqa: E402
import numpy as np  # noqa: E402


class TrainingDivergedError(RuntimeError):
  """The loss, gradient or new state became NaN or Inf; the message names the step."""


def validate_config(config) -> None:
  """Raises ValueError with a one-line cause for a config that cannot train."""
  from resa_jax import models
  if config.arch not in models.ARCHITECTURES:
    raise ValueError(f'unknown architecture {config.arch!r}; expected one of '
                     f'{", ".join(sorted(models.ARCHITECTURES))}')
  if config.stem not in ('imagenet', 'cifar'):
    raise ValueError(f"unknown stem {config.stem!r}; expected 'imagenet' or 'cifar'")
  if config.optimizer not in ('sgd', 'adamw'):
    raise ValueError(f"unknown optimizer {config.optimizer!r}; expected 'sgd' or 'adamw'")
  positive = ('batch_size', 'width_per_group', 'mlp_layers', 'mlp_dim', 'emb_dim', 'base_lr',
              'temperature', 'sinkhorn_epsilon', 'sinkhorn_iters', 'num_epochs',
              'log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints', 'knn_k',
              'knn_temperature')
  for name in positive:
    if not 0 < config[name] < math.inf:  # also rejects NaN
      raise ValueError(f'{name} must be positive and finite, got {config[name]!r}')
  for name in ('weight_decay', 'warmup_epochs', 'final_lr_ratio'):
    if not 0 <= config[name] < math.inf:
      raise ValueError(f'{name} must be >= 0 and finite, got {config[name]!r}')
  if not 0 <= config.ema_momentum <= 1:
    raise ValueError(f'ema_momentum must be in [0, 1], got {config.ema_momentum!r}')
  from resa_jax import input_pipeline  # imports TensorFlow: after the cheap checks
  input_pipeline.validate_config(config)


def _write_json(path: pathlib.Path, obj) -> None:
  from resa_jax import evaluate
  evaluate.write_json(path, obj)


class CheckpointMismatchError(ValueError):
  """A checkpoint whose arrays do not fit the config (another architecture)."""


def leaf_shapes(tree) -> dict[str, tuple]:
  """{'params/encoder/conv1/kernel': shape, ...} of a pytree of arrays or metadata."""
  def name(path):
    return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                    for k in path)
  return {name(path): tuple(getattr(leaf, 'shape', ()))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def first_shape_difference(stored: dict, expected: dict) -> str | None:
  """The first difference between a checkpoint's and a model's {name: shape}, in words.

  Parameters are compared first (they make the clearest message); None if equal.
  """
  for name in sorted(expected, key=lambda n: (not n.startswith('params/'), n)):
    if name not in stored:
      return f'the checkpoint has no {name}'
    if tuple(stored[name]) != tuple(expected[name]):
      return (f'{name} is {tuple(stored[name])} in the checkpoint, '
              f'{tuple(expected[name])} in the model')
  extra = sorted(set(stored) - set(expected))
  return f'the model has no {extra[0]}' if extra else None


class Checkpoints:
  """Orbax CheckpointManager of TrainStates with fallback over unreadable steps."""

  def __init__(self, directory: pathlib.Path, keep: int):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.directory = directory.absolute()
    # item_handlers fixes the single-item layout (<step>/default); left to orbax, it is
    # guessed from the newest step, and an emptied newest step makes all unreadable.
    self.manager = ocp.CheckpointManager(
        self.directory, item_handlers=ocp.StandardCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=True))

  def restore_latest(self, template: TrainState):
    """(state, step) from the newest readable checkpoint, or (template, None) if none.

    An unreadable checkpoint (truncated file, missing directory) is reported with
    a warning and skipped; nothing is deleted here.  Raises ValueError (one line)
    when a checkpoint's shapes do not fit `template` (another architecture or
    optimizer) or when checkpoints exist but none is readable.
    """
    abstract = jax.tree.map(self._ocp.utils.to_shape_dtype_struct, template)
    expected = leaf_shapes(abstract)
    self.manager.reload()  # see steps written by an earlier process
    steps = sorted(self.manager.all_steps(), reverse=True)
    for step in steps:
      try:
        if not (self.directory / str(step) / 'default').is_dir():  # orbax's message misleads
          raise FileNotFoundError(f'{self.directory / str(step) / "default"} is missing')
        stored = leaf_shapes(self.manager.item_metadata(step))
        if not stored:
          raise ValueError('no arrays in its metadata')
        mismatch = first_shape_difference(stored, expected)
        if mismatch:
          raise CheckpointMismatchError(
              f'the checkpoint at step {step} in {self.directory} does not fit the config '
              f'({mismatch}): rerun with the config it was trained with, or use a new workdir')
        state = self.manager.restore(step, args=self._ocp.args.StandardRestore(abstract))
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        for _ in range(10):  # the innermost cause names the file and what is wrong with it
          e = e.__cause__ or e.__context__ or e
        reason = f'{type(e).__name__}: {" ".join(str(e).split())[:300]}'
        logging.warning('checkpoint at step %d is unreadable (%s); trying an older one',
                        step, reason)
        print(f'warning: checkpoint at step {step} is unreadable ({reason}); '
              'falling back to an older one', flush=True)
        continue
      return state, step
    if steps:  # starting afresh here would mix new steps with the unreadable old ones
      raise ValueError(f'no readable checkpoint in {self.directory} (steps '
                       f'{", ".join(map(str, sorted(steps)))}; see the warnings above); '
                       'move it away to start afresh')
    return template, None

  def save(self, step: int, state: TrainState) -> float:
    """Saves (asynchronously after the host copy); returns the blocking seconds."""
    start = time.perf_counter()
    if step in self.manager.all_steps():  # an unreadable leftover we fell back from
      self.manager.wait_until_finished()  # never delete a save still being written
      self.manager.delete(step)
    self.manager.save(step, args=self._ocp.args.StandardSave(state), force=True)
    return time.perf_counter() - start

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def make_encode_fn(net, mesh):
  """jit: (variables, images (B,H,W,C)) -> float32 encodings (B, D), eval mode."""
  replicated = jax.sharding.NamedSharding(mesh, P())
  batch = jax.sharding.NamedSharding(mesh, P(mesh.axis_names[0]))
  return jax.jit(lambda variables, x: net.apply(variables, x, train=False,
                                                method='encode').astype(jnp.float32),
                 in_shardings=(replicated, batch), out_shardings=batch)


def knn_top1(config, mesh, feature_fn, num_classes: int) -> float:
  """Weighted kNN (DINO) top-1 in % with k = config.knn_k, T = config.knn_temperature.

  The memory bank is config.eval_train_split (its first knn_max_train_examples
  examples when that is > 0), the queries config.eval_split, both without
  augmentation.  `feature_fn` maps a global image batch to (B, D) features.
  """
  import itertools
  from resa_jax import evaluate, input_pipeline
  bank_batches = input_pipeline.create_eval_iterator(config, mesh, config.eval_train_split)
  limit = config.knn_max_train_examples
  if limit > 0:  # stop reading the split once the bank is full
    bank_batches = itertools.islice(bank_batches, -(-limit // config.batch_size))
  bank, bank_labels = evaluate.extract_features(feature_fn, bank_batches)
  if limit > 0:
    bank, bank_labels = bank[:limit], bank_labels[:limit]
  queries, query_labels = evaluate.extract_features(
      feature_fn, input_pipeline.create_eval_iterator(config, mesh, config.eval_split))
  result = evaluate.knn_weighted(bank, bank_labels, queries, query_labels, num_classes,
                                 ks=(config.knn_k,), temperature=config.knn_temperature)
  return float(result[f'top1_k{config.knn_k}'])


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


def _plot_history(history: dict, workdir: pathlib.Path) -> None:
  """training_curves.png: loss over steps and kNN top-1 over epochs."""
  # A bare Figure (no pyplot): leaves the user's matplotlib backend alone.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from resa_jax.evaluate import save_figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(10, 3.6))
  axes = fig.subplots(1, 2)
  if history['loss']:
    steps, values = zip(*history['loss'])
    axes[0].plot(steps, values)
  axes[0].set(xlabel='step', ylabel='ReSA loss', title='training loss')
  if history['knn']:
    epochs, accs = zip(*history['knn'])
    axes[1].plot(epochs, accs, 'o-', label='ReSA (momentum encoder)')
  for key, style, label in (('knn_top1_raw_pixels', 'k--', 'raw pixels'),
                            ('knn_top1_random_init', 'r:', 'random init')):
    if history.get(key) is not None:
      axes[1].axhline(history[key], linestyle=style[1:], color=style[0], label=label)
  axes[1].set(xlabel='epoch', ylabel='kNN top-1 (%)', title='weighted kNN')
  axes[1].legend(loc='lower right', fontsize=8)
  fig.tight_layout()
  save_figure(fig, str(workdir / 'training_curves.png'), dpi=100)


def train_and_evaluate(config, workdir) -> dict:
  """Trains ReSA with `config`, checkpointing to and resuming from `workdir`.

  Returns the results dict also written to workdir/results.json.  Raises
  ValueError (bad config, missing data; nothing written) or TrainingDivergedError.
  """
  validate_config(config)  # first: a bad config fails before TensorFlow is imported
  from clu import metric_writers
  from resa_jax import input_pipeline, models, sharding

  if '://' in str(workdir):  # pathlib would quietly make a local folder 'gs:/...'
    raise ValueError(f'workdir {workdir} is a URL; it must be a local or mounted path '
                     '(e.g. a gcsfuse mount of the bucket)')
  workdir = pathlib.Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f'workdir {workdir} exists and is not a directory')
  info = input_pipeline.dataset_info(config)  # DatasetNotFoundError before any write
  if info.num_train_examples < 1:
    raise ValueError(f'{config.dataset} split {config.train_split!r} has no examples')
  mesh = sharding.create_mesh()
  steps_per_epoch = input_pipeline.steps_per_epoch(config)
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else int(math.ceil(config.num_epochs * steps_per_epoch)))
  online_net, momentum_net = models.create_networks(config)
  schedule = learning_rate_schedule(config, steps_per_epoch, total_steps)
  tx = create_optimizer(config, schedule)
  size = int(config.crops_size[0])
  image_shape = (size, size, int(info.image_shape[-1]))
  replicated = jax.sharding.NamedSharding(mesh, P())
  init_fn = jax.jit(lambda rng: create_train_state(rng, online_net, momentum_net, tx, image_shape),
                    out_shardings=replicated)
  initial_state = init_fn(jax.random.key(config.seed))

  is_chief = jax.process_index() == 0
  workdir.mkdir(parents=True, exist_ok=True)
  checkpoints = Checkpoints(workdir / 'checkpoints', config.keep_checkpoints)
  state, restored_step = checkpoints.restore_latest(initial_state)
  start_step = int(restored_step or 0)
  history_path = workdir / 'history.json'
  history = {'loss': [], 'knn': [], 'wall_time': 0.0}
  if start_step and history_path.exists():
    history.update(json.loads(history_path.read_text()))
    history['loss'] = [p for p in history['loss'] if p[0] <= start_step]
    history['knn'] = [p for p in history['knn'] if p[1] is not None and
                      p[0] <= start_step / steps_per_epoch + 1e-9]
  if is_chief:
    (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
  writer = metric_writers.create_default_writer(str(workdir), just_logging=not is_chief)
  print(f'ReSA: {config.arch} on {config.dataset}, global batch {config.batch_size} over '
        f'{mesh.size} device(s) ({jax.devices()[0].platform}), {steps_per_epoch} steps/epoch, '
        f'{total_steps} steps' + (f'; resumed at step {start_step}' if start_step else ''),
        flush=True)

  encode = make_encode_fn(momentum_net, mesh)

  def momentum_encoder_features(s: TrainState):
    variables = {'params': s.momentum_params, 'batch_stats': s.momentum_batch_stats}
    return lambda images: encode(variables, images)
  has_labels = info.num_classes > 0 and config.knn_every_epochs > 0
  if has_labels and history.get('knn_top1_random_init') is None:
    history['knn_top1_raw_pixels'] = knn_top1(
        config, mesh, lambda x: jnp.reshape(x, (x.shape[0], -1)).astype(jnp.float32),
        info.num_classes)
    history['knn_top1_random_init'] = knn_top1(config, mesh,
                                               momentum_encoder_features(initial_state),
                                               info.num_classes)
    print(f'kNN top-1 before training: raw pixels {history["knn_top1_raw_pixels"]:.2f}%, '
          f'random encoder {history["knn_top1_random_init"]:.2f}%', flush=True)
  del initial_state

  step_fn = make_train_step(config, online_net=online_net, momentum_net=momentum_net, tx=tx,
                            mesh=mesh, lr_schedule=schedule, total_steps=total_steps)
  train_iter = input_pipeline.create_train_iterator(config, mesh, start_step=start_step)

  stop_requested = []
  # Multi-host: saving is collective, so all processes must stop at the same step;
  # JAX's preemption service (jax.distributed) catches SIGTERM there and picks it.
  multihost = jax.process_count() > 1
  previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop_requested.append(True)) \
      if is_main_thread() and not multihost else None
  pending = []  # (step, device metrics) not yet checked on the host
  last_loss = math.nan
  run_start, prior_wall_time = time.time(), float(history.get('wall_time', 0.0))
  timed_steps, timed_seconds = 0, 0.0
  interval_start, interval_steps = None, 0
  checkpoint_seconds = []

  def flush_metrics(step):
    """Fetches pending metrics, stops on NaN/Inf, writes the mean, prints progress."""
    nonlocal last_loss, interval_start, interval_steps, timed_steps, timed_seconds
    if not pending:
      return
    fetched = jax.device_get([m for _, m in pending])
    for (s, _), m in zip(pending, fetched):
      if not (np.isfinite(m['loss']) and np.isfinite(m['grad_norm']) and m['state_finite']):
        raise TrainingDivergedError(
            f'training diverged at step {s}: loss {m["loss"]}, gradient norm {m["grad_norm"]} '
            f'({m["nonfinite_fraction"]:.1%} of the gradient entries non-finite), parameters '
            f'{"finite" if m["state_finite"] else "non-finite"} after the step; nothing of '
            f'it was saved, the last good checkpoint is kept in {workdir / "checkpoints"}')
    pending.clear()
    mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    last_loss = mean['loss']
    now = time.time()
    rate = ''
    if interval_start is not None and interval_steps:
      seconds = now - interval_start
      timed_steps += interval_steps
      timed_seconds += seconds
      ips = interval_steps * config.batch_size / seconds
      mean['images_per_sec'] = ips
      eta = (total_steps - step) * seconds / interval_steps
      rate = f' | {ips:.1f} img/s | ETA {_format_duration(eta)}'
    interval_start, interval_steps = now, 0
    writer.write_scalars(step, mean)
    history['loss'].append((step, mean['loss']))
    print(f'step {step}/{total_steps} (epoch {step / steps_per_epoch:.2f}) '
          f'loss {mean["loss"]:.4f} lr {mean["lr"]:.4g} ema {mean["ema_momentum"]:.5f} '
          f'entropy {mean["assignment_entropy"]:.3f}{rate}', flush=True)

  def save(step):
    flush_metrics(step)  # never checkpoint a state we have not checked
    checkpoint_seconds.append(checkpoints.save(step, state))
    writer.write_scalars(step, {'checkpoint_save_sec': checkpoint_seconds[-1]})
    history['wall_time'] = prior_wall_time + time.time() - run_start
    if is_chief:
      _write_json(history_path, history)

  step = start_step
  stop_at = total_steps if config.run_steps <= 0 else min(total_steps, start_step + config.run_steps)
  try:
    while step < stop_at:
      batch = next(train_iter)
      state, metrics = step_fn(state, batch['views'])
      step += 1
      pending.append((step, metrics))
      if step == start_step + 1:  # the first step compiles: time from its end
        flush_metrics(step)
      else:
        interval_steps += 1
      if step % config.log_every_steps == 0 or step == total_steps:
        flush_metrics(step)
      epoch_done = step % steps_per_epoch == 0 or step == total_steps
      epoch = step / steps_per_epoch
      if (has_labels and epoch_done and
          (round(epoch) % config.knn_every_epochs == 0 or step == total_steps)):
        flush_metrics(step)
        accuracy = knn_top1(config, mesh, momentum_encoder_features(state), info.num_classes)
        history['knn'].append((epoch, accuracy))
        writer.write_scalars(step, {'knn_top1': accuracy})
        print(f'epoch {epoch:.2f}: kNN top-1 {accuracy:.2f}% (k={config.knn_k})', flush=True)
        interval_start, interval_steps = time.time(), 0  # do not count eval as training
      if step % config.checkpoint_every_steps == 0 or step == total_steps:
        save(step)
      if stop_requested or (multihost and _reached_preemption_sync_point(step)):
        if checkpoints.manager.latest_step() != step:  # not saved just above
          save(step)
        checkpoints.close()
        print(f'SIGTERM at step {step}: checkpoint saved, exiting', flush=True)
        raise SystemExit(143)
  finally:
    if previous_handler is not None:
      signal.signal(signal.SIGTERM, previous_handler)
    checkpoints.wait()
  if step < total_steps:  # config.run_steps reached: checkpoint and leave
    if checkpoints.manager.latest_step() != step:
      save(step)
    checkpoints.close()
    writer.flush()
    print(f'stopped after {step - start_step} steps (run_steps) at step {step}/{total_steps}; '
          'run the same command again to continue', flush=True)
    return {'step': step, 'finished': False}
  checkpoints.close()
  writer.flush()
  history['wall_time'] = prior_wall_time + time.time() - run_start

  results = {
      'finished': True,
      'step': step,
      'epoch': step / steps_per_epoch,
      'final_loss': last_loss,
      'knn_top1': history['knn'][-1][1] if history['knn'] else None,
      'knn_top1_raw_pixels': history.get('knn_top1_raw_pixels'),
      'knn_top1_random_init': history.get('knn_top1_random_init'),
      'knn_k': config.knn_k,
      'images_per_sec': (timed_steps * config.batch_size / timed_seconds
                         if timed_seconds else None),
      'wall_time_sec': history.get('wall_time', 0.0),
      'checkpoint_save_sec_mean': float(np.mean(checkpoint_seconds)) if checkpoint_seconds else None,
      'devices': mesh.size,
      'platform': jax.devices()[0].platform,
  }
  if is_chief:
    _write_json(history_path, history)
    _write_json(workdir / 'results.json', results)
    _plot_history(history, workdir)
  print('results: ' + json.dumps(results), flush=True)
  return results


def _reached_preemption_sync_point(step: int) -> bool:
  from jax.experimental import multihost_utils
  return multihost_utils.reached_preemption_sync_point(step)


def is_main_thread() -> bool:
  import threading
  return threading.current_thread() is threading.main_thread()
