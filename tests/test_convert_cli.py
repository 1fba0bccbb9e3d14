"""`python -m resa_jax.convert` as a user runs it: the model read from the checkpoint's
shapes, a contradicting flag named with the value to use, one-line errors, `--help`.

The checkpoints are the small PyTorch references of tests/test_convert.py (a width-4
CIFAR ResNet-18 with heads, a width-8 ResNet-50 encoder); `infer_fields` is checked
on those and, for every kind of architecture, on the keys and shapes a Flax template
maps to.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip('torch')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from resa_jax import convert, models  # noqa: E402
from resa_jax.convert import state_dict as state_dict_lib  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import test_convert as reference  # noqa: E402  pylint: disable=g-import-not-at-top

ROOT = pathlib.Path(__file__).resolve().parents[1]
CIFAR18 = dict(arch='resnet18', wpg=4, stem='cifar')


def run_cli(*args):
  env = dict(os.environ, CUDA_VISIBLE_DEVICES='', JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, '-m', 'resa_jax.convert', *map(str, args)], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=120, check=False)
  proc.seconds = time.perf_counter() - start
  return proc


def error_line(proc) -> str:
  """The one stderr line, an `error: ...`, exit code 2, no traceback."""
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr[-2000:]
  return lines[0]


def listing(folder: pathlib.Path) -> dict:
  return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in sorted(folder.rglob('*'))}


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """{'full18': a full DDP checkpoint (ResNet-18 w4 CIFAR, MLP 16, emb 8),
  'encoder50': an encoder-only ResNet-50 w8 ImageNet-stem state dict}."""
  folder = tmp_path_factory.mktemp('pth')
  full, _ = reference.full_checkpoint(CIFAR18)
  torch.save(full, folder / 'full18.pth')
  resnet50 = reference.randomise(reference.TorchResNet('resnet50', 8, 'imagenet'), seed=2)
  torch.save(reference.float32_state_dict(resnet50), folder / 'encoder50.pth')
  return {'full18': folder / 'full18.pth', 'encoder50': folder / 'encoder50.pth'}


def test_no_model_flags_needed(files, tmp_path):
  """Without model flags the model is read from the checkpoint: the full ResNet-18's
  variables equal a conversion with the right flags; an encoder-only file records no
  head fields."""
  out = tmp_path / 'out18'
  proc = run_cli(f'--checkpoint={files["full18"]}', f'--out={out}')
  assert proc.returncode == 0, proc.stderr[-2000:]
  variables, meta = convert.load_converted(out)
  assert {k: meta[k] for k in ('arch', 'width_per_group', 'stem', 'mlp_layers', 'mlp_dim',
                               'emb_dim', 'predictor')} == dict(
      arch='resnet18', width_per_group=4, stem='cifar', mlp_layers=3,
      mlp_dim=reference.MLP_DIM, emb_dim=reference.EMB_DIM, predictor=True)
  online, momentum = reference.networks('resnet18', 'cifar', 4, predictor=True)
  want = convert.convert_state_dict(convert.load_torch_state_dict(files['full18']), online,
                                    momentum)
  reference.assert_trees_equal(variables, want)
  assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]  # no temporary left

  out = tmp_path / 'out50'
  proc = run_cli('--checkpoint', files['encoder50'], '--out', out)  # space-separated too
  assert proc.returncode == 0, proc.stderr[-2000:]
  meta = convert.read_metadata(out)
  assert (meta['arch'], meta['width_per_group'], meta['stem']) == ('resnet50', 8, 'imagenet')
  assert 'mlp_dim' not in meta and meta['parts'] == ['batch_stats', 'params']


@pytest.mark.parametrize('flags,words', [
    (['--width_per_group=8', '--mlp_dim=64'],
     '--width_per_group=8 --mlp_dim=64 does not fit the checkpoint: its shapes say '
     '--width_per_group=4 --mlp_dim=16 (change them'),
    (['--arch=resnet50', '--stem=cifar'],
     '--arch=resnet50 does not fit the checkpoint: its shapes say --arch=resnet18 (change it'),
    (['--stem=imagenet', '--emb_dim=8'], 'its shapes say --stem=cifar (change it'),
    (['--arch=resnet19'], "unknown architecture 'resnet19'"),
    (['--stem=vit'], 'flag --stem=vit: value should be one of <imagenet|cifar>'),
    (['--mlp_dim=0'], 'flag --mlp_dim=0: 0 is not a positive integer'),
    (['--width_per_group=wide'], 'flag --width_per_group=wide: invalid literal'),
    (['--no_such_flag=1'], "Unknown command line flag 'no_such_flag'"),
    (['stray'], 'unexpected arguments: stray'),
], ids=['width_and_mlp', 'arch', 'stem', 'unknown_arch', 'bad_enum', 'zero', 'not_int',
        'unknown_flag', 'stray'])
def test_bad_flags_one_line_nothing_written(files, tmp_path, flags, words):
  """Each refusal: exit 2, one line naming the flag (and, for a flag the shapes
  contradict, the value to use), the output folder's parent unchanged."""
  before = listing(tmp_path)
  proc = run_cli(f'--checkpoint={files["full18"]}', f'--out={tmp_path / "out"}', *flags)
  assert words in error_line(proc)
  assert listing(tmp_path) == before
  print(f'\n[convert] {" ".join(flags)}: exit 2 in {proc.seconds:.1f} s')


