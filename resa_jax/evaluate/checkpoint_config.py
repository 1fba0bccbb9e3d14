"""The config an evaluation runs with: what the checkpoint records, and what the command
line adds.

A training workdir records the whole config it was trained with (`config.json` with the
changes of `config_history.json`, `workdir_lib.trained_config`); a converted checkpoint the
model fields its weights fix (`resa_jax_metadata.json`).  `config_for_checkpoint`
applies one rule:

* The model is the checkpoint's.  The fields that fix its arrays (the model fields
  and, for a workdir, the predictor and the optimizer, whose state it holds) are taken
  from what it records, whatever --config says; a `note:` line names each --config
  value so replaced.
* Without --config a workdir is evaluated with its own config; `--config.FIELD=VALUE`
  changes a field of it (where the data now lives, say).  A converted checkpoint
  records no dataset, so it needs --config (e.g. `--config=imagenet`).
* With --config, the dataset and every other field come from it.
* An explicit `--config.FIELD=VALUE` that contradicts a recorded field is refused
  with one line listing them: it asks for a model the weights are not.
* A workdir without config.json (copied checkpoints) is evaluated with --config as
  given; `model.load_model` then checks its shapes against the checkpoint's.
"""

from __future__ import annotations

import pathlib
from typing import Any, Iterable

import ml_collections

from resa_jax import checkpoints
from resa_jax import workdir as workdir_lib
from resa_jax.evaluate import common
from resa_jax.evaluate import model

# What a training checkpoint's arrays depend on: the networks and the optimizer state.
WORKDIR_FIELDS = model.MODEL_FIELDS + ('predictor', 'optimizer', 'grad_clip')


def recorded_config(checkpoint) -> tuple[str, dict | None, str]:
  """(kind, fields, where): what `checkpoint` records about the model that wrote it.

  kind: 'workdir' or 'converted'.  fields: a workdir's whole trained config, a
  converted checkpoint's model fields; None for a workdir without config.json.
  where: the file read.  EvaluationError if `checkpoint` is neither kind.
  """
  from resa_jax import convert  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(checkpoint).absolute()
  if not path.exists():
    raise common.EvaluationError(f'checkpoint {path} does not exist')
  if (path / convert.METADATA_FILE).is_file():
    try:
      metadata = convert.read_metadata(path)
    except convert.ConversionError as e:
      raise common.EvaluationError(str(e)) from e
    return ('converted', {k: metadata[k] for k in model.MODEL_FIELDS if k in metadata},
            str(path / convert.METADATA_FILE))
  checkpoint_dir = path / 'checkpoints' if (path / 'checkpoints').is_dir() else path
  if not checkpoints.checkpoint_steps(checkpoint_dir):
    raise common.EvaluationError(
        f'{path} is neither a training workdir with checkpoints nor a converted '
        f'checkpoint (no checkpoints/ and no {convert.METADATA_FILE})')
  workdir = checkpoint_dir.parent
  return 'workdir', workdir_lib.trained_config(workdir), str(workdir / 'config.json')


def _listing(config, names) -> str:
  return ', '.join(f'{k}={config[k]}' for k in names)


def config_for_checkpoint(config, checkpoint, *, config_given: bool = True,
                          overridden: Iterable[str] = ()) -> tuple[Any, list[str]]:
  """(config, notes): the config to evaluate `checkpoint` with (module docstring).

  Args:
    config: the parsed --config, or, when `config_given` is False, the default config;
      with the command line's `--config.FIELD=VALUE` overrides applied.
    checkpoint: a training workdir, its checkpoints/ folder, or a converted checkpoint.
    config_given: whether --config named a file.
    overridden: the fields set by `--config.FIELD=VALUE`.

  Returns:
    An unlocked copy of `config` with the checkpoint's fields, and `note:` lines (the
    --config values replaced by the checkpoint's).

  Raises:
    EvaluationError: an override that contradicts the checkpoint; a converted
      checkpoint without --config; a workdir without config.json without --config.
  """
  kind, recorded, where = recorded_config(checkpoint)
  overridden = set(overridden)
  if recorded is None:
    if not config_given:
      raise common.EvaluationError(
          f'{where} is missing or unreadable, so the model cannot be read from the workdir: '
          'give --config, the config it was trained with')
    return config, []
  fields = [k for k in (WORKDIR_FIELDS if kind == 'workdir' else model.MODEL_FIELDS)
            if k in recorded]
  conflicts = [k for k in fields if k in overridden and config[k] != recorded[k]]
  if conflicts:
    them = 'it' if len(conflicts) == 1 else 'them'
    raise common.EvaluationError(
        f'{" ".join(f"--config.{k}={config[k]}" for k in conflicts)} contradicts the '
        f'checkpoint, which records {_listing(recorded, conflicts)} ({where}); leave {them} '
        "out: the model evaluated is the checkpoint's")
  if kind == 'converted' and not config_given:
    raise common.EvaluationError(
        f'{checkpoint} is a converted checkpoint: it records its model '
        f'({_listing(recorded, fields)}) but not the data; give the data with --config, '
        'e.g. --config=imagenet')
  result = ml_collections.ConfigDict(config.to_dict())
  replaced = [k for k in fields if config_given and config[k] != recorded[k]]
  taken = fields if config_given else [k for k in recorded
                                       if k in result and k not in overridden]
  for name in taken:
    try:
      result[name] = recorded[name]
    except (TypeError, ValueError) as e:
      raise common.EvaluationError(f'{where}: {name}={recorded[name]!r} is not a value of '
                                   f'that field ({e})') from e
  notes = []
  if replaced:
    notes.append(f"note: the model is the checkpoint's ({where}): " + ', '.join(
        f'{k}={recorded[k]} (--config: {config[k]})' for k in replaced))
  return result, notes
