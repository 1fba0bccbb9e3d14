"""Time of the jit-compiled ReSA train step of a config, and of its parts.

    python experiments/bench_step.py [--config=configs/fake_data_benchmark.py] \
        [--steps=20] [--warmup=3] [--noparts] [--torch] [--write] \
        [--config.batch_size=128 ...]
    python experiments/bench_step.py --rerender   # RESULTS.md from the stored rows
    python experiments/bench_step.py --config=configs/imagenet_vit_small.py \
        --config.batch_size=256 --noparts   # ViT-S/16: batch 256 on one device, bfloat16

(ViT configs need --noparts: the parts' supervised baseline builds a ResNet.)

The views are random arrays already on the devices (sharded over the batch like
the input pipeline's), so only the step is measured, never the input pipeline.
For the given config it reports:

* compile: tracing + lowering, and XLA compilation (`.lower().compile()`) of the
  step, timed separately from the steps; the jitted function reuses that
  executable;
* step: median and mean of `steps` steps after `warmup` untimed ones, each
  blocked on (`block_until_ready`); images/s = global batch / median step time,
  where an image is one sample of the batch (not batch x views);
* memory: the device's `peak_bytes_in_use` where the backend reports it (GPU,
  TPU), else the process's peak RSS (labelled so, CPU); plus XLA's own plan
  for the step (arguments + outputs + temporaries - aliased);
* recompilations: XLA compilations during the timed steps (a `jax.monitoring`
  listener) and growth of the jitted step's cache; must be 0;
* parts, each jit-compiled on its own with the same shapes and timed the same
  way: online forward + backward of all views, the momentum forward of views 0
  and 1, Sinkhorn on the (B, B) scores, and a supervised step (the same encoder
  + a linear classifier, cross-entropy, SGD, one view) for the ReSA / supervised
  cost ratio;
* with --torch, when the config is a CIFAR-stem ResNet-18: the authors' step
  re-implemented in PyTorch (experiments/torch_reference_step.py), float32 on
  the CPU, same batch, view count and size.

With --write the row is stored in experiments/bench_step_results.json, keyed by
(hardware, config summary) so rows of other machines and configs are kept, and
the "Train step throughput" section of experiments/RESULTS.md is re-rendered
from all stored rows.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import resource
import statistics
import sys
import time
import warnings

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import results_md  # noqa: E402
from resa_jax import models, sharding  # noqa: E402
from resa_jax import step as step_lib  # noqa: E402
from resa_jax.models import layers  # noqa: E402
from resa_jax import sinkhorn as sinkhorn_lib  # noqa: E402

RESULTS_JSON = pathlib.Path(__file__).resolve().parent / 'bench_step_results.json'
SECTION = 'Train step throughput'
PART_LABELS = {
    'online_fwd_bwd': 'online fwd+bwd, all views',
    'momentum_fwd': 'momentum fwd, views 0-1',
    'sinkhorn': 'Sinkhorn (B, B)',
    'supervised_step': 'supervised step, 1 view',
}
_CHANNELS = {'fashion_mnist': 1, 'mnist': 1}  # everything else (fake included) is RGB

_CONFIG = config_flags.DEFINE_config_file(
    'config', str(pathlib.Path(__file__).resolve().parents[1] / 'configs/fake_data_benchmark.py'),
    'Config file (default: configs/fake_data_benchmark.py).', lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps (and timed calls of each part).')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps after compilation.')
_PARTS = flags.DEFINE_bool('parts', True, "Also time the step's parts and a supervised step.")
_TORCH = flags.DEFINE_bool('torch', False, 'Also time the PyTorch reference step (CIFAR-stem '
                           'ResNet-18 configs only).')
_RERENDER = flags.DEFINE_bool('rerender', False, 'Only re-render the RESULTS.md section from '
                              'bench_step_results.json (e.g. one brought back from a GPU run).')
_WRITE = flags.DEFINE_bool('write', False, 'Record the row in bench_step_results.json and '
                           'experiments/RESULTS.md.')


# --------------------------------------------------- compilation counting ----

_BACKEND_COMPILES = []  # one entry (seconds) per XLA compilation in this process


def _on_event_duration(name, duration, **_):
  if name == '/jax/core/compile/backend_compile_duration':
    _BACKEND_COMPILES.append(duration)


jax.monitoring.register_event_duration_secs_listener(_on_event_duration)


# ------------------------------------------------------------- helpers ----

def view_shapes(config):
  """[(H, W, C)] of every view, in the input pipeline's order."""
  channels = _CHANNELS.get(config.dataset, 3)
  sizes = [config.crops_size[0]] + [size for count, size in zip(config.crops_nmb,
                                                                config.crops_size)
                                    for _ in range(count)]  # the weak view, then the strong
  return [(int(size), int(size), channels) for size in sizes]


