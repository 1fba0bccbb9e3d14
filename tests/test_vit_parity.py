"""Parity of the ViT encoders with the authors' PyTorch ViT, on $RESA_REFERENCE_DIR/vit/.

The folder (README there) holds `<name>_encoder.pth` state dicts and `vit_vectors.npz`
with inputs and their eval-mode outputs.  Models are discovered from the files
(`eval_features_<name>` keys with a matching .pth), so any files of that format are
checked; nothing is hard-coded.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resa_jax import convert
from resa_jax.models import vit

ATOL = 1e-5  # the folder's README: float32 vs. float64 differ by ~2.4e-6


@pytest.fixture(scope='module')
def vit_dir(reference_dir):
  path = reference_dir / 'vit'
  if not (path / 'vit_vectors.npz').is_file():
    pytest.skip(f'no vit/vit_vectors.npz in {reference_dir}')
  return path


@pytest.fixture(scope='module')
def vectors(vit_dir):
  with np.load(vit_dir / 'vit_vectors.npz') as data:
    return {k: data[k] for k in data.files}


def _names(vit_dir):
  """Models with reference features and a state dict, e.g. ['vit_tiny', 'vitc_tiny']."""
  path = vit_dir / 'vit_vectors.npz'
  if not path.is_file():
    return []
  with np.load(path) as data:
    found = {m.group(1) for k in data.files
             if (m := re.fullmatch(r'eval_features_(?!96_)(.+?)(_float64)?', k))}
  return sorted(n for n in found if (vit_dir / f'{n}_encoder.pth').is_file())


@pytest.fixture(scope='module')
def converted(vit_dir):
  """{name: (encoder module, variables, counts, raw state dict)} for every model found."""
  out = {}
  for name in _names(vit_dir):
    if name not in vit.ARCHITECTURES:
      pytest.fail(f'reference model {name!r} is not one of {sorted(vit.ARCHITECTURES)}')
    state_dict = convert.load_torch_state_dict(vit_dir / f'{name}_encoder.pth')
    encoder = vit.create_vit(name)
    variables, counts = convert.convert_encoder(state_dict, encoder)
    out[name] = (encoder, variables, counts, state_dict)
  if not out:
    pytest.skip('no <name>_encoder.pth with eval_features_<name> in the vit folder')
  return out


def _nhwc(images):
  return jnp.asarray(np.transpose(images, (0, 2, 3, 1)))


def _apply(encoder, variables, images, **kw):
  return np.asarray(jax.jit(lambda v, x: encoder.apply(v, x, **kw))(variables, _nhwc(images)))


def test_inputs_are_the_documented_normalisation(vectors):
  mean = np.asarray([0.485, 0.456, 0.406], np.float32)[:, None, None]
  std = np.asarray([0.229, 0.224, 0.225], np.float32)[:, None, None]
  for pixels, images in (('pixels_u8', 'images'), ('pixels_96_u8', 'images_96')):
    if pixels in vectors:
      got = (vectors[pixels].astype(np.float32) / np.float32(255) - mean) / std
      np.testing.assert_array_equal(got, vectors[images])


def test_every_key_used_and_every_leaf_filled(converted):
  for name, (_, variables, counts, state_dict) in converted.items():
    leaves = len(jax.tree_util.tree_leaves(variables))
    extra = sum(k.endswith('num_batches_tracked') for k in state_dict)
    assert counts == {'checkpoint_keys': len(state_dict), 'used_keys': len(state_dict) - extra,
                      'model_leaves': leaves}, name
    assert leaves == len(state_dict) - extra, name


@pytest.mark.parametrize('suffix,images', [('', 'images'), ('96_', 'images_96')])
def test_eval_features_match(converted, vectors, suffix, images):
  if images not in vectors:
    pytest.skip(f'no {images} in vit_vectors.npz')
  for name, (encoder, variables, _, _) in converted.items():
    want = vectors.get(f'eval_features_{suffix}{name}')
    if want is None:
      continue
    got = _apply(encoder, variables, vectors[images], train=False)
    assert got.shape == want.shape, name
    err = float(np.abs(got - want).max())
    print(f'{name} {vectors[images].shape[-1]}px max abs error {err:.2e}')
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=f'{name} {images}')


def test_position_embedding_interpolation(converted, vectors):
  for name, (_, _, _, state_dict) in converted.items():
    want = vectors.get(f'pos_embed_96_{name}')
    if want is None or 'images_96' not in vectors:
      continue
    side = vectors['images_96'].shape[-1] // vit.PATCH_SIZE
    got = vit.interpolate_pos_embed(jnp.asarray(state_dict['pos_embed']), side, side)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=ATOL, err_msg=name)


def test_sincos_table(vectors):
  keys = [k for k in vectors if k.startswith('pos_embed_sincos_')]
  if not keys:
    pytest.skip('no pos_embed_sincos_* in vit_vectors.npz')
  for key in keys:
    want = vectors[key][0]
    side = int(round(np.sqrt(want.shape[0] - 1)))
    np.testing.assert_allclose(vit.sincos_pos_embed(want.shape[1], side), want, rtol=0,
                               atol=1e-6, err_msg=key)


def test_linear_eval_features_match(converted, vectors):
  for name, (encoder, variables, _, _) in converted.items():
    want = vectors.get(f'linear_eval_features_{name}')
    if want is None:
      continue
    n_last = want.shape[1] // encoder.embed_dim
    got = _apply(encoder, variables, vectors['images'], n_last_blocks=n_last,
                 method=vit.VisionTransformer.linear_features)
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=name)


def test_the_authors_other_layouts_convert_identically(converted):
  for name, (encoder, variables, _, state_dict) in converted.items():
    wrapped = {'state_dict': {convert.MOMENTUM_ENCODER_PREFIX + k: v
                              for k, v in state_dict.items()}}
    again, _ = convert.convert_encoder(wrapped, encoder)
    jax.tree.map(np.testing.assert_array_equal, again, variables)


def test_misfits_are_one_line_errors(converted):
  name, (encoder, _, _, state_dict) = next(iter(converted.items()))
  cases = {
      'missing': {k: v for k, v in state_dict.items() if k != 'norm.bias'},
      'unexpected': {**state_dict, 'head.weight': np.zeros((3, 3), np.float32)},
      'prefix': {'module.' + k: v for k, v in state_dict.items()},
      'shape': {**state_dict, 'cls_token': np.zeros((1, 1, 7), np.float32)},
  }
  for case, sd in cases.items():
    with pytest.raises(convert.ConversionError) as info:
      convert.convert_encoder(sd, encoder)
    assert '\n' not in str(info.value), (name, case)


def _torch_heads(dim, mlp_dim, emb_dim):
  """The authors' ViT heads (src/model.py, is_vit): projector and predictor Sequentials."""
  import torch
  from torch import nn
  torch.manual_seed(0)
  projector = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, mlp_dim),
                            nn.GELU(), nn.Linear(mlp_dim, emb_dim))
  predictor = nn.Sequential(nn.LayerNorm(emb_dim, eps=1e-6), nn.Linear(emb_dim, mlp_dim),
                            nn.GELU(), nn.Linear(mlp_dim, emb_dim))
  with torch.no_grad():  # non-trivial LayerNorm affine parameters
    predictor[0].weight.normal_(1.0, 0.2)
    predictor[0].bias.normal_(0.0, 0.2)
  return projector, predictor


