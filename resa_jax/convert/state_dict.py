"""PyTorch state dicts -> the variable trees of `resa_jax.models`.

Reads
* the "full checkpoint" layout ``{'state_dict': {'module.encoder.*',
  'module.projector.*', 'module.predictor.*', 'module.momentum_encoder.*',
  'module.momentum_projector.*'}}`` (DDP prefix optional), and
* a plain encoder state dict (torchvision-style keys ``conv1.weight``,
  ``layer1.0.bn1.running_mean`` ..., optionally under ``state_dict`` and/or with
  a ``module.`` / ``module.encoder.`` / ``encoder.`` prefix; a ``fc.*`` classifier
  is ignored),

into params and BatchNorm running statistics.  The Flax model is initialised first
(shapes only) and every one of its leaves is looked up in the state dict: a missing
key, an unexpected key or a shape that does not fit the chosen architecture is a
one-line `ConversionError` naming it.  PyTorch is imported lazily, only to read files.
"""

from __future__ import annotations

import pathlib
import pickle
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

SUBNETS = ('encoder', 'projector', 'predictor', 'momentum_encoder', 'momentum_projector')


class ConversionError(ValueError):
  """A checkpoint that does not fit the chosen architecture."""


# ---------------------------------------------------------------- reading ----

def load_torch_state_dict(path) -> dict[str, np.ndarray]:
  """Reads a .pth/.pt file into {key: float32/int numpy array} (CPU, no torch modules)."""
  path = pathlib.Path(path)
  if not path.is_file():  # before importing torch, which takes seconds
    raise ConversionError(f'checkpoint not found: {path}')
  try:
    import torch
  except ImportError as e:  # pragma: no cover - depends on the install
    raise ConversionError("PyTorch is needed to read .pth files: pip install 'resa_jax[torch]'") from e
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:  # torch's weights-only unpickler refused the content
    raise ConversionError(f'cannot read {path} as a PyTorch checkpoint: torch.load with '
                          'weights_only=True refused its content (not written by torch.save, '
                          'damaged, or holding objects other than tensors and plain '
                          'containers)') from e
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(f'cannot read {path} as a PyTorch checkpoint (torch.load with '
                          f'weights_only=True): {type(e).__name__}: {_first_sentence(e)}') from e
  for key in ('state_dict', 'model', 'teacher'):
    if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
      obj = obj[key]
      break
  if not isinstance(obj, Mapping):
    raise ConversionError(f'{path} holds a {type(obj).__name__}, not a state dict')
  def to_numpy(v):
    v = v.detach().cpu()
    if v.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
      v = v.float()
    return v.numpy()
  return {k: to_numpy(v) for k, v in obj.items() if hasattr(v, 'detach')}


