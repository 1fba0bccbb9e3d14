"""The Gaussian blur against Pillow's, the authors' `ImageFilter.GaussianBlur(radius=sigma)`
(installed Pillow is the ground truth)."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageFilter

from resa_jax import augment

# The authors' range is U[0.1, 2]; round values are where float32 would mis-round ties.
SIGMAS = (0.1, 0.5, 1.0, 1.5, 2.0, 0.3137, 0.777, 1.234, 1.9001)


def natural_image(rng, size, channels):
  """uint8: smooth gradients and waves per channel, plus pixel noise."""
  yy, xx = np.mgrid[0:size, 0:size] / size
  planes = []
  for _ in range(channels):
    a, b, phase = rng.uniform(2, 8, 2).tolist() + [rng.uniform(0, 6)]
    planes.append(60 * (xx - yy) + 70 * np.sin(a * xx + phase) * np.cos(b * yy - phase))
  image = 128 + np.stack(planes, -1) + rng.normal(0, 20, (size, size, channels))
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def images(size):
  rng = np.random.default_rng(size)
  return {'random_rgb': rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
          'natural_rgb': natural_image(rng, size, 3),
          'natural_gray': natural_image(rng, size, 1)}


def pil_blur(image, sigma):
  """Pillow's blur of a uint8 (H, W, C) image, as float in [0, 1]."""
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  out = np.asarray(pil.filter(ImageFilter.GaussianBlur(radius=sigma)), np.float64)
  return out.reshape(image.shape) / 255.0


def old_gaussian_blur(image, sigma, size):
  """The blur this replaced: a Gaussian of ~10% of the view side (odd, >= 3), reflect pad."""
  k = max(3, size // 10)
  radius = (k if k % 2 else k + 1) // 2
  x = np.arange(-radius, radius + 1)
  kernel = np.exp(-0.5 * (x / sigma) ** 2)
  kernel /= kernel.sum()
  out = np.pad(image, [(radius, radius), (radius, radius), (0, 0)], mode='reflect')
  out = sum(w * out[i:i + image.shape[0]] for i, w in enumerate(kernel))
  return sum(w * out[:, i:i + image.shape[1]] for i, w in enumerate(kernel))


@pytest.mark.parametrize('size', (96, 224))
def test_gaussian_blur_matches_pillow(size):
  report = []
  for name, image in images(size).items():
    for sigma in SIGMAS:
      ours = augment.gaussian_blur(tf.constant(image / 255.0, tf.float32), sigma).numpy()
      diff = np.abs(ours - pil_blur(image, sigma))
      report.append(f'{size}px {name} sigma={sigma}: mean {diff.mean() * 255:.4f}/255 '
                    f'max {diff.max() * 255:.4f}/255')
      assert ours.shape == image.shape
      assert diff.mean() <= 1 / 255, report[-1]
      assert diff.max() <= 1e-6, report[-1]  # in fact Pillow's output exactly
  print('\n'.join(report))


def test_gaussian_blur_traced_sigma_in_tf_data():
  """A random sigma per image, traced inside a tf.data map, as the pipeline uses it."""
  image = images(96)['natural_rgb']
  sigmas = np.random.default_rng(0).uniform(0.1, 2.0, 6).astype(np.float32)
  ds = tf.data.Dataset.from_tensor_slices(sigmas).map(
      lambda s: (augment.gaussian_blur(tf.constant(image / 255.0, tf.float32), s), s))
  for ours, sigma in ds.as_numpy_iterator():
    assert np.abs(ours - pil_blur(image, float(sigma))).mean() <= 1 / 255, sigma
  blurred = augment.random_gaussian_blur(tf.constant(image / 255.0, tf.float32),
                                         tf.constant([3, 4], tf.int32), prob=1.0)
  assert blurred.shape == image.shape and blurred.numpy().std() < (image / 255.0).std()


def test_gaussian_blur_rejects_sigma_above_its_static_bound():
  image = tf.zeros((8, 8, 1))
  with pytest.raises(ValueError):
    augment.gaussian_blur(image, 2.5)
  with pytest.raises(tf.errors.InvalidArgumentError):
    augment.gaussian_blur(image, tf.constant(2.5))
  augment.gaussian_blur(image, tf.constant(2.5), max_sigma=3.0)  # a larger static bound


def test_the_replaced_blur_fails_this_comparison():
  """The old 9-tap Gaussian at 96 px is more than 1/255 from PIL at sigma 2: the
  comparison above can fail."""
  image = images(96)['random_rgb']
  old = old_gaussian_blur(image / 255.0, 2.0, 96)
  assert np.abs(old - pil_blur(image, 2.0)).mean() > 1 / 255