def test_missing_inputs_and_busy_output(files, tmp_path):
  """No --checkpoint / --out, a missing file, a non-empty --out: one line each; the
  busy folder's files untouched."""
  assert '--checkpoint is required' in error_line(run_cli(f'--out={tmp_path}/o'))
  assert '--out is required' in error_line(run_cli(f'--checkpoint={files["full18"]}'))
  assert 'checkpoint not found' in error_line(
      run_cli(f'--checkpoint={tmp_path}/none.pth', f'--out={tmp_path}/o'))
  busy = tmp_path / 'busy'
  busy.mkdir()
  (busy / 'keep.txt').write_text('precious')
  before = listing(tmp_path)
  line = error_line(run_cli(f'--checkpoint={files["full18"]}', f'--out={busy}'))
  assert f'output {busy} exists and is not an empty directory' in line
  assert listing(tmp_path) == before


def test_help_is_short_and_lists_the_flags():
  proc = run_cli('--help')
  assert proc.returncode == 0, proc.stderr[-2000:]
  text = proc.stdout
  assert len(text.splitlines()) < 45, text
  for name in ('checkpoint', 'out', 'arch', 'width_per_group', 'stem', 'mlp_layers', 'mlp_dim',
               'emb_dim'):
    assert f'--{name}:' in text, name
  assert 'python -m resa_jax.convert --checkpoint=' in text
  assert 'SPEC' not in text and '.md' not in text and 'Traceback' not in proc.stderr


# ----------------------------------------------------------- infer_fields ----

def template_state_dict(arch, **config):
  """{torch key: zeros of the PyTorch shape} of every leaf of the online network with
  projector and predictor, through the converter's own key mapping."""
  config = ml_collections.ConfigDict(dict(
      dict(arch=arch, width_per_group=8, stem='imagenet', zero_init_residual=False,
           mlp_layers=3, mlp_dim=24, emb_dim=12, predictor=True, dtype='float32',
           drop_path=0.0), **config))
  online, _ = models.create_networks(config)
  size = 224 if models.is_vit(arch) else 32
  tree = jax.eval_shape(lambda: online.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                            train=False))
  out = {}
  for collection in ('params', 'batch_stats'):
    for part, subtree in tree.get(collection, {}).items():
      for path, leaf in jax.tree_util.tree_leaves_with_path(subtree):
        key = state_dict_lib._torch_key(  # pylint: disable=protected-access
            part, collection, tuple(p.key for p in path))
        out[f'module.{part}.{key}'] = np.zeros(
            state_dict_lib._torch_shape(leaf.shape), np.float32)  # pylint: disable=protected-access
  return out


@pytest.mark.parametrize('arch,config', [
    ('resnet18', dict(stem='cifar', width_per_group=4)), ('resnet34', {}),
    ('resnet50', dict(width_per_group=16)), ('resnet50w2', {}), ('resnet101', dict(stem='cifar')),
    ('vit_tiny', dict(mlp_layers=2)), ('vitc_tiny', {}), ('vit_small', dict(mlp_layers=4)),
])
def test_infer_fields_reads_back_every_architecture(arch, config):
  fields, problem = convert.infer_fields(convert.split_subnets(template_state_dict(arch, **config)))
  assert problem is None
  want = {'arch': arch, 'mlp_layers': config.get('mlp_layers', 3), 'mlp_dim': 24, 'emb_dim': 12}
  if not models.is_vit(arch):
    want.update(width_per_group=config.get('width_per_group', 8),
                stem=config.get('stem', 'imagenet'))
  assert fields == want


def test_infer_fields_on_the_torch_references(files):
  for name, want in (('full18', dict(arch='resnet18', width_per_group=4, stem='cifar',
                                     mlp_layers=3, mlp_dim=16, emb_dim=8)),
                     ('encoder50', dict(arch='resnet50', width_per_group=8, stem='imagenet'))):
    groups = convert.split_subnets(convert.load_torch_state_dict(files[name]))
    assert convert.infer_fields(groups) == (want, None), name


def test_unknown_architecture_is_explained():
  """A depth or stage layout no architecture has: the reason, unless --arch is given."""
  vit = {k: v for k, v in template_state_dict('vit_tiny').items()
         if not k.startswith('module.encoder.blocks.11.')}
  fields, problem = convert.infer_fields(convert.split_subnets(vit))
  assert 'arch' not in fields and 'a ViT of width 192 and depth 11' in problem
  with pytest.raises(convert.ConversionError, match='cannot tell the architecture'):
    convert.choose_fields(fields, {}, problem)
  assert convert.choose_fields(fields, {'arch': 'vit_tiny'}, problem)['arch'] == 'vit_tiny'
  resnet = {k: v for k, v in template_state_dict('resnet18').items()
            if not k.startswith('module.encoder.layer4.1.')}
  _, problem = convert.infer_fields(convert.split_subnets(resnet))
  assert 'BasicBlock blocks (2, 2, 2, 1)' in problem
  _, problem = convert.infer_fields({'encoder': {'stem.weight': np.zeros(3)}})
  assert "neither a ResNet's" in problem and "'stem.weight'" in problem
