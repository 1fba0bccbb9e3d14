"""The training loop: resume, train, log, evaluate periodically, checkpoint, report.

`train_and_evaluate(config, workdir)` is everything `python -m resa_jax.main` does.
One batch travels: `data.train_iterator` (an image -> its views as
global arrays, made on the host or the devices) -> `step.make_train_step` (the pure, jit-compiled ReSA step) ->
`MetricsLog` (device metrics fetched every `log_every_steps`, checked for NaN/Inf,
averaged, written through clu and printed as the progress line).  Every
`knn_every_epochs` the momentum encoder is measured by a weighted kNN
(`evaluate.knn`); checkpoints go through `checkpoints.Checkpoints`; at the end
`results.json` (`reporting`) and `training_curves.png` (`plots`).

Exit paths: a NaN/Inf loss or state raises `TrainingDivergedError` before the bad
state is saved; SIGTERM or Ctrl-C (or, multi-host, JAX's preemption sync point) saves
and exits with 143 or 130 (`interrupts`); `config.run_steps` stops early with a
checkpoint.
"""

from __future__ import annotations

import dataclasses
import pathlib
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp

from resa_jax import checkpoints as checkpoints_lib
from resa_jax import interrupts
from resa_jax import plots
from resa_jax import reporting
from resa_jax import sharding
from resa_jax import step as step_lib
from resa_jax import train_metrics
from resa_jax import validation
from resa_jax import workdir as workdir_lib
from resa_jax.evaluate import training_knn


# How the start line names each `data.placement`.
_PLACEMENT_WORDS = {'host': 'on the host', 'held': 'on the devices (split held there)',
                    'streamed': 'on the host (crops) and the devices (colour)'}


TrainingDivergedError = train_metrics.TrainingDivergedError
MetricsLog = train_metrics.MetricsLog


# ---------------------------------------------------------------- setup ----

@dataclasses.dataclass
class _Run:
  """What the loop needs, built once by `_set_up`."""
  config: Any
  workdir: pathlib.Path
  mesh: Any
  source: Any  # data.Source, opened once
  placement: str  # data.placement: where the views are made
  info: Any
  steps_per_epoch: int
  total_steps: int
  online_net: Any
  momentum_net: Any
  schedule: Any
  tx: Any
  initial_state: Any
  checkpoints: checkpoints_lib.Checkpoints
  history: dict
  start_step: int
  state: Any = None
  lock: Any = None

  @property
  def is_chief(self) -> bool:
    return jax.process_index() == 0

  @property
  def history_path(self) -> pathlib.Path:
    return self.workdir / 'history.json'

  @property
  def measures_knn(self) -> bool:
    return self.info.num_classes > 0 and self.config.knn_every_epochs > 0


def _set_up(config, workdir: pathlib.Path, take_lock) -> _Run:
  """Opens the data and checks what only it tells (its sizes against the batch and the
  kNN's k, where the views can be made), builds the networks and the optimizer, takes
  the workdir's lock (`take_lock()`, the first write), restores the newest checkpoint."""
  from resa_jax import data, models  # pylint: disable=g-import-not-at-top
  source = data.open_source(config)  # DatasetNotFoundError before any write
  info = data.dataset_info(config, source)
  mesh = sharding.create_mesh()
  # The data's refusals (fewer than one batch, a placement that cannot work, a k over
  # the bank) before the baselines and any write.
  steps_per_epoch = data.steps_per_epoch(config, source)
  placement = data.placement(config, source, mesh)
  bank = info.num_eval_train_examples  # validation.py checked the bounds the config sets
  if info.num_classes > 0 and config.knn_every_epochs > 0 and config.knn_k > bank:
    raise ValueError(f'knn_k ({config.knn_k}) exceeds the kNN memory bank: split '
                     f'{config.eval_train_split!r} of {config.dataset} has {bank} examples'
                     f'{data.used_words(source, config.eval_train_split)}; '
                     'lower --config.knn_k')
  total_steps = workdir_lib.num_total_steps(config, steps_per_epoch)
  online_net, momentum_net = models.create_networks(config)
  schedule = step_lib.learning_rate_schedule(config, steps_per_epoch, total_steps)
  tx = step_lib.create_optimizer(config, schedule)
  size = int(config.crops_size[0])
  image_shape = (size, size, int(info.image_shape[-1]))
  init_fn = jax.jit(lambda rng: step_lib.create_train_state(rng, online_net, momentum_net, tx,
                                                            image_shape),
                    out_shardings=sharding.replicated_sharding(mesh))
  initial_state = init_fn(jax.random.key(config.seed))
  lock = take_lock()  # creates the workdir
  try:
    checkpoints = checkpoints_lib.Checkpoints(workdir / 'checkpoints', config.keep_checkpoints)
    state, restored_step = checkpoints.restore_latest(initial_state)
  except BaseException:
    if lock is not None:
      lock.release()
    raise
  start_step = int(restored_step or 0)
  history = train_metrics.restored_history(workdir / 'history.json', start_step, steps_per_epoch)
  return _Run(config=config, workdir=workdir, mesh=mesh, source=source, placement=placement,
              info=info,
              steps_per_epoch=steps_per_epoch, total_steps=total_steps,
              online_net=online_net, momentum_net=momentum_net, schedule=schedule, tx=tx,
              initial_state=initial_state, checkpoints=checkpoints, history=history,
              start_step=start_step, state=state, lock=lock)


