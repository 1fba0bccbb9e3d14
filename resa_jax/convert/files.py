"""A .pth file -> a converted checkpoint folder, and reading that folder back.

A converted checkpoint is a folder with `variables/` (an orbax checkpoint of
{'params', 'batch_stats'[, 'momentum_params', 'momentum_batch_stats']}) and
`resa_jax_metadata.json` (the model fields the weights were converted for, and the
source file), which `python -m resa_jax.evaluate` reads to build the model.  The folder
is written under a temporary name next to it and renamed when complete, so a failed or
interrupted conversion leaves no partial output.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any, Mapping

import jax
import numpy as np

from resa_jax.convert import architecture
from resa_jax.convert import state_dict as state_dict_lib
from resa_jax.convert.state_dict import ConversionError

METADATA_FILE = 'resa_jax_metadata.json'


def check_output_dir(out_dir) -> pathlib.Path:
  """The absolute path of `out_dir`; ConversionError unless it is new or an empty folder."""
  out_dir = pathlib.Path(out_dir).absolute()
  if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
    raise ConversionError(f'output {out_dir} exists and is not an empty directory; choose '
                          'a new one')
  return out_dir


def save_converted(out_dir, variables: Mapping[str, Any], metadata: Mapping[str, Any]) -> None:
  """Writes `variables` as an orbax checkpoint in out_dir/'variables' plus metadata JSON.

  out_dir must be new or empty (ConversionError otherwise); it appears only once
  everything is written.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  out_dir = check_output_dir(out_dir)
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.tmp-', dir=out_dir.parent))
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(tmp / 'variables', jax.tree.map(np.asarray, dict(variables)))
    (tmp / METADATA_FILE).write_text(json.dumps(dict(metadata), indent=2, sort_keys=True))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 -> what mkdir would have made
    os.rename(tmp, out_dir)  # replaces an empty out_dir
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def read_metadata(path) -> dict:
  """The metadata of a converted checkpoint (nothing else is read)."""
  meta_file = pathlib.Path(path).absolute() / METADATA_FILE
  if not meta_file.is_file():
    raise ConversionError(f'{meta_file.parent} is not a converted checkpoint (no {METADATA_FILE})')
  try:
    metadata = json.loads(meta_file.read_text())
  except (OSError, ValueError) as e:
    raise ConversionError(f'cannot read {meta_file}: {e}') from e
  if not isinstance(metadata, dict):
    raise ConversionError(f'{meta_file} holds a {type(metadata).__name__}, not a JSON object')
  return metadata


def load_converted(path) -> tuple[dict[str, Any], dict[str, Any]]:
  """(variables, metadata) written by `save_converted`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path).absolute()
  metadata = read_metadata(path)
  with ocp.StandardCheckpointer() as checkpointer:
    variables = checkpointer.restore(path / 'variables')
  return variables, metadata


def convert_file(checkpoint, out_dir, given: Mapping[str, Any] | None = None) -> dict:
  """Converts the .pth file `checkpoint` into the new folder `out_dir`; returns the metadata.

  The model fields (`architecture.FIELDS`) are read from the checkpoint's shapes;
  `given` (flag values) must agree with them, and fills in what the checkpoint does not
  fix (the heads of an encoder-only file).  The metadata records the fields the
  weights fix: arch; width_per_group and stem for a ResNet; the head fields when there
  is a projector.  Raises ConversionError (one line) with nothing written.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  from resa_jax import models  # pylint: disable=g-import-not-at-top
  given = dict(given or {})
  if 'arch' in given and given['arch'] not in models.ARCHITECTURES:
    raise ConversionError(f'unknown architecture {given["arch"]!r}; expected one of '
                          f'{sorted(models.ARCHITECTURES)}')
  out_dir = check_output_dir(out_dir)
  state_dict = state_dict_lib.load_torch_state_dict(checkpoint)
  state_dict_lib.check_finite(state_dict)
  groups = state_dict_lib.split_subnets(state_dict)
  inferred, problem = architecture.infer_fields(groups)
  fields = architecture.choose_fields(inferred, given, problem)
  has_predictor = any(re.match(r'^(module\.)?predictor\.', k) for k in state_dict)
  config = ml_collections.ConfigDict(dict(
      fields, zero_init_residual=False, predictor=has_predictor, dtype='float32'))
  online, momentum = models.create_networks(config)
  variables = state_dict_lib.convert_state_dict(state_dict, online, momentum)
  recorded = ['arch']
  if not models.is_vit(fields['arch']):
    recorded += ['width_per_group', 'stem']
  if 'projector' in variables['params'] or 'projector' in variables.get('momentum_params', {}):
    recorded += ['mlp_layers', 'mlp_dim', 'emb_dim']
  metadata = {k: fields[k] for k in recorded} | {
      'predictor': has_predictor, 'dtype': 'float32', 'parts': sorted(variables),
      'source': str(pathlib.Path(checkpoint).resolve())}
  save_converted(out_dir, variables, metadata)
  return metadata
