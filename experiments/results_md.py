"""Writes one named section of experiments/RESULTS.md, leaving the others alone."""

from __future__ import annotations

import pathlib
import platform
import re

RESULTS = pathlib.Path(__file__).resolve().parent / 'RESULTS.md'
HEADER = '# Measured results\n\nEvery number here was measured by the command shown with it.\n'


def hardware() -> str:
  """A one-line description of this machine (CPU model, cores, accelerators)."""
  import os
  cpu = platform.processor() or platform.machine()
  flags = set()
  try:
    for line in open('/proc/cpuinfo'):
      if line.startswith('model name'):
        cpu = line.split(':', 1)[1].strip()
      elif line.startswith('flags'):
        flags = set(line.split(':', 1)[1].split())
        break
  except OSError:
    pass
  # XLA:CPU's speed differs by several times between AVX-512 and AVX2-only machines.
  vector = ('AVX-512' if 'avx512f' in flags else 'AVX2 only' if 'avx2' in flags
            else 'no AVX2' if flags else 'flags unknown')
  desc = f'{cpu}, {os.cpu_count()} cores, {vector}'
  try:
    import jax
    accel = [d.device_kind for d in jax.devices() if d.platform != 'cpu']
    if accel:
      desc += f', {len(accel)} x {accel[0]}'
  except Exception:  # pylint: disable=broad-except
    pass
  return desc


def write_section(title: str, body: str, path: pathlib.Path = RESULTS) -> None:
  """Replaces (or appends) the `## title` section of RESULTS.md with `body`."""
  text = path.read_text() if path.exists() else HEADER
  section = f'## {title}\n\n{body.strip()}\n'
  pattern = re.compile(rf'^## {re.escape(title)}\n.*?(?=^## |\Z)', re.S | re.M)
  if pattern.search(text):
    text = pattern.sub(lambda _: section + '\n', text, count=1)
  else:
    text = text.rstrip('\n') + '\n\n' + section
  path.write_text(text.rstrip('\n') + '\n')
