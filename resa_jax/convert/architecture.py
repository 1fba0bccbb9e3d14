"""The architecture a PyTorch state dict holds, read from its keys and shapes.

The authors' checkpoints do not say which model wrote them, but their shapes do, and
leave no choice: a ResNet's stem kernel is 7x7 ('imagenet') or 3x3 ('cifar'), its stem
width is `width_per_group * widen`, the number of blocks per stage and whether a block
has a conv3 name the architecture, and a Bottleneck's inner width
`int(stem width * width_per_group / 64)` tells `width_per_group` from `widen`.  A
ViT's class token gives its width, its blocks its depth, its patch embedding whether
it has the conv stem.  The projector's Linear layers give `mlp_layers`, `mlp_dim`
(their width) and `emb_dim` (the last one's).

So the converter needs no model flags, and a flag that disagrees with the checkpoint
is refused with the value to use (`choose_fields`), before any model is built.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from resa_jax.convert.state_dict import ConversionError

# The config fields of the model, in the converter's flag order, and the values used
# where neither the checkpoint nor a flag says (the authors' ImageNet ResNet-50).
FIELDS = ('arch', 'width_per_group', 'stem', 'mlp_layers', 'mlp_dim', 'emb_dim')
DEFAULTS = {'arch': 'resnet50', 'width_per_group': 64, 'stem': 'imagenet', 'mlp_layers': 3,
            'mlp_dim': 2048, 'emb_dim': 512}
_STEMS = {7: 'imagenet', 3: 'cifar'}  # conv1 kernel size -> stem


def _indices(state_dict: Mapping[str, Any], pattern: str) -> set[int]:
  """The distinct integers captured by `pattern` at the start of the keys."""
  return {int(m.group(1)) for k in state_dict if (m := re.match(pattern, k))}


def _resnet_fields(sd: Mapping[str, np.ndarray]) -> tuple[dict, str | None]:
  """arch, width_per_group and stem of a torchvision-style ResNet state dict."""
  from resa_jax.models import resnet  # pylint: disable=g-import-not-at-top
  width, _, kernel, _ = np.shape(sd['conv1.weight'])
  fields = {}
  if kernel in _STEMS:
    fields['stem'] = _STEMS[kernel]
  stages = tuple(len(_indices(sd, rf'layer{i}\.(\d+)\.')) for i in range(1, 6))
  stages = stages[:4] if not stages[4] else stages
  expansion = 4 if 'layer1.0.conv3.weight' in sd else 1
  block = 'Bottleneck' if expansion == 4 else 'BasicBlock'
  inner = np.shape(sd.get('layer1.0.conv1.weight', np.zeros(0)))[0] if expansion == 4 else None
  for name, (cls, sizes, widen) in resnet.ARCHITECTURES.items():
    if cls.expansion != expansion or tuple(sizes) != stages or width % widen:
      continue
    wpg = width // widen
    if inner is None or int(width * wpg / 64) == inner:
      fields.update(arch=name, width_per_group=int(wpg))
      break
  else:
    return fields, (f'its encoder is a ResNet of {block} blocks {stages} with a stem of '
                    f'{width} channels, which none of {sorted(resnet.ARCHITECTURES)} is')
  if 'stem' not in fields:
    return fields, (f'its conv1.weight is {kernel}x{kernel}: neither stem (7x7 imagenet, '
                    '3x3 cifar)')
  return fields, None


def _vit_fields(sd: Mapping[str, np.ndarray]) -> tuple[dict, str | None]:
  """arch of one of the authors' ViT / ViTC state dicts."""
  from resa_jax.models import vit  # pylint: disable=g-import-not-at-top
  dim = int(np.shape(sd['cls_token'])[-1])
  depth = len(_indices(sd, r'blocks\.(\d+)\.'))
  conv = any(k.startswith('patch_embed.proj.0.') for k in sd)
  for name, (d, n, _, c) in vit.ARCHITECTURES.items():
    if (d, n, c) == (dim, depth, conv):
      return {'arch': name}, None
  kind = 'ViTC (conv stem)' if conv else 'ViT'
  return {}, (f'its encoder is a {kind} of width {dim} and depth {depth}, which none of '
              f'{sorted(vit.ARCHITECTURES)} is')


def _head_fields(sd: Mapping[str, np.ndarray]) -> dict:
  """mlp_layers, mlp_dim, emb_dim from a projector's Linear layers (Sequential indices)."""
  linear = sorted((int(m.group(1)), np.shape(v)) for k, v in sd.items()
                  if (m := re.fullmatch(r'(\d+)\.weight', k)) and np.ndim(v) == 2)
  if not linear:
    return {}
  fields = {'mlp_layers': len(linear), 'emb_dim': int(linear[-1][1][0])}
  if len(linear) > 1:
    fields['mlp_dim'] = int(linear[0][1][0])
  return fields


def infer_fields(groups: Mapping[str, Mapping[str, np.ndarray]]) -> tuple[dict, str | None]:
  """(fields, problem): the model fields the shapes of `split_subnets`' groups fix.

  fields holds only what the checkpoint determines (no head fields without a
  projector; no width_per_group / stem for a ViT).  problem: None, or why the
  encoder is none of `resa_jax.models.ARCHITECTURES` (one clause, for an error).
  """
  encoder = groups.get('encoder') or groups.get('momentum_encoder') or {}
  projector = groups.get('projector') or groups.get('momentum_projector') or {}
  if 'conv1.weight' in encoder:
    fields, problem = _resnet_fields(encoder)
  elif 'cls_token' in encoder:
    fields, problem = _vit_fields(encoder)
  else:
    example = next(iter(sorted(encoder)), None)
    fields, problem = {}, ("its encoder's keys are neither a ResNet's (conv1.weight, "
                           f"layer1.0.*) nor a ViT's (cls_token, blocks.0.*), e.g. {example!r}")
  return {**fields, **_head_fields(projector)}, problem


def _as_flags(fields: Mapping[str, Any]) -> str:
  return ' '.join(f'--{k}={v}' for k, v in fields.items())


def choose_fields(inferred: Mapping[str, Any], given: Mapping[str, Any],
                  problem: str | None = None) -> dict:
  """The model fields to convert with: the given flags, else the checkpoint's, else
  `DEFAULTS`.

  Raises ConversionError naming each given flag the checkpoint contradicts and the
  value its shapes say, and, when the architecture cannot be read from the checkpoint
  (`problem`) and no --arch is given, why.
  """
  conflicts = [k for k in FIELDS if k in given and k in inferred and given[k] != inferred[k]]
  if conflicts:
    mine = {k: given[k] for k in conflicts}
    theirs = {k: inferred[k] for k in conflicts}
    them = 'it' if len(conflicts) == 1 else 'them'
    raise ConversionError(f'{_as_flags(mine)} does not fit the checkpoint: its shapes say '
                          f'{_as_flags(theirs)} (change {them}, or leave {them} out to use '
                          "the checkpoint's)")
  if problem and 'arch' not in given:
    raise ConversionError(f'cannot tell the architecture from the checkpoint: {problem}')
  return {**DEFAULTS, **inferred, **given}
