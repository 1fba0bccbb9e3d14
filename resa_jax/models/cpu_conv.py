"""Convolutions on the CPU backend, in the form measured fastest on this machine.

XLA:CPU's convolutions are several times slower than PyTorch's on the same cores, the
gradient with respect to the weights most of all (experiments/RESULTS.md, 'The CPU step
against PyTorch's').  Three forms of one NHWC x HWIO convolution compute the same values
(to float rounding), and `backend()` picks, once per machine, the one that runs its
forward and both gradients fastest:

* 'onednn': oneDNN's kernels, the library PyTorch's CPU convolutions use, called through
  XLA's FFI (`onednn.py`).  Offered for float32 in a process of one CPU device where
  `onednn.checked()` holds: built against the machine's oneDNN, running its AVX-512
  kernels, and equal to XLA's values on every kind of convolution the encoders build
  (checked once per machine in a process of its own).  Forced on a mesh, each call runs
  on every device's rows of the batch.
* 'matmul': XLA's forward and input gradient, the weight gradient as one matmul per
  kernel offset (`x_pad[:, i::s, j::s]^T @ g`), which XLA's dot runs at matmul speed
  (faster than XLA's weight-gradient kernel on AVX2 CPUs; RESULTS.md, 'The CPU weight
  gradient as matmuls').
* 'xla': `lax.conv_general_dilated` as it is.

`backend()` measures each form offered on two convolutions (`CALIBRATION`: one of the
size of the tests' models, one of a ResNet-18 stage on CIFAR; forward and both
gradients, the median of 3 runs after one), keeps the times in `<cache>/cpu_conv.json`
under the machine's name (`onednn.machine()`), and gives each convolution the form whose
line through its two times (a fixed cost a call and a cost a multiply-add) predicts it
fastest at that convolution's size: library calls pay a fixed cost that XLA's fused
code does not, which decides for the small models of the tests.  So the choice is made
by measurement on the machine it runs on, once.
`$RESA_CPU_CONV=onednn|matmul|xla` forces a form (tests and benchmarks; oneDNN's only
where offered).  Values agree across forms to float rounding: 1e-12 in float64 for
'matmul' against XLA (tests/test_conv.py), 5e-5 of the largest value in float32 for
'onednn'.  GPUs and TPUs always use XLA's convolution (`layers.conv_general_dilated`
asks this module only on the CPU).
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from resa_jax.models import onednn

BACKENDS = ('onednn', 'matmul', 'xla')


# --------------------------------------------------------- the matmul form ----

def _nhwc_conv(x, w, strides, padding, precision=None):
  return lax.conv_general_dilated(x, w, strides, padding, precision=precision,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def matmul_conv(x, w, strides, padding, precision=None):
  """XLA's convolution whose weight gradient is one 2-D dot per kernel offset."""
  return _nhwc_conv(x, w, strides, padding, precision)


def _matmul_fwd(x, w, strides, padding, precision):
  return _nhwc_conv(x, w, strides, padding, precision), (x, w)


def _matmul_bwd(strides, padding, precision, residuals, g):
  x, w = residuals
  (gx,) = jax.linear_transpose(lambda x: _nhwc_conv(x, w, strides, padding, precision), x)(g)
  n, oh, ow, _ = g.shape  # (N, OH, OW, C_out)
  (sh, sw), (kh, kw) = strides, w.shape[:2]
  x_pad = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  # Offsets whose window runs past the padded input never occur: OH was computed from it.
  # As 2-D (N OH OW, C) matrices: XLA:CPU runs this dot 2-3x faster than the 4-D einsum.
  g2 = g.reshape(n * oh * ow, -1)  # (N OH OW, C_out)
  out_dtype = jnp.promote_types(w.dtype, jnp.float32)
  gw = jnp.stack([
      jnp.stack([
          jnp.dot(lax.slice(x_pad, (0, i, j, 0),
                            (n, i + sh * (oh - 1) + 1, j + sw * (ow - 1) + 1, x.shape[3]),
                            (1, sh, sw, 1)).reshape(n * oh * ow, -1).T,
                  g2, precision=precision, preferred_element_type=out_dtype)
          for j in range(kw)])
      for i in range(kh)])  # (KH, KW, C_in, C_out)
  return gx, gw.astype(w.dtype)


matmul_conv.defvjp(_matmul_fwd, _matmul_bwd)


def conv(backend_name: str, x, w, strides, padding, precision=None):
  """The NHWC x HWIO convolution in form `backend_name` (`BACKENDS`)."""
  if backend_name == 'onednn':
    return onednn.conv(x, w, strides, padding)
  if backend_name == 'matmul':
    return matmul_conv(x, w, strides, padding, precision)
  return _nhwc_conv(x, w, strides, padding, precision)


