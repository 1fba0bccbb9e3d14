"""The training curves a run leaves (training_curves.png) and the one way every figure
is saved: a bare matplotlib Figure (no pyplot, so the user's backend is left alone)
written as PNG atomically."""

from __future__ import annotations

import importlib.util
import math

from resa_jax import reporting


def available() -> bool:
  """Whether matplotlib is installed: without it (the GPU machines this project is
  checked on) training and evaluation write their numbers and draw no figures."""
  return importlib.util.find_spec('matplotlib') is not None


def save_figure(figure, path, dpi: int = 120) -> None:
  """Saves a matplotlib Figure as PNG atomically (no pyplot, no global backend)."""
  reporting.replace_atomically(
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
