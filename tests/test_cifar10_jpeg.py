"""The CIFAR-10 JPEG snapshot as a dataset (`cifar10_jpeg`): a small slice of the real
archive, checked against an independent decoding of the same files, and the whole
archive's class counts and pixel means against the snapshot's README."""

import os
import pathlib
import tarfile

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from resa_jax.configs import cifar10_jpeg
from resa_jax import data, sharding
from resa_jax.data import local_files

ARCHIVE = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'datasets' / 'cifar10_jpeg.tar.gz'
pytestmark = [pytest.mark.data,
              pytest.mark.skipif(not ARCHIVE.is_file(), reason=f'{ARCHIVE} not found')]
PER_CLASS = {'train': 4, 'test': 2}


@pytest.fixture(scope='module')
def slice_dir(tmp_path_factory):
  """train/ and test/ with the first PER_CLASS[split] files of every class folder."""
  root = tmp_path_factory.mktemp('cifar10_jpeg')
  taken = {}
  with tarfile.open(ARCHIVE) as archive:
    for member in archive:
      parts = member.name.split('/')
      if member.isfile() and len(parts) == 3:
        key = tuple(parts[:2])
        if taken.get(key, 0) < PER_CLASS[parts[0]]:
          taken[key] = taken.get(key, 0) + 1
          archive.extract(member, root, filter='data')
  return root


def config_for(path):
  config = cifar10_jpeg.get_config()
  config.data_dir = str(path)
  config.batch_size = 8
  return config


def whole(snapshot, split):
  return snapshot.rows(split, 0, len(snapshot.labels[split]))


def test_slice_matches_the_files_and_class_order(slice_dir):
  snapshot = local_files.load_cifar10_jpeg(str(slice_dir))
  for split, per_class in PER_CLASS.items():
    images, labels = whole(snapshot, split)
    part, part_labels = snapshot.rows(split, 3, 7)  # a range alone: the same rows
    np.testing.assert_array_equal(part, images[3:7])
    np.testing.assert_array_equal(part_labels, labels[3:7])
    assert images.shape == (10 * per_class, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.repeat(np.arange(10), per_class))
    for index in (0, len(labels) - 1):
      class_name = local_files.CIFAR10_CLASSES[labels[index]]
      folder = slice_dir / split / class_name
      name = sorted(os.listdir(folder))[index % per_class]
      expected = tf.io.decode_jpeg((folder / name).read_bytes(), channels=3).numpy()
      np.testing.assert_array_equal(images[index], expected)
      pil = np.asarray(Image.open(folder / name).convert('RGB')).astype(int)
      assert np.abs(images[index].astype(int) - pil).mean() < 3  # the same picture


def test_source_info_and_pipelines(slice_dir):
  config = config_for(slice_dir)
  info = data.dataset_info(config)
  assert (info.num_train_examples, info.num_eval_examples, info.num_classes) == (40, 20, 10)
  assert info.mean == (0.4914, 0.4822, 0.4465)  # CIFAR-10's statistics, as the authors'
  mesh = sharding.create_mesh()
  for augment_on in ('host', 'device'):
    config.augment_on = augment_on
    batch = next(data.train_iterator(config, mesh))
    assert [v.shape for v in batch['views']] == [(8, 32, 32, 3)] * 2
  first = next(data.eval_iterator(config, mesh, 'test', batch_size=8))
  images, labels = whole(local_files.load_cifar10_jpeg(str(slice_dir)), 'test')
  expected = (images[:8] / 255.0 - np.asarray(info.mean)) / np.asarray(info.std)
  np.testing.assert_allclose(np.asarray(first['image']), expected, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(first['label']), labels[:8])


