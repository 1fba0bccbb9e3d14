"""Every refusal of the three commands, in one place: bad flags, bad configs, bad
checkpoints and outputs.  Each ends with one `error: ...` line, exit code 2, and
nothing written, removed or touched.

The tables run each command in this process (`helpers.run_in_process`: the command's
own flag definitions, flag parser and `main`), so a case costs milliseconds to a few
seconds, not a Python start-up.  One subprocess per command (`slow`) proves that a
refusal reaches a user the same way, and that `--help` prints the command's own text.
"""

from __future__ import annotations

import os
import shutil

import pytest

import helpers
from helpers import TINY, error_line, run_in_process, snapshot

# ----------------------------------------------------------- training: main ----

# (id, arguments ({tmp} is filled in; it holds broken.py and a_file), words of the line).
# --config=TINY and --workdir={tmp}/run are added unless the case gives its own.
MAIN = [
    ('unknown_config_field', ['--config.not_a_field=1'], "no field 'not_a_field'"),
    ('misspelt_config_field', ['--config.batch_siz=1'],
     "--config.batch_siz: the config has no field 'batch_siz' (did you mean batch_size? "),
    ('missing_config_file', ['--config={tmp}/missing.py'], 'No such file'),
    ('config_syntax_error', ['--config={tmp}/broken.py'], 'SyntaxError'),
    ('bad_value_type', ['--config.batch_size=sixteen'], 'batch_size'),
    ('no_workdir', ['--workdir='], '--workdir is required'),
    ('stray_argument', ['stray'], 'unexpected arguments: stray'),
    ('batch_not_divisible', ['--config.batch_size=15'], 'multiple of the number of devices'),
    ('crop_lists_lengths', ['--config.crops_size=(16,8)'], 'equal lengths'),
    ('min_scale_above_max', ['--config.crops_min_scale=(0.9,)', '--config.crops_max_scale=(0.5,)'],
     'crops_min_scale <= crops_max_scale'),
    ('float64_without_x64', ['--config.dtype=float64'], 'dtype float64 needs JAX x64'),
    ('tfds_data_dir_missing', ['--config.dataset=cifar10', '--config.data_dir={tmp}/no_data',
                               '--config.tfds_download=False'], 'tfds build cifar10'),
    ('image_folder_missing', ['--config.dataset=image_folder', '--config.data_dir={tmp}/no_data'],
     'no train/ folder'),
    ('batch_larger_than_dataset', ['--config.batch_size=128'],
     'has 64 examples, fewer than one batch of 128'),
    ('nested_override', ['--config.arch.name=resnet18'],
     "--config.arch.name: config field 'arch' has no sub-fields"),
    ('unknown_shipped_config', ['--config=cifar11'], 'no shipped config of that name'),
    ('drop_path_on_a_resnet', ['--config.drop_path=0.1'], 'drop_path is for ViT encoders'),
    ('workdir_is_a_file', ['--workdir={tmp}/a_file'], 'is not a directory'),
    ('knn_k_above_the_fake_bank', ['--config.knn_k=65'],
     'knn_k (65) exceeds the kNN memory bank: at most 64 examples (fake_num_examples=64)'),
    ('knn_k_above_the_bank_limit', ['--config.knn_max_train_examples=4'],
     'knn_k (5) exceeds the kNN memory bank: at most 4 examples (knn_max_train_examples=4)'),
    ('input_shards_not_dividing_the_batch', ['--config.input_shards=3'],
     'input_shards 3 must be a positive multiple of the number of processes (1) that '
     'divides the batch size 16'),
]