def _first_sentence(error: Exception, max_len: int = 200) -> str:
  """The first sentence of an error's first line (torch's go on with advice)."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[0].split('. ', 1)[0][:max_len] if lines else ''


def split_subnets(state_dict: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
  """Groups keys by sub-network; a plain encoder state dict becomes {'encoder': ...}.

  In a full checkpoint, a key outside the five sub-networks is a `ConversionError`.
  """
  stripped = {re.sub(r'^module\.', '', k): v for k, v in state_dict.items()}
  groups: dict[str, dict[str, np.ndarray]] = {}
  for key, value in stripped.items():
    head, _, rest = key.partition('.')
    if head in SUBNETS and rest:
      groups.setdefault(head, {})[rest] = value
  if groups:
    stray = sorted(k for k in state_dict
                   if re.sub(r'^module\.', '', k).partition('.')[0] not in SUBNETS)
    if stray:
      raise ConversionError(f'{len(stray)} checkpoint key(s) belong to none of {SUBNETS}, '
                            f'e.g. {stray[0]!r}')
    return groups
  # A plain encoder: torchvision-style keys, classifier dropped.
  return {'encoder': {k: v for k, v in stripped.items() if not k.startswith('fc.')}}


# ---------------------------------------------------------------- mapping ----

def _torch_module_name(flax_path: tuple[str, ...]) -> str:
  """('layer1_0', 'downsample_conv') -> 'layer1.0.downsample.0'; 'linear2' -> '6'."""
  parts = []
  for name in flax_path:
    if m := re.fullmatch(r'layer(\d+)_(\d+)', name):
      parts += [f'layer{m.group(1)}', m.group(2)]
    elif name == 'downsample_conv':
      parts += ['downsample', '0']
    elif name == 'downsample_bn':
      parts += ['downsample', '1']
    elif m := re.fullmatch(r'linear(\d+)', name):  # nn.Sequential: Linear, BN, ReLU
      parts.append(str(3 * int(m.group(1))))
    elif m := re.fullmatch(r'(blocks|proj)_(\d+)', name):  # ViT: ModuleList / stem Sequential
      parts += [m.group(1), m.group(2)]
    elif m := re.fullmatch(r'seq_(\d+)', name):  # ViT heads: the Sequential index itself
      parts.append(m.group(1))
    else:
      parts.append(name)
  return '.'.join(parts)


def _is_head(subnet: str) -> bool:
  return subnet.endswith('projector') or subnet == 'predictor'


def _torch_key(subnet: str, collection: str, path: tuple[str, ...]) -> str:
  *modules, leaf = path
  if _is_head(subnet):
    # Head BN layers are Sequential indices; in the encoder 'bn1' is a real name.
    modules = [str(3 * int(m[2:]) + 1) if re.fullmatch(r'bn\d+', m) else m for m in modules]
  module = _torch_module_name(tuple(modules))
  torch_leaf = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight',
                ('params', 'bias'): 'bias', ('batch_stats', 'mean'): 'running_mean',
                ('batch_stats', 'var'): 'running_var', ('params', 'cls_token'): 'cls_token',
                ('params', 'pos_embed'): 'pos_embed'}[(collection, leaf)]
  return f'{module}.{torch_leaf}' if module else torch_leaf


def _to_flax(value: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
  if value.ndim == 4:  # conv OIHW -> HWIO
    value = value.transpose(2, 3, 1, 0)
  elif value.ndim == 2:  # linear (out, in) -> (in, out)
    value = value.T
  return value


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The PyTorch shape of a Flax leaf: HWIO -> OIHW, (in, out) -> (out, in)."""
  shape = tuple(int(d) for d in flax_shape)
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return shape[::-1] if len(shape) == 2 else shape


def convert_subnet(subnet: str, torch_sd: Mapping[str, np.ndarray], template: Mapping[str, Any],
                   *, strict: bool = True) -> dict[str, Any]:
  """Fills `template` ({'params': ..., 'batch_stats': ...}) from one sub-network's keys."""
  used = set()

  def fill(collection):
    def leaf(path, ref):
      names = tuple(p.key for p in path)
      key = _torch_key(subnet, collection, names)
      if key not in torch_sd:
        raise ConversionError(f'{subnet}: key {key!r} (for {"/".join(names)}) is missing '
                              'from the checkpoint; is the architecture right?')
      value = _to_flax(np.asarray(torch_sd[key]), ref.shape)
      if value.shape != tuple(ref.shape):
        raise ConversionError(f'{subnet}: {key!r} has shape {tuple(torch_sd[key].shape)}, the '
                              f'model expects {_torch_shape(ref.shape)} for '
                              f'{"/".join(names)}; is the architecture right?')
      used.add(key)
      return jnp.asarray(value, ref.dtype)
    return jax.tree_util.tree_map_with_path(leaf, template.get(collection, {}))

  out = {'params': fill('params'), 'batch_stats': fill('batch_stats')}
  ignored = {k for k in torch_sd if k.endswith('num_batches_tracked') or k.startswith('fc.')}
  unexpected = sorted(set(torch_sd) - used - ignored)
  if strict and unexpected:
    raise ConversionError(f'{subnet}: {len(unexpected)} checkpoint key(s) not used by the model, '
                          f'e.g. {unexpected[0]!r}; is the architecture right?')
  return out


