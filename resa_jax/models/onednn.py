"""2-D convolutions on the CPU through oneDNN, the library PyTorch's CPU convolutions use.

`conv` is a float32 NHWC x HWIO convolution (strides, explicit padding) whose forward,
input gradient and weight gradient are oneDNN's, called through XLA's FFI (`onednn.cc`,
three handlers).  The C++ file is compiled on first use into the cache folder
(`$RESA_CACHE_DIR`, else ~/.cache/resa_jax) against the oneDNN found on the machine
(Debian/Ubuntu's `libdnnl-dev`, which scripts/_setup.sh installs; `$RESA_ONEDNN_ROOT`
names another install).  On a mesh each call runs on every device's rows of the batch
(`custom_partitioning`), the weight gradient summed over the devices.

`checked()` says whether the form may be used on this machine: built, oneDNN running its
AVX-512 kernels, and its values and gradients equal to XLA's on every kind of
convolution the encoders build (`CHECKS`), checked once per machine in a process of its
own, so that a kernel that crashes takes down only that process.  Debian's oneDNN 2.6.3
was seen to crash and to race on some machines and shapes (`CHECKS` says which).
`resa_jax/models/cpu_conv.py` offers this form beside XLA's own where `checked()` holds.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import pathlib
import platform
import signal
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

_SOURCE = pathlib.Path(__file__).with_name('onednn.cc')
_TARGETS = {'forward': 'ResaConvForward', 'backward_data': 'ResaConvBackwardData',
            'backward_weights': 'ResaConvBackwardWeights'}


def cache_dir() -> pathlib.Path:
  """Where the compiled library and the measured choice are kept."""
  root = os.environ.get('RESA_CACHE_DIR') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'resa_jax')
  return pathlib.Path(root)


def machine() -> str:
  """This machine's name for the records kept in the cache folder: the CPU, its flags,
  the core count, the jax version and onednn.cc's."""
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


@functools.lru_cache(maxsize=None)
def _library() -> tuple[ctypes.CDLL | None, str]:
  """(onednn.cc compiled and loaded, or None and the reason); compiles it on first use
  (about 5 s), under a file lock other processes wait on, and registers its handlers."""
  import filelock  # pylint: disable=g-import-not-at-top
  root = os.environ.get('RESA_ONEDNN_ROOT')
  flags = ['-O2', '-std=c++17', '-shared', '-fPIC', '-w', f'-I{jax.ffi.include_dir()}']
  if root:
    flags += [f'-I{root}/include', f'-L{root}/lib', f'-Wl,-rpath,{root}/lib']
  key = hashlib.sha256(_SOURCE.read_bytes() + ' '.join(flags).encode()
                       + jax.__version__.encode()).hexdigest()[:16]
  path = cache_dir() / f'onednn_{key}.so'
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(path) + '.lock'):
      if not path.exists():
        with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
          made = pathlib.Path(scratch) / path.name
          subprocess.run([os.environ.get('CXX', 'c++'), *flags, str(_SOURCE), '-o',
                          str(made), '-ldnnl'], check=True, capture_output=True, timeout=300)
          os.replace(made, path)
    library = ctypes.CDLL(str(path))
  except (OSError, subprocess.SubprocessError) as e:
    detail = getattr(e, 'stderr', b'') or b''
    reason = (detail.decode(errors='replace').strip().splitlines() or [str(e)])[-1]
    return None, f'cannot build or load {_SOURCE.name} with oneDNN: {reason[:200]}'
  for name in _TARGETS.values():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)),
                                platform='cpu')
  return library, ''


def built() -> tuple[bool, str]:
  """(whether onednn.cc is built and its handlers registered with XLA, the reason if
  not).  Built is not usable: `checked` decides that."""
  library, reason = _library()
  return library is not None, reason


# The convolutions the oneDNN form is checked on before it is offered (forward and both
# gradients against XLA's, each 3 times, on every core): each kind the encoders build, at
# batches that split over the threads.  oneDNN 2.6.3 was seen to fail on these kinds in
# three ways: its AVX2 weight gradient of the 1x1 stride-2 downsample wrong in about half
# the runs on 2 threads (a race), its AVX2 7x7 stem refused, its AVX-512 strided 1x1 with
# 8 channels corrupting the heap (which `conv` avoids).  This check keeps a fault like
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


