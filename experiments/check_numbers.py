"""Re-measures the demo's kNN figures that README.md and experiments/RESULTS.md quote and
compares each with the text, so that a change to the code or the documents that moves one
is seen.

    python experiments/check_numbers.py             # the cheap checks (the demo's baselines)
    python experiments/check_numbers.py --demo      # also the demo on its 3 seeds (about 45 min)
    python experiments/check_numbers.py --only=demo_baselines,demo_output
    python experiments/check_numbers.py --list      # the checks and the quoted values; no run

A check reads its quoted value(s) from a document with a regular expression that must match
exactly once, re-measures them with the command the document names, on the code as it is
(real subprocesses of `python -m resa_jax.main`), and passes when every value is within its
tolerance.  Prints one line per check; exit 0 when all pass, 1 when a value differs, 2 when
a quoted value is missing from its document.

Deterministic numbers only: the same seed and device count give the same run on the same
software (docs/reliability.md).  Timings depend on the machine and its load; RESULTS.md
gives their commands instead (docs/development.md, "How numbers are recorded").
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from typing import Callable, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / 'README.md'
RESULTS = ROOT / 'experiments' / 'RESULTS.md'
DEMO_CONFIG = 'configs/fashion_mnist.py'
DEMO_SEEDS = (0, 1, 2)
KNN_TOLERANCE = 0.011  # the runs store kNN rounded to 2 decimals


@dataclasses.dataclass(frozen=True)
class Check:
  """`pattern` (re.M) matches once in `document`; its groups are the quoted values, in
  the order `measure()` returns them."""
  name: str
  document: pathlib.Path
  pattern: str
  measure: Callable[[], Sequence[float]]
  tolerance: float = 0.0
  expensive: bool = False

  def quoted(self) -> list[float]:
    matches = list(re.finditer(self.pattern, self.document.read_text(), re.M))
    if len(matches) != 1:
      raise LookupError(f'{self.name}: {len(matches)} matches of {self.pattern!r} in '
                        f'{self.document.relative_to(ROOT)} (expected 1)')
    return [float(v.replace(',', '')) for v in matches[0].groups()]


# ------------------------------------------------------------ measurements ----

def _run_main(*flags: str) -> dict:
  """`python -m resa_jax.main` in a fresh workdir; returns its history.json and
  results.json (the latter {} when the run stopped early)."""
  with tempfile.TemporaryDirectory() as tmp:
    workdir = pathlib.Path(tmp) / 'run'
    env = dict(os.environ, PYTHONPATH=f'{ROOT}{os.pathsep}' + os.environ.get('PYTHONPATH', ''))
    subprocess.run([sys.executable, '-m', 'resa_jax.main', f'--workdir={workdir}', *flags],
                   cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    results = workdir / 'results.json'
    return {'history': json.loads((workdir / 'history.json').read_text()),
            'results': json.loads(results.read_text()) if results.exists() else {}}


@functools.cache  # one run serves README's and RESULTS.md's copies
def _demo_baselines(seed: int) -> tuple[float, ...]:
  """The demo's kNN of its randomly initialised encoder and of raw pixels: the baselines
  a run measures before its first step (one step then, to stop early)."""
  history = _run_main(f'--config={DEMO_CONFIG}', f'--config.seed={seed}',
                      '--config.run_steps=1')['history']
  return history['knn_top1_random_init'], history['knn_top1_raw_pixels']


@functools.cache
def _demo(seed: int) -> tuple[float, ...]:
  results = _run_main(f'--config={DEMO_CONFIG}', f'--config.seed={seed}')['results']
  return results['knn_top1'], results['knn_top1_random_init'], results['knn_top1_raw_pixels']


def _row(seed: int) -> str:
  """A row of the demo table: | seed | **ReSA**% | random% | raw% | ..."""
  return rf'^\| {seed} \| \*\*([\d.]+)%\*\* \| ([\d.]+)% \| ([\d.]+)% \|'


def _demo_table() -> list[float]:
  """README's results row: the three seeds' kNN, then their random encoders', then raw."""
  runs = [_demo(seed) for seed in DEMO_SEEDS]
  return [r[0] for r in runs] + [r[1] for r in runs] + [runs[0][2]]


# What scripts/demo.sh prints at the end, as README's Quick start shows it for seed 0.
_OUTPUT_BASELINES = r'  randomly initialised encoder +: ([\d.]+)%\n  raw pixels +: ([\d.]+)%$'

CHECKS = [
    Check('demo_baselines', README, '^' + _OUTPUT_BASELINES, lambda: _demo_baselines(0),
          KNN_TOLERANCE),
    Check('demo_baselines_results_md', RESULTS,
          r'^\| 0 \| \*\*[\d.]+%\*\* \| ([\d.]+)% \| ([\d.]+)% \|', lambda: _demo_baselines(0),
          KNN_TOLERANCE),
    Check('demo_output', README,
          r'^  ReSA encoder after [\d.]+ epochs : ([\d.]+)%\n' + _OUTPUT_BASELINES,
          lambda: _demo(0), KNN_TOLERANCE, expensive=True),
    Check('demo_results_table', README,
          r'weighted kNN \*\*([\d.]+)%\*\*, ([\d.]+)%, ([\d.]+)% \(seeds 0, 1, 2\), against '
          r'([\d.]+)%, ([\d.]+)%, ([\d.]+)% for the same encoder randomly initialised; '
          r'raw pixels ([\d.]+)%', _demo_table, KNN_TOLERANCE, expensive=True),
    *(Check(f'demo_seed{seed}_results_md', RESULTS, _row(seed), lambda seed=seed: _demo(seed),
            KNN_TOLERANCE, expensive=True)
      for seed in DEMO_SEEDS),
]


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--demo', action='store_true', help='also re-run the demo on its seeds')
  parser.add_argument('--only', default='', help='comma-separated check names')
  parser.add_argument('--list', action='store_true', help='print the quoted values only')
  args = parser.parse_args(argv)
  only = [n for n in args.only.split(',') if n]
  unknown = sorted(set(only) - {c.name for c in CHECKS})
  if unknown:
    parser.error(f'unknown checks {unknown}; known: {[c.name for c in CHECKS]}')
  checks = [c for c in CHECKS if (c.name in only if only else args.demo or not c.expensive)]
  failed = 0
  for check in checks:
    try:
      quoted = check.quoted()
    except LookupError as e:
      print(f'error: {e}', file=sys.stderr)
      return 2
    if args.list:
      print(f'{check.name:32s} quoted {quoted}')
      continue
    try:
      measured = [float(v) for v in check.measure()]
    except subprocess.CalledProcessError as e:
      print(f'error: {check.name}: {" ".join(map(str, e.cmd))} exited {e.returncode}',
            file=sys.stderr)
      return 1
    ok = len(measured) == len(quoted) and all(
        abs(m - q) <= check.tolerance for m, q in zip(measured, quoted))
    failed += not ok
    print(f'{check.name:32s} {"ok  " if ok else "DIFF"} quoted {quoted} measured {measured}'
          f' (tolerance {check.tolerance:g})', flush=True)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
