"""Where the CPU train step's time goes, ours against PyTorch's, op by op.

    python experiments/profile_cpu_step.py [--batch 64] [--width 64] [--repeats 5] \
        [--json FILE]

The ReSA CIFAR step (ResNet-18 with the authors' CIFAR stem, two 32 px views, float32,
`experiments/bench_step.py --config=configs/cifar10.py`) spends its time in a few kinds of
op.  Each is timed alone on the step's own shapes, jit-compiled JAX on one CPU device
against PyTorch (oneDNN) on the same cores, the median of `repeats` blocked calls:

* every distinct convolution of the encoder (the stem, each stage's 3x3s, the strided
  3x3 and 1x1 shortcut that open a stage): forward, gradient with respect to the input
  (dgrad), gradient with respect to the weights (wgrad), in each form this machine
  offers (`resa_jax/models/cpu_conv.py`: oneDNN through XLA's FFI, the matmul weight
  gradient, XLA's own);
* BatchNorm + ReLU forward and backward, per stage;

Each op's count in one step weighs it (the online branch runs forward, dgrad and wgrad
of both views; the momentum branch the forward of both), so the table ends with the
estimated step time of each side beside the measured one (bench_step.py).  The
machine is named as RESULTS.md asks (results_md.hardware()).  Time it on an idle
machine: both sides use every core.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from experiments import bench_timing as timing  # noqa: E402
from experiments import results_md  # noqa: E402
from resa_jax.models import cpu_conv, layers  # noqa: E402


def conv_shapes(width: int, size: int = 34):
  """(name, H, C_in, C_out, kernel, stride, count a view) of ResNet-18's convolutions
  with the authors' CIFAR stem (a 32 px image padded to 34 px, then 3x3 stride 1)."""
  rows = [('stem 3x3 3->w', size, 3, width, 3, 1, 1)]
  h, c = size, width
  for stage, mult in enumerate((1, 2, 4, 8), start=1):
    out = width * mult
    if stage == 1:
      rows.append((f'stage1 3x3 {c}->{out}', h, c, out, 3, 1, 4))
    else:
      rows.append((f'stage{stage} 3x3/2 {c}->{out}', h, c, out, 3, 2, 1))
      rows.append((f'stage{stage} 1x1/2 {c}->{out}', h, c, out, 1, 2, 1))
      h = (h + 1) // 2
      rows.append((f'stage{stage} 3x3 {out}->{out}', h, out, out, 3, 1, 3))
    c = out
  return rows


def median_seconds(fn, repeats: int) -> float:
  """The median of `repeats` blocked calls fn() after one (compile / warm up)."""
  return statistics.median(timing.time_calls(fn, lambda: (), repeats, 1))


