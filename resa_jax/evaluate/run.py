"""The evaluation protocols on one checkpoint: what `python -m resa_jax.evaluate` runs.

`run_evaluations(config, checkpoint, output, Options(...))` loads the model once,
extracts each split's features once, runs the asked evaluations in order (kNN,
linear probe, semi-supervised fine-tuning, clustering analysis; docs/method.md,
'Evaluation protocols') and writes `<output>/<evaluation>.json` after each and
`<output>/summary.json`.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import time
from typing import Sequence

import jax
from jax.sharding import Mesh
import numpy as np

from resa_jax import data
from resa_jax import models
from resa_jax import progress as progress_lib
from resa_jax import reporting
from resa_jax import sharding
from resa_jax import validation
from resa_jax.evaluate import clustering
from resa_jax.evaluate import common
from resa_jax.evaluate import features as features_lib
from resa_jax.evaluate import knn
from resa_jax.evaluate import linear
from resa_jax.evaluate import model as model_lib


# --dtype value: the dtype the checkpoint was trained with (its config's).
AS_TRAINED = 'as_trained'


def parse_evaluations(text: str) -> list[str]:
  """'knn,clustering' -> ['knn', 'clustering']; EvaluationError on an unknown name."""
  names = [n.strip() for n in text.split(',') if n.strip()]
  unknown = [n for n in names if n not in common.EVALUATIONS]
  if unknown or not names:
    raise common.EvaluationError(f'unknown evaluation {", ".join(unknown) or repr(text)}; '
                          f'expected a comma-separated list of {", ".join(common.EVALUATIONS)}')
  return list(dict.fromkeys(names))


def default_linear_protocol(config) -> str:
  """'imagenet' for ImageNet-sized data (variable image size), else 'features'."""
  return 'imagenet' if config.dataset in ('imagenet2012', 'imagenet100') else 'features'


@dataclasses.dataclass
class Options:
  """What the command line asks for (flags of the same names)."""
  evaluations: Sequence[str]
  encoder: str = 'momentum'
  batch_size: int = 0  # feature extraction / evaluation; 0: config.batch_size
  knn_ks: Sequence[int] = common.DEFAULT_KNN_KS
  linear_protocol: str = ''  # '': default_linear_protocol(config)
  linear_epochs: int = -1  # -1: 500 (features) / 100 (imagenet)
  linear_batch_size: int = -1  # -1: 1000 (features) / 256 (imagenet)
  # ImageNet protocol, x batch / 256; -1: `linear_probe_recipe` (ViTs 0.03, ResNets 40 if
  # pretrained with batch >= 1024, else 10).
  linear_lr: float = -1.0
  # ViTs' ImageNet probe input; -1 / None: `linear_probe_recipe`'s default for the arch.
  linear_n_last_blocks: int = -1
  linear_avgpool_patchtokens: bool | None = None
  semi_fraction: float = 0.01
  semi_epochs: int = 20
  semi_batch_size: int = 256
  semi_encoder_lr: float = 0.0002  # x batch / 256
  semi_head_lr: float = 40.0  # x batch / 256
  clustering_samples: int = 10_000
  clustering_metric: str = 'cosine'
  tsne: bool = False
  save_features: bool = False
  seed: int = 0
  # Compute dtype of the networks and inputs; 'float32' as the authors (no autocast),
  # AS_TRAINED: the dtype the checkpoint was trained with (the config's, e.g. bfloat16).
  dtype: str = 'float32'

  def check(self) -> None:
    """EvaluationError (one line) on a bad combination; cheap, before any work."""
    model_lib.check_encoder(self.encoder)
    if self.linear_protocol not in ('', 'features', 'imagenet'):
      raise common.EvaluationError("--linear_protocol must be 'features' or 'imagenet', got "
                            f'{self.linear_protocol!r}')
    if self.clustering_metric not in ('cosine', 'euclidean'):
      raise common.EvaluationError("--clustering_metric must be 'cosine' or 'euclidean', got "
                            f'{self.clustering_metric!r}')
    if not self.knn_ks or min(self.knn_ks) < 1:
      raise common.EvaluationError(f'--knn_ks must be positive, got {list(self.knn_ks)}')
    if self.batch_size < 0 or self.semi_batch_size < 1 or self.semi_epochs < 1:
      raise common.EvaluationError('--batch_size must be >= 0, --semi_batch_size and '
                            '--semi_epochs positive')
    if not 0 < self.semi_fraction <= 1:
      raise common.EvaluationError(f'--semi_fraction must be in (0, 1], got {self.semi_fraction}')
    if self.dtype == 'train':  # the first spelling of AS_TRAINED
      raise common.EvaluationError(f'--dtype=train is now --dtype={AS_TRAINED} (the dtype the '
                                   'checkpoint was trained with)')
    if self.dtype not in ('float32', 'bfloat16', 'float16', AS_TRAINED):
      raise common.EvaluationError(f'--dtype must be float32, bfloat16, float16 or {AS_TRAINED} '
                                   f'(the dtype the checkpoint was trained with), got '
                                   f'{self.dtype!r}')
    for name in ('linear_epochs', 'linear_batch_size', 'linear_lr', 'linear_n_last_blocks'):
      value = getattr(self, name)
      if value != -1 and not value > 0:  # -1: the protocol's default
        raise common.EvaluationError(f'--{name} must be positive, or -1 (the protocol\'s '
                                     f'default), got {value!r}')
    if self.clustering_samples < 3:
      raise common.EvaluationError('--clustering_samples must be at least 3')


def linear_probe_recipe(config, options: Options, pretrain_batch) -> dict:
  """Base lr and encoder input of the ImageNet linear probe, as the authors' eval_linear.py.

  ResNets: the encoding; base lr 40 if pre-trained with batch >= 1024 (`pretrain_batch`,
  else config.batch_size), else 10.  ViTs: base lr 0.03 (their scripts/eval/
  linear_vits.sh and eval_linear_vitb.sh), the class tokens of the last
  `n_last_blocks` blocks, each after the final norm (their --n_last_blocks, default 4)
  and, with `avgpool_patchtokens`, the last block's mean patch token; *_base ViTs
  default to 1 block + the mean patch token (their eval_linear_vitb.sh).  The options
  override each default.  Returns {'base_lr', 'n_last_blocks', 'avgpool_patchtokens'}
  (the last two None for a ResNet).
  """
  n, avgpool = options.linear_n_last_blocks, options.linear_avgpool_patchtokens
  if not models.is_vit(config.arch):
    if n != -1 or avgpool is not None:
      raise common.EvaluationError('--linear_n_last_blocks / --linear_avgpool_patchtokens are '
                                   f'for ViT encoders; --config.arch is {config.arch}')
    base_lr = 40.0 if (pretrain_batch or config.batch_size) >= 1024 else 10.0
    return {'base_lr': options.linear_lr if options.linear_lr > 0 else base_lr,
            'n_last_blocks': None, 'avgpool_patchtokens': None}
  is_base = config.arch.endswith('_base')
  depth = models.vit.ARCHITECTURES[config.arch].depth
  n = n if n > 0 else (1 if is_base else 4)
  if n > depth:
    raise common.EvaluationError(f'--linear_n_last_blocks={n}: {config.arch} has {depth} blocks')
  return {'base_lr': options.linear_lr if options.linear_lr > 0 else 0.03, 'n_last_blocks': n,
          'avgpool_patchtokens': is_base if avgpool is None else bool(avgpool)}


def _check_finite(features: dict, split: str) -> None:
  """EvaluationError naming how many rows and entries of `split`'s features are NaN/Inf
  (a diverged checkpoint, or a half-precision --dtype that overflows)."""
  for name, x in features.items():
    x = np.asarray(x)
    bad = ~np.isfinite(x)
    if bad.any():
      rows = int(bad.reshape(len(x), -1).any(axis=1).sum())
      raise common.EvaluationError(
          f'the {name} features of split {split!r} are non-finite (NaN/Inf) in {rows} of '
          f'{len(x)} rows ({int(bad.sum())} of {x.size} entries): the checkpoint has '
          'diverged, or --dtype overflows (try --dtype=float32)')


def _best_and_last(result: dict) -> str:
  return (f'best top-1 {result["top1_best"]:.2f} top-5 {result["top5_best"]:.2f} (epoch '
          f'{result["best_epoch"]}), last top-1 {result["top1_last"]:.2f} top-5 '
          f'{result["top5_last"]:.2f}')


class _Evaluation:
  """One checkpoint under evaluation: the model, the data, the features (extracted
  once per split, on first use) and one method per protocol."""

  def __init__(self, config, mesh: Mesh, model: model_lib.Model, info, options: Options, output,
               dataset):
    self.config, self.mesh, self.model, self.info = config, mesh, model, info
    self.dataset = dataset  # the data.Source of config.dataset, opened once
    self.options, self.output = options, pathlib.Path(output)
    self.batch_size = options.batch_size or int(config.batch_size)
    self.label_keys = ('label', 'coarse_label') if info.num_coarse_classes else ('label',)
    # The eval split's features serve kNN, the probe and the clustering analysis: its
    # projector layers are extracted with it when the analysis is asked for.
    self.layers = 'clustering' in options.evaluations
    self._features = {}

  def features(self, which: str):
    """(features {name: (N, d)}, labels {key: (N,)}) of 'train' (eval_train_split)
    or 'test' (eval_split)."""
    if which not in self._features:
      config, info = self.config, self.info
      split, num_examples, layers = {
          'train': (config.eval_train_split, info.num_eval_train_examples, False),
          'test': (config.eval_split, info.num_eval_examples, self.layers)}[which]
      features, labels = features_lib.extract_split(
          config, self.mesh, self.model.feature_fn(self.mesh, layers=layers), split,
          batch_size=self.batch_size, num_examples=num_examples,
          label_keys=self.label_keys, source=self.dataset)
      _check_finite(features, split)
      if self.options.save_features and jax.process_index() == 0:
        self.output.mkdir(parents=True, exist_ok=True)
        np.savez(self.output / f'features_{split}.npz', **features, **labels)
      self._features[which] = (features, labels)
    return self._features[which]

  def _eval_batches(self):
    return data.eval_iterator(self.config, self.mesh, self.config.eval_split,
                              batch_size=self.batch_size, source=self.dataset)

  def knn(self) -> dict:
    (train, train_labels), (test, test_labels) = self.features('train'), self.features('test')
    train_x, train_y = train['encoding'], train_labels['label']
    test_x, test_y = test['encoding'], test_labels['label']
    ks = sorted({k for k in self.options.knn_ks if k <= len(train_y)})
    dropped = sorted({k for k in self.options.knn_ks if k > len(train_y)})
    if dropped:
      reporting.say(f'note: k={",".join(map(str, dropped))} left out: more than the '
                    f'{len(train_y)} examples of the memory bank')
    temperature = float(self.config.knn_temperature)
    mesh = self.mesh if self.mesh.size > 1 else None
    weighted = knn.knn_weighted(train_x, train_y, test_x, test_y, self.info.num_classes, ks=ks,
                            temperature=temperature, mesh=mesh)
    majority = knn.knn_majority(train_x, train_y, test_x, test_y, self.info.num_classes, k=5,
                            mesh=mesh)
    reporting.say('kNN weighted (DINO, cosine, T=%g): ' % temperature + ', '.join(
        f'k={k} top-1 {weighted[f"top1_k{k}"]:.2f} top-5 {weighted[f"top5_k{k}"]:.2f}'
        for k in ks) + f'; 5-NN majority (Euclidean) top-1 {majority:.2f}')
    return {'weighted': {'metric': 'cosine', 'temperature': temperature, 'ks': ks, **weighted},
            'majority': {'metric': 'euclidean', 'k': 5, 'top1': majority},
            'num_train': len(train_y), 'num_test': len(test_y)}

  def linear(self) -> dict:
    protocol = self.options.linear_protocol or default_linear_protocol(self.config)
    return self._linear_features() if protocol == 'features' else self._linear_imagenet()

  def _linear_features(self) -> dict:
    """docs/method.md, 'Evaluation protocols', CIFAR: Adam on fixed features of
    un-augmented images."""
    options = self.options
    epochs = options.linear_epochs if options.linear_epochs > 0 else 500
    batch_size = options.linear_batch_size if options.linear_batch_size > 0 else 1000
    (train, train_labels), (test, test_labels) = self.features('train'), self.features('test')
    result = linear.linear_probe_features(
        train['encoding'], train_labels['label'], test['encoding'], test_labels['label'],
        self.info.num_classes, epochs=epochs, batch_size=batch_size, seed=options.seed)
    reporting.say(f'linear probe (fixed features, {epochs} epochs): {_best_and_last(result)}')
    return {'protocol': 'features', 'optimizer': 'adam', 'lr': 1e-2, 'final_lr': 1e-6,
            'weight_decay': 5e-6, 'epochs': epochs, 'batch_size': batch_size,
            'num_train': len(train_labels['label']), 'num_test': len(test_labels['label']),
            **result}

  def _linear_imagenet(self) -> dict:
    """docs/method.md, 'Evaluation protocols', ImageNet: frozen encoder, augmented
    images, SGD, steps at 60/80."""
    options, config = self.options, self.config
    epochs = options.linear_epochs if options.linear_epochs > 0 else 100
    batch_size = options.linear_batch_size if options.linear_batch_size > 0 else 256
    # The authors' ResNet default follows the batch the checkpoint was PRE-trained with.
    pretrain_batch = self.model.source.get('train_batch_size')
    recipe = linear_probe_recipe(config, options, pretrain_batch)
    base_lr = recipe['base_lr']
    encode = ('encode' if recipe['n_last_blocks'] is None else
              linear.vit_probe_input(recipe['n_last_blocks'], recipe['avgpool_patchtokens']))
    steps_per_epoch = data.epoch_steps(self.info.num_eval_train_examples, batch_size,
                                       repr(config.eval_train_split), 'lower --linear_batch_size')
    result = linear.train_classifier(
        self.model, self.mesh,
        data.linear_probe_iterator(config, self.mesh, batch_size=batch_size,
                                   source=self.dataset),
        self._eval_batches, num_classes=self.info.num_classes,
        steps_per_epoch=steps_per_epoch, epochs=epochs,
        head_lr=base_lr * batch_size / 256, schedule='step', seed=options.seed,
        label='linear probe', encode=encode)
    reporting.say(f'linear probe (frozen encoder, {epochs} epochs): {_best_and_last(result)}')
    return {'protocol': 'imagenet', 'optimizer': 'sgd', 'momentum': 0.9, 'weight_decay': 0.0,
            **{k: v for k, v in recipe.items() if v is not None}, 'batch_size': batch_size,
            'pretrain_batch_size': pretrain_batch or config.batch_size,
            'pretrain_batch_size_from': ('the checkpoint' if pretrain_batch
                                         else '--config (the checkpoint does not say)'),
            'lr_milestones': [round(0.6 * epochs), round(0.8 * epochs)], **result}

  def semi(self) -> dict:
    """Fine-tunes encoder and classifier on a labelled subset (docs/method.md,
    'Evaluation protocols')."""
    options, config = self.options, self.config
    cache_dir = ''
    if config.dataset == 'imagenet2012':  # read ImageNet once, then the cache
      cache_dir = str(self.output / f'.semi_cache_{jax.process_index()}')
      os.makedirs(cache_dir, exist_ok=True)
    try:
      batches, subset_size = data.subset_train_iterator(
          config, self.mesh, self.dataset, options.semi_fraction,
          batch_size=options.semi_batch_size,
          seed=options.seed, cache_file=os.path.join(cache_dir, 'records') if cache_dir else '')
      reporting.say(f'semi-supervised: {subset_size} labelled examples '
           f'({100 * options.semi_fraction:g}% of {config.eval_train_split!r})')
      scale = options.semi_batch_size / 256
      result = linear.train_classifier(
          self.model, self.mesh, batches, self._eval_batches,
          num_classes=self.info.num_classes,
          steps_per_epoch=max(1, subset_size // options.semi_batch_size),
          epochs=options.semi_epochs, head_lr=options.semi_head_lr * scale,
          encoder_lr=options.semi_encoder_lr * scale, schedule='cosine', seed=options.seed,
          label='semi-supervised')
    finally:
      if cache_dir:
        shutil.rmtree(cache_dir, ignore_errors=True)
    reporting.say(f'semi-supervised ({100 * options.semi_fraction:g}% labels, '
                  f'{options.semi_epochs} epochs): {_best_and_last(result)}')
    return {'fraction': options.semi_fraction, 'num_labelled': subset_size,
            'optimizer': 'sgd', 'momentum': 0.9, 'weight_decay': 0.0, 'schedule': 'cosine',
            'batch_size': options.semi_batch_size,
            'base_lr_encoder': options.semi_encoder_lr, 'base_lr_head': options.semi_head_lr,
            **result}

  def clustering(self) -> dict:
    """The paper's analysis on a random subset of the eval split, every representation."""
    options = self.options
    features, labels = self.features('test')
    num_rows = len(labels['label'])
    rng = np.random.default_rng(options.seed)
    subset = np.sort(rng.permutation(num_rows)[:min(options.clustering_samples, num_rows)])
    order = (['encoding'] + sorted(k for k in features if k.startswith('projector_'))
             + (['embedding'] if 'embedding' in features else []))
    named = {k: features[k][subset] for k in order}
    if 'coarse_label' in labels:
      granularities = {'fine': labels['label'][subset], 'coarse': labels['coarse_label'][subset]}
    else:
      granularities = {'class': labels['label'][subset]}
    reporting.say(f'clustering analysis of {len(subset)} {self.config.eval_split!r} examples: '
         f'{", ".join(named)} x {", ".join(granularities)}')
    tables = None
    if jax.process_index() == 0:  # local computations: the other processes skip them
      tables = clustering.clustering_analysis(named, granularities, self.output,
                                   metric=options.clustering_metric, seed=options.seed,
                                   tsne=options.tsne, print_fn=reporting.say,
                                   source=f'{self.config.dataset} {self.config.eval_split}')
    return {'metric': options.clustering_metric, 'seed': options.seed,
            'split': self.config.eval_split, 'num_samples': len(subset),
            'representations': order, 'granularities': list(granularities),
            'results': tables, 'png': 'clustering.png',
            'tsne_png': 'tsne.png' if options.tsne else None}


