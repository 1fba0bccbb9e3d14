"""What a run leaves for people to read: JSON files and PNG figures written atomically,
and the one-line error text every command prints.

Nothing here knows about models or data; every module that reports imports this one.
Writes are atomic (a temporary file in the same folder, then `os.replace`), so a
reader, or a run killed mid-write, never leaves half a file behind, and a write that
fails (a full disk) leaves the previous file as it was.  A write the system refuses
(full disk, quota, read-only file system, permission) is recognised by
`refused_write` and told in one line by `refused_write_line`; `require_writable`
refuses a folder that cannot be written before any work starts.
"""

from __future__ import annotations

import errno
import json
import math
import os
import pathlib
import re
import tempfile
from typing import Any, Callable

import numpy as np


# ------------------------------------------------------------------ text ----

def one_line(text: Any, max_len: int | None = None) -> str:
  """`text` with every run of white space (newlines included) folded to one space."""
  line = ' '.join(re.sub(r'\x1b\[[0-9;]*m', '', str(text)).split())
  return line if max_len is None else line[:max_len]


def first_line(error: BaseException) -> str:
  """The first non-empty line of an exception's message, or its type's name."""
  text = str(error).strip()
  return text.splitlines()[0].strip() if text else type(error).__name__


# errno of an access the system refused -> (what the error line says first, whether the
# path was being written for certain, what to do).
_REFUSED = {
    errno.ENOSPC: ('the disk is full', True,
                   'free some space there or write elsewhere; the files written before are kept'),
    errno.EDQUOT: ('the disk quota is used up', True,
                   'free some space there or write elsewhere; the files written before are kept'),
    errno.EROFS: ('the file system is read-only', True, 'choose a writable folder'),
    errno.EACCES: ('permission denied', False, 'check its permissions or use another path'),
    errno.EPERM: ('operation not permitted', False, 'check its permissions or use another path'),
}
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def refused_write(error: BaseException | None) -> OSError | None:
  """The OSError of an access the system refused (a full disk or quota, a read-only file
  system: writes; a permission) that `error` is or was caused by; None if none.

  TensorStore (orbax's array writer) raises ValueErrors that only say it in words
  ('... No space left on device [os_error_code=28]'): those count as the OSError."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _REFUSED:
      return error
    for code in DISK_FULL_ERRNOS:
      if os.strerror(code) in str(error):
        return OSError(code, os.strerror(code))
    error = error.__cause__ or error.__context__
  return None


def refused_write_line(error: OSError) -> str:
  """'the disk is full: cannot write PATH (No space left on device); ...' for an
  OSError that `refused_write` returned: what happened, where, what to do."""
  what, writing, advice = _REFUSED[error.errno]
  if error.filename:
    what += f': cannot write {error.filename}' if writing else f': {error.filename}'
  return f'{what} ({error.strerror}); {advice}'


def is_chief() -> bool:
  """True on the process that writes and prints (process 0)."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def say(text: str) -> None:
  """Prints on the first process only (every process runs the same program)."""
  if is_chief():
    print(text, flush=True)


# ----------------------------------------------------------------- files ----

def require_writable(path, flag: str) -> None:
  """ValueError (one line naming `flag`) unless this process may create files in the
  folder `path` or, when it does not exist yet, create it: the nearest existing folder
  above it must be writable.  Asks the file system (access, statvfs); writes nothing."""
  path = pathlib.Path(os.path.abspath(path))
  folder = path
  while not os.path.lexists(folder):
    folder = folder.parent
  if not folder.is_dir():
    raise ValueError(f'{flag}={path}: {folder} is not a directory')
  read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
  if read_only or not os.access(folder, os.W_OK | os.X_OK):
    why = 'is on a read-only file system' if read_only else f'is not writable by {_user()}'
    if folder == path:
      raise ValueError(f'{flag}={path} cannot be written: it {why}; choose a writable {flag}')
    raise ValueError(f'{flag}={path} cannot be created: {folder} {why}; choose a writable '
                     f'{flag}')


