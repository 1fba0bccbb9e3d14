"""`python -m resa_jax.evaluate` end to end (in this process), and the evaluation pieces
that need a model.  Its refusals are in tests/test_refusals.py.

The checkpoint is the tiny test config's TrainState, saved through checkpoints.Checkpoints
(no training: the numbers are those of a random network, but every one of them is
checked against an independent computation on the same features).
"""

import json
import math
import shutil

import jax
import numpy as np
import pytest
import tensorflow as tf
from sklearn import metrics as sk_metrics
from sklearn.neighbors import KNeighborsClassifier

from helpers import run_in_process, tiny_config
from resa_jax import checkpoints as checkpoints_lib
from resa_jax import convert
from resa_jax import evaluate
from resa_jax import data
from resa_jax import models
from resa_jax import sharding
from resa_jax import step as step_lib

STEP = 8


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(workdir, config, state): a training workdir with one checkpoint at step STEP.

  The momentum network differs from the online one (perturbed weights, and
  BatchNorm running statistics away from 0 / 1), so a wrong choice of network or
  of BatchNorm mode changes the features.
  """
  config = tiny_config()
  online_net, momentum_net = models.create_networks(config)
  tx = step_lib.create_optimizer(config, step_lib.learning_rate_schedule(config, 1, 1))
  state = jax.device_get(jax.jit(lambda: step_lib.create_train_state(
      jax.random.key(1), online_net, momentum_net, tx, (16, 16, 3)))())
  rng = np.random.default_rng(0)
  perturb = lambda x: x + 0.5 * np.std(x) * rng.normal(size=x.shape).astype(x.dtype)

  def perturb_stats(tree):  # running mean + N(0, 0.1^2), running var x U(0.5, 1.5)
    return {k: perturb_stats(v) if isinstance(v, dict) else
            v + 0.1 * rng.normal(size=v.shape).astype(v.dtype) if k == 'mean' else
            v * rng.uniform(0.5, 1.5, size=v.shape).astype(v.dtype)
            for k, v in tree.items()}

  state = state.replace(step=np.asarray(STEP, np.int32),
                        momentum_params=jax.tree.map(perturb, state.momentum_params),
                        momentum_batch_stats=perturb_stats(state.momentum_batch_stats))
  workdir = tmp_path_factory.mktemp('run')
  (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
  checkpoints = checkpoints_lib.Checkpoints(workdir / 'checkpoints', 3)
  checkpoints.save(STEP, state)
  checkpoints.close()
  return workdir, config, state


def eval_images(config, split):
  """All images and labels of `split`, un-augmented, in order (one device)."""
  mesh = sharding.create_mesh(jax.devices()[:1])
  images, labels = [], []
  for batch in data.eval_iterator(config, mesh, split, batch_size=16):
    mask = np.asarray(batch['mask'])
    images.append(np.asarray(batch['image'])[mask])
    labels.append(np.asarray(batch['label'])[mask])
  return np.concatenate(images), np.concatenate(labels)


def test_cli_knn_linear_clustering(run, tmp_path, monkeypatch, capsys):
  workdir, config, state = run
  out = tmp_path / 'eval'
  proc = run_in_process('resa_jax.evaluate', f'--checkpoint={workdir}',
                        '--eval=knn,linear,clustering', '--linear_epochs=3', '--batch_size=16',
                        '--save_features', f'--output={out}', monkeypatch=monkeypatch,
                        capsys=capsys)
  assert proc.code == 0, proc.stderr[-3000:]
  assert "features of 'train': 4/4 batches (100%)" in proc.stdout
  assert f'(step {STEP})' in proc.stdout and 'momentum encoder' in proc.stdout

  # The features are the momentum encoder's, in eval mode, of every example once.
  _, momentum_net = models.create_networks(config)
  variables = {'params': state.momentum_params, 'batch_stats': state.momentum_batch_stats}
  saved = {split: dict(np.load(out / f'features_{split}.npz')) for split in ('train', 'test')}
  for split in ('train', 'test'):
    images, labels = eval_images(config, split)
    encoding, embedding = momentum_net.apply(variables, images, train=False)
    np.testing.assert_allclose(saved[split]['encoding'], encoding, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(saved[split]['label'], labels)
  np.testing.assert_allclose(saved['test']['embedding'], embedding, rtol=1e-5, atol=1e-5)
  assert saved['test']['projector_hidden0'].shape == (64, config.mlp_dim)
  assert saved['test']['projector_hidden1'].min() >= 0  # after the ReLU
  train_x, train_y = saved['train']['encoding'], saved['train']['label']
  test_x, test_y = saved['test']['encoding'], saved['test']['label']

  knn = json.loads((out / 'knn.json').read_text())
  reference = KNeighborsClassifier(5).fit(train_x, train_y).score(test_x, test_y)
  assert knn['majority']['top1'] == pytest.approx(100 * reference)
  assert knn['weighted']['ks'] == [5, 10, 15, 20, 25]
  for k in knn['weighted']['ks']:
    assert 0 <= knn['weighted'][f'top1_k{k}'] <= knn['weighted'][f'top5_k{k}'] <= 100
  assert knn['num_train'] == knn['num_test'] == 64
  assert knn['checkpoint']['step'] == STEP and knn['checkpoint']['encoder'] == 'momentum'

  linear = json.loads((out / 'linear.json').read_text())
  assert linear['protocol'] == 'features' and linear['epochs'] == 3
  assert linear['batch_size'] == 64  # the batch used: --linear_batch_size 1000 > 64 rows
  assert 'linear probe training: 192/192 examples (100%)' in proc.stdout
  expected = evaluate.linear_probe_features(train_x, train_y, test_x, test_y, 4, epochs=3)
  for name in ('top1_last', 'top1_best', 'top5_last', 'best_epoch'):
    assert linear[name] == pytest.approx(expected[name])

  clustering = json.loads((out / 'clustering.json').read_text())
  names = ['encoding', 'projector_hidden0', 'projector_hidden1', 'embedding']
  assert clustering['representations'] == names and list(clustering['results']) == names
  assert clustering['num_samples'] == 64  # fewer examples than --clustering_samples
  encoding_metrics = clustering['results']['encoding']['class']
  assert encoding_metrics['silhouette_mean'] == pytest.approx(
      sk_metrics.silhouette_score(test_x, test_y, metric='cosine'), abs=1e-4)
  for values in clustering['results'].values():
    assert -1 <= values['class']['silhouette_mean'] <= 1 and -1 <= values['class']['ari'] <= 1
  assert (out / 'clustering.png').stat().st_size > 1000

  summary = json.loads((out / 'summary.json').read_text())
  assert list(summary['results']) == ['knn', 'linear', 'clustering']
  assert summary['devices'] == jax.device_count()


def test_ks_above_the_bank_are_left_out_with_a_note(run, tmp_path, monkeypatch, capsys):
  """Some k above the 64 examples of the bank: left out with a note line, the rest kept."""
  workdir, _, _ = run
  proc = run_in_process('resa_jax.evaluate', f'--checkpoint={workdir}', '--eval=knn',
                        '--knn_ks=5,64,65,1000', '--batch_size=16', f'--output={tmp_path}/eval',
                        monkeypatch=monkeypatch, capsys=capsys)
  assert proc.code == 0, proc.stderr[-3000:]
  assert 'note: k=65,1000 left out: more than the 64 examples of the memory bank' in proc.stdout
  assert json.loads((tmp_path / 'eval' / 'knn.json').read_text())['weighted']['ks'] == [5, 64]


def test_imagenet_linear_protocol_and_semi_supervised(run, tmp_path):
  workdir, config, state = run
  options = evaluate.Options(
      evaluations=['linear', 'semi'], encoder='online', batch_size=16,
      linear_protocol='imagenet', linear_epochs=1, linear_batch_size=16,
      semi_fraction=0.25, semi_epochs=1, semi_batch_size=16)
  summary = evaluate.run_evaluations(config, workdir, tmp_path, options)
  assert summary['checkpoint']['encoder'] == 'online'

  linear = json.loads((tmp_path / 'linear.json').read_text())
  assert linear['protocol'] == 'imagenet' and linear['steps'] == 4  # 64 / 16 per epoch
  assert linear['base_lr'] == 10.0 and linear['lr_milestones'] == [1, 1]
  assert linear['pretrain_batch_size'] == config.batch_size  # read from its config.json
  assert linear['pretrain_batch_size_from'] == 'the checkpoint'
  assert linear['num_eval'] == 64 and math.isfinite(linear['train_loss'])
  assert 0 <= linear['top1_last'] <= linear['top5_last'] <= 100
  assert linear['top1_best'] == max(linear['top1_by_epoch']) >= linear['top1_last']

  semi = json.loads((tmp_path / 'semi.json').read_text())
  _, train_labels = eval_images(config, 'train')
  assert semi['num_labelled'] == len(data.balanced_subset(train_labels, 0.25))
  assert semi['steps'] == 1 and math.isfinite(semi['train_loss'])
  assert 0 <= semi['top1_last'] <= semi['top5_last'] <= 100
  assert semi['top1_best'] == semi['top1_last']  # one epoch
  assert summary['results']['semi']['top1_best'] == semi['top1_best']
  assert summary['dtype'] == 'float32'


def test_imagenet_linear_lr_follows_the_pretraining_batch(run, tmp_path):
  """The authors' default linear lr is 40 for checkpoints pre-trained with batch 1024,
  10 for batch 256: read from the workdir's config.json, not from --config."""
  workdir, config, _ = run
  copy = tmp_path / 'run_b1024'
  shutil.copytree(workdir, copy)
  trained = json.loads((copy / 'config.json').read_text())
  trained['batch_size'] = 1024
  (copy / 'config.json').write_text(json.dumps(trained))
  options = evaluate.Options(evaluations=['linear'], batch_size=16, linear_protocol='imagenet',
                             linear_epochs=1, linear_batch_size=16)
  evaluate.run_evaluations(config, copy, tmp_path / 'eval', options)
  linear = json.loads((tmp_path / 'eval' / 'linear.json').read_text())
  assert linear['pretrain_batch_size'] == 1024 and linear['base_lr'] == 40.0


