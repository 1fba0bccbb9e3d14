"""CIFAR-10 (JPEG snapshot) with the authors' CIFAR recipe on one GPU, in a fixed time.

    python experiments/gpu_cifar10.py --archive=tmp/cifar10_jpeg.tar.gz --out=DIR \
        [--epochs=60] [--time_budget_s=480] [--config.width_per_group=64 ...]

For a lent H100/H200 (experiments/gpu_cifar10.sh runs it there).  That machine has
JAX but no TensorFlow, so this script does not use the tf.data pipeline: the JPEGs
are decoded once with PIL, kept on the GPU as uint8, and the authors' CIFAR views
are made on the GPU in JAX (`augment_batch`):
  weak:   RandomResizedCrop(32, scale 0.2-1, bilinear) + horizontal flip;
  strong: RandomResizedCrop(32, scale 0.2-1, bicubic), colour jitter (0.4, 0.4, 0.2,
          0.1; p 0.8; the four in a random order), grayscale p 0.2, solarisation p 0.2,
          horizontal flip; no blur (the authors' CIFAR transform).
Differences from the TF pipeline of `resa_jax.main`, on purpose and small: the crop
box is drawn once with scale and ratio clipped to the image (torchvision retries 10
times), PIL decodes the chroma slightly differently from TF's decoder, and the data
order is one permutation per epoch from jax.random.
The model, the loss and the step are the project's (`configs/cifar10.py`, its CIFAR
stem, `step.make_train_step`); the schedule is built for `--epochs`, and training
stops early when `--time_budget_s` runs out (results.json says how far it got).
At the end: the momentum encoder's features of the un-augmented train and test sets,
the 5-NN Euclidean majority vote (the authors' CIFAR metric) and the weighted kNN
(k 20), for raw pixels too; images/s after compilation and the peak GPU memory.
"""

from __future__ import annotations

import io
import json
import math
import os
import pathlib
import sys
import tarfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from resa_jax import models, sharding  # noqa: E402
from resa_jax import step as step_lib  # noqa: E402
from resa_jax.evaluate import knn  # noqa: E402

CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship',
           'truck')
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # the authors' CIFAR-10 values

FLAGS = flags.FLAGS