def test_full_checkpoint_with_vit_heads(converted, vectors):
  import ml_collections
  import torch
  from resa_jax.configs import default
  from resa_jax import models
  name, (encoder, enc_vars, _, state_dict) = next(iter(converted.items()))
  mlp_dim, emb_dim = 64, 32
  projector, predictor = _torch_heads(encoder.embed_dim, mlp_dim, emb_dim)
  full = {}
  for sub in ('encoder', 'momentum_encoder'):
    full.update({f'module.{sub}.{k}': v for k, v in state_dict.items()})
  for sub, module in (('projector', projector), ('momentum_projector', projector),
                      ('predictor', predictor)):
    full.update({f'module.{sub}.{k}': v.detach().numpy() for k, v in module.state_dict().items()})
  config = default.get_config()
  config.update(ml_collections.ConfigDict(dict(arch=name, mlp_layers=3, mlp_dim=mlp_dim,
                                               emb_dim=emb_dim, predictor=True,
                                               dtype='float32')))
  online, momentum = models.create_networks(config)
  variables = convert.convert_state_dict(full, online, momentum)
  jax.tree.map(np.testing.assert_array_equal, variables['params']['encoder'], enc_vars['params'])
  h, z = jax.jit(lambda v, x: online.apply(v, x, train=False))(
      {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})},
      _nhwc(vectors['images']))
  np.testing.assert_allclose(np.asarray(h), vectors[f'eval_features_{name}'], rtol=0, atol=ATOL)
  with torch.no_grad():
    want = predictor(projector(torch.from_numpy(np.array(h)))).numpy()
  np.testing.assert_allclose(np.asarray(z), want, rtol=0, atol=ATOL)


def test_vit_heads_init_as_theirs():
  """Xavier-uniform Linear weights (bound sqrt(6 / (fan_in + fan_out))), zero biases, no BN."""
  from resa_jax import models
  net = models.SSLNetwork(encoder=vit.create_vit('vit_tiny'), mlp_dim=64, emb_dim=32,
                          use_predictor=True, vit_heads=True)
  x = jnp.zeros((1, 32, 32, 3))
  variables = jax.jit(lambda: net.init(jax.random.key(0), x, train=False))()
  assert 'batch_stats' not in variables
  for part in ('projector', 'predictor'):
    for name, layer in variables['params'][part].items():
      if layer['bias'].ndim and 'kernel' in layer:
        fan_in, fan_out = layer['kernel'].shape
        assert np.abs(layer['kernel']).max() <= np.sqrt(6 / (fan_in + fan_out)), (part, name)
        assert np.abs(layer['kernel']).max() > 0.9 * np.sqrt(6 / (fan_in + fan_out)), (part, name)
        np.testing.assert_array_equal(layer['bias'], 0)
  assert sorted(variables['params']['projector']) == ['seq_0', 'seq_2', 'seq_4']
  assert sorted(variables['params']['predictor']) == ['seq_0', 'seq_1', 'seq_3']