def _momentum_encoder_features(run: _Run):
  """state -> (images -> momentum-encoder features (B, D)), eval mode, float32."""
  from resa_jax import models  # pylint: disable=g-import-not-at-top
  from resa_jax.evaluate import features  # pylint: disable=g-import-not-at-top
  _, float32_net = models.create_networks(training_knn.eval_config(run.config))
  feature_fn = features.make_feature_fn(float32_net, run.mesh)

  def of_state(state):
    variables = {'params': state.momentum_params, 'batch_stats': state.momentum_batch_stats}
    return lambda images: feature_fn(variables, images)['encoding']
  return of_state


# The raw-pixel baseline holds every bank image as a feature vector (S * S * C floats):
# 600 KB per 224 px image (100,000 of them: 60 GB), 48 KB at 64 px.  It runs where that
# is cheap.
RAW_PIXELS_MAX_SIDE = 64


def _measure_baselines(run: _Run, features_of) -> None:
  """kNN of the randomly initialised encoder and, for images of at most
  RAW_PIXELS_MAX_SIDE pixels a side, of raw pixels; once per workdir, on the same
  bounded bank (knn_max_train_examples) as the periodic kNN."""
  config, history = run.config, run.history
  eval_config = training_knn.eval_config(config)
  random = training_knn.knn_accuracies(eval_config, run.mesh, features_of(run.initial_state),
                                       run.info.num_classes, source=run.source)
  side = int(config.crops_size[0])
  raw = None
  if side <= RAW_PIXELS_MAX_SIDE:
    raw = training_knn.knn_accuracies(
        eval_config, run.mesh,
        lambda x: jnp.reshape(x, (x.shape[0], -1)).astype(jnp.float32), run.info.num_classes,
        source=run.source)
  for name in random:
    history[f'{name}_random_init'] = random[name]
    if raw is not None:
      history[f'{name}_raw_pixels'] = raw[name]
  print('kNN top-1 before training: ' + '; '.join(
      f'{name}: ' + (f'raw pixels {raw[name]:.2f}%, ' if raw is not None else '')
      + f'random encoder {random[name]:.2f}%' for name in random)
      + ('' if raw is not None else
         f' (raw pixels skipped: {side} px views, above {RAW_PIXELS_MAX_SIDE} px a side)'),
      flush=True)


# ----------------------------------------------------------------- loop ----

def _periodic_knn(run: _Run, writer, features_of, step: int) -> None:
  """The loop's `_measure_knn`; a stop signal during it ends it (the loop then saves
  `step`, and a run stopped at its last step measures it when resumed)."""
  try:
    with interrupts.not_polling():
      _measure_knn(run, writer, features_of, step)
  except interrupts.Stopped:
    return


