"""Checkpoints of a training run: an orbax manager of TrainStates that falls back over
unreadable steps, and the one shape check every reader uses.

`leaf_shapes` names every array of a pytree (a state, a template or orbax's stored
metadata) by its path; `first_shape_difference` says in words where two such maps
first disagree.  Training (resume), evaluation (`evaluate/model.py`) and conversion
compare shapes only through these two, so a checkpoint of another architecture is
always refused with the same kind of message, naming the first array that differs.

Layout on disk: `<workdir>/checkpoints/<step>/default/` (orbax's StandardSave of one
item).  Saves are asynchronous after the host copy; a save still being written is
never deleted.  A save the disk refuses (full, quota, read-only) raises an OSError
naming the checkpoints folder, from `save` (the previous save's failure shows there),
`wait` or `close`; orbax writes each step under a temporary name and renames it when
complete, so the earlier checkpoints stay readable.
"""

from __future__ import annotations

import contextlib
import pathlib
import time

from absl import logging
import jax

from resa_jax import reporting


class CheckpointMismatchError(ValueError):
  """A checkpoint whose arrays do not fit the config (another architecture)."""


def leaf_shapes(tree) -> dict[str, tuple]:
  """{'params/encoder/conv1/kernel': shape, ...} of a pytree of arrays or metadata."""
  def name(path):
    return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                    for k in path)
  return {name(path): tuple(getattr(leaf, 'shape', ()))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def first_shape_difference(stored: dict, expected: dict) -> str | None:
  """The first difference between a checkpoint's and a model's {name: shape}, in words.

  Parameters are compared first (they make the clearest message); None if equal.
  """
  for name in sorted(expected, key=lambda n: (not n.startswith('params/'), n)):
    if name not in stored:
      return f'the checkpoint has no {name}'
    if tuple(stored[name]) != tuple(expected[name]):
      return (f'{name} is {tuple(stored[name])} in the checkpoint, '
              f'{tuple(expected[name])} in the model')
  extra = sorted(set(stored) - set(expected))
  return f'the model has no {extra[0]}' if extra else None


class Checkpoints:
  """Orbax CheckpointManager of TrainStates with fallback over unreadable steps."""

  def __init__(self, directory: pathlib.Path, keep: int):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.directory = directory.absolute()
    # item_handlers fixes the single-item layout (<step>/default); left to orbax, it is
    # guessed from the newest step, and an emptied newest step makes all unreadable.
    self.manager = ocp.CheckpointManager(
        self.directory, item_handlers=ocp.StandardCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=True))

  def restore_latest(self, template):
    """(state, step) from the newest readable checkpoint, or (template, None) if none.

    An unreadable checkpoint (truncated file, missing directory) is reported with
    a warning and skipped; nothing is deleted here.  Raises ValueError (one line)
    when a checkpoint's shapes do not fit `template` (another architecture or
    optimizer) or when checkpoints exist but none is readable.
    """
    abstract = jax.tree.map(self._ocp.utils.to_shape_dtype_struct, template)
    expected = leaf_shapes(abstract)
    self.manager.reload()  # see steps written by an earlier process
    steps = sorted(self.manager.all_steps(), reverse=True)
    for step in steps:
      try:
        if not (self.directory / str(step) / 'default').is_dir():  # orbax's message misleads
          raise FileNotFoundError(f'{self.directory / str(step) / "default"} is missing')
        stored = leaf_shapes(self.manager.item_metadata(step))
        if not stored:
          raise ValueError('no arrays in its metadata')
        mismatch = first_shape_difference(stored, expected)
        if mismatch:
          raise CheckpointMismatchError(
              f'the checkpoint at step {step} in {self.directory} does not fit the config '
              f'({mismatch}): rerun with the config it was trained with, or use a new workdir')
        state = self.manager.restore(step, args=self._ocp.args.StandardRestore(abstract))
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        for _ in range(10):  # the innermost cause names the file and what is wrong with it
          e = e.__cause__ or e.__context__ or e
        reason = f'{type(e).__name__}: {" ".join(str(e).split())[:300]}'
        logging.warning('checkpoint at step %d is unreadable (%s); trying an older one',
                        step, reason)
        print(f'warning: checkpoint at step {step} is unreadable ({reason}); '
              'falling back to an older one', flush=True)
        continue
      return state, step
    if steps:  # starting afresh here would mix new steps with the unreadable old ones
      raise ValueError(f'no readable checkpoint in {self.directory} (steps '
                       f'{", ".join(map(str, sorted(steps)))}; see the warnings above); '
                       'move it away to start afresh')
    return template, None

  @contextlib.contextmanager
  def _refused_writes_named(self):
    """Re-raises a write the system refused (orbax's OSError, or TensorStore's
    ValueError, whose status text carries the errno) as an OSError naming this folder."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      refused = reporting.refused_write(e)
      if refused is None:
        raise
      raise OSError(refused.errno, refused.strerror, str(self.directory)) from e

  def save(self, step: int, state) -> float:
    """Saves (asynchronously after the host copy); returns the blocking seconds."""
    start = time.perf_counter()
    with self._refused_writes_named():
      if step in self.manager.all_steps():  # an unreadable leftover we fell back from
        self.manager.wait_until_finished()  # never delete a save still being written
        self.manager.delete(step)
      self.manager.save(step, args=self._ocp.args.StandardSave(state), force=True)
    return time.perf_counter() - start

  def wait(self):
    with self._refused_writes_named():
      self.manager.wait_until_finished()

  def close(self):
    with self._refused_writes_named():
      self.manager.wait_until_finished()
    self.manager.close()


def checkpoint_steps(directory: pathlib.Path) -> list[int]:
  """The steps (sorted) that have a folder in `directory`; [] if it does not exist."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def stored_shapes(step_dir: pathlib.Path) -> dict[str, tuple] | None:
  """{name: shape} of the TrainState saved in `step_dir`, None if unreadable."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  item = pathlib.Path(step_dir) / 'default'
  if not item.is_dir():
    return None
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # orbax warns that Checkpoints wrote no step
  try:                                  # metadata file; the tree's is all we need
    with ocp.StandardCheckpointer() as checkpointer:
      metadata = checkpointer.metadata(item)
  except Exception:  # pylint: disable=broad-except  (restore_latest reports it)
    return None
  finally:
    logging.set_verbosity(verbosity)
  tree = getattr(metadata, 'item_metadata', metadata)
  return leaf_shapes(tree) if tree is not None else None
