"""The Gaussian blur against Pillow's, the authors' `ImageFilter.GaussianBlur(radius=sigma)`
(installed Pillow is the ground truth)."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageFilter

from helpers import natural_image
from resa_jax.data import views_tf as augment

# The authors' range is U[0.1, 2]; round values are where float32 would mis-round ties.
SIGMAS = (0.1, 0.5, 1.0, 1.5, 2.0, 0.3137, 0.777, 1.234, 1.9001)


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


def test_eval_resize_method():
  """ImageNet-sized eval images: bicubic (the authors' kNN) differs from bilinear, and
  equals TF's own antialiased bicubic resize of the shorter side, centre-cropped."""
  image = tf.constant(np.random.default_rng(3).integers(0, 256, (50, 70, 3)), tf.uint8)
  bicubic = augment.resize_shorter_and_center_crop(image, 32, 28, method='bicubic').numpy()
  bilinear = augment.resize_shorter_and_center_crop(image, 32, 28).numpy()
  assert np.abs(bicubic - bilinear).mean() > 1e-3
  resized = tf.image.resize(image, (32, 44), method='bicubic', antialias=True).numpy()
  np.testing.assert_allclose(bicubic, np.clip(resized[2:30, 8:36] / 255.0, 0, 1), atol=1e-6)