def _xla_conv(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def check_against_xla(form=None, repeats: int = 3) -> str:
  """'' if `form(x, w, strides, padding)` (this module's `conv` if None) gives XLA's
  float32 values and gradients on every `CHECKS` convolution `repeats` times, else what
  differed (or failed)."""
  form = form or conv
  rng = np.random.default_rng(0)
  for x_shape, w_shape, strides, padding in CHECKS:
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=w_shape), jnp.float32)
    g = jnp.asarray(rng.normal(size=_output_shape(x_shape, w_shape, strides, padding)),
                    jnp.float32)

    @functools.partial(jax.jit, static_argnums=0)
    def grads(fn, x, w, g, strides=strides, padding=padding):
      y, vjp = jax.vjp(lambda x, w: fn(x, w, strides, padding), x, w)
      return vjp(g), y
    (ref_gx, ref_gw), ref_y = grads(_xla_conv, x, w, g)
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
_CHECK_COMMAND = (sys.executable, '-c', 'from resa_jax.models import onednn; onednn.main()')
_ISA_VARIABLES = ('ONEDNN_MAX_CPU_ISA', 'DNNL_MAX_CPU_ISA', 'OMP_NUM_THREADS')


@functools.lru_cache(maxsize=None)
def checked() -> tuple[bool, str]:
  """(whether the oneDNN form is offered on this machine, the reason if not): built,
  running oneDNN's AVX-512 kernels, and passing `check_against_xla` in a process of its
  own (about 10 s, once per machine: kept in <cache>/onednn_check.json)."""
  import filelock  # pylint: disable=g-import-not-at-top
  library, reason = _library()
  if library is None:
    return False, reason
  if not library.ResaOneDnnAvx512():
    return False, ("oneDNN runs its pre-AVX-512 kernels here, whose AVX2 weight gradient "
                   "was seen wrong (a race of oneDNN 2.6.3's; see CHECKS)")
  path = cache_dir() / 'onednn_check.json'
  key = machine() + ''.join(f' {k}={os.environ[k]}' for k in _ISA_VARIABLES
                                  if k in os.environ)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(path) + '.lock'):
      try:
        records = json.loads(path.read_text()) if path.exists() else {}
      except ValueError:  # a damaged record: checked again
        records = {}
      if key not in records:
        records[key] = _check_in_a_process()
        path.write_text(json.dumps(records, indent=1, sort_keys=True))
    reason = records[key]
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
def _conv(x, w, strides, padding):
  return _forward(x, w, strides, padding)


def _onednn_fwd(x, w, strides, padding):
  return _conv(x, w, strides, padding), (x, w)


def _onednn_bwd(strides, padding, residuals, g):
  x, w = residuals
  return (_backward_data(g, w, x.shape, strides, padding),
          _backward_weights(x, g, w.shape, strides, padding))


_conv.defvjp(_onednn_fwd, _onednn_bwd)


def conv(x, w, strides, padding):
  """float32 NHWC x HWIO -> NHWC through oneDNN: `strides` (sh, sw), `padding`
  ((top, bottom), (left, right)); gradients through oneDNN too; split along the batch
  over a mesh.  Raises RuntimeError where onednn.cc is not built (`built`)."""
  ready, reason = built()
  if not ready:
    raise RuntimeError(reason)
  if tuple(w.shape[:2]) == (1, 1) and tuple(strides) != (1, 1) and not np.any(padding):
    # oneDNN 2.6.3's strided 1x1 kernels corrupt the heap when the channels do not fill
    # its vector block (seen on AVX-512: 8 channels, stride 2): the same values from its
    # stride-1 kernel on every s-th pixel, which XLA slices out.
    x, strides = x[:, ::strides[0], ::strides[1]], (1, 1)
  return _conv(x, w, tuple(strides), tuple(map(tuple, padding)))


def main():
  """The check `checked` runs in a process of its own: prints one JSON line."""
  _, reason = built()
  print(json.dumps({'failed': reason or check_against_xla()}))