def load_archive(path: str, limit: int = 0):
  """{'train': (uint8 (N, 32, 32, 3), int32 (N,)), 'test': ...}, decoded with PIL."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  found = {'train': [], 'test': []}
  with tarfile.open(path) as archive:
    for member in archive:
      parts = member.name.strip('./').split('/')
      if member.isfile() and len(parts) == 3 and parts[0] in found:
        found[parts[0]].append((CLASSES.index(parts[1]), parts[2],
                                archive.extractfile(member).read()))
  arrays = {}
  for split, files in found.items():
    files.sort(key=lambda f: f[:2])
    if limit:
      files = files[::max(1, len(files) // limit)][:limit]
    images = np.stack([np.asarray(Image.open(io.BytesIO(f[2])).convert('RGB')) for f in files])
    arrays[split] = (images, np.asarray([f[0] for f in files], np.int32))
  return arrays


# ------------------------------------------------------------ augmentation ----

def _crop(key, image, method: str):
  """RandomResizedCrop(32, scale (0.2, 1), ratio (3/4, 4/3)) of one (32, 32, 3) image."""
  k_scale, k_ratio, k_top, k_left = jax.random.split(key, 4)
  area = 32.0 * 32.0 * jax.random.uniform(k_scale, (), minval=0.2, maxval=1.0)
  ratio = jnp.exp(jax.random.uniform(k_ratio, (), minval=math.log(3 / 4), maxval=math.log(4 / 3)))
  h = jnp.clip(jnp.sqrt(area / ratio), 1.0, 32.0)
  w = jnp.clip(jnp.sqrt(area * ratio), 1.0, 32.0)
  top = jax.random.uniform(k_top, ()) * (32.0 - h)
  left = jax.random.uniform(k_left, ()) * (32.0 - w)
  scale = jnp.stack([32.0 / h, 32.0 / w])
  return jax.image.scale_and_translate(image, (32, 32, 3), (0, 1), scale,
                                       -jnp.stack([top, left]) * scale, method=method,
                                       antialias=True)


def _gray(x):
  return jnp.sum(x * jnp.asarray([0.299, 0.587, 0.114]), axis=-1, keepdims=True)


def _hue_shift(x, delta):
  """Rotates the hue of an RGB image in [0, 1] by `delta` (a fraction of the circle)."""
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  maximum, minimum = jnp.max(x, -1), jnp.min(x, -1)
  chroma = maximum - minimum
  safe = jnp.where(chroma > 0, chroma, 1.0)
  hue = jnp.where(maximum == r, ((g - b) / safe) % 6.0,
                  jnp.where(maximum == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)) / 6.0
  hue = jnp.where(chroma > 0, hue, 0.0)
  hue = (hue + delta) % 1.0
  saturation = jnp.where(maximum > 0, chroma / jnp.where(maximum > 0, maximum, 1.0), 0.0)
  k = (jnp.asarray([5.0, 3.0, 1.0]) + hue[..., None] * 6.0) % 6.0
  return maximum[..., None] * (1 - saturation[..., None] *
                               jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0))


def _jitter(key, x):
  """torchvision ColorJitter(0.4, 0.4, 0.2, 0.1): the four in a random order."""
  keys = jax.random.split(key, 5)
  b, c, s = (jax.random.uniform(k, (), minval=1 - a, maxval=1 + a)
             for k, a in zip(keys[:3], (0.4, 0.4, 0.2)))
  h = jax.random.uniform(keys[3], (), minval=-0.1, maxval=0.1)
  ops = (lambda y: jnp.clip(y * b, 0, 1),
         lambda y: jnp.clip((y - jnp.mean(_gray(y))) * c + jnp.mean(_gray(y)), 0, 1),
         lambda y: jnp.clip((y - _gray(y)) * s + _gray(y), 0, 1),
         lambda y: _hue_shift(y, h))
  order = jax.random.permutation(keys[4], 4)
  for position in range(4):
    x = jax.lax.switch(order[position], ops, x)
  return x


def _view(key, image, strong: bool):
  keys = jax.random.split(key, 6)
  x = jnp.clip(_crop(keys[0], image.astype(jnp.float32) / 255.0,
                     'cubic' if strong else 'linear'), 0.0, 1.0)
  if strong:
    x = jnp.where(jax.random.uniform(keys[1]) < 0.8, _jitter(keys[2], x), x)
    x = jnp.where(jax.random.uniform(keys[3]) < 0.2, jnp.broadcast_to(_gray(x), x.shape), x)
    x = jnp.where(jax.random.uniform(keys[4]) < 0.2, jnp.where(x >= 0.5, 1.0 - x, x), x)
  x = jnp.where(jax.random.uniform(keys[5]) < 0.5, x[:, ::-1], x)
  return (x - jnp.asarray(MEAN)) / jnp.asarray(STD)


@jax.jit
def augment_batch(key, images):
  """uint8 (B, 32, 32, 3) -> (weak view, strong view), float32 normalised."""
  weak_keys, strong_keys = jax.random.split(key, (2, images.shape[0]))
  return (jax.vmap(lambda k, i: _view(k, i, False))(weak_keys, images),
          jax.vmap(lambda k, i: _view(k, i, True))(strong_keys, images))


# -------------------------------------------------------------------- run ----

def encode_all(net, variables, images, batch: int = 1000):
  """Momentum-encoder features (N, D) of un-augmented images, eval mode."""
  apply = jax.jit(lambda v, x: net.apply(v, (x.astype(jnp.float32) / 255.0 - jnp.asarray(MEAN))
                                         / jnp.asarray(STD), train=False, method='encode'))
  return np.concatenate([np.asarray(apply(variables, images[i:i + batch]))
                         for i in range(0, len(images), batch)])


def evaluate_features(train, train_y, test, test_y):
  weighted = knn.knn_weighted(train, train_y, test, test_y, 10, ks=(20,), temperature=0.07)
  return {'knn5_euclidean_top1': knn.knn_majority(train, train_y, test, test_y, 10, k=5),
          'knn_top1_k20': weighted['top1_k20']}


def main(argv):
  del argv
  config, out = FLAGS.config, pathlib.Path(FLAGS.out)
  out.mkdir(parents=True, exist_ok=True)
  start = time.time()
  data = load_archive(FLAGS.archive, FLAGS.limit)
  (train_images, train_y), (test_images, test_y) = data['train'], data['test']
  print(f'decoded {len(train_y)} + {len(test_y)} images in {time.time() - start:.1f} s',
        flush=True)
  mesh = sharding.create_mesh(jax.devices()[:1])
  batch = int(config.batch_size)
  steps_per_epoch = len(train_y) // batch
  total_steps = FLAGS.epochs * steps_per_epoch
  online_net, momentum_net = models.create_networks(config)
  schedule = step_lib.learning_rate_schedule(config, steps_per_epoch, total_steps)
  tx = step_lib.create_optimizer(config, schedule)
  state = jax.jit(lambda key: step_lib.create_train_state(key, online_net, momentum_net, tx,
                                                           (32, 32, 3)))(jax.random.key(0))
  step_fn = step_lib.make_train_step(config, online_net=online_net, momentum_net=momentum_net,
                                     tx=tx, mesh=mesh, lr_schedule=schedule,
                                     total_steps=total_steps)
  images = jax.device_put(train_images)
  key = jax.random.key(int(config.seed))
  step, timed_steps, timed_seconds, train_start, losses = 0, 0, 0.0, time.time(), []
  for epoch in range(FLAGS.epochs):
    order = jax.random.permutation(jax.random.fold_in(key, epoch), len(train_y))
    epoch_start = time.time()
    for i in range(steps_per_epoch):
      views = augment_batch(jax.random.fold_in(key, 1_000_003 + step),
                            images[order[i * batch:(i + 1) * batch]])
      state, metrics = step_fn(state, views)
      step += 1
      if step == 1:
        jax.block_until_ready(metrics['loss'])
        epoch_start = time.time()  # compilation is not counted
    loss = float(metrics['loss'])
    if not math.isfinite(loss):
      raise SystemExit(f'error: loss {loss} at step {step}')
    seconds = time.time() - epoch_start
    counted = steps_per_epoch - (1 if epoch == 0 else 0)
    timed_steps, timed_seconds = timed_steps + counted, timed_seconds + seconds
    losses.append(loss)
    print(f'epoch {epoch + 1}/{FLAGS.epochs} loss {loss:.4f} '
          f'{counted * batch / seconds:.0f} img/s', flush=True)
    if time.time() - train_start > FLAGS.time_budget_s:
      break
  variables = {'params': state.momentum_params, 'batch_stats': state.momentum_batch_stats}
  results = {
      'hardware': str(jax.devices()[0].device_kind), 'epochs_done': epoch + 1,
      'epochs_scheduled': FLAGS.epochs, 'steps': step, 'batch_size': batch,
      'width_per_group': int(config.width_per_group), 'final_loss': losses[-1],
      'loss_by_epoch': losses, 'train_seconds': time.time() - train_start,
      'images_per_sec': timed_steps * batch / timed_seconds,
      'encoder': evaluate_features(encode_all(momentum_net, variables, train_images), train_y,
                                   encode_all(momentum_net, variables, test_images), test_y),
      'raw_pixels': evaluate_features(
          ((train_images / 255.0 - MEAN) / STD).reshape(len(train_y), -1).astype(np.float32),
          train_y,
          ((test_images / 255.0 - MEAN) / STD).reshape(len(test_y), -1).astype(np.float32),
          test_y),
  }
  stats = jax.devices()[0].memory_stats() or {}
  results['peak_memory_gib'] = stats.get('peak_bytes_in_use', 0) / 2**30 or None
  results['wall_seconds'] = time.time() - start
  (out / 'results.json').write_text(json.dumps(results, indent=2))
  print('results: ' + json.dumps({k: v for k, v in results.items() if k != 'loss_by_epoch'}),
        flush=True)


def define_flags() -> None:
  """The flags (defined only when run as a script: the tests import this module)."""
  config_flags.DEFINE_config_file('config', str(ROOT / 'configs' / 'cifar10.py'), 'The recipe.')
  flags.DEFINE_string('archive', 'tmp/cifar10_jpeg.tar.gz', 'The CIFAR-10 JPEG snapshot.')
  flags.DEFINE_string('out', '/tmp/gpu_cifar10', 'Folder for results.json.')
  flags.DEFINE_integer('epochs', 60, 'Epochs the schedule is built for.')
  flags.DEFINE_float('time_budget_s', 480.0, 'Stop training after this many seconds.')
  flags.DEFINE_integer('limit', 0, 'Use only the first N images per split (a CPU dry run).')


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  define_flags()
  app.run(main)