def test_archive_and_folder_give_the_same_arrays(slice_dir, tmp_path):
  archive = tmp_path / 'slice.tar.gz'
  with tarfile.open(archive, 'w:gz') as tar:
    for split in PER_CLASS:
      tar.add(slice_dir / split, arcname=split)
  from_folder = local_files.load_cifar10_jpeg(str(slice_dir))
  from_archive = local_files.load_cifar10_jpeg(str(archive))
  for split in PER_CLASS:
    for a, b in zip(whole(from_folder, split), whole(from_archive, split)):
      np.testing.assert_array_equal(a, b)


def test_a_path_given_is_used_or_refused_never_replaced(slice_dir, tmp_path, monkeypatch):
  """--config.data_dir, else $RESA_CIFAR10_JPEG, else the default: the first given is
  used, or refused with one line naming it; never another copy found elsewhere."""
  monkeypatch.setenv(local_files.CIFAR10_JPEG_ENV, str(slice_dir))
  assert local_files.cifar10_jpeg_path(None) == str(slice_dir)
  (tmp_path / 'empty').mkdir()
  for given, env, found in ((tmp_path / 'typo', str(slice_dir), 'does not exist'),
                            (None, str(tmp_path / 'typo'), 'does not exist'),
                            (tmp_path / 'empty', str(slice_dir), 'is neither')):
    monkeypatch.setenv(local_files.CIFAR10_JPEG_ENV, env)
    with pytest.raises(data.DatasetNotFoundError,
                       match=rf"(typo|empty) \((--config.data_dir|\$RESA_CIFAR10_JPEG)\) {found}"
                       ) as error:
      data.dataset_info(config_for(given) if given else
                        cifar10_jpeg.get_config())
    assert '\n' not in str(error.value)


