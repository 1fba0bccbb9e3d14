"""Parity with the authors' PyTorch ReSA, on the vectors in $RESA_REFERENCE_DIR.

Cases are discovered from the files' keys (sk{n}_*, loss{n}_*, dist_rank{r}.npz),
so any set of vectors in the documented format is checked; nothing is hard-coded.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resa_jax import losses
from resa_jax import sinkhorn as sk


def _cases(reference_dir, prefix):
  path = reference_dir / 'reference_vectors.npz'
  if not path.exists():
    return []
  with np.load(path) as data:
    ids = sorted({int(m.group(1)) for k in data.files
                  if (m := re.fullmatch(prefix + r'(\d+)_.*', k))})
    return [(i, {k[len(f'{prefix}{i}_'):]: data[k] for k in data.files
                 if k.startswith(f'{prefix}{i}_')}) for i in ids]


def _require(cases, what):
  if not cases:
    pytest.skip(f'no {what} cases in the reference folder')
  return cases


def test_sinkhorn_matches_reference(reference_dir):
  cases = _require(_cases(reference_dir, 'sk'), 'sk*')
  for n, case in cases:
    got = jax.jit(sk.sinkhorn, static_argnames='num_iters')(
        jnp.asarray(case['scores']), float(case['temp']), num_iters=3)
    want = case['assignment']
    assert got.shape == want.shape, n
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5, err_msg=f'sk{n}')


def test_loss_matches_reference(reference_dir):
  cases = _require(_cases(reference_dir, 'loss'), 'loss*')
  for n, case in cases:
    scores = case['h_online'] @ case['h_momentum'].T
    assignment = sk.sinkhorn(jnp.asarray(scores), 0.05, 3)
    np.testing.assert_allclose(np.asarray(assignment), case['assignment'], rtol=0, atol=1e-5,
                               err_msg=f'loss{n} assignment')
    loss = losses.resa_loss(jnp.asarray(case['z_online']), jnp.asarray(case['z_momentum']),
                            assignment, temperature=0.4)
    np.testing.assert_allclose(float(loss), float(case['value']), rtol=0, atol=1e-5,
                               err_msg=f'loss{n} value')


def test_distributed_sinkhorn_matches_reference(reference_dir):
  files = sorted(reference_dir.glob('dist_rank*.npz'),
                 key=lambda p: int(re.search(r'(\d+)', p.name).group(1)))
  if not files:
    pytest.skip('no dist_rank*.npz in the reference folder')
  ranks = [dict(np.load(f)) for f in files]
  world = len(ranks)
  if len(jax.devices()) < world:
    pytest.skip(f'needs {world} devices')
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:world]), ('data',))
  P = jax.sharding.PartitionSpec
  scores = np.concatenate([r['scores'] for r in ranks])  # rank r's rows, in rank order
  if 'full_scores' in ranks[0]:
    np.testing.assert_array_equal(scores, ranks[0]['full_scores'])
  fn = jax.jit(jax.shard_map(lambda s: sk.sinkhorn(s, 0.05, 3, axis_name='data'),
                             mesh=mesh, in_specs=P('data'), out_specs=P('data')))
  out = fn(jax.device_put(scores, jax.sharding.NamedSharding(mesh, P('data'))))
  shards = sorted(out.addressable_shards, key=lambda s: s.index[0].start)
  assert len(shards) == world
  for r, (shard, ref) in enumerate(zip(shards, ranks)):
    np.testing.assert_allclose(np.asarray(shard.data), ref['assignment'], rtol=0, atol=1e-5,
                               err_msg=f'rank {r}')


# ------------------------------------------------------------ whole model ----
# The reference checkpoint is a ResNet-50 layout; its widths are read off the file.

def _whole_model_inputs(reference_dir):
  ckpt = reference_dir / 'resa_full_checkpoint.pth'
  vectors = reference_dir / 'reference_vectors.npz'
  if not ckpt.exists() or not vectors.exists():
    pytest.skip('no whole-model reference in the folder')
  data = np.load(vectors)
  if 'views' not in data.files:
    pytest.skip('no whole-model vectors in reference_vectors.npz')
  pytest.importorskip('torch')
  import ml_collections
  from resa_jax import convert, models
  state_dict = convert.load_torch_state_dict(ckpt)
  groups = convert.split_subnets(state_dict)
  enc, proj = groups['encoder'], groups['projector']
  linear_keys = sorted((k for k in proj if k.endswith('.weight') and proj[k].ndim == 2),
                       key=lambda k: int(k.split('.')[0]))
  config = ml_collections.ConfigDict(dict(
      arch='resnet50', width_per_group=int(enc['conv1.weight'].shape[0]), stem='imagenet',
      zero_init_residual=False, mlp_layers=len(linear_keys),
      mlp_dim=int(proj[linear_keys[0]].shape[0]), emb_dim=int(proj[linear_keys[-1]].shape[0]),
      predictor='predictor' in groups, dtype='float32'))
  online, momentum = models.create_networks(config)
  variables = convert.convert_state_dict(state_dict, online, momentum)
  views = np.transpose(data['views'], (0, 1, 3, 4, 2))  # (V, N, C, H, W) -> NHWC
  return data, config, online, momentum, variables, views


def test_whole_model_eval_features_match_reference(reference_dir):
  data, _, online, momentum, variables, views = _whole_model_inputs(reference_dir)
  for prefix, net, key in (('', online, 'eval_encoder_features'),
                           ('momentum_', momentum, 'eval_momentum_encoder_features')):
    feats = net.apply({'params': variables[prefix + 'params'],
                       'batch_stats': variables[prefix + 'batch_stats']},
                      jnp.asarray(views[0]), train=False, method='encode')
    want = data[key]
    np.testing.assert_allclose(np.asarray(feats), want, rtol=1e-4,
                               atol=1e-4 * float(np.abs(want).max()), err_msg=key)


def test_whole_model_train_forward_matches_reference(reference_dir):
  from resa_jax import step as step_lib
  import ml_collections
  data, config, online, momentum, variables, views = _whole_model_inputs(reference_dir)
  config.update(ml_collections.ConfigDict(dict(temperature=0.4, sinkhorn_epsilon=0.05,
                                               sinkhorn_iters=3)))
  state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                           batch_stats=variables['batch_stats'],
                           momentum_params=variables['momentum_params'],
                           momentum_batch_stats=variables['momentum_batch_stats'], opt_state=None)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ('data',))
  fn = jax.jit(lambda s, v: step_lib.resa_loss_and_aux(s.params, s, v, jnp.float32(0.99),
                                                    online_net=online, momentum_net=momentum,
                                                    mesh=mesh, config=config))
  loss, aux = fn(state, tuple(jnp.asarray(v) for v in views))
  np.testing.assert_allclose(np.asarray(aux['assignment']), data['train_assignment'], rtol=0,
                             atol=1e-4)
  np.testing.assert_allclose(float(loss), float(data['train_loss']), rtol=1e-4, atol=1e-4)