# ------------------------------------------------------------- the choice ----

def offered(dtype, num_devices: int = 1) -> tuple[str, ...]:
  """The forms that can run a convolution of `dtype` on this machine, in a process of
  `num_devices` CPU devices.  The oneDNN form is offered on one device: on simulated
  multi-device CPUs (the tests' 8 devices on 2 cores) every device's small calls wait
  their turn and wake a thread team each (a tiny model's step measured 0.75 s against
  XLA's 0.20 s on 8 devices); forced there, it still splits each call along the batch."""
  forms = ('matmul', 'xla')
  if jnp.dtype(dtype) == jnp.float32 and num_devices == 1 and onednn.checked()[0]:
    forms = ('onednn',) + forms
  return forms


# The two convolutions each form is timed on (forward and both gradients): (images NHWC,
# kernel HWIO), 3x3, stride 1, 'SAME'.  The small one is the size of the tests' models,
# where a library call's fixed cost shows; the large one a ResNet-18 stage on CIFAR.
CALIBRATION = {'small': ((2, 8, 8, 8), (3, 3, 8, 8)),
               'large': ((16, 32, 32, 64), (3, 3, 64, 64))}


def work(x_shape, w_shape, out_shape) -> float:
  """Multiply-adds of a convolution's forward: N OH OW KH KW C_in C_out."""
  return float(np.prod(out_shape[:3]) * np.prod(w_shape))


def _time_form(form: str, x_shape, w_shape) -> float:
  """Median seconds of the forward and both gradients of one float32 convolution in
  form `form` (3 runs after one)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=w_shape) * 0.05, jnp.float32)
  grads = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(form, x, w, (1, 1), ((1, 1), (1, 1))) ** 2),
                           argnums=(0, 1)))
  jax.block_until_ready(grads(x, w))
  times = []
  for _ in range(3):
    start = time.perf_counter()
    jax.block_until_ready(grads(x, w))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


@functools.lru_cache(maxsize=None)
def measured() -> dict[str, dict[str, float]]:
  """{form: {'small': seconds, 'large': seconds}} of every form this machine offers on
  the `CALIBRATION` convolutions, measured once and kept in <cache>/cpu_conv.json under
  this machine's name."""
  import filelock  # pylint: disable=g-import-not-at-top
  path, machine = onednn.cache_dir() / 'cpu_conv.json', onednn.machine()
  forms = offered(jnp.float32)

  def measure():  # in a thread of its own: outside any trace the caller is in
    def on_cpu():
      with jax.default_device(jax.local_devices(backend='cpu')[0]):
        return {form: {size: _time_form(form, *shapes) for size, shapes in CALIBRATION.items()}
                for form in forms}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      return pool.submit(on_cpu).result()

  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(path) + '.lock'):
      records = json.loads(path.read_text()) if path.exists() else {}
      times = records.get(machine, {})
      if not all(isinstance(times.get(form), dict) and set(times[form]) == set(CALIBRATION)
                 for form in forms):
        times = records[machine] = measure()
        path.write_text(json.dumps(records, indent=1, sort_keys=True))
  except (OSError, ValueError):  # no cache folder to keep it in: measure in memory
    times = measure()
  return times


def predicted_seconds(times: dict[str, float], multiply_adds: float) -> float:
  """A form's seconds for a convolution of `multiply_adds`, on the line through its two
  measured points (a fixed cost a call, and a cost a multiply-add)."""
  small, large = (work(x, w, x[:3] + w[3:]) for x, w in CALIBRATION.values())
  per_work = (times['large'] - times['small']) / (large - small)
  return times['small'] + per_work * (multiply_adds - small)


def backend(dtype=jnp.float32, multiply_adds: float | None = None) -> str:
  """The form of a CPU convolution of `dtype` and `multiply_adds` (the large calibration
  convolution's if None): $RESA_CPU_CONV if set (and offered for `dtype`, else XLA's),
  else the one predicted fastest from this machine's measurements (`measured`)."""
  forced = os.environ.get('RESA_CPU_CONV')
  if forced:
    if forced not in BACKENDS:
      raise ValueError(f'RESA_CPU_CONV must be one of {", ".join(BACKENDS)}, got {forced!r}')
    return forced if forced in offered(dtype) else 'xla'
  forms = offered(dtype, jax.local_device_count())
  times = measured()
  if multiply_adds is None:
    multiply_adds = work(*CALIBRATION['large'], CALIBRATION['large'][0][:3]
                         + CALIBRATION['large'][1][3:])
  return min(forms, key=lambda form: predicted_seconds(times[form], multiply_adds)
             if form in times else float('inf'))