def test_restore_errors_name_the_cause(run, tmp_path):
  workdir, config, _ = run
  mesh = sharding.create_mesh()
  wide = tiny_config()
  wide.width_per_group = 8
  with pytest.raises(evaluate.EvaluationError, match=r'its config.json has width_per_group=4'):
    evaluate.load_model(wide, workdir, mesh)
  adamw = tiny_config()
  adamw.optimizer = 'adamw'
  with pytest.raises(evaluate.EvaluationError,
                     match=r'optimizer state that --config \(optimizer=adamw'):
    evaluate.load_model(adamw, workdir, mesh)
  (tmp_path / 'empty' / 'checkpoints').mkdir(parents=True)
  with pytest.raises(evaluate.EvaluationError, match='neither a training workdir'):
    evaluate.load_model(config, tmp_path / 'empty', mesh)
  with pytest.raises(evaluate.EvaluationError, match="'momentum' or 'online'"):
    evaluate.load_model(config, workdir, mesh, encoder='target')


def test_sharded_and_single_device_features_are_identical(run):
  """8 devices x 2 examples give bit for bit the features of 1 device x 2 examples.

  (1 device x 16 examples agrees to float32 rounding only: XLA's CPU convolutions
  and matmuls block their loops by the batch size.)
  """
  workdir, config, _ = run
  features = {}
  for num_devices, batch_size in ((1, 2), (8, 16), (1, 16)):
    mesh = sharding.create_mesh(jax.devices()[:num_devices])
    model = evaluate.load_model(config, workdir, mesh)
    features[num_devices, batch_size] = evaluate.features.extract_split(
        config, mesh, model.feature_fn(mesh, layers=True), 'test',
        batch_size=batch_size, num_examples=64)
  assert len(jax.devices()) == 8
  sharded, sharded_labels = features[8, 16]
  assert sorted(sharded) == ['embedding', 'encoding', 'projector_hidden0',
                             'projector_hidden1']
  for (single, single_labels), exact in ((features[1, 2], True), (features[1, 16], False)):
    assert sorted(single) == sorted(sharded)
    for name in single:
      assert single[name].shape[0] == 64
      if exact:
        np.testing.assert_array_equal(single[name], sharded[name], err_msg=name)
      else:
        np.testing.assert_allclose(single[name], sharded[name], rtol=1e-5, atol=1e-5,
                                   err_msg=name)
    np.testing.assert_array_equal(single_labels['label'], sharded_labels['label'])