def _measure_knn(run: _Run, writer, features_of, step: int) -> None:
  """The kNN of the momentum encoder after `step`, into history and TensorBoard."""
  epoch = step / run.steps_per_epoch
  accuracies = training_knn.knn_accuracies(training_knn.eval_config(run.config), run.mesh,
                                           features_of(run.state), run.info.num_classes,
                                           source=run.source)
  for name, accuracy in accuracies.items():
    run.history.setdefault(train_metrics.KNN_CURVES[name], []).append((epoch, accuracy))
  writer.write_scalars(step, accuracies)
  print(f'epoch {epoch:.2f}: kNN top-1 {accuracies["knn_top1"]:.2f}% (k={run.config.knn_k})'
        + (f', 5-NN Euclidean {accuracies["knn5_euclidean_top1"]:.2f}%'
           if 'knn5_euclidean_top1' in accuracies else ''), flush=True)


def _train(run: _Run, writer, features_of) -> int:
  """Steps from run.start_step until the end, run_steps or a stop signal.

  Returns the last step.  SIGTERM or SIGINT (resa_jax/interrupts.py) saves and raises
  SystemExit(143 or 130).
  """
  from resa_jax import data  # pylint: disable=g-import-not-at-top
  config, history = run.config, run.history
  step_fn = step_lib.make_train_step(config, online_net=run.online_net,
                                     momentum_net=run.momentum_net, tx=run.tx, mesh=run.mesh,
                                     lr_schedule=run.schedule, total_steps=run.total_steps)
  train_iter = data.train_iterator(config, run.mesh, start_step=run.start_step,
                                   source=run.source)
  log = MetricsLog(writer=writer, history=history, batch_size=config.batch_size,
                   total_steps=run.total_steps, steps_per_epoch=run.steps_per_epoch,
                   checkpoint_dir=run.workdir / 'checkpoints')
  # Multi-host: saving is collective, so all processes stop at one step (SIGTERM: JAX's
  multihost = jax.process_count() > 1  # preemption service picks it)
  run_start, prior_wall_time = time.time(), float(history.get('wall_time', 0.0))

  def save(step):
    log.flush(step)  # never checkpoint a state we have not checked
    history['wall_time'] = prior_wall_time + time.time() - run_start
    if run.is_chief:  # first: history.json is never behind the newest checkpoint
      reporting.write_json(run.history_path, history)
    seconds = run.checkpoints.save(step, run.state)
    history.setdefault('checkpoint_save_sec', []).append((step, seconds))
    writer.write_scalars(step, {'checkpoint_save_sec': seconds})

  step = run.start_step
  stop_at = (run.total_steps if config.run_steps <= 0
             else min(run.total_steps, run.start_step + config.run_steps))
  print(f'compiling the train step (step {step + 1} follows)...', flush=True)
  try:
    with interrupts.polling(install_handlers=not multihost):
      while step < stop_at:
        run.state, metrics = step_fn(run.state, next(train_iter)['views'])
        step += 1
        log.add(step, metrics)
        if step == run.start_step + 1 or step % config.log_every_steps == 0 \
            or step == run.total_steps:  # the first step compiles: time from its end
          log.flush(step)
        epoch_done = step % run.steps_per_epoch == 0 or step == run.total_steps
        if (run.measures_knn and epoch_done and (round(step / run.steps_per_epoch)
                                           % config.knn_every_epochs == 0
                                           or step == run.total_steps)):
          log.flush(step)
          _periodic_knn(run, writer, features_of, step)  # a stop signal ends it at once
          log.restart_clock()  # do not count eval as training
        if step % config.checkpoint_every_steps == 0 or step == run.total_steps:
          save(step)
        signum = interrupts.requested() or (
            signal.SIGTERM if multihost and _reached_preemption_sync_point(step) else None)
        if signum is not None:
          interrupts.acknowledge()
          if run.checkpoints.manager.latest_step() != step:  # not saved just above
            save(step)
          run.checkpoints.close()
          print(f'{interrupts.signal_name(signum)} at step {step}: checkpoint saved, '
                'exiting', flush=True)
          raise SystemExit(128 + signum)
  finally:
    run.checkpoints.wait()
  if step < run.total_steps and run.checkpoints.manager.latest_step() != step:
    save(step)  # config.run_steps reached: checkpoint and leave
  history['wall_time'] = prior_wall_time + time.time() - run_start
  return step