# Every config field's domain (resa_jax/validation.py DOMAINS): (field, a value outside
# it, words of the line).  Every field of configs/default.py has at least one row
# (`test_every_config_field_has_a_domain_and_a_row`); a field whose domain is its type (a
# boolean) is refused by the flag parser.
_NOT_BOOLEAN = "('Non-boolean argument to boolean flag', 'maybe')"
DOMAIN_CASES = [
    ('seed', '18446744073709551616', 'seed must be an integer that fits 64 bits'),
    ('seed', '-9223372036854775809', 'seed must be an integer that fits 64 bits'),
    ('dataset', 'mnist_typo', "unknown dataset 'mnist_typo'; expected one of fashion_mnist, "
     'cifar10, cifar10_jpeg'),
    ('data_dir', '', "data_dir must be a path, or unset (None), got ''"),
    ('manual_dir', ' ', "manual_dir must be a path, or unset (None), got ' '"),
    ('tfds_download', 'maybe', _NOT_BOOLEAN),
    ('train_split', '', "train_split must be a non-empty name, got ''"),
    ('eval_train_split', '', "eval_train_split must be a non-empty name, got ''"),
    ('eval_split', '', "eval_split must be a non-empty name, got ''"),
    ('crops_nmb', '(0,)', 'crops_nmb must count the strong views of each crop group'),
    ('crops_size', '(0,)', 'crops_size must be positive integers (pixels), got (0,)'),
    ('crops_min_scale', '(0.0,)', 'crops_min_scale must be in (0, 1], got (0.0,)'),
    ('crops_max_scale', '(1.5,)', 'crops_max_scale must be in (0, 1], got (1.5,)'),
    ('gaussian_prob', '(1.5,)', 'gaussian_prob must be probabilities, got (1.5,)'),
    ('solarization_prob', '(-0.1,)', 'solarization_prob must be probabilities, got (-0.1,)'),
    ('color_jitter_prob', '1.2', 'color_jitter_prob must be a probability, got 1.2'),
    ('brightness', '-0.4', 'brightness must be >= 0 and finite, got -0.4'),
    ('contrast', '-0.1', 'contrast must be >= 0 and finite, got -0.1'),
    ('saturation', 'inf', 'saturation must be >= 0 and finite, got inf'),
    ('hue', '0.6', 'hue must be in [0, 0.5], got 0.6'),
    ('hue', '-0.1', 'hue must be in [0, 0.5], got -0.1'),
    ('grayscale_prob', '1.5', 'grayscale_prob must be a probability, got 1.5'),
    ('flip_prob', '-0.5', 'flip_prob must be a probability, got -0.5'),
    ('eval_resize', '0', 'eval_resize must be a positive integer, got 0'),
    ('shuffle_buffer', '0', 'shuffle_buffer must be a positive integer, got 0'),
    ('prefetch', '-1', 'prefetch must be an integer >= 0, got -1'),
    ('augment_on', 'gpu', "augment_on must be one of auto, host, device, got 'gpu'"),
    ('device_memory_budget_mb', '-1.0', 'device_memory_budget_mb must be >= 0 and finite'),
    ('host_memory_budget_mb', 'inf', 'host_memory_budget_mb must be >= 0 and finite'),
    ('input_shards', '0', 'input_shards must be positive, or -1'),
    ('fake_image_size', '0', 'fake_image_size must be a positive integer, got 0'),
    ('fake_num_classes', '0', 'fake_num_classes must be a positive integer, got 0'),
    ('fake_num_examples', '0', 'fake_num_examples must be a positive integer, got 0'),
    ('arch', 'resnet9', "unknown architecture 'resnet9'; expected one of resnet101, resnet18, "
     'resnet200, resnet34, resnet50'),
    ('width_per_group', '0', 'width_per_group must be a positive integer, got 0'),
    ('stem', 'vit', "unknown stem 'vit'; expected one of imagenet, cifar"),
    ('zero_init_residual', 'maybe', _NOT_BOOLEAN),
    ('mlp_layers', '0', 'mlp_layers must be a positive integer, got 0'),
    ('mlp_dim', '0', 'mlp_dim must be a positive integer, got 0'),
    ('emb_dim', '-16', 'emb_dim must be a positive integer, got -16'),
    ('predictor', 'maybe', _NOT_BOOLEAN),
    ('drop_path', '1.0', 'drop_path must be in [0, 1), got 1.0'),
    ('patch_size', '0', 'patch_size must be a positive integer, got 0'),
    ('dtype', 'float8', "dtype must be one of float32, bfloat16, float16, float64, got 'float8'"),
    ('temperature', '0', 'temperature must be positive and finite, got 0'),
    ('sinkhorn_epsilon', '-0.05', 'sinkhorn_epsilon must be positive and finite, got -0.05'),
    ('sinkhorn_iters', '0', 'sinkhorn_iters must be a positive integer, got 0'),
    ('ema_momentum', '1.5', 'ema_momentum must be in [0, 1], got 1.5'),
    ('optimizer', 'adam', "unknown optimizer 'adam'; expected one of sgd, adamw"),
    ('base_lr', '0', 'base_lr must be positive and finite, got 0'),
    ('base_lr', '-0.1', 'base_lr must be positive and finite, got -0.1'),
    ('base_lr', 'inf', 'base_lr must be positive and finite, got inf'),
    ('base_lr', 'nan', 'base_lr must be positive and finite, got nan'),
    ('weight_decay', '-1e-4', 'weight_decay must be >= 0 and finite, got -0.0001'),
    ('sgd_momentum', '1.0', 'sgd_momentum must be in [0, 1), got 1.0'),
    ('warmup_epochs', '-1', 'warmup_epochs must be >= 0 and finite, got -1'),
    ('final_lr_ratio', '-0.1', 'final_lr_ratio must be >= 0 and finite, got -0.1'),
    ('num_epochs', '0', 'num_epochs must be positive and finite, got 0'),
    ('batch_size', '0', 'batch_size must be a positive integer, got 0'),
    ('grad_clip', '-1.0', 'grad_clip must be positive and finite, or unset (None), got -1.0'),
    ('log_every_steps', '0', 'log_every_steps must be a positive integer, got 0'),
    ('checkpoint_every_steps', '0', 'checkpoint_every_steps must be a positive integer, got 0'),
    ('keep_checkpoints', '0', 'keep_checkpoints must be a positive integer, got 0'),
    ('knn_every_epochs', '-1', 'knn_every_epochs must be an integer >= 0, got -1'),
    ('knn_k', '0', 'knn_k must be a positive integer, got 0'),
    ('knn_temperature', '0', 'knn_temperature must be positive and finite, got 0'),
    # -1 is the documented "unset" of these fields; other non-positive values are refused.
    ('knn_max_train_examples', '0', 'knn_max_train_examples must be positive, or -1 (unset)'),
    ('steps_per_epoch', '-2', 'steps_per_epoch must be positive, or -1 (unset), got -2'),
    ('num_train_steps', '0', 'num_train_steps must be positive, or -1 (unset), got 0'),
    ('run_steps', '-5', 'run_steps must be positive, or -1 (unset), got -5'),
    ('run_steps', '0', 'run_steps must be positive, or -1 (unset), got 0'),
    ('allow_config_change', 'maybe', _NOT_BOOLEAN),
]