def test_converted_checkpoints(run, tmp_path):
  _, config, state = run
  mesh = sharding.create_mesh()
  metadata = {k: config[k] for k in ('arch', 'width_per_group', 'stem', 'mlp_layers',
                                     'mlp_dim', 'emb_dim')}
  full = tmp_path / 'full'
  convert.save_converted(full, {'params': state.params, 'batch_stats': state.batch_stats,
                                'momentum_params': state.momentum_params,
                                'momentum_batch_stats': state.momentum_batch_stats}, metadata)
  model = evaluate.load_model(config, full, mesh)
  assert model.source['kind'] == 'converted' and model.source['encoder'] == 'momentum'
  assert model.has_projector
  for got, want in zip(jax.tree.leaves(model.variables['params']),
                       jax.tree.leaves(state.momentum_params)):
    np.testing.assert_array_equal(np.asarray(got), want)

  encoder_only = tmp_path / 'encoder_only'
  convert.save_converted(encoder_only, {'params': {'encoder': state.params['encoder']},
                                        'batch_stats': {'encoder': state.batch_stats['encoder']}},
                         metadata)
  model = evaluate.load_model(config, encoder_only, mesh)
  assert model.source['encoder'].startswith('online') and not model.has_projector

  with pytest.raises(evaluate.EvaluationError, match='converted for another architecture'):
    other = tiny_config()
    other.mlp_dim = 64
    evaluate.load_model(other, full, mesh)