def config_summary(config, num_devices: int, platform: str) -> str:
  views = f'weak {config.crops_size[0]} + ' + ' + '.join(
      f'{n}x{s}' for n, s in zip(config.crops_nmb, config.crops_size) if n)
  return (f'{config.arch} w{config.width_per_group} {config.stem} stem, '
          f'mlp {config.mlp_dim}/{config.emb_dim}, predictor {"on" if config.predictor else "off"}, '
          f'views {views}, batch {config.batch_size}, {config.dtype}, '
          f'{num_devices} {platform} device{"s" if num_devices > 1 else ""}')


def _cache_size(jitted) -> int:
  """Entries in a jitted function's compilation cache (-1 where jax hides it)."""
  try:
    return int(jitted._cache_size())  # pylint: disable=protected-access
  except AttributeError:
    return -1


def _block(tree):
  return jax.block_until_ready(tree)


def time_calls(fn, args_fn, steps: int, warmup: int):
  """Seconds of `steps` blocked calls fn(*args_fn()) after `warmup` ones."""
  for _ in range(warmup):
    _block(fn(*args_fn()))
  times = []
  for _ in range(steps):
    args = args_fn()
    start = time.perf_counter()
    _block(fn(*args))
    times.append(time.perf_counter() - start)
  return times


def memory_report(compiled=None) -> dict:
  """Peak memory: the device's where reported, else the process's peak RSS."""
  out = {}
  stats = None
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except  (not implemented on some backends)
    pass
  if stats and 'peak_bytes_in_use' in stats:
    out['peak_bytes'] = int(stats['peak_bytes_in_use'])
    out['peak_kind'] = 'device peak_bytes_in_use'
  else:
    # Linux reports ru_maxrss in KiB.
    out['peak_bytes'] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    out['peak_kind'] = 'process peak RSS (host)'
  if compiled is not None:
    try:
      ma = compiled.memory_analysis()
      out['xla_plan_bytes'] = int(ma.argument_size_in_bytes + ma.output_size_in_bytes +
                                  ma.temp_size_in_bytes - ma.alias_size_in_bytes)
      out['xla_temp_bytes'] = int(ma.temp_size_in_bytes)
    except Exception:  # pylint: disable=broad-except
      pass
  return out


class SupervisedNet(nn.Module):
  """The ReSA encoder followed by a linear classifier."""
  encoder: nn.Module
  num_classes: int
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    h = self.encoder(x, train=train)
    return layers.dense(self.num_classes, h.shape[-1], self.dtype, 'classifier')(h)


# --------------------------------------------------------------- parts ----

