"""Re-renders the figures in experiments/figures from the JSON beside them, with the
plotting code the runs use (no training, no evaluation):

  NAME_history.json + NAME_results.json -> NAME_curves.png     (plots.plot_training_curves)
  NAME_clustering.json                  -> NAME_clustering.png (the evaluator's bar chart)

  python experiments/replot_figures.py [NAME ...]   # default: every NAME with its JSON

A figure without its JSON (the Fashion-MNIST runs kept results.json only) is left as is.
"""

from __future__ import annotations

import json
import pathlib
import sys

from resa_jax import plots
from resa_jax.evaluate import clustering

FIGURES = pathlib.Path(__file__).resolve().parent / 'figures'


def _read(path: pathlib.Path) -> dict:
  with open(path) as f:
    return json.load(f)


def replot(name: str) -> list[pathlib.Path]:
  """Re-renders NAME's figures that have their JSON; returns the PNGs written."""
  written = []
  history, results = FIGURES / f'{name}_history.json', FIGURES / f'{name}_results.json'
  if history.exists() and results.exists():
    run = _read(results)
    plots.plot_training_curves(_read(history), FIGURES / f'{name}_curves.png',
                                   total_steps=run['step'], num_epochs=run['epoch'])
    written.append(FIGURES / f'{name}_curves.png')
  table = FIGURES / f'{name}_clustering.json'
  if table.exists():
    summary = _read(table)
    source = ' '.join(summary[k] for k in ('dataset', 'split') if summary.get(k))
    # The evaluator's own bar chart (private: this script is its only other caller).
    plot_bars = clustering._plot_bars  # pylint: disable=protected-access
    plot_bars(summary['results'], str(FIGURES / f'{name}_clustering.png'),
              metric=summary['metric'], num_samples=summary['num_samples'], source=source)
    written.append(FIGURES / f'{name}_clustering.png')
  return written


def main(names: list[str]) -> None:
  names = names or sorted({p.name.rsplit('_', 1)[0] for p in FIGURES.glob('*_*.json')})
  for name in names:
    for path in replot(name):
      print(f'wrote {path.relative_to(FIGURES.parent.parent)}')


if __name__ == '__main__':
  main(sys.argv[1:])