def test_subsets_and_schedules():
  labels = np.repeat(np.arange(5), [10, 20, 30, 1, 39])
  subset = data.balanced_subset(labels, 0.1, seed=3)
  assert np.array_equal(subset, data.balanced_subset(labels, 0.1, seed=3))
  assert np.bincount(labels[subset]).tolist() == [1, 2, 3, 1, 4]
  assert np.all(np.diff(subset) > 0)

  one, ten = (data.imagenet_subset_file_names(f) for f in (0.01, 0.1))
  assert (len(one), len(ten)) == (12811, 128116) and len(set(one)) == len(one)
  assert all(n.endswith('.JPEG') and n.startswith('n') for n in one[:100])
  with pytest.raises(ValueError, match='1% and 10%'):
    data.imagenet_subset_file_names(0.05)
  keep = data.subsets.file_name_filter(one)
  records = tf.data.Dataset.from_tensor_slices(
      {'file_name': [one[0], 'n01440764_0.JPEG', one[-1], 'x.JPEG'], 'label': [0, 1, 2, 3]})
  kept = [int(r['label']) for r in records.filter(keep).as_numpy_iterator()]
  assert kept == [0, 2]

  step = [float(evaluate.linear.epoch_lr_factor('step', e, 100)) for e in (0, 59, 60, 79, 80, 99)]
  assert step == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
  cosine = [float(evaluate.linear.epoch_lr_factor('cosine', e, 20)) for e in (0, 10, 19)]
  assert cosine == pytest.approx([1.0, 0.5, (1 + math.cos(math.pi * 19 / 20)) / 2],
                                rel=1e-5, abs=1e-7)  # float32

  assert evaluate.run.parse_evaluations('clustering, knn,knn') == ['clustering', 'knn']
  with pytest.raises(evaluate.EvaluationError, match='unknown evaluation'):
    evaluate.run.parse_evaluations('knn,svm')
  with pytest.raises(evaluate.EvaluationError, match='semi_fraction'):
    evaluate.Options(evaluations=['semi'], semi_fraction=0.0).check()


def test_clustering_at_fine_and_coarse_granularity_on_mock_cifar100(run, tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  workdir = run[0]
  config = tiny_config()
  config.dataset, config.data_dir = 'cifar100', str(tmp_path / 'tfds')
  options = evaluate.Options(evaluations=['clustering'], batch_size=16, clustering_samples=30)
  with tfds.testing.mock_data(num_examples=40):
    evaluate.run_evaluations(config, workdir, tmp_path / 'eval', options)
  saved = json.loads((tmp_path / 'eval' / 'clustering.json').read_text())
  assert saved['granularities'] == ['fine', 'coarse'] and saved['num_samples'] == 30
  for values in saved['results'].values():
    assert set(values) == {'fine', 'coarse'}
    assert all(-1 <= v['silhouette_mean'] <= 1 for v in values.values())


def test_evaluation_runs_in_float32_whatever_the_training_dtype(run, tmp_path):
  """The authors evaluate in float32 (no autocast): a bfloat16 training config gives the
  float32 features unless --dtype=as_trained asks for its own."""
  workdir, config, _ = run
  bf16 = tiny_config()
  bf16.dtype = 'bfloat16'
  results = {}
  for name, cfg, dtype in (('f32', config, 'float32'), ('default', bf16, 'float32'),
                           ('as_trained', bf16, 'as_trained')):
    options = evaluate.Options(evaluations=['knn'], batch_size=16, dtype=dtype)
    results[name] = evaluate.run_evaluations(cfg, workdir, tmp_path / name, options)
  assert results['default']['dtype'] == 'float32' and results['as_trained']['dtype'] == 'bfloat16'
  assert results['default']['results']['knn']['weighted'] == results['f32']['results']['knn'][
      'weighted']
  assert bf16.dtype == 'bfloat16'  # the caller's config is not changed