def _main_args(args, tmp):
  args = [a.format(tmp=tmp) for a in args]
  if not any(a.startswith('--config=') for a in args):
    args = [f'--config={TINY}'] + args
  if not any(a.startswith('--workdir=') for a in args):
    args.append(f'--workdir={tmp}/run')
  return [a for a in args if a != '--workdir=']


@pytest.mark.parametrize('name,args,words', MAIN, ids=[c[0] for c in MAIN])
def test_training_refusals(name, args, words, tmp_path, monkeypatch, capsys):
  del name
  (tmp_path / 'broken.py').write_text('def get_config(:\n')
  (tmp_path / 'a_file').write_text('not a folder\n')
  before = snapshot(tmp_path)
  outcome = run_in_process('resa_jax.main', *_main_args(args, tmp_path), monkeypatch=monkeypatch,
                           capsys=capsys)
  assert outcome.code == 2, outcome
  line = error_line(outcome)
  assert words in line, line
  assert snapshot(tmp_path) == before


@pytest.mark.parametrize('field,value,words', DOMAIN_CASES,
                         ids=[f'{c[0]}={c[1]}' for c in DOMAIN_CASES])
def test_a_config_value_outside_its_domain_is_refused(field, value, words, tmp_path, monkeypatch,
                                                      capsys):
  outcome = run_in_process('resa_jax.main', f'--config={TINY}', f'--config.{field}={value}',
                           f'--workdir={tmp_path}/run', monkeypatch=monkeypatch, capsys=capsys)
  assert outcome.code == 2, outcome
  line = error_line(outcome)
  assert words in line, line
  assert not os.listdir(tmp_path)


