"""The model under evaluation is read from the checkpoint (evaluate/checkpoint_config.py):
a workdir's config.json (with config_history.json), a converted checkpoint's metadata.

The checkpoint is the tiny test config's initial TrainState at step 8 (no training);
the user-facing cases run `python -m resa_jax.evaluate` in this process.  The refusals
are in tests/test_refusals.py.
"""

import json
import pathlib
import shutil

import pytest

from helpers import TINY, run_in_process, tiny_config
from resa_jax.configs import default
from resa_jax.evaluate import checkpoint_config
from resa_jax.evaluate import common

@pytest.fixture(scope='module')
def saved(tiny_checkpoints):
  """{'workdir', 'converted', 'bare' (checkpoints without config.json)} of one state."""
  return {name: tiny_checkpoints / name for name in ('workdir', 'converted', 'bare')}


def summary(folder) -> dict:
  return json.loads((pathlib.Path(folder) / 'summary.json').read_text())


def test_workdir_needs_no_config(saved, tmp_path, monkeypatch, capsys):
  """--checkpoint=WORKDIR alone: the model, the data and the batch are config.json's."""
  proc = run_in_process('resa_jax.evaluate', f'--checkpoint={saved["workdir"]}', '--eval=knn',
                        '--knn_ks=5', f'--output={tmp_path}/eval', monkeypatch=monkeypatch,
                        capsys=capsys)
  assert proc.code == 0, proc.stderr[-3000:]
  assert 'note:' not in proc.stdout
  result = summary(tmp_path / 'eval')
  config = tiny_config()
  assert result['dataset'] == 'fake' and result['checkpoint']['step'] == 8
  assert result['model'] == {k: config[k] for k in result['model']}
  assert result['results']['knn']['num_train'] == config.fake_num_examples


def test_converted_model_is_its_metadata(saved, tmp_path, monkeypatch, capsys):
  """A converted checkpoint with a --config of another width: the checkpoint's model is
  evaluated and a note names the replaced values."""
  wide = tmp_path / 'wide.py'
  wide.write_text(f'import importlib.util\nspec = importlib.util.spec_from_file_location('
                  f'"tiny", {str(TINY)!r})\nmodule = importlib.util.module_from_spec(spec)\n'
                  'spec.loader.exec_module(module)\n\n\ndef get_config():\n'
                  '  config = module.get_config()\n  config.width_per_group = 8\n'
                  '  config.mlp_dim = 64\n  return config\n')
  proc = run_in_process('resa_jax.evaluate', f'--checkpoint={saved["converted"]}',
                        f'--config={wide}', '--eval=knn', '--knn_ks=5',
                        f'--output={tmp_path}/eval', monkeypatch=monkeypatch, capsys=capsys)
  assert proc.code == 0, proc.stderr[-3000:]
  assert ("note: the model is the checkpoint's (" f'{saved["converted"]}/resa_jax_metadata.json): '
          'width_per_group=4 (--config: 8), mlp_dim=32 (--config: 64)') in proc.stdout
  assert summary(tmp_path / 'eval')['model']['width_per_group'] == 4


# ------------------------------------------------ the rule, as a library ----

def default_config():
  config = default.get_config()
  config.lock()
  return config


def test_history_and_overrides_apply_to_the_workdirs_config(saved, tmp_path):
  """Without --config: config.json with config_history.json's newest changes, then the
  command line's overrides of non-model fields."""
  workdir = tmp_path / 'workdir'
  shutil.copytree(saved['workdir'], workdir)
  (workdir / 'config_history.json').write_text(json.dumps([
      {'step': 4, 'changed': {'knn_temperature': [0.07, 0.1], 'base_lr': [0.3, 0.2]}},
      {'step': 6, 'changed': {'knn_temperature': [0.1, 0.2]}}]))
  base = default_config()
  base.data_dir = '/data/moved'
  config, notes = checkpoint_config.config_for_checkpoint(
      base, workdir, config_given=False, overridden={'data_dir'})
  assert notes == [] and config.knn_temperature == 0.2 and config.base_lr == 0.2
  assert config.data_dir == '/data/moved' and config.dataset == 'fake'
  assert config.crops_size == (16,) and isinstance(config.crops_size, tuple)
  assert (config.arch, config.width_per_group, config.stem) == ('resnet18', 4, 'cifar')


def test_config_given_keeps_its_data_and_takes_the_model(saved):
  cifar = default_config()
  cifar.dataset, cifar.width_per_group, cifar.optimizer = 'cifar10', 16, 'adamw'
  config, notes = checkpoint_config.config_for_checkpoint(cifar, saved['workdir'])
  assert config.dataset == 'cifar10' and config.crops_size == (224,)
  assert (config.width_per_group, config.optimizer, config.predictor) == (4, 'sgd', True)
  assert len(notes) == 1 and 'width_per_group=4 (--config: 16)' in notes[0]
  assert 'optimizer=sgd (--config: adamw)' in notes[0] and 'arch=' in notes[0]
  assert cifar.width_per_group == 16  # the caller's config is not changed
  # Copied checkpoints without config.json: --config is taken as it is.
  same, notes = checkpoint_config.config_for_checkpoint(cifar, saved['bare'])
  assert same is cifar and notes == []
  with pytest.raises(common.EvaluationError, match='neither a training workdir'):
    checkpoint_config.config_for_checkpoint(cifar, saved['bare'] / 'checkpoints' / '8')