@pytest.mark.parametrize('damage', ['truncated', 'not_gzip', 'not_a_jpeg'])
def test_a_damaged_snapshot_is_one_line_naming_it(damage, slice_dir, tmp_path):
  archive = tmp_path / 'slice.tar.gz'
  with tarfile.open(archive, 'w:gz') as tar:
    for split in PER_CLASS:
      tar.add(slice_dir / split, arcname=split)
  if damage == 'truncated':
    archive.write_bytes(archive.read_bytes()[:len(archive.read_bytes()) // 2])
  elif damage == 'not_gzip':
    archive.write_bytes(b'this is not an archive' * 100)
  else:
    folder = tmp_path / 'folder'
    for split in PER_CLASS:
      (folder / split).mkdir(parents=True)
      for class_dir in (slice_dir / split).iterdir():
        (folder / split / class_dir.name).mkdir()
        for f in class_dir.iterdir():
          (folder / split / class_dir.name / f.name).write_bytes(f.read_bytes())
    broken = sorted((folder / 'train' / 'cat').iterdir())[0]
    broken.write_bytes(b'not a jpeg at all')
    archive = folder
  with pytest.raises(data.DatasetNotFoundError) as error:
    source = data.open_source(config_for(archive))
    source.rows('train', 0, 40)
  message = str(error.value) if error.type is data.DatasetNotFoundError else ''
  assert '\n' not in message and str(archive) in message
  assert ('damaged or truncated' in message if damage != 'not_a_jpeg'
          else 'train/cat/' in message and 'is not a JPEG file' in message), message


def test_whole_archive_statistics():
  """The full snapshot: 5,000 / 1,000 images per class, and its README's pixel means."""
  snapshot = local_files.load_cifar10_jpeg(str(ARCHIVE))
  train_images, train_labels = whole(snapshot, 'train')
  assert np.bincount(train_labels).tolist() == [5000] * 10
  assert np.bincount(snapshot.labels['test']).tolist() == [1000] * 10
  mean = train_images.reshape(-1, 3).mean(axis=0) / 255.0
  np.testing.assert_allclose(mean, (0.4868, 0.4822, 0.4414), atol=6e-4)


@pytest.mark.slow
def test_training_reports_the_authors_5nn_metric(slice_dir, tmp_path):
  """results.json names the 5-NN Euclidean majority vote apart from the weighted kNN;
  its raw-pixel baseline equals scikit-learn's 5-NN on the same normalised pixels."""
  from sklearn.neighbors import KNeighborsClassifier
  from resa_jax import train
  config = config_for(slice_dir)
  config.update(dict(arch='resnet18', width_per_group=4, mlp_dim=32, emb_dim=16,
                     num_epochs=1.0, warmup_epochs=0.0, knn_every_epochs=1, knn_k=5,
                     log_every_steps=5, checkpoint_every_steps=100, prefetch=1))
  results = train.train_and_evaluate(config, tmp_path / 'run')
  for name in ('knn5_euclidean_top1', 'knn5_euclidean_top1_raw_pixels',
               'knn5_euclidean_top1_random_init', 'knn_top1', 'knn_top1_raw_pixels'):
    assert 0.0 <= results[name] <= 100.0, name
  info = data.dataset_info(config)
  snapshot = local_files.load_cifar10_jpeg(str(slice_dir))
  arrays = {split: whole(snapshot, split) for split in PER_CLASS}
  pixels = {split: ((images / 255.0 - np.asarray(info.mean)) / np.asarray(info.std)
                    ).reshape(len(images), -1).astype(np.float32)
            for split, (images, _) in arrays.items()}
  reference = KNeighborsClassifier(n_neighbors=5, algorithm='brute').fit(
      pixels['train'], arrays['train'][1]).score(pixels['test'], arrays['test'][1])
  assert results['knn5_euclidean_top1_raw_pixels'] == pytest.approx(100 * reference)


# Runs `python -m MODULE ARGS` with TensorFlow, TFDS and matplotlib made unimportable, as
# on a machine with JAX alone (the GPU machines this project uses have no TensorFlow).
WITHOUT_TENSORFLOW = (
    'import runpy, sys\n'
    'for name in ("tensorflow", "tensorflow_datasets", "matplotlib"):\n'
    '  sys.modules[name] = None  # `import name` now raises ImportError\n'
    'sys.argv = sys.argv[1:]\n'
    'runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)\n')


@pytest.mark.slow
def test_trains_and_evaluates_without_tensorflow(slice_dir, tmp_path):
  """The training command on the snapshot's slice, views made on the device, then kNN
  and the clustering analysis of the checkpoint, with no TensorFlow to import."""
  import json, subprocess, sys
  from helpers import TINY, cli_env, ROOT
  workdir, out = tmp_path / 'run', tmp_path / 'eval'
  overrides = dict(dataset='cifar10_jpeg', data_dir=slice_dir, crops_size='(32,)',
                   eval_resize=32, batch_size=8, num_epochs=1.0, augment_on='device')
  command = [sys.executable, '-c', WITHOUT_TENSORFLOW]
  env = cli_env(devices=2)
  train = subprocess.run(
      command + ['resa_jax.main', f'--config={TINY}', f'--workdir={workdir}']
      + [f'--config.{k}={v}' for k, v in overrides.items()],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert train.returncode == 0, train.stderr[-3000:]
  assert 'metrics.jsonl, not TensorBoard' in train.stdout
  results = json.loads((workdir / 'results.json').read_text())
  assert results['finished'] and results['step'] == 5  # 40 examples / 8
  for name in ('knn_top1', 'knn5_euclidean_top1', 'knn_top1_raw_pixels'):
    assert 0.0 <= results[name] <= 100.0, name
  losses = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert any('loss' in entry for entry in losses)
  evaluate = subprocess.run(
      command + ['resa_jax.evaluate', f'--checkpoint={workdir}', '--eval=knn,clustering',
                 '--knn_ks=5', '--batch_size=8', '--clustering_samples=20', f'--output={out}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert evaluate.returncode == 0, evaluate.stderr[-3000:]
  clustering = json.loads((out / 'clustering.json').read_text())
  assert {'encoding', 'embedding'} <= set(clustering['results'])