def test_every_config_field_has_a_domain_and_a_row():
  """A new field of configs/default.py needs its domain (validation.DOMAINS) and a row
  of DOMAIN_CASES; the shipped configs have no other fields and are inside them."""
  import importlib  # pylint: disable=g-import-not-at-top
  from resa_jax import validation  # pylint: disable=g-import-not-at-top
  from resa_jax.configs import default  # pylint: disable=g-import-not-at-top
  fields = set(default.get_config())
  assert fields == set(validation.DOMAINS), (
      f'no domain: {sorted(fields - set(validation.DOMAINS))}, '
      f'no field: {sorted(set(validation.DOMAINS) - fields)}')
  assert fields == {c[0] for c in DOMAIN_CASES}, sorted(fields ^ {c[0] for c in DOMAIN_CASES})
  for path in sorted((helpers.ROOT / 'resa_jax' / 'configs').glob('[a-z]*.py')):
    config = importlib.import_module(f'resa_jax.configs.{path.stem}').get_config()
    assert set(config) <= fields, path.stem
    for name, domain in validation.DOMAINS.items():
      assert domain.refusal(name, config[name]) is None, (path.stem, name, config[name])


def test_knn_k_above_the_bank_found_in_the_data_is_refused_before_any_write(
    tmp_path, monkeypatch, capsys):
  """An image folder whose eval_train_split lists 5 files of which 3 decode: known only
  once it is opened, and refused then, naming what was found, before the workdir
  exists."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for split, count in (('train', 16), ('val', 3)):
    for i in range(count):
      folder = tmp_path / 'images' / split / f'class{i % 2}'
      folder.mkdir(parents=True, exist_ok=True)
      Image.fromarray(helpers.natural_image(rng, 16, 3)).save(folder / f'{i}.png')
  for name in ('empty.jpg', 'text.png'):
    (tmp_path / 'images' / 'val' / 'class0' / name).write_bytes(b'' if name == 'empty.jpg'
                                                                else b'not an image')
  before = snapshot(tmp_path)
  outcome = run_in_process('resa_jax.main', f'--config={TINY}', '--config.dataset=image_folder',
                           f'--config.data_dir={tmp_path}/images', '--config.eval_split=val',
                           '--config.eval_train_split=val', '--config.eval_resize=16',
                           f'--workdir={tmp_path}/run', monkeypatch=monkeypatch, capsys=capsys)
  assert outcome.code == 2, outcome
  line = error_line(outcome)
  assert ("knn_k (5) exceeds the kNN memory bank: split 'val' of image_folder has 3 examples "
          '(3 of 5 images used); lower --config.knn_k') in line, line
  assert (f'note: image_folder {tmp_path}/images/val: 3 of 5 images used; 2 did not decode '
          '(class0/empty.jpg, class0/text.png)') in outcome.stdout, outcome.stdout
  assert snapshot(tmp_path) == before


def test_configs_load_from_any_directory_by_path_or_name(tmp_path, monkeypatch, capsys):
  """A config path outside the checkout, or a shipped config's name, from another
  directory (the configs import resa_jax.configs, not a top-level `configs`)."""
  mine = tmp_path / 'my_config.py'
  mine.write_text('from resa_jax.configs import fashion_mnist\n\n\ndef get_config():\n'
                  '  config = fashion_mnist.get_config()\n  config.batch_size = 0\n'
                  '  return config\n')
  monkeypatch.chdir(tmp_path)
  for config, flags, words in ((helpers.ROOT / 'configs' / 'cifar10.py', ['--config.base_lr=-1'],
                                 'base_lr must be positive'),
                                ('cifar10', ['--config.base_lr=-1'], 'base_lr must be positive'),
                                (mine, [], 'batch_size must be a positive integer')):
    outcome = run_in_process('resa_jax.main', f'--config={config}', *flags,
                             f'--workdir={tmp_path}/run', monkeypatch=monkeypatch, capsys=capsys)
    assert outcome.code == 2 and words in error_line(outcome), outcome
  assert sorted(p.name for p in tmp_path.iterdir()) == ['my_config.py']


@pytest.fixture(scope='module')
def saved(tiny_checkpoints):
  return tiny_checkpoints


def test_training_a_workdir_of_another_architecture_is_refused(saved, tmp_path, monkeypatch,
                                                              capsys):
  """Refused from config.json, and with allow_config_change from the checkpoint's shapes."""
  workdir = tmp_path / 'run'
  shutil.copytree(saved / 'workdir', workdir)
  before = snapshot(workdir)
  for flags, words in ((['--config.width_per_group=8'],
                        ['was trained with width_per_group=4; --config has width_per_group=8']),
                       (['--config.width_per_group=8', '--config.allow_config_change=True'],
                        ['does not fit the config', 'in the model'])):
    outcome = run_in_process('resa_jax.main', f'--config={TINY}', f'--workdir={workdir}', *flags,
                             monkeypatch=monkeypatch, capsys=capsys)
    assert outcome.code == 2, outcome
    line = error_line(outcome)
    assert all(w in line for w in words), line
    assert snapshot(workdir) == before


