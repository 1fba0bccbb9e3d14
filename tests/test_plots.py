"""The figures a run leaves (training_curves.png, clustering.png, tsne.png) read at a
glance: no legend over the data, coinciding baselines both visible, no empty legend
or warning when kNN is off, one kNN point drawn as a point on a sensible axis, titles
and axis labels that say what is measured, on what distance and how many samples."""

import warnings

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
import numpy as np
import pytest

from resa_jax import plots
from resa_jax.evaluate import clustering

LOSS = [(1, 4.9), (100, 4.5), (200, 4.2), (300, 4.1)]
DEMO = {'loss': LOSS, 'knn': [(1.5, 83.32)], 'knn_top1_raw_pixels': 85.69,
        'knn_top1_random_init': 79.04}
CIFAR = {'loss': LOSS, 'knn': [(2.0, 42.44), (4.0, 44.01), (4.5, 44.11)],
         'knn_top1_raw_pixels': 45.65, 'knn_top1_random_init': 32.97,
         'knn5_euclidean': [(2.0, 39.15), (4.0, 41.01), (4.5, 40.92)],
         'knn5_euclidean_top1_raw_pixels': 34.04, 'knn5_euclidean_top1_random_init': 26.81}


@pytest.fixture(autouse=True)
def warnings_are_errors():
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    yield


def _drawn(figure):
  """(figure, renderer) after an Agg draw, the layout as it is saved."""
  canvas = FigureCanvasAgg(figure)
  canvas.draw()
  return figure, canvas.get_renderer()


def _assert_legends_clear_of_axes(figure, renderer):
  legends = list(figure.legends) + [ax.get_legend() for ax in figure.axes if ax.get_legend()]
  assert legends
  for legend in legends:
    box = legend.get_window_extent(renderer)
    assert figure.bbox.contains(box.x0, box.y0) and figure.bbox.contains(box.x1, box.y1)
    for ax in figure.axes:  # the axes' tight box: data, ticks, tick labels, axis labels
      assert not box.overlaps(ax.get_tightbbox(renderer)), ax.get_title()


def _labelled(ax):
  return ax.get_title() and ax.get_xlabel() and ax.get_ylabel()


def _legend_texts(figure):
  return [t.get_text() for legend in figure.legends for t in legend.get_texts()]


@pytest.mark.parametrize('history', [{'loss': LOSS, 'knn': []}, {'loss': [], 'knn': []},
                                     {'loss': [(5, 4.0)], 'knn': []}])
def test_knn_off_one_panel_no_legend_no_warning(history, tmp_path):
  figure, _ = _drawn(plots.training_curves_figure(history, total_steps=300))
  assert len(figure.axes) == 1 and _labelled(figure.axes[0])
  assert not figure.legends and figure.axes[0].get_legend() is None
  assert figure.axes[0].get_xlim() == (0.0, 300.0)
  plots.plot_training_curves(history, tmp_path / 'curves.png', total_steps=300,
                                 num_epochs=1.0)
  assert (tmp_path / 'curves.png').read_bytes()[:4] == b'\x89PNG'


@pytest.mark.parametrize('baselines', [True, False])
def test_one_knn_point_is_a_marker_on_an_axis_spanning_the_run(baselines):
  history = DEMO if baselines else {'loss': LOSS, 'knn': [(1.5, 83.32)]}
  figure, _ = _drawn(plots.training_curves_figure(history, total_steps=702,
                                                      num_epochs=1.5))
  ax = figure.axes[1]
  (curve,) = [line for line in ax.get_lines() if line.get_label().startswith('ReSA')]
  assert curve.get_marker() == 'o' and curve.get_markersize() >= 5
  low, high = ax.get_xlim()
  assert low == 0.0 and 1.5 < high <= 1.7  # the whole run, the point inside the frame
  low, high = ax.get_ylim()
  assert high - low >= 4.0  # points of accuracy, not a sliver around one value
  for value in [83.32] + ([85.69, 79.04] if baselines else []):
    assert low < value < high
  assert any('83.32' in text for text in _legend_texts(figure))