def run_evaluations(config, checkpoint, output, options: Options, mesh: Mesh | None = None):
  """Loads the checkpoint and runs `options.evaluations` in order; returns the summary.

  Writes <output>/<evaluation>.json after each evaluation (clustering also
  clustering.png and, with `tsne`, tsne.png), and <output>/summary.json with all
  results and what was evaluated.  Raises EvaluationError / ValueError on bad input.
  """
  options.check()
  evaluations = parse_evaluations(','.join(options.evaluations))
  validation.validate_config(config)
  if options.dtype != AS_TRAINED and options.dtype != config.dtype:
    config = config.copy_and_resolve_references()
    config.dtype = options.dtype
  mesh = sharding.create_mesh() if mesh is None else mesh
  dataset = data.open_source(config)
  info = data.dataset_info(config, dataset)
  if info.num_classes <= 0:
    raise common.EvaluationError(f'{config.dataset} has no labels to evaluate with')
  bank = info.num_eval_train_examples
  if 'knn' in evaluations and min(options.knn_ks) > bank:
    raise common.EvaluationError(
        f'--knn_ks={",".join(map(str, options.knn_ks))}: every k exceeds the kNN memory bank: '
        f'{config.eval_train_split!r} has {bank} examples'
        f'{data.used_words(dataset, config.eval_train_split)}; use k <= {bank}')
  if 'semi' in evaluations and config.dataset == 'imagenet2012':
    data.imagenet_subset_file_names(options.semi_fraction)  # fail now on a fraction without list
  start = time.time()
  model = model_lib.load_model(config, checkpoint, mesh, encoder=options.encoder,
                     image_channels=int(info.image_shape[-1]) if info.image_shape else 3)
  source = model.source
  reporting.say(f'evaluating the {source["encoder"]} encoder of {source["path"]}'
       + (f' (step {source["step"]})' if source['step'] is not None else ' (converted)')
       + f' on {config.dataset}, {mesh.size} device(s): {", ".join(evaluations)}')
  run = _Evaluation(config, mesh, model, info, options, output, dataset)
  summary = {'checkpoint': source, 'dataset': config.dataset, 'dtype': config.dtype,
             'model': {k: config[k] for k in model_lib.MODEL_FIELDS}, 'devices': mesh.size,
             'platform': jax.devices()[0].platform, 'results': {}}
  for name in evaluations:
    reporting.say(f'--- {name}')
    section_start = time.time()
    result = getattr(run, name)()
    result['wall_time_sec'] = time.time() - section_start
    summary['results'][name] = result
    summary['wall_time_sec'] = time.time() - start
    if jax.process_index() == 0:
      reporting.write_json(run.output / f'{name}.json',
                 {'checkpoint': source, 'dataset': config.dataset, **result})
      reporting.write_json(run.output / 'summary.json', summary)
  reporting.say(f'results in {run.output} ({progress_lib.format_duration(time.time() - start)})')
  return summary