# The records of a workdir with checkpoints, damaged: (id, damage(workdir), words).  The
# changed-config check needs them, so each is refused rather than trusted or skipped.
RECORDS = [
    ('config_truncated', lambda w: (w / 'config.json').write_text('{"arch": "resnet18", "ba'),
     'config.json is unreadable (JSONDecodeError: '),
    ('config_emptied', lambda w: (w / 'config.json').write_text('{}'),
     'config.json is not a config (a JSON object with dataset, arch'),
    ('config_missing', lambda w: (w / 'config.json').unlink(), 'config.json is missing'),
    ('history_corrupt', lambda w: (w / 'config_history.json').write_text('[{"step": 4}, 7]'),
     'config_history.json is not a list of {step, changed: {field: [old, new]}} records'),
]


@pytest.mark.parametrize('name,damage,words', RECORDS, ids=[c[0] for c in RECORDS])
def test_training_a_workdir_with_unreadable_records_is_refused(name, damage, words, saved,
                                                              tmp_path, monkeypatch, capsys):
  del name
  workdir = tmp_path / 'run'
  shutil.copytree(saved / 'workdir', workdir)
  damage(workdir)
  before = snapshot(workdir)
  outcome = run_in_process('resa_jax.main', f'--config={TINY}', f'--workdir={workdir}',
                           '--config.base_lr=4.8', monkeypatch=monkeypatch, capsys=capsys)
  assert outcome.code == 2, outcome
  line = error_line(outcome)
  assert f'the workdir {workdir} has checkpoints but {workdir}/' in line and words in line, line
  assert 'pass --config.allow_config_change=True to record --config' in line, line
  assert snapshot(workdir) == before


# -------------------------------------------------------------- evaluation ----