def make_parts(config, mesh, online_net, momentum_net, state, views):
  """{name: (jitted fn, args_fn)}, each part of the step on the same shapes."""
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(mesh.axis_names[0]))
  parts = {}

  def online_loss(params, batch_stats, views):
    _, embeddings, new_stats = step_lib.forward_views(online_net, params, batch_stats, views)
    # A scalar of every view's embedding, so the backward covers all of them.
    return sum(jnp.mean(jnp.square(z.astype(jnp.float32))) for z in embeddings), new_stats

  online_fwd_bwd = jax.jit(jax.value_and_grad(online_loss, has_aux=True),
                           in_shardings=(replicated, replicated, batch_sharding))
  parts['online_fwd_bwd'] = (
      online_fwd_bwd, lambda: (state.params, state.batch_stats, views))

  def momentum_forward(params, batch_stats, views):
    encodings, embeddings, new_stats = step_lib.forward_views(momentum_net, params, batch_stats,
                                                           views)
    return encodings[0], embeddings, new_stats

  momentum_fwd = jax.jit(momentum_forward, in_shardings=(replicated, replicated, batch_sharding))
  parts['momentum_fwd'] = (
      momentum_fwd, lambda: (state.momentum_params, state.momentum_batch_stats, views[:2]))

  # Sinkhorn as the step runs it: rows sharded over the devices, columns global.
  b = config.batch_size
  rng = np.random.default_rng(0)
  x = rng.normal(size=(b, 64)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  scores = jax.device_put(jnp.asarray(x @ x.T), batch_sharding)  # (B, B)
  axis = mesh.axis_names[0]
  sinkhorn = jax.jit(jax.shard_map(
      functools.partial(sinkhorn_lib.sinkhorn, epsilon=config.sinkhorn_epsilon,
                        num_iters=config.sinkhorn_iters, axis_name=axis),
      mesh=mesh, in_specs=P(axis), out_specs=P(axis)))
  parts['sinkhorn'] = (sinkhorn, lambda: (scores,))

  # Supervised step: same encoder, a linear classifier, cross-entropy, SGD, one view.
  dtype = jnp.dtype(config.dtype)
  encoder = models.create_resnet(config.arch, width_per_group=config.width_per_group,
                                 stem=config.stem, zero_init_residual=config.zero_init_residual,
                                 dtype=dtype)
  num_classes = int(config.get('fake_num_classes', 1000))
  net = SupervisedNet(encoder, num_classes, dtype)
  tx = optax.chain(optax.add_decayed_weights(config.weight_decay),
                   optax.sgd(0.1, momentum=config.sgd_momentum))
  variables = jax.jit(lambda: net.init(jax.random.key(1), jnp.zeros((2,) + views[0].shape[1:],
                                                                    views[0].dtype),
                                       train=False), out_shardings=replicated)()
  sup_state = {'params': variables['params'], 'batch_stats': variables['batch_stats'],
               'opt_state': jax.jit(tx.init, out_shardings=replicated)(variables['params'])}
  labels = jax.device_put(jnp.asarray(rng.integers(0, num_classes, size=(b,)), jnp.int32),
                          batch_sharding)

  def supervised_step(s, image, labels):
    def loss_fn(params):
      logits, updates = net.apply({'params': params, 'batch_stats': s['batch_stats']}, image,
                                  train=True, mutable=['batch_stats'])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
      return jnp.mean(loss), updates['batch_stats']
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(s['params'])
    updates, opt_state = tx.update(grads, s['opt_state'], s['params'])
    return {'params': optax.apply_updates(s['params'], updates), 'batch_stats': batch_stats,
            'opt_state': opt_state}, loss

  sup_step = jax.jit(supervised_step, in_shardings=(replicated, batch_sharding, batch_sharding),
                     out_shardings=(replicated, replicated), donate_argnums=(0,))
  holder = {'state': sup_state}

  def sup_fn(_, image, labels):
    holder['state'], loss = sup_step(holder['state'], image, labels)
    return loss
  parts['supervised_step'] = (
      sup_fn, lambda: (None, views[0], labels))
  return parts


# ----------------------------------------------------------- benchmark ----

def benchmark(config, steps: int = 20, warmup: int = 3, parts: bool = True,
              torch_reference: bool = False, devices=None, log=print) -> dict:
  """Compiles and times the ReSA train step of `config`; returns the report dict."""
  if steps < 1 or warmup < 0:
    raise ValueError(f'need steps >= 1 and warmup >= 0, got {steps} and {warmup}')
  devices = jax.devices() if devices is None else devices
  mesh = sharding.create_mesh(devices)
  if config.batch_size % mesh.size:
    raise ValueError(f'batch_size {config.batch_size} is not divisible by {mesh.size} devices')
  platform = devices[0].platform
  summary = config_summary(config, mesh.size, platform)
  log(f'bench_step: {summary}; jax {jax.__version__}; {results_md.hardware()}')

  online_net, momentum_net = models.create_networks(config)
  # The schedules only set values; any horizon gives the same step program.
  steps_per_epoch, total_steps = 1000, 100_000
  schedule = step_lib.learning_rate_schedule(config, steps_per_epoch, total_steps)
  tx = step_lib.create_optimizer(config, schedule)
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(mesh.axis_names[0]))
  shapes = view_shapes(config)
  state = jax.jit(lambda rng: step_lib.create_train_state(rng, online_net, momentum_net, tx,
                                                       shapes[0]),
                  out_shardings=replicated)(jax.random.key(config.seed))
  rng = np.random.default_rng(config.seed)
  views = tuple(jax.device_put(rng.standard_normal((config.batch_size,) + shape, np.float32)
                               .astype(jnp.dtype(config.dtype)), batch_sharding)
                for shape in shapes)
  _block((state, views))

  step_fn = step_lib.make_train_step(config, online_net=online_net, momentum_net=momentum_net,
                                  tx=tx, mesh=mesh, lr_schedule=schedule,
                                  total_steps=total_steps)
  start = time.perf_counter()
  lowered = step_fn.lower(state, views)
  lower_s = time.perf_counter() - start
  compiles_before = len(_BACKEND_COMPILES)
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  if len(_BACKEND_COMPILES) == compiles_before:  # the event was renamed in this jax?
    log('warning: no XLA compilation event seen; the recompilation check relies on the '
        'jit cache size alone')
  log(f'trace + lower {lower_s:.2f} s, XLA compile {compile_s:.2f} s')

  holder = {'state': state}
  del state

  def run_step(views):
    holder['state'], metrics = step_fn(holder['state'], views)
    return holder['state'], metrics

  with warnings.catch_warnings():
    warnings.filterwarnings('ignore', message='Some donated buffers were not usable')
    compiles_before_warmup = len(_BACKEND_COMPILES)
    for _ in range(warmup):
      _block(run_step(views))
    warmup_compiles = len(_BACKEND_COMPILES) - compiles_before_warmup
    cache_after_warmup = _cache_size(step_fn)
    compiles_before = len(_BACKEND_COMPILES)
    times = time_calls(run_step, lambda: (views,), steps, 0)
    timed_compiles = len(_BACKEND_COMPILES) - compiles_before
    cache_size = _cache_size(step_fn)
  recompilations = timed_compiles + (cache_size - cache_after_warmup)
  if recompilations:
    raise AssertionError(f'the train step recompiled {recompilations} time(s) during the '
                         f'timed steps (jit cache size {cache_size})')
  metrics = jax.device_get(run_step(views)[1])
  memory = memory_report(compiled)

  median_s, mean_s = statistics.median(times), statistics.fmean(times)
  report = dict(
      summary=summary, hardware=results_md.hardware(), jax_version=jax.__version__,
      backend=jax.default_backend(), num_devices=mesh.size,
      config=dict(arch=config.arch, width_per_group=config.width_per_group, stem=config.stem,
                  mlp_dim=config.mlp_dim, emb_dim=config.emb_dim, predictor=config.predictor,
                  crops_nmb=list(config.crops_nmb), crops_size=list(config.crops_size),
                  batch_size=config.batch_size, dtype=config.dtype),
      steps=steps, warmup=warmup, lower_s=lower_s, compile_s=compile_s,
      step_times_s=times, step_median_s=median_s, step_mean_s=mean_s, step_min_s=min(times),
      images_per_s=config.batch_size / median_s, jit_cache_size=cache_size,
      warmup_compilations=warmup_compiles, recompilations=recompilations,
      loss=float(metrics['loss']), memory=memory, parts={}, torch=None)
  log(f'step: median {median_s:.4f} s, mean {mean_s:.4f} s over {steps} steps; '
      f'{report["images_per_s"]:.1f} images/s; jit cache size {cache_size}, '
      f'recompilations {recompilations}; loss {report["loss"]:.4f}')

  if parts:
    part_fns = make_parts(config, mesh, online_net, momentum_net, holder['state'], views)
    for name, (fn, args_fn) in part_fns.items():
      part_times = time_calls(fn, args_fn, steps, max(warmup, 1))
      report['parts'][name] = dict(median_s=statistics.median(part_times),
                                   mean_s=statistics.fmean(part_times))
      log(f'  {PART_LABELS[name]}: median {report["parts"][name]["median_s"] * 1e3:.2f} ms')
    report['resa_over_supervised'] = median_s / report['parts']['supervised_step']['median_s']
    # What the three ReSA parts leave: EMA, loss, optimizer update, and whatever XLA
    # fuses differently in the whole step (can be negative).
    report['rest_of_step_s'] = median_s - sum(
        v['median_s'] for k, v in report['parts'].items() if k != 'supervised_step')
    log(f'  rest of the step (EMA, loss, optimizer, fusion): '
        f'{report["rest_of_step_s"] * 1e3:.2f} ms; ReSA / supervised step time '
        f'{report["resa_over_supervised"]:.2f}')

  if torch_reference:
    if config.arch == 'resnet18' and config.stem == 'cifar' and len(set(shapes)) == 1:
      from experiments import torch_reference_step  # torch is imported only here
      log('timing the PyTorch reference step ...')
      result = torch_reference_step.time_torch_step(
          config.batch_size, shapes[0][0], steps, max(warmup, 3),
          width=config.width_per_group, mlp_dim=config.mlp_dim, emb_dim=config.emb_dim,
          predictor=config.predictor, num_views=len(shapes))
      import torch
      result.update(torch_version=torch.__version__, dtype='float32', device='cpu')
      report['torch'] = result
      report['torch_over_jax'] = result['median_s'] / median_s
      log(f'PyTorch reference (float32, CPU, {result["threads"]} threads): median '
          f'{result["median_s"]:.4f} s, mean {result["mean_s"]:.4f} s, min {result["min_s"]:.4f} s -> '
          f'{report["torch_over_jax"]:.2f}x the JAX step time')
    else:
      log('--torch: skipped, the PyTorch reference is the CIFAR-stem ResNet-18 with views of '
          'one size only')
  return report