def jax_conv_times(batch, h, c_in, c_out, k, s, repeats, forms):
  """{form: {'fwd', 'dgrad', 'wgrad'}} seconds of one NHWC convolution in each of
  `forms` (`cpu_conv.BACKENDS`): its forward, and each gradient alone (the vjp with
  respect to one argument; XLA drops the other gradient's unused work)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, h, h, c_in)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, c_in, c_out)) * 0.05, jnp.float32)
  pad = ((k // 2, k // 2),) * 2
  g = jnp.ones(cpu_conv.conv('xla', x, w, (s, s), pad).shape, jnp.float32)
  block = jax.block_until_ready
  times = {}
  for form in forms:
    conv = lambda x, w, form=form: cpu_conv.conv(form, x, w, (s, s), pad)
    fwd = jax.jit(conv)
    dgrad = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
    wgrad = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
    times[form] = {'fwd': median_seconds(lambda: block(fwd(x, w)), repeats),
                   'dgrad': median_seconds(lambda: block(dgrad(x, w, g)), repeats),
                   'wgrad': median_seconds(lambda: block(wgrad(x, w, g)), repeats)}
  return times


def torch_conv_times(batch, h, c_in, c_out, k, s, repeats):
  """The same in PyTorch (NCHW, its default layout, as the authors' code)."""
  import torch  # pylint: disable=g-import-not-at-top
  x = torch.randn(batch, c_in, h, h)
  w = torch.randn(c_out, c_in, k, k) * 0.05
  y = torch.nn.functional.conv2d(x, w, stride=s, padding=k // 2)
  g = torch.ones_like(y)
  backward = torch.ops.aten.convolution_backward
  args = ([0], [s, s], [k // 2, k // 2], [1, 1], False, [0, 0], 1)
  with torch.no_grad():
    return {'fwd': median_seconds(lambda: torch.nn.functional.conv2d(x, w, stride=s,
                                                                     padding=k // 2), repeats),
            'dgrad': median_seconds(lambda: backward(g, x, w, *args, [True, False, False]),
                                    repeats),
            'wgrad': median_seconds(lambda: backward(g, x, w, *args, [False, True, False]),
                                    repeats)}


def bn_relu_times(batch, h, c, repeats):
  """BatchNorm (batch statistics) + ReLU forward and forward+backward, ours and torch."""
  import torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(batch, h, h, c)), jnp.float32)
  bn = layers.BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.key(0), x)

  def forward(params, x):
    y, _ = bn.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                    mutable=['batch_stats'])
    return jax.nn.relu(y)
  fwd = jax.jit(forward)
  fwd_bwd = jax.jit(jax.grad(lambda p, x: jnp.sum(forward(p, x) ** 2), argnums=(0, 1)))
  block = jax.block_until_ready
  ours = {'fwd': median_seconds(lambda: block(fwd(variables['params'], x)), repeats),
          'fwd_bwd': median_seconds(lambda: block(fwd_bwd(variables['params'], x)), repeats)}
  tbn = torch.nn.BatchNorm2d(c).train()
  tx = torch.randn(batch, c, h, h, requires_grad=True)

  def torch_fwd_bwd():
    out = torch.relu(tbn(tx))
    (out ** 2).sum().backward()
  with torch.no_grad():
    theirs_fwd = median_seconds(lambda: torch.relu(tbn(tx)), repeats)
  theirs = {'fwd': theirs_fwd, 'fwd_bwd': median_seconds(torch_fwd_bwd, repeats)}
  return ours, theirs


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--width', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--json', help='Also write the rows to this file.')
  args = parser.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  print(f'{results_md.hardware()}; jax {jax.__version__}, torch {torch.__version__} '
        f'({torch.get_num_threads()} threads); batch {args.batch}, width {args.width}')
  forms = cpu_conv.offered(jnp.float32)
  rows, totals = [], {**{form: 0.0 for form in forms}, 'torch': 0.0}
  print('| convolution | count a view | ' + ' | '.join(
      f'{form} {op}' for form in (*forms, 'torch') for op in ('fwd', 'dgrad', 'wgrad'))
        + ' | best / torch |')
  print('|---' * (3 + 3 * (len(forms) + 1)) + '|')
  for name, h, c_in, c_out, k, s, count in conv_shapes(args.width):
    times = jax_conv_times(args.batch, h, c_in, c_out, k, s, args.repeats, forms)
    times['torch'] = torch_conv_times(args.batch, h, c_in, c_out, k, s, args.repeats)
    first = name.startswith('stem')  # the input needs no gradient
    step = {}
    for form, t in times.items():
      # Online: forward and both gradients of both views; momentum: the forward of both.
      step[form] = count * (2 * (t['fwd'] + (0 if first else t['dgrad']) + t['wgrad'])
                            + 2 * t['fwd'])
      totals[form] += step[form]
    best = min(step[form] for form in forms)
    rows.append(dict(name=name, count=count, times=times, step=step))
    print(f'| {name} ({h}x{h}) | {count} | ' + ' | '.join(
        f'{1e3 * times[form][op]:.1f}' for form in (*forms, 'torch')
        for op in ('fwd', 'dgrad', 'wgrad')) + f' | {best / step["torch"]:.2f} |')
  print('convolutions in one step (ms): ' + ', '.join(
      f'{form} {1e3 * total:.0f}' for form, total in totals.items()))
  bn_total = {'ours': 0.0, 'torch': 0.0}
  print('| BatchNorm + ReLU | count a view | ours fwd | ours fwd+bwd | torch fwd | torch fwd+bwd |')
  print('|---|---|---|---|---|---|')
  for h, c, count in ((34, args.width, 5), (17, 2 * args.width, 5), (9, 4 * args.width, 5),
                      (5, 8 * args.width, 5)):
    ours, theirs = bn_relu_times(args.batch, h, c, args.repeats)
    for key, t in (('ours', ours), ('torch', theirs)):
      bn_total[key] += count * (2 * t['fwd_bwd'] + 2 * t['fwd'])
    rows.append(dict(name=f'bn {h}x{h}x{c}', count=count, ours=ours, torch=theirs))
    print(f'| {h}x{h}x{c} | {count} | ' + ' | '.join(
        f'{1e3 * v:.1f}' for v in (ours['fwd'], ours['fwd_bwd'], theirs['fwd'],
                                   theirs['fwd_bwd'])) + ' |')
  print(f'BatchNorm + ReLU in one step (ms): ours {1e3 * bn_total["ours"]:.0f}, '
        f'torch {1e3 * bn_total["torch"]:.0f}')
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(
        dict(hardware=results_md.hardware(), batch=args.batch, width=args.width, rows=rows,
             conv_totals=totals, bn_totals=bn_total), indent=1))


if __name__ == '__main__':
  main()