# (id, arguments ({saved} is the `saved` fixture's folder, {tmp} the test's), words).
EVALUATE = [
    ('no_checkpoint', [], '--checkpoint is required'),
    ('missing_checkpoint', ['--checkpoint={tmp}/none'], 'does not exist'),
    ('not_a_checkpoint', ['--checkpoint={saved}'],
     'neither a training workdir with checkpoints nor a converted checkpoint'),
    ('model_override', ['--checkpoint={saved}/workdir', '--config.width_per_group=8'],
     '--config.width_per_group=8 contradicts the checkpoint, which records width_per_group=4 '
     '({saved}/workdir/config.json); leave it out'),
    ('model_and_optimizer_override', ['--checkpoint={saved}/workdir/checkpoints',
                                      f'--config={TINY}', '--config.optimizer=adamw',
                                      '--config.mlp_dim=64'],
     '--config.mlp_dim=64 --config.optimizer=adamw contradicts'),
    ('converted_without_config', ['--checkpoint={saved}/converted'],
     'is a converted checkpoint: it records its model (arch=resnet18, width_per_group=4, '
     'stem=cifar, mlp_layers=3, mlp_dim=32, emb_dim=16) but not the data; give the data with '
     '--config'),
    ('checkpoints_without_config', ['--checkpoint={saved}/bare'],
     'config.json is missing or unreadable'),
    ('shapes_of_another_architecture', ['--checkpoint={saved}/bare', f'--config={TINY}',
                                        '--config.width_per_group=8'],
     'another architecture than --config'),
    ('unknown_field', ['--checkpoint={saved}/workdir', '--config.no_field=1'],
     "the config has no field 'no_field'"),
    ('unknown_evaluation', ['--checkpoint={saved}/workdir', '--eval=knn,svm'],
     'unknown evaluation svm'),
    ('stray_argument', ['--checkpoint={saved}/workdir', 'stray'], 'unexpected arguments: stray'),
    ('old_dtype_spelling', ['--checkpoint={saved}/workdir', '--dtype=train'],
     '--dtype=train is now --dtype=as_trained (the dtype the checkpoint was trained with)'),
    ('unknown_dtype', ['--checkpoint={saved}/workdir', '--dtype=float8'],
     "--dtype must be float32, bfloat16, float16 or as_trained"),
    ('zero_linear_epochs', ['--checkpoint={saved}/workdir', '--eval=linear',
                            '--linear_epochs=0'], '--linear_epochs must be positive, or -1'),
    ('k_above_the_bank', ['--checkpoint={saved}/workdir', '--knn_ks=1000'],
     "every k exceeds the kNN memory bank: 'train' has 64 examples; use k <= 64"),
    ('nonfinite_features', ['--checkpoint={saved}/nonfinite'],
     "the encoding features of split 'train' are non-finite (NaN/Inf) in 64 of 64 rows"),
]


@pytest.mark.parametrize('name,args,words', EVALUATE, ids=[c[0] for c in EVALUATE])
def test_evaluation_refusals(name, args, words, saved, tmp_path, monkeypatch, capsys):
  before = snapshot(saved)
  args = [a.format(saved=saved, tmp=tmp_path) for a in args]
  if not any(a.startswith('--eval=') for a in args):
    args.append('--eval=knn')
  if name != 'no_checkpoint':
    args += [f'--output={tmp_path}/out', '--batch_size=16']
  outcome = run_in_process('resa_jax.evaluate', *args, monkeypatch=monkeypatch, capsys=capsys)
  assert outcome.code == 2, outcome
  line = error_line(outcome)
  assert words.format(saved=saved) in line, line
  if name == 'shapes_of_another_architecture':
    assert 'params/encoder/' in line and '(4,) in the checkpoint, (8,) in the model' in line
  assert snapshot(saved) == before and not (tmp_path / 'out').exists()


def test_a_second_evaluation_of_one_output_is_refused(saved, tmp_path, monkeypatch, capsys):
  """The training workdir's lock, on --output: while a live process holds it, one line
  naming the holder; nothing written there.  Released, the evaluation runs."""
  from resa_jax import workdir  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'out'
  held = workdir.Lock.acquire(out, '--output')  # as a first evaluation holds it
  try:
    before = snapshot(out)
    outcome = run_in_process('resa_jax.evaluate', f'--checkpoint={saved}/workdir', '--eval=knn',
                             '--batch_size=16', f'--output={out}', monkeypatch=monkeypatch,
                             capsys=capsys)
    assert outcome.code == 2, outcome
    line = error_line(outcome)
    assert (f'the --output folder {out} is in use by another run (pid {os.getpid()} on host'
            in line and line.endswith('or use another --output')), line
    assert snapshot(out) == before
  finally:
    held.release()
  outcome = run_in_process('resa_jax.evaluate', f'--checkpoint={saved}/workdir', '--eval=knn',
                           '--batch_size=16', f'--output={out}', monkeypatch=monkeypatch,
                           capsys=capsys)
  assert outcome.code == 0, outcome
  assert sorted(p.name for p in out.iterdir()) == ['knn.json', 'summary.json']  # no .lock