def train_and_evaluate(config, workdir) -> dict:
  """Trains ReSA with `config`, checkpointing to and resuming from `workdir`.

  Returns the results dict also written to workdir/results.json.  Raises
  ValueError (bad config, missing data, a workdir this user cannot write, in use by
  another run or trained with another config; nothing written) or
  TrainingDivergedError.  A finished run rerun with its config prints its
  results.json and returns it, changing nothing (a read-only workdir included).
  """
  workdir = workdir_lib.check_workdir(workdir)
  chief = jax.process_index() == 0  # multi-host: only process 0 takes the lock
  if chief:
    workdir_lib.refuse_if_locked(workdir)  # before TensorFlow: a refusal takes no time
  changes = workdir_lib.config_changes(workdir, config)
  done = None if changes else workdir_lib.finished_results(workdir, config)
  if done is None:
    reporting.require_writable(workdir, '--workdir')  # before TensorFlow, too
  validation.validate_config(config)  # a bad config fails before any write
  if done is not None:
    return _nothing_to_do(workdir, done)
  run = _set_up(config, workdir, lambda: workdir_lib.Lock.acquire(workdir) if chief else None)
  try:
    done = workdir_lib.read_results(workdir)
    if done is not None and done['step'] == run.start_step >= run.total_steps:
      return _nothing_to_do(workdir, done)  # e.g. a changed config that adds no step
    return _train_and_report(run, changes)
  finally:
    if run.lock is not None:
      run.lock.release()


def _nothing_to_do(workdir, results: dict) -> dict:
  print(f'{workdir} finished at step {results["step"]}; nothing to do. results: '
        + reporting.json_line(results), flush=True)
  return results


def _train_and_report(run: _Run, changes: dict) -> dict:
  config = run.config
  if run.is_chief:
    workdir_lib.record_config(run.workdir, config, run.start_step, changes)
  writer = train_metrics.metric_writer(run.workdir, run.is_chief)
  print(f'ReSA: {config.arch} on {config.dataset}, global batch {config.batch_size} over '
        f'{run.mesh.size} device(s) ({jax.devices()[0].platform}), views made '
        f'{_PLACEMENT_WORDS[run.placement]}, {run.steps_per_epoch} steps/epoch, '
        f'{run.total_steps} steps'
        + (f'; resumed at step {run.start_step}' if run.start_step else ''), flush=True)
  features_of = _momentum_encoder_features(run)
  if run.measures_knn and run.history.get('knn_top1_random_init') is None:
    _measure_baselines(run, features_of)
  run.initial_state = None
  step = _train(run, writer, features_of)
  run.checkpoints.close()
  if step < run.total_steps:
    writer.flush()
    print(f'stopped after {step - run.start_step} steps (run_steps) at step '
          f'{step}/{run.total_steps}; run the same command again to continue', flush=True)
    return {'step': step, 'finished': False}
  final_knn = train_metrics.at_epoch(run.history['knn'], step / run.steps_per_epoch)
  if run.measures_knn and final_knn is None:
    # Stopped at its last step before its kNN was measured: measure it now (a stop
    # signal during it ends the command without results).
    _measure_knn(run, writer, features_of, step)
  writer.flush()
  return _write_results(run, step)


def _write_results(run: _Run, step: int) -> dict:
  """results.json, history.json and training_curves.png of a finished run."""
  results = train_metrics.results(
      run.history, step=step, steps_per_epoch=run.steps_per_epoch,
      batch_size=run.config.batch_size, knn_k=run.config.knn_k, devices=run.mesh.size,
      platform=jax.devices()[0].platform)
  if run.is_chief:
    reporting.write_json(run.history_path, run.history)
    reporting.write_json(run.workdir / 'results.json', results)
    if not plots.available():
      print('matplotlib is not installed: no training_curves.png', flush=True)
    else:
      plots.plot_training_curves(run.history, run.workdir / 'training_curves.png')
  print('results: ' + reporting.json_line(results), flush=True)
  return results


def _reached_preemption_sync_point(step: int) -> bool:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.reached_preemption_sync_point(step)


