"""experiments/gpu_cifar10.py's on-device augmentation, against independent references
(colorsys for the hue rotation), and its CPU dry run's shapes."""

import colorsys

import jax
import numpy as np

from experiments import gpu_cifar10


def test_hue_shift_matches_colorsys():
  rng = np.random.default_rng(0)
  pixels = rng.uniform(size=(200, 3)).astype(np.float32)
  for delta in (0.0, 0.1, -0.07):
    got = np.asarray(gpu_cifar10._hue_shift(pixels, delta))
    expected = []
    for r, g, b in pixels:
      h, s, v = colorsys.rgb_to_hsv(r, g, b)
      expected.append(colorsys.hsv_to_rgb((h + delta) % 1.0, s, v))
    np.testing.assert_allclose(got, np.asarray(expected), atol=2e-6)


def test_views_are_normalised_crops_of_the_image():
  images = np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3)).astype(np.uint8)
  weak, strong = gpu_cifar10.augment_batch(jax.random.key(0), images)
  assert weak.shape == strong.shape == (8, 32, 32, 3)
  pixel_range = ((0 - np.asarray(gpu_cifar10.MEAN)) / np.asarray(gpu_cifar10.STD),
                 (1 - np.asarray(gpu_cifar10.MEAN)) / np.asarray(gpu_cifar10.STD))
  for view in (np.asarray(weak), np.asarray(strong)):
    assert np.all(view >= pixel_range[0] - 1e-5) and np.all(view <= pixel_range[1] + 1e-5)
  # A constant image stays constant through crop, flip (weak view).
  constant = np.full((2, 32, 32, 3), 128, np.uint8)
  weak, _ = gpu_cifar10.augment_batch(jax.random.key(3), constant)
  expected = (128 / 255 - np.asarray(gpu_cifar10.MEAN)) / np.asarray(gpu_cifar10.STD)
  np.testing.assert_allclose(np.asarray(weak), np.broadcast_to(expected, weak.shape), atol=1e-5)