# -------------------------------------------------------------- conversion ----

@pytest.fixture(scope='module')
def pth_files(tmp_path_factory):
  """'tiny.pth': a torchvision-layout ResNet-18 encoder of width 4 (ImageNet stem);
  'full18.pth': a full checkpoint in the authors' DDP layout (ResNet-18 width 4, CIFAR
  stem, MLP 16, embedding 8); 'nonfinite.pth': tiny.pth with a NaN and an Inf;
  'a_file': not a checkpoint; 'busy/': a non-empty folder."""
  torch = pytest.importorskip('torch')
  import torch_reference  # pylint: disable=g-import-not-at-top
  folder = tmp_path_factory.mktemp('pth')
  tiny = helpers.torchvision_resnet18_state_dict(torch, width=4)
  torch.save(tiny, folder / 'tiny.pth')
  full, _ = torch_reference.full_checkpoint(dict(arch='resnet18', wpg=4, stem='cifar'))
  torch.save(full, folder / 'full18.pth')
  tiny['layer1.0.conv1.weight'][0, 0, :2, 0] = float('nan')
  tiny['layer2.0.bn1.running_var'][3] = float('inf')
  torch.save(tiny, folder / 'nonfinite.pth')
  (folder / 'a_file').write_text('not a checkpoint\n')
  (folder / 'busy').mkdir()
  (folder / 'busy' / 'keep.txt').write_text('precious')
  return folder


# (id, arguments ({pth} is `pth_files`, {tmp} the test's folder), words of the line).
CONVERT = [
    ('no_checkpoint', ['--out={tmp}/out'], '--checkpoint is required'),
    ('no_out', ['--checkpoint={pth}/tiny.pth'], '--out is required'),
    ('missing_file', ['--checkpoint={tmp}/none.pth', '--out={tmp}/out'], 'checkpoint not found'),
    ('not_a_checkpoint', ['--checkpoint={pth}/a_file', '--out={tmp}/out'], 'cannot read'),
    ('output_not_empty', ['--checkpoint={pth}/tiny.pth', '--out={pth}/busy'],
     'output {pth}/busy exists and is not an empty directory'),
    ('width_and_stem', ['--checkpoint={pth}/tiny.pth', '--out={tmp}/out', '--width_per_group=8',
                        '--stem=cifar'],
     '--width_per_group=8 --stem=cifar does not fit the checkpoint: its shapes say '
     '--width_per_group=4 --stem=imagenet'),
    ('width_and_mlp', ['--checkpoint={pth}/full18.pth', '--out={tmp}/out', '--width_per_group=8',
                       '--mlp_dim=64'],
     '--width_per_group=8 --mlp_dim=64 does not fit the checkpoint: its shapes say '
     '--width_per_group=4 --mlp_dim=16 (change them'),
    ('architecture', ['--checkpoint={pth}/full18.pth', '--out={tmp}/out', '--arch=resnet50',
                      '--stem=cifar'],
     '--arch=resnet50 does not fit the checkpoint: its shapes say --arch=resnet18 (change it'),
    ('stem_and_embedding', ['--checkpoint={pth}/full18.pth', '--out={tmp}/out',
                            '--stem=imagenet', '--emb_dim=8'],
     'its shapes say --stem=cifar (change it'),
    ('unknown_architecture', ['--checkpoint={pth}/full18.pth', '--out={tmp}/out',
                              '--arch=resnet19'], "unknown architecture 'resnet19'"),
    ('bad_enum', ['--checkpoint={pth}/tiny.pth', '--out={tmp}/out', '--stem=vit'],
     'flag --stem=vit: value should be one of <imagenet|cifar>'),
    ('zero', ['--checkpoint={pth}/tiny.pth', '--out={tmp}/out', '--mlp_dim=0'],
     'flag --mlp_dim=0: 0 is not a positive integer'),
    ('not_an_integer', ['--checkpoint={pth}/tiny.pth', '--out={tmp}/out',
                        '--width_per_group=wide'], 'flag --width_per_group=wide: invalid literal'),
    ('unknown_flag', ['--checkpoint={pth}/tiny.pth', '--out={tmp}/out', '--no_such_flag=1'],
     "Unknown command line flag 'no_such_flag'"),
    ('stray_argument', ['--checkpoint={pth}/tiny.pth', '--out={tmp}/out', 'stray'],
     'unexpected arguments: stray'),
    ('nonfinite_weights', ['--checkpoint={pth}/nonfinite.pth', '--out={tmp}/out',
                           '--arch=resnet18'],
     'layer1.0.conv1.weight has 2 non-finite (NaN/Inf) entries of 144; 1 more tensor(s) have '
     'some'),
]