# ------------------------------------------------------------- tables ----

def _fmt_bytes(n) -> str:
  if n is None:
    return ''
  return f'{n / 2 ** 30:.2f} GiB' if n >= 2 ** 30 else f'{n / 2 ** 20:.1f} MiB'


def _ms(seconds) -> str:
  return '' if seconds is None else f'{seconds * 1e3:.1f}'


def render_tables(rows) -> str:
  """Markdown: a step table and a parts table, one line per stored row."""
  lines = ['| hardware | jax | config | compile (s) | step median (ms) | step mean (ms) | '
           'images/s | peak memory | XLA plan | PyTorch ref. median (ms) |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    mem = r['memory']
    torch_ms = _ms(r['torch']['median_s']) if r.get('torch') else ''
    lines.append(
        f'| {r["hardware"]} | {r["jax_version"]} | {r["summary"]} | {r["compile_s"]:.1f} | '
        f'{_ms(r["step_median_s"])} | {_ms(r["step_mean_s"])} | {r["images_per_s"]:.1f} | '
        f'{_fmt_bytes(mem.get("peak_bytes"))} ({mem.get("peak_kind", "")}) | '
        f'{_fmt_bytes(mem.get("xla_plan_bytes"))} | {torch_ms} |')
  with_parts = [r for r in rows if r.get('parts')]
  if with_parts:
    names = list(PART_LABELS)
    short = [f'{PART_LABELS[n]} (ms)' for n in names]
    lines += ['', '| hardware | config | ' + ' | '.join(short) +
              ' | rest of step (ms) | ReSA / supervised |',
              '|---|---|' + '---|' * len(names) + '---|---|']
    for r in with_parts:
      cells = [_ms(r['parts'][n]['median_s']) if n in r['parts'] else '' for n in names]
      lines.append(f'| {r["hardware"]} | {r["summary"]} | ' + ' | '.join(cells) +
                   f' | {_ms(r.get("rest_of_step_s"))} | '
                   f'{r.get("resa_over_supervised", float("nan")):.2f} |')
  return '\n'.join(lines)


def print_report(report) -> None:
  print()
  print(render_tables([report]))
  if report.get('torch'):
    print(f'\nPyTorch reference / JAX step time: {report["torch_over_jax"]:.2f}')


def write_results(report, command: str, path: pathlib.Path = RESULTS_JSON,
                  results_path: pathlib.Path = results_md.RESULTS) -> None:
  """Stores the row (replacing the one with the same hardware and config) and renders."""
  rows = json.loads(path.read_text()) if path.exists() else []
  row = dict(report, command=command)
  row.pop('step_times_s', None)
  rows = [r for r in rows if (r['hardware'], r['summary']) != (row['hardware'], row['summary'])]
  rows.append(row)
  path.write_text(json.dumps(rows, indent=1, sort_keys=True) + '\n')
  render_results(rows, results_path)


def render_results(rows, results_path: pathlib.Path = results_md.RESULTS) -> None:
  """(Re)writes the RESULTS.md section from the stored rows."""
  commands = '\n'.join(f'- `{r["command"]}`' for r in rows)
  body = ('ReSA train step on random device-resident views (no input pipeline), measured by '
          '`experiments/bench_step.py`; median / mean of the timed steps after warm-up, each '
          'blocked on; images/s = global batch / median step time (an image is one sample, '
          'not batch x views); compile time is XLA compilation, reported apart; no '
          'recompilation happened during the timed steps in any row.  Peak memory is the '
          "device's peak_bytes_in_use, or on CPU the process's peak RSS; XLA plan = arguments "
          '+ outputs + temporaries - donated.  The PyTorch reference is the authors\' step '
          're-implemented in experiments/torch_reference_step.py (float32, CPU), same batch '
          'and views.  Parts are each jit-compiled alone with the same shapes.\n\n'
          f'{render_tables(rows)}\n\nCommands:\n{commands}')
  results_md.write_section(SECTION, body, results_path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if _RERENDER.value:
    render_results(json.loads(RESULTS_JSON.read_text()))
    print(f'rendered RESULTS.md ("{SECTION}") from {RESULTS_JSON.name}')
    return
  report = benchmark(_CONFIG.value, steps=_STEPS.value, warmup=_WARMUP.value, parts=_PARTS.value,
                     torch_reference=_TORCH.value)
  print_report(report)
  if _WRITE.value:
    command = 'python ' + ' '.join([pathlib.Path(sys.argv[0]).as_posix()] +
                                   [a for a in sys.argv[1:] if a != '--write'])
    write_results(report, command)
    print(f'\nwrote {RESULTS_JSON.name} and RESULTS.md ("{SECTION}")')


if __name__ == '__main__':
  app.run(main)
