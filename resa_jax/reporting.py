"""Files and refusals: JSON files written atomically, the one-line error text every
command prints, and the refusal of a write the system will not take.

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
# Where an errno is only in a text, these are the forms that carry it: TensorStore's
# status payload (`[os_error_code='28']`; tensorstore 0.1.86 raises a plain ValueError
# with no attribute for it: tests/test_faults.py writes to a real full disk through it)
# and Python's OSError string as a log record quotes it (`[Errno 28] ...`).
_TENSORSTORE_ERRNO = re.compile(r"\[os_error_code='?(\d+)'?\]")
_ERRNO_IN_TEXT = re.compile(r"\[os_error_code='?(\d+)'?\]|\[Errno (\d+)\]")


def refused_write(error: BaseException | None) -> OSError | None:
  """The OSError of an access the system refused (a full disk or quota, a read-only file
  system: writes; a permission) that `error` is or was caused by; None if none.

  By its errno: an OSError's attribute; for TensorStore's errors (orbax's array writer),
  ValueErrors that carry it only in their status text, that text (a full disk or quota
  only)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _REFUSED:
      return error
    match = _TENSORSTORE_ERRNO.search(str(error)) if isinstance(error, ValueError) else None
    if match and int(match.group(1)) in DISK_FULL_ERRNOS:
      return OSError(int(match.group(1)), os.strerror(int(match.group(1))))
    error = error.__cause__ or error.__context__
  return None


def refused_write_in_text(text: str) -> OSError | None:
  """`refused_write` of an error known only by its text (a log record's message that
  quotes it): a full disk or quota, by the errno the text carries."""
  match = _ERRNO_IN_TEXT.search(text)
  code = int(match.group(1) or match.group(2)) if match else None
  return OSError(code, os.strerror(code)) if code in DISK_FULL_ERRNOS else None


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


def replace_atomically(path: str, write: Callable[[str], None], suffix: str) -> None:
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


def json_line(obj: Any) -> str:
  """`obj` as one line of strict JSON for the console or a JSON-lines file: NaN and
  infinities as null (as `write_json` writes them), never the invalid `NaN`."""
  return json.dumps(_finite_json(obj), allow_nan=False)


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
  replace_atomically(path, write, '.tmp')
