"""Convolutions on the CPU backend, in the form measured fastest on this machine.

XLA:CPU's convolutions are several times slower than PyTorch's on the same cores, the
gradient with respect to the weights most of all (experiments/RESULTS.md, 'The CPU step
against PyTorch's').  Three forms of one NHWC x HWIO convolution compute the same values
(to float rounding), and `backend()` picks, once per machine, the one that runs its
forward and both gradients fastest:

* 'onednn': oneDNN's kernels, the library PyTorch's CPU convolutions use, called through
  XLA's FFI (`cpu_conv.cc`: forward, input gradient, weight gradient).  The C++ file is
  compiled on first use into the cache folder (`$RESA_CACHE_DIR`, else
  ~/.cache/resa_jax) against the oneDNN found on the machine (Debian/Ubuntu's
  `libdnnl-dev`, which scripts/_setup.sh installs; `$RESA_ONEDNN_ROOT` names another
  install); without a compiler or oneDNN the form is not offered.  Nor is it until it
  has passed a check against XLA's values on every kind of convolution the encoders
  build, run once per machine in a process of its own (`onednn_checked`: oneDNN 2.6.3
  was seen to crash and to race on some machines and shapes, `CHECKS`), nor where
  oneDNN runs its pre-AVX-512 kernels.  float32, and in a process of one CPU device
  (`offered` says why); forced on a mesh, each call runs on every device's rows of the
  batch (`custom_partitioning`), the weight gradient summed over the devices.
* 'matmul': XLA's forward and input gradient, the weight gradient as one matmul per
  kernel offset (`x_pad[:, i::s, j::s]^T @ g`), which XLA's dot runs at matmul speed
  (faster than XLA's weight-gradient kernel on AVX2 CPUs; RESULTS.md, 'The CPU weight
  gradient as matmuls').
* 'xla': `lax.conv_general_dilated` as it is.

`backend()` measures each form offered on two convolutions (`CALIBRATION`: one of the
size of the tests' models, one of a ResNet-18 stage on CIFAR; forward and both
gradients, the median of 3 runs after one), keeps the times in `<cache>/cpu_conv.json`
under the CPU's name, flags and jax version, and gives each convolution the form whose
line through its two times (a fixed cost a call and a cost a multiply-add) predicts it
fastest at that convolution's size: library calls pay a fixed cost that XLA's fused
code does not, which decides for the small models of the tests.  So the choice is made
by measurement on the machine it runs on, once.
`$RESA_CPU_CONV=onednn|matmul|xla` forces a form (tests and benchmarks).  Values agree
across forms to float rounding: 1e-12 in float64 for 'matmul' against XLA
(tests/test_conv.py), 1e-5 relative in float32 for 'onednn'.  GPUs and TPUs always use
XLA's convolution (`layers.conv_general_dilated` asks this module only on the CPU).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import hashlib
import json
import os
import pathlib
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

BACKENDS = ('onednn', 'matmul', 'xla')
_SOURCE = pathlib.Path(__file__).with_name('cpu_conv.cc')
_TARGETS = {'forward': 'ResaConvForward', 'backward_data': 'ResaConvBackwardData',
            'backward_weights': 'ResaConvBackwardWeights'}


def cache_dir() -> pathlib.Path:
  """Where the compiled library and the measured choice are kept."""
  root = os.environ.get('RESA_CACHE_DIR') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'resa_jax')
  return pathlib.Path(root)


# --------------------------------------------------------- the oneDNN form ----

@functools.lru_cache(maxsize=None)
def _library() -> tuple[ctypes.CDLL | None, str]:
  """(cpu_conv.cc compiled and loaded, or None and the reason); compiles it on first use
  (about 5 s), under a file lock other processes wait on, and registers its handlers."""
  import filelock  # pylint: disable=g-import-not-at-top
  root = os.environ.get('RESA_ONEDNN_ROOT')
  flags = ['-O2', '-std=c++17', '-shared', '-fPIC', '-w', f'-I{jax.ffi.include_dir()}']
  if root:
    flags += [f'-I{root}/include', f'-L{root}/lib', f'-Wl,-rpath,{root}/lib']
  key = hashlib.sha256(_SOURCE.read_bytes() + ' '.join(flags).encode()
                       + jax.__version__.encode()).hexdigest()[:16]
  path = cache_dir() / f'cpu_conv_{key}.so'
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(path) + '.lock'):
      if not path.exists():
        with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
          built = pathlib.Path(scratch) / path.name
          subprocess.run([os.environ.get('CXX', 'c++'), *flags, str(_SOURCE), '-o',
                          str(built), '-ldnnl'], check=True, capture_output=True, timeout=300)
          os.replace(built, path)
    library = ctypes.CDLL(str(path))
  except (OSError, subprocess.SubprocessError) as e:
    detail = getattr(e, 'stderr', b'') or b''
    reason = (detail.decode(errors='replace').strip().splitlines() or [str(e)])[-1]
    return None, f'cannot build or load {_SOURCE.name} with oneDNN: {reason[:200]}'
  for name in _TARGETS.values():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)),
                                platform='cpu')
  return library, ''


def onednn_library() -> tuple[bool, str]:
  """(whether cpu_conv.cc is built and its handlers registered with XLA, the reason if
  not).  Registered is not offered: `onednn_checked` decides that."""
  library, reason = _library()
  return library is not None, reason


# The convolutions the oneDNN form is checked on before it is offered (forward and both
# gradients against XLA's, each 3 times, on every core): each kind the encoders build, at
# batches that split over the threads.  oneDNN 2.6.3 was seen to fail on these kinds in
# three ways: its AVX2 weight gradient of the 1x1 stride-2 downsample wrong in about half
# the runs on 2 threads (a race), its AVX2 7x7 stem refused, its AVX-512 strided 1x1 with
# 8 channels corrupting the heap (which `conv` now avoids).  This check keeps a fault like
# them off the machines it happens on.
CHECKS = [  # (input NHWC, kernel HWIO, strides, padding)
    ((8, 10, 10, 16), (3, 3, 16, 16), (1, 1), ((1, 1), (1, 1))),
    ((8, 10, 10, 16), (3, 3, 16, 32), (2, 2), ((1, 1), (1, 1))),
    ((8, 10, 10, 16), (1, 1, 16, 32), (2, 2), ((0, 0), (0, 0))),
    ((3, 10, 10, 6), (1, 1, 6, 8), (2, 2), ((0, 0), (0, 0))),
    ((3, 10, 10, 8), (1, 1, 8, 8), (2, 2), ((0, 0), (0, 0))),
    ((8, 10, 10, 16), (1, 1, 16, 64), (1, 1), ((0, 0), (0, 0))),
    ((4, 24, 24, 3), (7, 7, 3, 16), (2, 2), ((3, 3), (3, 3))),
    ((8, 8, 8, 3), (3, 3, 3, 16), (1, 1), ((2, 2), (2, 2))),
    ((4, 16, 16, 3), (4, 4, 3, 16), (4, 4), ((0, 0), (0, 0))),
]


def check_against_xla(form: str = 'onednn', repeats: int = 3) -> str:
  """'' if form `form` gives XLA's float32 values and gradients on every `CHECKS`
  convolution `repeats` times, else what differed (or failed)."""
  rng = np.random.default_rng(0)
  for x_shape, w_shape, strides, padding in CHECKS:
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=w_shape), jnp.float32)
    g = jnp.asarray(rng.normal(size=_output_shape(x_shape, w_shape, strides, padding)),
                    jnp.float32)

    @functools.partial(jax.jit, static_argnums=0)
    def grads(form, x, w, g, strides=strides, padding=padding):
      y, vjp = jax.vjp(lambda x, w: conv(form, x, w, strides, padding), x, w)
      return vjp(g), y
    (ref_gx, ref_gw), ref_y = grads('xla', x, w, g)
    for _ in range(repeats):
      try:
        (gx, gw), y = grads(form, x, w, g)
        jax.block_until_ready(gw)
      except Exception as e:  # pylint: disable=broad-except
        return f'{x_shape}x{w_shape}: {str(e).splitlines()[0][:200]}'
      # float32 sums of up to 1,568 products in two orders: 5e-5 of the largest value; a
      # wrong tap or race is off by a term's size (1/40 of it or more).
      for name, ours, ref in (('output', y, ref_y), ('input gradient', gx, ref_gx),
                              ('weight gradient', gw, ref_gw)):
        off = float(jnp.max(jnp.abs(ours - ref)))
        if not off <= 5e-5 * float(jnp.max(jnp.abs(ref))):
          return (f'{x_shape}x{w_shape} stride {strides}: the {name} differs from '
                  f"XLA's by {off:.3g}")
  return ''


# The check runs in a process of its own: a kernel that crashes kills that process only.
_CHECK_COMMAND = (sys.executable, '-c', 'from resa_jax.models import cpu_conv; cpu_conv.main()')
_ISA_VARIABLES = ('ONEDNN_MAX_CPU_ISA', 'DNNL_MAX_CPU_ISA', 'OMP_NUM_THREADS')


@functools.lru_cache(maxsize=None)
def onednn_checked() -> tuple[bool, str]:
  """(whether the oneDNN form is offered on this machine, the reason if not): built,
  running oneDNN's AVX-512 kernels, and passing `check_against_xla` in a process of its
  own (about 15 s, once per machine: kept in <cache>/cpu_conv_check.json)."""
  import filelock  # pylint: disable=g-import-not-at-top
  library, reason = _library()
  if library is None:
    return False, reason
  if not library.ResaOneDnnAvx512():
    return False, ("oneDNN runs its pre-AVX-512 kernels here, whose AVX2 weight gradient "
                   "was seen wrong (a race of oneDNN 2.6.3's; see CHECKS)")
  path = cache_dir() / 'cpu_conv_check.json'
  machine = _machine() + ''.join(f' {k}={os.environ[k]}' for k in _ISA_VARIABLES
                                  if k in os.environ)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(path) + '.lock'):
      try:
        records = json.loads(path.read_text()) if path.exists() else {}
      except ValueError:  # a damaged record: checked again
        records = {}
      if machine not in records:
        records[machine] = _check_in_a_process()
        path.write_text(json.dumps(records, indent=1, sort_keys=True))
    reason = records[machine]
  except OSError:  # no cache folder to keep it in: checked in this process's life only
    reason = _check_in_a_process()
  return not reason, reason and f'the oneDNN form failed its check against XLA: {reason}'


def _check_in_a_process() -> str:
  env = {k: v for k, v in os.environ.items() if k not in ('RESA_CPU_CONV', 'XLA_FLAGS')}
  root = str(pathlib.Path(__file__).parents[2])
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [root, env.get('PYTHONPATH')]))
  env['JAX_PLATFORMS'] = 'cpu'
  try:
    done = subprocess.run(_CHECK_COMMAND, env=env, capture_output=True, text=True,
                          timeout=600)
  except subprocess.TimeoutExpired:
    return 'the check ran past 600 s'
  if done.returncode:
    how = (f'signal {signal.Signals(-done.returncode).name}' if done.returncode < 0
           else f'exit code {done.returncode}')
    last = (done.stderr.strip().splitlines() or [''])[-1][:200]
    return f'the check ended with {how}' + (f': {last}' if last else '')
  lines = done.stdout.strip().splitlines()
  try:
    return str(json.loads(lines[-1])['failed'])
  except (IndexError, ValueError, KeyError, TypeError):
    return f'the check printed no result: {done.stdout.strip()[-200:]!r}'


def _ffi(op: str, shape, *operands, strides, padding):
  (pt, pb), (pl, pr) = padding
  attrs = dict(sh=strides[0], sw=strides[1], pt=pt, pb=pb, pl=pl, pr=pr)
  return jax.ffi.ffi_call(_TARGETS[op], jax.ShapeDtypeStruct(shape, jnp.float32))(
      *operands, **{k: np.int64(v) for k, v in attrs.items()})


def _output_shape(x_shape, w_shape, strides, padding):
  return tuple([x_shape[0]] + [
      (x_shape[1 + d] + sum(padding[d]) - w_shape[d]) // strides[d] + 1 for d in range(2)]
      + [w_shape[3]])


# Each FFI call is partitioned along the batch (`custom_partitioning`): on a mesh, every
# device runs it on its own rows, and the weight gradient is summed over the devices.
# Without it, XLA would gather the whole batch onto every device for the call.

def _batch_axes(sharding):
  spec = sharding.spec if isinstance(sharding, NamedSharding) else P()
  return spec[0] if len(spec) else None


def _by_batch(mesh, arg_shapes, reduce: bool):
  """(the batch's mesh axes, the argument shardings): the batch axis as the first
  argument's, everything else replicated (the weights), or (reduce) both arguments
  split along their batch."""
  axes = _batch_axes(arg_shapes[0].sharding)
  rows = NamedSharding(mesh, P(axes))
  return axes, (rows, rows if reduce else NamedSharding(mesh, P()))


@functools.partial(custom_partitioning, static_argnums=(2, 3))
def _forward(x, w, strides, padding):
  return _ffi('forward', _output_shape(x.shape, w.shape, strides, padding), x, w,
              strides=strides, padding=padding)


def _forward_partition(strides, padding, mesh, arg_shapes, result_shape):
  del result_shape
  axes, shardings = _by_batch(mesh, arg_shapes, reduce=False)
  return mesh, lambda x, w: _forward(x, w, strides, padding), shardings[0], shardings


_forward.def_partition(
    partition=_forward_partition,
    infer_sharding_from_operands=lambda s, p, mesh, args, result: NamedSharding(
        mesh, P(_batch_axes(args[0].sharding))),
    sharding_rule='b h w c, k l c o -> b y z o')


@functools.partial(custom_partitioning, static_argnums=(2, 3, 4))
def _backward_data(g, w, x_shape, strides, padding):
  return _ffi('backward_data', (g.shape[0],) + tuple(x_shape[1:]), g, w, strides=strides,
              padding=padding)


def _backward_data_partition(x_shape, strides, padding, mesh, arg_shapes, result_shape):
  del result_shape
  axes, shardings = _by_batch(mesh, arg_shapes, reduce=False)
  return (mesh, lambda g, w: _backward_data(g, w, x_shape, strides, padding), shardings[0],
          shardings)


_backward_data.def_partition(
    partition=_backward_data_partition,
    infer_sharding_from_operands=lambda xs, s, p, mesh, args, result: NamedSharding(
        mesh, P(_batch_axes(args[0].sharding))),
    sharding_rule='b y z o, k l c o -> b h w c')


@functools.partial(custom_partitioning, static_argnums=(2, 3, 4))
def _backward_weights(x, g, w_shape, strides, padding):
  return _ffi('backward_weights', tuple(w_shape), x, g, strides=strides, padding=padding)


def _backward_weights_partition(w_shape, strides, padding, mesh, arg_shapes, result_shape):
  del result_shape
  axes, shardings = _by_batch(mesh, arg_shapes, reduce=True)

  def lower(x, g):  # this device's rows' gradient, summed over the devices
    local = _backward_weights(x, g, w_shape, strides, padding)
    return jax.lax.psum(local, axes) if axes else local
  return mesh, lower, NamedSharding(mesh, P()), shardings


_backward_weights.def_partition(
    partition=_backward_weights_partition,
    infer_sharding_from_operands=lambda ws, s, p, mesh, args, result: NamedSharding(mesh, P()),
    sharding_rule='b h w c, b y z o -> k l c o', reduction_factors=('b',))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def onednn_conv(x, w, strides, padding):
  """float32 NHWC x HWIO -> NHWC through oneDNN: `strides` (sh, sw), `padding`
  ((top, bottom), (left, right)); gradients through oneDNN too; split along the batch
  over a mesh."""
  return _forward(x, w, strides, padding)


def _onednn_fwd(x, w, strides, padding):
  return onednn_conv(x, w, strides, padding), (x, w)


def _onednn_bwd(strides, padding, residuals, g):
  x, w = residuals
  return (_backward_data(g, w, x.shape, strides, padding),
          _backward_weights(x, g, w.shape, strides, padding))


onednn_conv.defvjp(_onednn_fwd, _onednn_bwd)


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
    ready, reason = onednn_library()
    if not ready:
      raise RuntimeError(reason)
    if tuple(w.shape[:2]) == (1, 1) and tuple(strides) != (1, 1) and not np.any(padding):
      # oneDNN 2.6.3's strided 1x1 kernels corrupt the heap when the channels do not fill
      # its vector block (seen on AVX-512: 8 channels, stride 2): the same values from its
      # stride-1 kernel on every s-th pixel, which XLA slices out.
      x, strides = x[:, ::strides[0], ::strides[1]], (1, 1)
    return onednn_conv(x, w, tuple(strides), tuple(map(tuple, padding)))
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
  if jnp.dtype(dtype) == jnp.float32 and num_devices == 1 and onednn_checked()[0]:
    forms = ('onednn',) + forms
  return forms


def _machine() -> str:
  model, flags = platform.processor(), ''
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name') and not model:
          model = line.split(':', 1)[1].strip()
        elif line.startswith('flags'):
          flags = hashlib.sha256(line.encode()).hexdigest()[:12]
          break
  except OSError:
    pass
  source = hashlib.sha256(_SOURCE.read_bytes()).hexdigest()[:8]
  return (f'{model} {os.cpu_count()} cores flags:{flags} jax {jax.__version__} '
          f'{_SOURCE.name}:{source}')


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
  path, machine = cache_dir() / 'cpu_conv.json', _machine()
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


def main():
  """The check `onednn_checked` runs in a process of its own: prints one JSON line."""
  _, reason = onednn_library()
  print(json.dumps({'failed': reason or check_against_xla()}))
