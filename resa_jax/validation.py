"""`validate_config`: every check of a config that can run before data loading or a
device is touched, so a bad config fails in seconds with one line.  The one place a
config is checked; what only the data can tell (missing files, too few examples, the
kNN bank's size) is checked when it is opened, before anything is written (train.py).

Every field has a domain, a row of `DOMAINS`: the values it may take, and the words
that say so (`<field> must <words>, got <value>`).  A new config field needs its row
(tests/test_refusals.py checks that every field of configs/default.py has one, and
refuses a value outside it).  The checks between fields (crop lists of one length, the
kNN's k against the bank, the batch over the devices, ...) follow in `validate_config`.
"""

from __future__ import annotations

import math
from typing import Any, Callable


class Domain:
  """The values a config field may take: `accepts(value)`, and `says` them in words
  ('be positive and finite'; a callable for words known only when asked).  A domain
  of names (`noun`: 'dataset') refuses as 'unknown dataset ...; expected ...'."""

  def __init__(self, accepts: Callable[[Any], bool], says: str | Callable[[], str],
               noun: str | None = None):
    self.accepts, self._says, self._noun = accepts, says, noun

  def refusal(self, name: str, value) -> str | None:
    """'NAME must WORDS, got VALUE' if `value` is outside the domain, else None."""
    try:
      if self.accepts(value):
        return None
    except TypeError:  # a comparison with a value of another type
      pass
    says = self._says() if callable(self._says) else self._says
    if self._noun:
      return f'unknown {self._noun} {value!r}; expected {says.removeprefix("be ")}'
    return f'{name} must {says}, got {value!r}'


