"""`python -m resa_jax.convert` as a user runs it (in this process): the model read from
the checkpoint's shapes.  Its refusals are in tests/test_refusals.py.

The checkpoints are the small PyTorch references of tests/torch_reference.py (a width-4
CIFAR ResNet-18 with heads, a width-8 ResNet-50 encoder); `infer_fields` is checked
on those and, for every kind of architecture, on the keys and shapes a Flax template
maps to.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip('torch')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

import torch_reference as reference  # noqa: E402
from helpers import run_in_process  # noqa: E402
from resa_jax import convert, models  # noqa: E402
from resa_jax.convert import state_dict as state_dict_lib  # noqa: E402

CIFAR18 = dict(arch='resnet18', wpg=4, stem='cifar')


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


def test_no_model_flags_needed(files, tmp_path, monkeypatch, capsys):
  """Without model flags the model is read from the checkpoint: the full ResNet-18's
  variables equal a conversion with the right flags; an encoder-only file records no
  head fields."""
  out = tmp_path / 'out18'
  proc = run_in_process('resa_jax.convert', f'--checkpoint={files["full18"]}', f'--out={out}',
                        monkeypatch=monkeypatch, capsys=capsys)
  assert proc.code == 0, proc.stderr[-2000:]
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
  proc = run_in_process('resa_jax.convert', '--checkpoint', files['encoder50'], '--out', out,
                        monkeypatch=monkeypatch, capsys=capsys)  # space-separated too
  assert proc.code == 0, proc.stderr[-2000:]
  meta = convert.read_metadata(out)
  assert (meta['arch'], meta['width_per_group'], meta['stem']) == ('resnet50', 8, 'imagenet')
  assert 'mlp_dim' not in meta and meta['parts'] == ['batch_stats', 'params']


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
