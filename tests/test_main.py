"""Training end to end in this process, in the manner of flax's examples/imagenet
train_test.py: `train.train_and_evaluate` on tests/configs/tiny.py over 8 simulated
devices, stopped part-way and resumed to the end.  The same through the real command is
tests/test_reliability.py's (`slow`)."""

import json

from helpers import checkpoint_steps, tiny_config
from resa_jax import data, train


def test_train_stop_resume_to_the_end(tmp_path, capsys, monkeypatch):
  workdir = tmp_path / 'run'
  config = tiny_config()
  config.run_steps = 5
  opened = []  # the data source is opened once per run (the baselines, the loop, the kNN)
  open_source = data.open_source
  monkeypatch.setattr(data, 'open_source',
                      lambda config: opened.append(config.dataset) or open_source(config))
  first = train.train_and_evaluate(config, workdir)
  assert opened == ['fake']
  out = capsys.readouterr().out
  assert 'stopped after 5 steps' in out
  assert not first['finished'] and not (workdir / 'results.json').exists()
  assert checkpoint_steps(workdir) == [3, 5]
  # Progress lines: step, epoch, loss, lr, EMA momentum, images/s and ETA.
  progress = [l for l in out.splitlines() if l.startswith('step 4/8')]
  assert progress and all(k in progress[0] for k in ('epoch', 'loss', 'lr', 'ema', 'img/s', 'ETA'))
  assert 'kNN top-1 before training' in out

  config.run_steps = -1
  results = train.train_and_evaluate(config, workdir)
  assert opened == ['fake'] * 2
  out = capsys.readouterr().out
  assert 'resumed at step 5' in out
  assert 'kNN top-1 before training' not in out  # baselines are kept
  assert results == json.loads((workdir / 'results.json').read_text())
  assert results['finished'] and results['step'] == 8 and results['epoch'] == 2.0
  for key in ('final_loss', 'knn_top1', 'knn_top1_raw_pixels', 'knn_top1_random_init',
              'images_per_sec', 'wall_time_sec'):
    assert isinstance(results[key], float), key
  assert 0 <= results['knn_top1'] <= 100 and results['images_per_sec'] > 0
  assert results['devices'] == 8
  history = json.loads((workdir / 'history.json').read_text())
  assert [round(e, 6) for e, _ in history['knn']] == [1.0, 2.0]
  assert history['knn'][-1][1] == results['knn_top1']
  assert [s for s, _ in history['loss']][-1] == 8
  assert results['wall_time_sec'] >= history['wall_time'] - 1e-6 > 0
  assert (workdir / 'training_curves.png').stat().st_size > 1000
  assert list(workdir.glob('events.out.tfevents.*')), 'no TensorBoard event file'
  steps = checkpoint_steps(workdir)
  assert steps[-1] == 8 and len(steps) <= 3


def test_raw_pixel_baseline_only_for_small_images(monkeypatch, capsys):
  """The random-encoder baseline always; raw pixels only up to RAW_PIXELS_MAX_SIDE a side
  (raw pixels of a 224 px image are 600 KB as float32)."""
  import types  # pylint: disable=g-import-not-at-top
  measured = []
  monkeypatch.setattr(train.training_knn, 'knn_accuracies',
                      lambda config, mesh, fn, num_classes, source: measured.append(fn) or
                      {'knn_top1': 10.0 * len(measured)})
  for side, with_raw in ((train.RAW_PIXELS_MAX_SIDE, True), (train.RAW_PIXELS_MAX_SIDE + 1, False)):
    measured.clear()
    config = tiny_config()
    config.crops_size = (side,)
    run = types.SimpleNamespace(config=config, history={}, mesh=None, initial_state=None,
                                source=None, info=types.SimpleNamespace(num_classes=4))
    train._measure_baselines(run, lambda state: 'the random encoder')  # pylint: disable=protected-access
    assert measured[0] == 'the random encoder' and len(measured) == 1 + with_raw
    assert run.history['knn_top1_random_init'] == 10.0
    assert ('knn_top1_raw_pixels' in run.history) == with_raw
    out = capsys.readouterr().out
    assert ('raw pixels skipped' in out) != with_raw, out