@pytest.mark.parametrize('name,args,words', CONVERT, ids=[c[0] for c in CONVERT])
def test_conversion_refusals(name, args, words, pth_files, tmp_path, monkeypatch, capsys):
  del name
  before = snapshot(pth_files), snapshot(tmp_path)
  args = [a.format(pth=pth_files, tmp=tmp_path) for a in args]
  outcome = run_in_process('resa_jax.convert', *args, monkeypatch=monkeypatch, capsys=capsys)
  assert outcome.code == 2, outcome
  line = error_line(outcome)
  assert words.format(pth=pth_files) in line, line
  assert (snapshot(pth_files), snapshot(tmp_path)) == before


# ------------------------------------------- the real commands, one each ----

@pytest.fixture(scope='module')
def env():
  return helpers.cli_env(devices=2)


@pytest.mark.slow
def test_a_refusal_reaches_the_user_as_one_line_and_exit_2(env, saved, pth_files, tmp_path):
  """The same refusals as the tables, through `python -m`: what `cli.run` and the
  signal watcher add on top changes nothing of them."""
  for module, args, words in (
      ('resa_jax.main', [f'--config={TINY}', '--config.base_lr=-0.1',
                         f'--workdir={tmp_path}/run'], 'base_lr must be positive'),
      ('resa_jax.evaluate', [f'--checkpoint={saved}/workdir', '--config.width_per_group=8',
                             f'--output={tmp_path}/out'], 'contradicts the checkpoint'),
      ('resa_jax.convert', [f'--checkpoint={pth_files}/tiny.pth', f'--out={tmp_path}/out',
                            '--stem=vit'], 'value should be one of')):
    before = snapshot(saved), snapshot(pth_files)
    proc = helpers.run(env, *args, module=module)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert words in error_line(proc)
    assert (snapshot(saved), snapshot(pth_files)) == before
    assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_help_is_the_commands_own_text_and_exits_0(env):
  flags_of = {'resa_jax.main': ('--workdir:', '--config:'),
              'resa_jax.evaluate': ('--checkpoint:', '--eval:'),
              'resa_jax.convert': ('--checkpoint:', '--out:', '--arch:', '--width_per_group:',
                                   '--stem:', '--mlp_layers:', '--mlp_dim:', '--emb_dim:')}
  for module, names in flags_of.items():
    proc = helpers.run(env, '--help', module=module)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f'python -m {module} --' in proc.stdout, proc.stdout
    assert all(name in proc.stdout for name in names), proc.stdout
    assert '         [' not in proc.stdout  # no docstring continuation squeezed into one line
    assert 'Traceback' not in proc.stderr
  assert len(proc.stdout.splitlines()) < 45  # convert's is short