def convert_state_dict(state_dict: Mapping[str, np.ndarray], online_net, momentum_net,
                       image_size: int = 64) -> dict[str, Any]:
  """Converts a full or encoder-only state dict for the given SSLNetworks.

  Returns {'params', 'batch_stats'} for the online network (encoder, projector,
  predictor as present) and, for a full checkpoint, 'momentum_params' /
  'momentum_batch_stats'.  Subtrees absent from the checkpoint are absent here.
  """
  groups = split_subnets(state_dict)
  x = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
  online_tmpl = jax.eval_shape(lambda: online_net.init(jax.random.key(0), x, train=False))
  momentum_tmpl = jax.eval_shape(lambda: momentum_net.init(jax.random.key(0), x, train=False))
  result: dict[str, dict[str, Any]] = {}
  for subnet, torch_sd in groups.items():
    is_momentum = subnet.startswith('momentum_')
    part = subnet.replace('momentum_', '')
    tmpl = momentum_tmpl if is_momentum else online_tmpl
    if part not in tmpl['params']:
      raise ConversionError(f'the checkpoint has {subnet}.* but the model has no {part}; '
                            'set the predictor/projector options to match')
    sub_tmpl = {c: tmpl[c][part] for c in ('params', 'batch_stats') if part in tmpl.get(c, {})}
    converted = convert_subnet(subnet, torch_sd, sub_tmpl)
    prefix = 'momentum_' if is_momentum else ''
    for collection, tree in converted.items():
      result.setdefault(prefix + collection, {})[part] = tree
  if 'encoder' not in result.get('params', {}) and 'encoder' not in result.get('momentum_params', {}):
    raise ConversionError('no encoder weights found in the checkpoint')
  return result


MOMENTUM_ENCODER_PREFIX = 'module.momentum_encoder.'


def encoder_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The encoder keys of an encoder-only file, in the three layouts the authors'
  `load_pretrained_encoder` accepts: a plain state dict, one under 'state_dict', and
  keys prefixed 'module.momentum_encoder.' (stripped; other keys, such as the rest of
  a full checkpoint, are not the encoder and are left out).
  """
  if isinstance(state_dict.get('state_dict'), Mapping):
    state_dict = state_dict['state_dict']
  prefixed = {k[len(MOMENTUM_ENCODER_PREFIX):]: v for k, v in state_dict.items()
              if k.startswith(MOMENTUM_ENCODER_PREFIX)}
  return prefixed or dict(state_dict)


def convert_encoder(state_dict: Mapping[str, Any], encoder, image_size: int = 224,
                    ) -> tuple[dict[str, Any], dict[str, int]]:
  """An encoder-only state dict -> ({'params', 'batch_stats'}, counts) for `encoder`.

  Their loader uses load_state_dict(strict=False), so a wrongly prefixed file loads
  nothing silently; here every model leaf must be filled from a key of the right shape
  and every checkpoint key used (BatchNorm's num_batches_tracked, unused at eval, and a
  ResNet's fc.* classifier aside),
  else a one-line ConversionError.  counts: {'checkpoint_keys', 'used_keys',
  'model_leaves'}.
  """
  torch_sd = encoder_state_dict(state_dict)
  if not torch_sd:
    raise ConversionError('the checkpoint holds no tensors')
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  template = jax.eval_shape(lambda: encoder.init(jax.random.key(0), x, train=False))
  variables = convert_subnet('encoder', torch_sd, template)
  leaves = len(jax.tree_util.tree_leaves(variables))
  ignored = sum(k.endswith('num_batches_tracked') or k.startswith('fc.') for k in torch_sd)
  counts = {'checkpoint_keys': len(torch_sd), 'used_keys': len(torch_sd) - ignored,
            'model_leaves': leaves}
  if counts['used_keys'] != leaves:  # a key used twice, or a template leaf not filled
    raise ConversionError(f'encoder: {leaves} model leaves but {counts["used_keys"]} '
                          'checkpoint keys used; is the architecture right?')
  return variables, counts


def check_finite(state_dict: Mapping[str, np.ndarray]) -> None:
  """ConversionError naming the first tensor (in the file's order) with NaN/Inf
  entries, how many it has and how many other tensors have some."""
  bad = {k: int(np.size(v) - np.isfinite(v).sum()) for k, v in state_dict.items()
         if np.issubdtype(np.asarray(v).dtype, np.floating)}
  bad = {k: n for k, n in bad.items() if n}
  if bad:
    key = next(iter(bad))
    more = f'; {len(bad) - 1} more tensor(s) have some' if len(bad) > 1 else ''
    raise ConversionError(f'{key} has {bad[key]} non-finite (NaN/Inf) entries of '
                          f'{np.size(state_dict[key])}{more}: the checkpoint has diverged; '
                          'convert an earlier one')