def _user() -> str:
  """'user NAME (uid N)' of this process (not $USER: a setuid or su'd process keeps it)."""
  import pwd  # pylint: disable=g-import-not-at-top
  uid = os.geteuid()
  try:
    return f'user {pwd.getpwuid(uid).pw_name} (uid {uid})'
  except KeyError:
    return f'uid {uid}'


def _json_default(x):
  import jax  # pylint: disable=g-import-not-at-top
  if isinstance(x, (np.generic, jax.Array)) and np.ndim(x) == 0:
    return np.asarray(x).item()
  if isinstance(x, (np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  raise TypeError(f'not JSON serialisable: {type(x).__name__}')


def _replace_atomically(path: str, write: Callable[[str], None], suffix: str) -> None:
  """Calls write(tmp_path) on a new file beside `path`, then renames it to `path`.

  A refused write (see `refused_write`) is raised as an OSError naming `path` (the
  temporary file's name would mean nothing to the reader); `path` is then unchanged."""
  path = os.path.abspath(os.fspath(path))
  folder = os.path.dirname(path)
  try:
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.',
                                    suffix=suffix)
    os.close(fd)
    try:
      write(tmp_path)
      os.chmod(tmp_path, 0o644)  # mkstemp creates 0600 files
      os.replace(tmp_path, path)
    except BaseException:
      if os.path.exists(tmp_path):
        os.unlink(tmp_path)
      raise
  except OSError as e:
    refused = refused_write(e)
    if refused is None:
      raise
    raise OSError(refused.errno, refused.strerror, path) from e


def _finite_json(x):
  """`x` with numpy/JAX values as Python ones and every NaN/Inf float as None."""
  if isinstance(x, dict):
    return {k: _finite_json(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite_json(v) for v in x]
  if not isinstance(x, (str, bool, int, type(None))) and not isinstance(x, float):
    try:
      x = _json_default(x)
    except TypeError:
      return x  # json.dump names it
    return _finite_json(x)
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def write_json(path, obj: Any) -> None:
  """Writes `obj` as JSON to `path` atomically; numpy/JAX scalars and arrays become
  numbers and lists.  The parent folder is created if needed.  Local paths only.

  The file is always valid JSON: a NaN or infinite number (which `json` would write
  as the invalid `NaN` / `Infinity`) is written as null, i.e. "not measured"."""
  obj = _finite_json(obj)

  def write(tmp_path):
    with open(tmp_path, 'w') as f:
      json.dump(obj, f, indent=2, allow_nan=False)
      f.write('\n')
      f.flush()
      os.fsync(f.fileno())
  _replace_atomically(path, write, '.tmp')


def save_figure(figure, path, dpi: int = 120) -> None:
  """Saves a matplotlib Figure as PNG atomically (no pyplot, no global backend)."""
  _replace_atomically(
      path, lambda tmp: figure.savefig(tmp, format='png', dpi=dpi, bbox_inches='tight'),
      '.png.tmp')


# kNN metrics the loop may measure: (history curve, baseline prefix, panel title).
_KNN_PANELS = (('knn', 'knn_top1', 'weighted kNN top-1'),
               ('knn5_euclidean', 'knn5_euclidean_top1', '5-NN Euclidean top-1'))
# Baselines: (history suffix, label, line style).  Raw pixels is drawn thin and dashed
# over a thick dotted random-init line, so two baselines of equal value both show.
_BASELINES = (('raw_pixels', 'raw pixels', dict(color='black', linestyle='--',
                                                linewidth=1.4, zorder=3)),
              ('random_init', 'random encoder', dict(color='tab:red', linestyle=':',
                                                     linewidth=3.2, zorder=2)))


def _knn_panels(history: dict) -> list[tuple[str, list, dict]]:
  """[(title, [(epoch, top-1)], {baseline label: (value, style)})] of every kNN metric
  the run measured (a curve point or a baseline); [] when kNN was off."""
  panels = []
  for curve, prefix, title in _KNN_PANELS:
    points = [(e, a) for e, a in history.get(curve) or [] if a is not None]
    baselines = {label: (history[f'{prefix}_{suffix}'], style)
                 for suffix, label, style in _BASELINES
                 if history.get(f'{prefix}_{suffix}') is not None}
    if points or baselines:
      panels.append((title, points, baselines))
  return panels


def _span(low: float, high: float, min_span: float) -> tuple[float, float]:
  """(low, high) padded by 8% of their distance, and to at least `min_span` wide."""
  pad = max(0.08 * (high - low), (min_span - (high - low)) / 2, 0.0)
  return low - pad, high + pad


def _plot_loss(ax, loss: list, total_steps: int | None) -> None:
  loss = [(s, v) for s, v in loss if v is not None and math.isfinite(v)]  # NaN: null
  if loss:
    steps, values = zip(*loss)
    ax.plot(steps, values, color='C0', marker='o' if len(loss) == 1 else None)
    ax.set_ylim(*_span(min(values), max(values), 0.02 * max(abs(v) for v in values) or 1.0))
  ax.set_xlim(0, max(total_steps or 0, loss[-1][0] if loss else 0) or 1)
  ax.set(xlabel='step', ylabel='ReSA loss', title='training loss')


def _plot_knn(ax, title: str, points: list, baselines: dict, num_epochs: float | None,
              prefix: str) -> None:
  """One kNN panel: the momentum encoder's top-1 over epochs (markers, so one point
  reads as a point), each baseline a horizontal line; the labels carry the values."""
  values = [a for _, a in points] + [v for v, _ in baselines.values()]
  if points:
    epochs, accs = zip(*points)
    ax.plot(epochs, accs, 'o-', color='C0', markersize=6, zorder=4,
            label=f'{prefix}ReSA momentum encoder (last {accs[-1]:.2f}%)')
  for label, (value, style) in baselines.items():
    ax.axhline(value, label=f'{prefix}{label} ({value:.2f}%)', **style)
  last_epoch = max([e for e, _ in points], default=0.0)
  ax.set_xlim(0, 1.04 * (max(num_epochs or 0.0, last_epoch) or 1.0))
  low, high = _span(min(values), max(values), 4.0)
  ax.set_ylim(max(low, 0.0), min(high, 100.0))
  ax.set(xlabel='epoch', ylabel='top-1 accuracy (%)', title=title)
  ax.grid(alpha=0.3)


def training_curves_figure(history: dict, *, total_steps: int | None = None,
                           num_epochs: float | None = None):
  """The Figure of `plot_training_curves`: loss over steps, one panel per kNN metric
  measured (none when kNN was off), the legend below all panels, off the data."""
  # A bare Figure (no pyplot): leaves the user's matplotlib backend alone.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  panels = _knn_panels(history)
  fig = Figure(figsize=(4.8 * (1 + len(panels)), 4.0), layout='constrained')
  axes = fig.subplots(1, 1 + len(panels), squeeze=False)[0]
  _plot_loss(axes[0], history.get('loss') or [], total_steps)
  for ax, (title, points, baselines) in zip(axes[1:], panels):
    _plot_knn(ax, title, points, baselines, num_epochs,
              f'{title.removesuffix(" top-1")}: ' if len(panels) > 1 else '')
  if panels:
    # 'outside': constrained layout keeps the legend clear of every axes.  One column
    # per panel; matplotlib fills the columns in order.
    handles = [h for ax in axes[1:] for h in ax.get_legend_handles_labels()[0]]
    fig.legend(handles=handles, loc='outside lower center', ncols=len(panels), fontsize=9,
               frameon=False)
  return fig


def plot_training_curves(history: dict, path, *, total_steps: int | None = None,
                         num_epochs: float | None = None) -> None:
  """training_curves.png: loss over steps and kNN top-1 over epochs, with baselines.

  `history` as train.py keeps it: 'loss' [(step, loss)], 'knn' [(epoch, top-1)],
  optional 'knn_top1_raw_pixels' and 'knn_top1_random_init'; on CIFAR also
  'knn5_euclidean' [(epoch, top-1)] with its '..._raw_pixels' / '..._random_init'.
  `total_steps` / `num_epochs`: where the x axes end (at least the last loss step and
  kNN epoch, which for a finished run are its end: it logs and measures its last step).
  """
  save_figure(training_curves_figure(history, total_steps=total_steps,
                                     num_epochs=num_epochs), path, dpi=100)
