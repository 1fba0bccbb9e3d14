"""Times resa_jax's log-domain Sinkhorn against ott-jax and a plain exp-domain version.

    python experiments/bench_sinkhorn.py [--sizes 256,1024,4096] [--repeats 20] [--min_seconds 2]

For b = B in `sizes`: the same (b, B) cosine-like scores, epsilon 0.05, 3 iterations,
row marginal 1 per row and column marginal b / B per column for every solver.  Each
function is jit-compiled and warmed up first (compile time excluded); the table
shows the median wall time over rounds that call each solver once in turn (at
least `repeats` rounds; more for fast sizes, about `min_seconds` per solver).  The
outputs are checked to agree before anything is timed.  The table is printed and written to
experiments/RESULTS.md ("Sinkhorn" section) with the hardware named.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import results_md  # noqa: E402
from resa_jax import sinkhorn as resa_sinkhorn  # noqa: E402

EPSILON, NUM_ITERS = 0.05, 3


def exp_domain(scores):
  """The authors' iteration as written: exp(S / eps), then divisions."""
  q = jnp.exp(scores / EPSILON).T
  num_rows, num_cols = q.shape
  q = q / jnp.sum(q)
  for _ in range(NUM_ITERS):
    q = q / jnp.sum(q, axis=1, keepdims=True) / num_rows
    q = q / jnp.sum(q, axis=0, keepdims=True) / num_cols
  return (q * num_cols).T


def ott_sinkhorn(scores):
  from ott.geometry import geometry
  from ott.problems.linear import linear_problem
  from ott.solvers.linear import sinkhorn
  b, big_b = scores.shape
  geom = geometry.Geometry(cost_matrix=-scores, epsilon=EPSILON)
  problem = linear_problem.LinearProblem(geom, a=jnp.full((b,), 1.0 / b),
                                         b=jnp.full((big_b,), 1.0 / big_b))
  solver = sinkhorn.Sinkhorn(lse_mode=True, threshold=0.0, inner_iterations=1,
                             min_iterations=NUM_ITERS, max_iterations=NUM_ITERS,
                             implicit_diff=None)
  out = solver(problem)
  return out.matrix * b  # rows sum to 1, as ReSA's assignment


def time_interleaved(solvers, x, repeats, min_seconds):
  """({name: median seconds}, rounds): rounds call each solver once, in turn.

  Interleaving spreads any drift of the machine (frequency, other processes)
  over all solvers alike.  At least `repeats` rounds, more for fast calls: as
  many as fit in about `min_seconds` per solver.
  """
  for fn in solvers.values():  # compile + warm-up
    fn(x).block_until_ready()
    fn(x).block_until_ready()
  times = {name: [] for name in solvers}
  rounds = repeats
  while len(times[next(iter(solvers))]) < rounds:
    for name, fn in solvers.items():
      start = time.perf_counter()
      fn(x).block_until_ready()
      times[name].append(time.perf_counter() - start)
    slowest = max(statistics.median(t) for t in times.values())
    rounds = max(repeats, min(100 * repeats, int(min_seconds / slowest)))
  return {name: statistics.median(t) for name, t in times.items()}, rounds


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', default='256,1024,4096')
  parser.add_argument('--repeats', type=int, default=20, help='at least this many rounds')
  parser.add_argument('--min_seconds', type=float, default=2.0,
                      help='more rounds for fast sizes: about this long per solver')
  parser.add_argument('--no-write', action='store_true', help='do not update RESULTS.md')
  args = parser.parse_args()

  solvers = {
      'resa_jax (log domain)': jax.jit(lambda s: resa_sinkhorn.sinkhorn(s, EPSILON, NUM_ITERS)),
      'ott-jax 0.6 (lse_mode)': jax.jit(ott_sinkhorn),
      'exp domain (reference)': jax.jit(exp_domain),
  }
  rows = []
  for size in [int(s) for s in args.sizes.split(',')]:
    rng = np.random.default_rng(size)
    x = rng.normal(size=(size, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    scores = jnp.asarray(x @ x.T)  # (b, B) cosine similarities
    outputs = {name: np.asarray(fn(scores)) for name, fn in solvers.items()}
    reference = outputs['resa_jax (log domain)']
    max_diff = {name: float(np.abs(out - reference).max()) for name, out in outputs.items()}
    for name, diff in max_diff.items():
      if not diff < 1e-4:
        raise SystemExit(f'{name} disagrees with resa_jax at size {size}: max |diff| {diff:.2e}')
    timings, rounds = time_interleaved(solvers, scores, args.repeats, args.min_seconds)
    rows.append((size, timings, max_diff, rounds))
    print(f'b = B = {size}: ' + ', '.join(f'{n} {t * 1e3:.3f} ms' for n, t in timings.items()),
          flush=True)

  names = list(solvers)
  lines = ['| b = B | ' + ' | '.join(f'{n} (ms)' for n in names) +
           ' | resa_jax / ott-jax | rounds |', '|---' * (len(names) + 3) + '|']
  for size, timings, _, rounds in rows:
    ratio = timings[names[0]] / timings[names[1]]
    lines.append(f'| {size} | ' + ' | '.join(f'{timings[n] * 1e3:.3f}' for n in names) +
                 f' | {ratio:.2f} | {rounds} |')
  worst = max(max(r[2].values()) for r in rows)
  table = '\n'.join(lines)
  print(table)
  body = (f'Command: `python experiments/bench_sinkhorn.py --sizes {args.sizes} --repeats '
          f'{args.repeats} --min_seconds {args.min_seconds:g}`  \n'
          f'Hardware: {results_md.hardware()}; jax {jax.__version__}, '
          f'backend {jax.default_backend()}.  \nepsilon {EPSILON}, {NUM_ITERS} iterations, '
          f'float32; median over rounds that call each solver once in turn (at least '
          f'{args.repeats}, about {args.min_seconds:g} s per solver), after compilation; all '
          f'outputs agree within '
          f'{worst:.1e} (max abs).\n\n{table}')
  if not args.no_write:
    results_md.write_section('Sinkhorn', body)


if __name__ == '__main__':
  main()
