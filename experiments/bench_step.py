"""Time of the jit-compiled ReSA train step of a config, and of its parts.

    python experiments/bench_step.py [--config=configs/fake_data_benchmark.py] \
        [--steps=20] [--warmup=3] [--noparts] [--torch] [--device_views] [--write] \
        [--report=FILE.json] [--config.batch_size=128 ...]
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
* with --device_views, the step again with its views made on the devices inside
  the timed step: a uint8 split of random `fake_image_size` px images held on the
  devices (split over them), read through `resa_jax.data.train_iterator` (the
  training loop's 'held' placement: each step's batch gathered across the devices and
  augmented by `device_views`), then the train step; images/s, the views alone, the
  exchange between the devices alone, and the peak memory after this mode
  (`time_device_views`);
* parts (bench_step_parts.py), each jit-compiled on its own with the same shapes
  and timed the same way: online forward + backward of all views, the momentum
  forward of views 0 and 1, Sinkhorn on the (B, B) scores, and a supervised step
  (the same encoder + a linear classifier, cross-entropy, SGD, one view) for the
  ReSA / supervised cost ratio;
* with --torch, when the config is a CIFAR-stem ResNet-18: the authors' step
  re-implemented in PyTorch (experiments/torch_reference_step.py), float32 on
  the CPU, same batch, view count and size.

With --write the row is stored in experiments/bench_step_results.json, keyed by
(hardware, config summary) so rows of other machines and configs are kept, and
the "Train step throughput" section of experiments/RESULTS.md is re-rendered
from all stored rows (bench_step_tables.py).  --report=FILE writes the report
as JSON to FILE and nothing into the repository (experiments/gpu_check.sh).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import statistics
import sys
import time
from typing import Any

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import bench_timing as timing  # noqa: E402
from experiments import results_md  # noqa: E402
from experiments.bench_step_parts import PART_LABELS, make_parts  # noqa: E402
from experiments.bench_step_tables import (RESULTS_JSON, SECTION, print_report,  # noqa: E402
                                           render_results, write_results)
from resa_jax import data, models, sharding  # noqa: E402  (data: no TensorFlow)
from resa_jax import step as step_lib  # noqa: E402
from resa_jax.data import device as data_device  # noqa: E402

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
_DEVICE_VIEWS = flags.DEFINE_bool('device_views', False, 'Also time the step with its views '
                                   'made on the devices inside the timed step.')
_REPORT = flags.DEFINE_string('report', None, 'Also write the report as JSON to this file.')
_WRITE = flags.DEFINE_bool('write', False, 'Record the row in bench_step_results.json and '
                           'experiments/RESULTS.md.')


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
  predictor = 'on' if config.predictor else 'off'
  return (f'{config.arch} w{config.width_per_group} {config.stem} stem, '
          f'mlp {config.mlp_dim}/{config.emb_dim}, predictor {predictor}, '
          f'views {views}, batch {config.batch_size}, {config.dtype}, '
          f'{num_devices} {platform} device{"s" if num_devices > 1 else ""}')


# ----------------------------------------------------------- benchmark ----

@dataclasses.dataclass
class _Bench:
  """One config's step, set up: the mesh, the networks, the jitted step, its state
  (in `holder`, replaced by every step) and random views already on the devices."""
  config: Any
  mesh: Any
  online_net: Any
  momentum_net: Any
  step_fn: Any
  holder: dict
  views: tuple
  summary: str

  def run_step(self, views):
    self.holder['state'], metrics = self.step_fn(self.holder['state'], views)
    return self.holder['state'], metrics


def _set_up(config, devices, log) -> _Bench:
  mesh = sharding.create_mesh(devices)
  if config.batch_size % mesh.size:
    raise ValueError(f'batch_size {config.batch_size} is not divisible by {mesh.size} devices')
  summary = config_summary(config, mesh.size, devices[0].platform)
  log(f'bench_step: {summary}; jax {jax.__version__}; {results_md.hardware()}')
  online_net, momentum_net = models.create_networks(config)
  # The schedules only set values; any horizon gives the same step program.
  steps_per_epoch, total_steps = 1000, 100_000
  schedule = step_lib.learning_rate_schedule(config, steps_per_epoch, total_steps)
  tx = step_lib.create_optimizer(config, schedule)
  shapes = view_shapes(config)
  state = jax.jit(lambda rng: step_lib.create_train_state(rng, online_net, momentum_net, tx,
                                                          shapes[0]),
                  out_shardings=NamedSharding(mesh, P()))(jax.random.key(config.seed))
  rng = np.random.default_rng(config.seed)
  batch_sharding = NamedSharding(mesh, P(mesh.axis_names[0]))
  views = tuple(jax.device_put(rng.standard_normal((config.batch_size,) + shape, np.float32)
                               .astype(jnp.dtype(config.dtype)), batch_sharding)
                for shape in shapes)
  timing.block((state, views))
  step_fn = step_lib.make_train_step(config, online_net=online_net, momentum_net=momentum_net,
                                     tx=tx, mesh=mesh, lr_schedule=schedule,
                                     total_steps=total_steps)
  return _Bench(config, mesh, online_net, momentum_net, step_fn, {'state': state}, views,
                summary)


def _time_parts(bench: _Bench, steps: int, warmup: int, median_s: float, log) -> dict:
  """report['parts'], 'resa_over_supervised' and 'rest_of_step_s'."""
  part_fns = make_parts(bench.config, bench.mesh, bench.online_net, bench.momentum_net,
                        bench.holder['state'], bench.views)
  parts = {}
  for name, (fn, args_fn) in part_fns.items():
    part_times = timing.time_calls(fn, args_fn, steps, max(warmup, 1))
    parts[name] = dict(median_s=statistics.median(part_times),
                       mean_s=statistics.fmean(part_times))
    log(f'  {PART_LABELS[name]}: median {parts[name]["median_s"] * 1e3:.2f} ms')
  out = dict(parts=parts, resa_over_supervised=median_s / parts['supervised_step']['median_s'],
             # What the three ReSA parts leave: EMA, loss, optimizer update, and whatever
             # XLA fuses differently in the whole step (can be negative).
             rest_of_step_s=median_s - sum(v['median_s'] for k, v in parts.items()
                                           if k != 'supervised_step'))
  log(f'  rest of the step (EMA, loss, optimizer, fusion): {out["rest_of_step_s"] * 1e3:.2f} '
      f'ms; ReSA / supervised step time {out["resa_over_supervised"]:.2f}')
  return out


def _time_torch(config, steps: int, warmup: int, median_s: float, log) -> dict:
  """report['torch'] and 'torch_over_jax': the PyTorch reference step on this CPU."""
  shapes = view_shapes(config)
  if not (config.arch == 'resnet18' and config.stem == 'cifar' and len(set(shapes)) == 1):
    log('--torch: skipped, the PyTorch reference is the CIFAR-stem ResNet-18 with views of '
        'one size only')
    return {}
  from experiments import torch_reference_step  # torch is imported only here
  log('timing the PyTorch reference step ...')
  result = torch_reference_step.time_torch_step(
      config.batch_size, shapes[0][0], steps, max(warmup, 3), width=config.width_per_group,
      mlp_dim=config.mlp_dim, emb_dim=config.emb_dim, predictor=config.predictor,
      num_views=len(shapes))
  result.update(dtype='float32', device='cpu')
  log(f'PyTorch reference (float32, CPU, {result["threads"]} threads): median '
      f'{result["median_s"]:.4f} s, mean {result["mean_s"]:.4f} s, min {result["min_s"]:.4f} '
      f's -> {result["median_s"] / median_s:.2f}x the JAX step time')
  return dict(torch=result, torch_over_jax=result['median_s'] / median_s)


# The held split's normalisation (ImageNet's statistics): any per-channel values cost the same.
_VIEWS_MEAN, _VIEWS_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HELD_BATCHES = 4  # the held uint8 split is this many batches of random images


def _held_source(config, size: int, channels: int, num_held: int):
  """The split `--device_views` holds: random uint8 images, as a TensorFlow-free Source
  (the GPU machine has no TensorFlow)."""
  images = np.random.default_rng(config.seed + 1).integers(
      0, 256, (num_held, size, size, channels), dtype=np.uint8)
  return data.array_source('random', {config.train_split: (images, np.zeros(num_held, np.int32))},
                           _VIEWS_MEAN[:channels], _VIEWS_STD[:channels], num_classes=1)


def time_device_views(bench: _Bench, steps: int, warmup: int, log) -> dict:
  """report['device_views']: the step with its views made on the devices, both timed.

  A split of HELD_BATCHES x batch random uint8 images of `fake_image_size` px (the
  source images the views are cropped from) is held on the devices, split over them,
  and read through the library's own front door (`data.train_iterator`, the 'held'
  placement): each timed step gathers its batch across the devices, makes its views and
  runs the train step, blocked on at the end.  Also: the views alone, the gather (the
  exchange between the devices) alone, the first batch (holding the split and
  compiling), and the device's peak memory after this mode (peak_bytes_in_use only
  grows, so it is the larger of the two modes' peaks).
  """
  config, mesh = bench.config.copy_and_resolve_references(), bench.mesh
  size = int(config.get('fake_image_size', config.crops_size[0]))
  channels = view_shapes(config)[0][-1]
  num_held = HELD_BATCHES * int(config.batch_size)
  source = _held_source(config, size, channels, num_held)
  config.augment_on, config.device_memory_budget_mb = 'device', float('inf')
  start = time.perf_counter()
  batches = data.train_iterator(config, mesh, source=source)
  timing.block(next(batches))
  first_batch_s = time.perf_counter() - start
  views_only = timing.time_calls(lambda: next(batches), lambda: (), steps, max(warmup, 1))
  held = data_device.hold_split(source, config.train_split, num_held, mesh)
  gather = jax.jit(data_device.gather_rows(mesh, data_device.block_rows(num_held, mesh.size)))
  ids = np.random.default_rng(0).permutation(num_held)[:config.batch_size].astype(np.int32)
  exchange = timing.time_calls(gather, lambda: (held, ids), steps, max(warmup, 1))
  timed = timing.time_without_recompiling(
      lambda: bench.run_step(next(batches)['views']), lambda: (), steps, warmup,
      [bench.step_fn])
  median_s = statistics.median(timed['times'])
  out = dict(source_image_size=size, held_examples=num_held, views_compile_s=first_batch_s,
             views_median_s=statistics.median(views_only),
             exchange_median_s=statistics.median(exchange), step_median_s=median_s,
             step_mean_s=statistics.fmean(timed['times']),
             images_per_s=config.batch_size / median_s,
             warmup_compilations=timed['warmup_compilations'],
             recompilations=timed['recompilations'], memory=timing.memory_report())
  log(f'views on the device + step: median {median_s:.4f} s ({out["images_per_s"]:.1f} '
      f'images/s); the views alone {out["views_median_s"] * 1e3:.2f} ms, of which the '
      f'exchange {out["exchange_median_s"] * 1e3:.2f} ms; peak memory '
      f'{out["memory"]["peak_bytes"] / 2**30:.2f} GiB ({out["memory"]["peak_kind"]})')
  return out


def benchmark(config, steps: int = 20, warmup: int = 3, parts: bool = True,
              torch_reference: bool = False, devices=None, log=print,
              with_device_views: bool = False) -> dict:
  """Compiles and times the ReSA train step of `config`; returns the report dict."""
  if steps < 1 or warmup < 0:
    raise ValueError(f'need steps >= 1 and warmup >= 0, got {steps} and {warmup}')
  bench = _set_up(config, jax.devices() if devices is None else devices, log)
  compiled, lower_s, compile_s = timing.compile_timed(
      bench.step_fn, (bench.holder['state'], bench.views), log, 'train step')
  timed = timing.time_without_recompiling(bench.run_step, lambda: (bench.views,), steps,
                                          warmup, [bench.step_fn])
  times = timed.pop('times')
  metrics = jax.device_get(bench.run_step(bench.views)[1])
  median_s, mean_s = statistics.median(times), statistics.fmean(times)
  report = dict(
      summary=bench.summary, hardware=results_md.hardware(), jax_version=jax.__version__,
      backend=jax.default_backend(), num_devices=bench.mesh.size,
      config=dict(arch=config.arch, width_per_group=config.width_per_group, stem=config.stem,
                  mlp_dim=config.mlp_dim, emb_dim=config.emb_dim, predictor=config.predictor,
                  crops_nmb=list(config.crops_nmb), crops_size=list(config.crops_size),
                  batch_size=config.batch_size, dtype=config.dtype),
      steps=steps, warmup=warmup, lower_s=lower_s, compile_s=compile_s,
      step_times_s=times, step_median_s=median_s, step_mean_s=mean_s, step_min_s=min(times),
      images_per_s=config.batch_size / median_s, **timed,
      loss=float(metrics['loss']), memory=timing.memory_report(compiled), parts={}, torch=None)
  log(f'step: median {median_s:.4f} s, mean {mean_s:.4f} s over {steps} steps; '
      f'{report["images_per_s"]:.1f} images/s; jit cache size {report["jit_cache_size"]}, '
      f'recompilations {report["recompilations"]}; loss {report["loss"]:.4f}')
  if with_device_views:  # after the step's own peak memory was read
    report['device_views'] = time_device_views(bench, steps, warmup, log)
  if parts:
    report.update(_time_parts(bench, steps, warmup, median_s, log))
  if torch_reference:
    report.update(_time_torch(config, steps, warmup, median_s, log))
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if _RERENDER.value:
    render_results(json.loads(RESULTS_JSON.read_text()))
    print(f'rendered RESULTS.md ("{SECTION}") from {RESULTS_JSON.name}')
    return
  report = benchmark(_CONFIG.value, steps=_STEPS.value, warmup=_WARMUP.value, parts=_PARTS.value,
                     torch_reference=_TORCH.value, with_device_views=_DEVICE_VIEWS.value)
  print_report(report)
  if _REPORT.value:
    pathlib.Path(_REPORT.value).write_text(json.dumps(report, indent=1, sort_keys=True) + '\n')
  if _WRITE.value:
    command = 'python ' + ' '.join([pathlib.Path(sys.argv[0]).as_posix()] +
                                   [a for a in sys.argv[1:] if a != '--write'])
    write_results(report, command)
    print(f'\nwrote {RESULTS_JSON.name} and RESULTS.md ("{SECTION}")')


if __name__ == '__main__':
  app.run(main)
