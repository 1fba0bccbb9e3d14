"""Re-measures the numbers README.md and experiments/RESULTS.md quote and compares each
with the text, so that a change to the code or the documents that moves one is seen.

    python experiments/check_numbers.py             # the cheap checks, about 3 min on 2 cores
    python experiments/check_numbers.py --demo      # also the demo on its 3 seeds (about 45 min)
    python experiments/check_numbers.py --only=tiny_steps,reliability_tests
    python experiments/check_numbers.py --list      # the checks and the quoted values; no run

A check reads its quoted value(s) from a document with a regular expression that must match
exactly once, re-measures them with the command the document names, on the code as it is
(real subprocesses of `python -m resa_jax.main`, or the configs and tests themselves), and
passes when every value is within its tolerance.  Prints one line per check; exit 0 when all
pass, 1 when a value differs, 2 when a quoted value is missing from its document.

Deterministic numbers only: the kNN figures of the demo (same seed and device count give
the same run on the same software, README "Reliability") and counts.  Timings depend on
the machine and its load; their tables name their commands instead.
"""

from __future__ import annotations

import argparse
import ast
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
DEMO_DOCUMENTS = (('', README), ('_results_md', RESULTS))  # both hold the seeds' table
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


@functools.cache  # one run serves README's and RESULTS.md's copy of a row
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


def _load_config(path: str):
  import importlib.util  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(ROOT))  # configs import resa_jax.configs
  spec = importlib.util.spec_from_file_location('checked_config', ROOT / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _total_steps(config) -> int:
  from resa_jax import input_pipeline, train  # pylint: disable=g-import-not-at-top  (TensorFlow)
  return train.num_total_steps(config, input_pipeline.steps_per_epoch(config))


def _tiny_steps() -> list[float]:
  config = _load_config('tests/configs/tiny.py')
  plain = _total_steps(config)
  config.num_epochs = 3  # the reliability runs' --config.num_epochs=3
  return [plain, _total_steps(config)]


def _case_tables() -> list[float]:
  """Lengths of tests/test_reliability.py's BAD_INPUT and TOOL_BAD_INPUT tables."""
  tree = ast.parse((ROOT / 'tests' / 'test_reliability.py').read_text())
  sizes = {node.targets[0].id: len(node.value.elts) for node in tree.body
           if isinstance(node, ast.Assign) and isinstance(node.value, ast.List)
           and isinstance(node.targets[0], ast.Name)}
  return [sizes['BAD_INPUT'], sizes['TOOL_BAD_INPUT']]


def _reliability_tests() -> list[float]:
  out = subprocess.run([sys.executable, '-m', 'pytest', '--collect-only', '-q',
                        'tests/test_reliability.py'], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout
  return [sum(1 for line in out.splitlines() if '::' in line)]


def _row(seed: int) -> str:
  """A row of the demo table: | seed | **ReSA**% | random% | raw% | ..."""
  return rf'^\| {seed} \| \*\*([\d.]+)%\*\* \| ([\d.]+)% \| ([\d.]+)% \|'


CHECKS = [
    Check('tiny_steps', README,
          r'width-4 ResNet-18, (\d+) steps as it stands.*\n.*?: (\d+) steps,', _tiny_steps),
    Check('reliability_cases', README, r'^\*\*Bad input \(\d+ cases\)\.\*\* Each case is one '
          r'process\. (\d+) are parametrised', lambda: _case_tables()[:1]),
    Check('reliability_tool_cases', README, r'^\| bad input to `python -m resa_jax\.evaluate`'
          r'.*\| \*\*(\d+)/\1\*\*', lambda: _case_tables()[1:]),
    Check('reliability_tests', README, r'^\((\d+) tests; lines starting', _reliability_tests),
    *(Check(f'demo_baselines_seed{seed}{suffix}', document,
            rf'^\| {seed} \| \*\*[\d.]+%\*\* \| ([\d.]+)% \| ([\d.]+)% \|',
            lambda seed=seed: _demo_baselines(seed), KNN_TOLERANCE)
      for seed in DEMO_SEEDS[:1] for suffix, document in DEMO_DOCUMENTS),
    *(Check(f'demo_seed{seed}{suffix}', document, _row(seed), lambda seed=seed: _demo(seed),
            KNN_TOLERANCE, expensive=True)
      for seed in DEMO_SEEDS for suffix, document in DEMO_DOCUMENTS),
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