def _real(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _integer(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def interval(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Domain:
  """A real number in [lo, hi]; `lo_open`, `hi_open`: without that end."""
  return Domain(lambda v: _real(v) and (lo < v if lo_open else lo <= v)
                and (v < hi if hi_open else v <= hi),
                f'be in {"(" if lo_open else "["}{lo:g}, {hi:g}{")" if hi_open else "]"}')


def one_of(values: Callable[[], tuple], noun: str | None = None) -> Domain:
  """One of `values()` (a callable: the lists live in modules imported when asked)."""
  return Domain(lambda v: v in values(), lambda: 'be one of ' + ', '.join(values()), noun)


def each(domain: Domain, says: str) -> Domain:
  """A non-empty tuple (or list) of values of `domain`."""
  return Domain(lambda v: isinstance(v, (tuple, list)) and len(v) > 0
                and all(domain.accepts(x) for x in v), says)


POSITIVE = Domain(lambda v: _real(v) and 0 < v < math.inf, 'be positive and finite')
NON_NEGATIVE = Domain(lambda v: _real(v) and 0 <= v < math.inf, 'be >= 0 and finite')
POSITIVE_INT = Domain(lambda v: _integer(v) and v > 0, 'be a positive integer')
NON_NEGATIVE_INT = Domain(lambda v: _integer(v) and v >= 0, 'be an integer >= 0')
UNSET_OR_POSITIVE_INT = Domain(lambda v: _integer(v) and (v == -1 or v > 0),
                               'be positive, or -1 (unset)')
PROBABILITY = Domain(lambda v: _real(v) and 0 <= v <= 1, 'be a probability')
BOOLEAN = Domain(lambda v: isinstance(v, bool), 'be True or False')
NAME = Domain(lambda v: isinstance(v, str) and v.strip() != '', 'be a non-empty name')
PATH_OR_UNSET = Domain(lambda v: v is None or (isinstance(v, str) and v.strip() != ''),
                       'be a path, or unset (None)')
# jax.random.key and TensorFlow's stateless seeds (int64) take 64 bits, signed.
SEED = Domain(lambda v: _integer(v) and -2**63 <= v < 2**63,
              'be an integer that fits 64 bits (signed, as JAX and TensorFlow take it)')
# Compute dtypes.  float64: for checking numerics (runs compared across meshes or
# processes), under JAX x64 (JAX_ENABLE_X64=1); never for speed.
DTYPES = ('float32', 'bfloat16', 'float16', 'float64')


def _architectures() -> tuple:
  from resa_jax import models  # pylint: disable=g-import-not-at-top
  return tuple(sorted(models.ARCHITECTURES))


def _datasets() -> tuple:
  from resa_jax import data  # pylint: disable=g-import-not-at-top
  return tuple(data.DATASETS)


def _augment_on() -> tuple:
  from resa_jax import data  # pylint: disable=g-import-not-at-top
  return data.AUGMENT_ON


# Every field of configs/default.py, in its order: its domain.
DOMAINS = {
    'seed': SEED,
    # ---- data
    'dataset': one_of(_datasets, 'dataset'),
    'data_dir': PATH_OR_UNSET,
    'manual_dir': PATH_OR_UNSET,
    'tfds_download': BOOLEAN,
    'train_split': NAME,
    'eval_train_split': NAME,
    'eval_split': NAME,
    'crops_nmb': Domain(lambda v: each(NON_NEGATIVE_INT, '').accepts(v) and v[0] >= 1,
                        'count the strong views of each crop group (the weak view comes on '
                        "top, as the authors' --crops_nmb): integers >= 0; the first group "
                        'needs at least one strong view'),
    'crops_size': each(POSITIVE_INT, 'be positive integers (pixels)'),
    'crops_min_scale': each(interval(0, 1, lo_open=True), 'be in (0, 1]'),
    'crops_max_scale': each(interval(0, 1, lo_open=True), 'be in (0, 1]'),
    'gaussian_prob': each(PROBABILITY, 'be probabilities'),
    'solarization_prob': each(PROBABILITY, 'be probabilities'),
    'color_jitter_prob': PROBABILITY,
    # The colour jitter's strengths, bounded as torchvision's ColorJitter bounds them.
    'brightness': NON_NEGATIVE,
    'contrast': NON_NEGATIVE,
    'saturation': NON_NEGATIVE,
    'hue': interval(0, 0.5),
    'grayscale_prob': PROBABILITY,
    'flip_prob': PROBABILITY,
    'eval_resize': POSITIVE_INT,
    'shuffle_buffer': POSITIVE_INT,
    'prefetch': NON_NEGATIVE_INT,
    'augment_on': one_of(_augment_on),
    # 0: never hold a split in that memory (stream it).
    'device_memory_budget_mb': NON_NEGATIVE,
    'host_memory_budget_mb': NON_NEGATIVE,
    'input_shards': UNSET_OR_POSITIVE_INT,
    'fake_image_size': POSITIVE_INT,
    'fake_num_classes': POSITIVE_INT,
    'fake_num_examples': POSITIVE_INT,
    # ---- model
    'arch': one_of(_architectures, 'architecture'),
    'width_per_group': POSITIVE_INT,
    'stem': one_of(lambda: ('imagenet', 'cifar'), 'stem'),
    'zero_init_residual': BOOLEAN,
    'mlp_layers': POSITIVE_INT,
    'mlp_dim': POSITIVE_INT,
    'emb_dim': POSITIVE_INT,
    'predictor': BOOLEAN,
    'drop_path': interval(0, 1, hi_open=True),
    'patch_size': POSITIVE_INT,
    'dtype': one_of(lambda: DTYPES),
    # ---- ReSA
    'temperature': POSITIVE,
    'sinkhorn_epsilon': POSITIVE,
    'sinkhorn_iters': POSITIVE_INT,
    'ema_momentum': interval(0, 1),
    # ---- optimisation
    'optimizer': one_of(lambda: ('sgd', 'adamw'), 'optimizer'),
    'base_lr': POSITIVE,
    'weight_decay': NON_NEGATIVE,
    'sgd_momentum': interval(0, 1, hi_open=True),
    'warmup_epochs': NON_NEGATIVE,
    'final_lr_ratio': NON_NEGATIVE,
    'num_epochs': POSITIVE,
    'batch_size': POSITIVE_INT,
    # A negative clip would turn every update uphill.
    'grad_clip': Domain(lambda v: v is None or POSITIVE.accepts(v),
                        'be positive and finite, or unset (None)'),
    # ---- bookkeeping
    'log_every_steps': POSITIVE_INT,
    'checkpoint_every_steps': POSITIVE_INT,
    'keep_checkpoints': POSITIVE_INT,
    'knn_every_epochs': NON_NEGATIVE_INT,  # 0: no kNN during training
    'knn_k': POSITIVE_INT,
    'knn_temperature': POSITIVE,
    'knn_max_train_examples': UNSET_OR_POSITIVE_INT,
    'steps_per_epoch': UNSET_OR_POSITIVE_INT,
    'num_train_steps': UNSET_OR_POSITIVE_INT,
    'run_steps': UNSET_OR_POSITIVE_INT,
    'allow_config_change': BOOLEAN,
}


def validate_config(config) -> None:
  """Raises ValueError with a one-line cause for a config that cannot train or evaluate:
  a field outside its domain (`DOMAINS`), then the checks between fields."""
  for name, domain in DOMAINS.items():
    if name in config:
      refusal = domain.refusal(name, config[name])
      if refusal:
        raise ValueError(refusal)
  _validate_model(config)
  _validate_input(config)


def _validate_model(config) -> None:
  from resa_jax import models  # pylint: disable=g-import-not-at-top
  if config.get('drop_path', 0.0) > 0 and not models.is_vit(config.arch):
    raise ValueError(f'drop_path is for ViT encoders; --config.arch is {config.arch}')
  conv_stem = models.is_vit(config.arch) and models.vit.ARCHITECTURES[config.arch].conv_stem
  if conv_stem and config.get('patch_size', 16) != 16:
    raise ValueError(f'patch_size {config.patch_size!r}: a positive size for a plain ViT; '
                     f'the ViTC conv stem has patches of 16')


def smallest_knn_bank(config) -> int | None:
  """The most examples the training kNN's memory bank can have, where the config alone
  tells (knn_max_train_examples, fake data's size); None where only the data does."""
  bounds = [config.knn_max_train_examples] if config.knn_max_train_examples > 0 else []
  if config.dataset == 'fake':
    bounds.append(config.fake_num_examples)
  return min(bounds, default=None)


def _validate_input(config) -> None:
  """The checks between the input's fields: crop groups, evaluation size, dtype, the
  kNN's k, the batch over the devices."""
  import jax  # pylint: disable=g-import-not-at-top
  from resa_jax import sharding  # pylint: disable=g-import-not-at-top
  groups = {name: tuple(config[name]) for name in (
      'crops_nmb', 'crops_size', 'crops_min_scale', 'crops_max_scale',
      'gaussian_prob', 'solarization_prob')}
  lengths = {name: len(value) for name, value in groups.items()}
  if len(set(lengths.values())) != 1:
    raise ValueError(f'crop-group lists must have equal lengths, got {lengths}')
  for lo, hi in zip(groups['crops_min_scale'], groups['crops_max_scale']):
    if not lo <= hi:
      raise ValueError('need 0 < crops_min_scale <= crops_max_scale <= 1, got '
                       f'{groups["crops_min_scale"]} and {groups["crops_max_scale"]}')
  if config.eval_resize < groups['crops_size'][0]:
    raise ValueError(f'eval_resize ({config.eval_resize}) must be >= crops_size[0] '
                     f'({groups["crops_size"][0]}): evaluation centre-crops the resized image')
  if config.dtype == 'float64' and not jax.config.jax_enable_x64:
    raise ValueError('dtype float64 needs JAX x64: set JAX_ENABLE_X64=1 (float64 is for '
                     'checking numerics, not for training)')
  bank = smallest_knn_bank(config)
  if config.knn_every_epochs > 0 and bank is not None and config.knn_k > bank:
    bound = ('knn_max_train_examples' if bank == config.knn_max_train_examples
             else 'fake_num_examples')
    raise ValueError(f'knn_k ({config.knn_k}) exceeds the kNN memory bank: at most {bank} '
                     f'examples ({bound}={bank}); lower --config.knn_k')
  sharding.check_batch_size(config.batch_size, jax.device_count())
  from resa_jax.data import order  # pylint: disable=g-import-not-at-top
  order.num_input_shards(config, jax.process_count())