def test_coinciding_baselines_both_stay_visible():
  history = {'loss': LOSS, 'knn': [(1.0, 60.0)], 'knn_top1_raw_pixels': 50.0,
             'knn_top1_random_init': 50.0}
  figure, _ = _drawn(plots.training_curves_figure(history, num_epochs=1.0))
  ax = figure.axes[1]
  texts = _legend_texts(figure)
  assert 'raw pixels (50.00%)' in texts and 'random encoder (50.00%)' in texts
  # The pixels along y = 50 show both lines' colours, not only the one drawn last.
  pixels = np.asarray(figure.canvas.buffer_rgba())[..., :3].astype(float) / 255
  _, y = ax.transData.transform((0.5, 50.0))
  box = ax.get_window_extent()
  row = int(round(pixels.shape[0] - y))
  band = pixels[row - 5:row + 6, int(box.x0) + 4:int(box.x1) - 4]
  for style in (dict(plots._BASELINES[0][2]), dict(plots._BASELINES[1][2])):
    near = np.linalg.norm(band - np.array(to_rgb(style['color'])), axis=-1) < 0.25
    assert near.sum() > 100, style


@pytest.mark.parametrize('history,panels', [(DEMO, 1), (CIFAR, 2)])
def test_typical_run_legend_off_the_data_and_everything_labelled(history, panels):
  figure, renderer = _drawn(plots.training_curves_figure(history, total_steps=1755,
                                                             num_epochs=4.5))
  assert len(figure.axes) == 1 + panels
  assert all(_labelled(ax) for ax in figure.axes)
  assert [ax.get_xlabel() for ax in figure.axes] == ['step'] + ['epoch'] * panels
  _assert_legends_clear_of_axes(figure, renderer)
  for ax in figure.axes[1:]:
    assert ax.get_xlim()[0] == 0.0 and ax.get_xlim()[1] >= 4.5
  texts = ' '.join(_legend_texts(figure))
  for key, value in history.items():
    if key.endswith(('_raw_pixels', '_random_init')):
      assert f'{value:.2f}%' in texts, key


def _clustering_results(granularities):
  rng = np.random.default_rng(0)
  return {r: {g: {'silhouette_mean': rng.uniform(-0.2, 0.2), 'silhouette_std': 0.2,
                  'ari': rng.uniform(0, 1), 'nmi': rng.uniform(0, 1)} for g in granularities}
          for r in ('encoding', 'projector_hidden0', 'embedding')}


@pytest.mark.parametrize('granularities', [('class',), ('fine', 'coarse')])
def test_clustering_bars_say_what_they_measure(granularities, tmp_path):
  figure, renderer = _drawn(clustering._bars_figure(
      _clustering_results(granularities), metric='cosine', num_samples=10000,
      source='cifar10 test'))
  title = figure.get_suptitle()
  for words in ('silhouette mean', 'ARI', 'NMI', 'cosine distance', '10,000 cifar10 test'):
    assert words in title
  assert len(figure.axes) == 4 and all(_labelled(ax) for ax in figure.axes)
  assert [ax.get_title().split()[0] for ax in figure.axes] == [
      'silhouette', 'silhouette', 'ARI:', 'NMI:']
  for ax in figure.axes:  # every bar carries its value
    assert len(ax.texts) == 3 * len(granularities)
  if len(granularities) > 1:
    _assert_legends_clear_of_axes(figure, renderer)
  else:
    assert not figure.legends and all(ax.get_legend() is None for ax in figure.axes)
  clustering._plot_bars(_clustering_results(granularities), str(tmp_path / 'c.png'),
                        metric='euclidean', num_samples=10)
  assert (tmp_path / 'c.png').read_bytes()[:4] == b'\x89PNG'


def test_tsne_states_samples_and_metric():
  rng = np.random.default_rng(0)
  fine = rng.integers(0, 4, size=60)
  features = {'encoding': rng.normal(size=(60, 6)) + fine[:, None],
              'embedding': rng.normal(size=(60, 3))}
  figure, _ = _drawn(clustering._tsne_figure(
      features, {'fine': fine, 'coarse': fine // 2}, num_samples=40, metric='euclidean',
      seed=0, source='cifar100 test'))
  title = figure.get_suptitle()
  assert '40 cifar100 test samples' in title and 'euclidean distance' in title
  assert len(figure.axes) == 4 and all(_labelled(ax) for ax in figure.axes)
  assert figure.axes[0].get_xlabel() == 't-SNE 1'
