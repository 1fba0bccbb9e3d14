"""The device views (data/views_jax.py, JAX) against the host views (data/views_tf.py, TensorFlow)
op by op with injected parameters, the distributions of their random choices, and
`device_views` itself: shapes, determinism, the same views on 1 and 8 devices."""

import itertools
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import tensorflow as tf
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from helpers import natural_image, seed, tiny_config

from resa_jax.data import views_tf as augment
from resa_jax.data import views_jax as ad
from resa_jax.data.views import ViewSpec

LEVEL = 1 / 255


def float_images(n=6, size=12, channels=3):
  rng = np.random.default_rng(channels)
  return [natural_image(rng, size, channels) / 255.0 for _ in range(n)]


# ---------------------------------------------------------------------------
# Each op against the host's, with the same parameters


@pytest.mark.parametrize('method', ('bilinear', 'bicubic'))
def test_resized_crop_matches_host(method):
  # A 24x30 image to 16 px (shrinking: antialiased) and 40 px (enlarging).
  image = natural_image(np.random.default_rng(0), 30, 3)[:24]
  for size in (16, 40):
    boxes = [augment.random_resized_crop_box(seed(i), 24, 30, (0.2, 1.0)) for i in range(12)]
    boxes = np.array([[int(t) for t in box] for box in boxes], np.int32)
    device = jax.jit(jax.vmap(lambda b: ad.resized_crop(image, b, size, method)))(boxes)
    host = np.stack([augment.random_resized_crop(tf.constant(image), seed(i), size, (0.2, 1.0),
                                                 method=method).numpy() for i in range(12)])
    # Measured max: 1.3e-6 (float rounding): the box edges renormalise as the host's.
    np.testing.assert_allclose(device, host, atol=1e-5)


def test_colour_ops_match_host():
  host_ops = {'brightness': augment.adjust_brightness, 'contrast': augment.adjust_contrast,
              'saturation': augment.adjust_saturation, 'hue': augment.adjust_hue}
  device_ops = {'brightness': ad.adjust_brightness, 'contrast': ad.adjust_contrast,
                'saturation': ad.adjust_saturation, 'hue': ad.adjust_hue}
  factors = {'brightness': (0.6, 0.93, 1.4), 'contrast': (0.6, 1.17, 1.4),
             'saturation': (0.0, 0.8, 1.2), 'hue': (-0.5, -0.1, 0.037, 0.1, 0.5)}
  for channels in (3, 1):
    for x in float_images(channels=channels):
      x32 = x.astype(np.float32)
      for name, values in factors.items():
        for f in values:
          ours = np.asarray(device_ops[name](jnp.asarray(x32), f))
          theirs = host_ops[name](tf.constant(x32), f).numpy()
          # Measured max: 0 (brightness, saturation), 1.2e-7 (contrast), 5.1e-7 (hue).
          np.testing.assert_allclose(ours, theirs, atol=1e-5, err_msg=f'{name} {f}')
      pairs = [(ad.grayscale, augment.grayscale), (ad.solarize, augment.solarize),
               (ad.flip_left_right, tf.image.flip_left_right)]
      for ours, theirs in pairs:  # measured max: 0
        np.testing.assert_allclose(ours(jnp.asarray(x32)), theirs(tf.constant(x32)).numpy(),
                                   atol=1e-6)
  # The host's solarisation threshold is PIL's 128 of 255, and so is ours.
  edge = np.array([[[127.4 / 255], [127.6 / 255], [128 / 255]]], np.float32)
  np.testing.assert_allclose(ad.solarize(edge), augment.solarize(tf.constant(edge)).numpy())
  np.testing.assert_allclose(ad.solarize(edge).ravel(), [127.4 / 255, 127.6 / 255, 127 / 255],
                             atol=1e-7)


def test_color_jitter_order_and_full_view_match_host():
  spec = ViewSpec(size=16, min_scale=0.2, max_scale=1.0, color_jitter_prob=0.8,
                  grayscale_prob=0.2, gaussian_prob=0.0, solarization_prob=0.2)
  image = natural_image(np.random.default_rng(3), 20, 3)
  host_ops = (augment.adjust_brightness, augment.adjust_contrast, augment.adjust_saturation,
              augment.adjust_hue)
  apply = jax.jit(lambda p: ad.apply_view(image, p, spec))
  for i, order in enumerate([(0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1), (1, 3, 0, 2)]):
    box = np.array([int(t) for t in augment.random_resized_crop_box(seed(i), 20, 20,
                                                                    (0.2, 1.0))], np.int32)
    factors = np.array([1.3, 0.7, 1.15, -0.08 + 0.05 * i], np.float32)
    flags = dict(jitter=True, grayscale=i % 2 == 1, solarize=i >= 2, flip=i % 3 == 0)
    params = dict(box=box, order=np.array(order, np.int32), factors=factors, blur=False,
                  sigma=np.float32(1.0), **flags)
    ours = np.asarray(apply(params))
    # The host's make_view, step by step, with these parameters.
    view = augment.random_resized_crop(tf.constant(image), seed(i), 16, (0.2, 1.0),
                                       method='bicubic')
    for k in order:
      view = host_ops[k](view, factors[k])
    if flags['grayscale']:
      view = tf.tile(augment.grayscale(view), [1, 1, 3])
    if flags['solarize']:
      view = augment.solarize(view)
    if flags['flip']:
      view = tf.image.flip_left_right(view)
    # Measured max: 6.6e-7 (the solarisation threshold flips no pixel here).
    np.testing.assert_allclose(ours, view.numpy(), atol=LEVEL, err_msg=f'order {order}')
  # A one-channel strong view: saturation, hue and grayscale do nothing.
  gray = natural_image(np.random.default_rng(4), 20, 1)
  params = dict(params, order=np.array((2, 3, 0, 1), np.int32),
                factors=np.array([1.0, 1.0, 0.3, 0.25], np.float32), grayscale=True,
                solarize=False, flip=False)
  ours = ad.apply_view(gray, params, spec)
  assert ours.shape == (16, 16, 1)
  np.testing.assert_allclose(ours, ad.resized_crop(gray, params['box'], 16, 'bicubic'),
                             atol=1e-6)


def test_gaussian_blur_against_scipy_and_pillow_algorithm():
  sigmas = np.array([0.1, 0.3137, 0.5, 0.777, 1.0, 1.5, 1.9001, 2.0], np.float32)
  blur = jax.jit(jax.vmap(ad.gaussian_blur, in_axes=(None, 0)))
  means, maxes = np.zeros(len(sigmas)), np.zeros(len(sigmas))
  for x in float_images(n=3, size=24):
    ours = np.asarray(blur(jnp.asarray(x, jnp.float32), sigmas))
    for s, sigma in enumerate(sigmas):
      reference = scipy.ndimage.gaussian_filter(x, float(sigma), mode='nearest', truncate=4.0,
                                                axes=(0, 1))
      np.testing.assert_allclose(ours[s], reference, atol=1e-5)  # measured max 3.6e-7
      pillow = augment.gaussian_blur(tf.constant(x, tf.float32), float(sigma)).numpy()
      diff = np.abs(ours[s] - pillow)
      means[s], maxes[s] = max(means[s], diff.mean()), max(maxes[s], diff.max())
  # The host's blur is Pillow's (three box blurs per axis, each rounded to uint8 levels);
  # ours is a true Gaussian in float.  Measured on these noisy 24 px images (the worst of
  # 3), mean |diff| in 1/255: 0.0 at sigma 0.1 (both ~the identity), 2.56 at 0.3137
  # (Pillow's rounding returns the image unchanged, ours blurs), 0.61-0.94 from 0.5 to 2;
  # max 2.7-11.3/255 (single noisy pixels; 96 px images: 3.1-14.8/255).
  assert means[0] < 0.1 * LEVEL and means[1] < 3.5 * LEVEL
  assert means[2:].max() < 1.2 * LEVEL and maxes.max() < 16 * LEVEL


# ---------------------------------------------------------------------------
# The random choices: rates and ranges over 10,000 draws


def test_drawn_parameters_rates_and_ranges():
  n, height, width = 10_000, 96, 128
  spec = ViewSpec(size=32, min_scale=0.2, max_scale=1.0, flip_prob=0.5, color_jitter_prob=0.8,
                  grayscale_prob=0.2, gaussian_prob=0.5, solarization_prob=0.2)
  small = ViewSpec(size=16, min_scale=0.05, max_scale=0.2)
  keys = jax.random.split(jax.random.key(0), n)
  draw = jax.jit(jax.vmap(lambda k, spec: ad.draw_view_params(k, spec, height, width),
                          in_axes=(0, None)), static_argnums=1)
  params = jax.tree.map(np.asarray, draw(keys, spec))
  for name, prob in [('flip', 0.5), ('jitter', 0.8), ('grayscale', 0.2), ('blur', 0.5),
                     ('solarize', 0.2)]:
    rate = params[name].mean()
    assert abs(rate - prob) < 4 * np.sqrt(prob * (1 - prob) / n), (name, rate)
  orders = {tuple(o) for o in params['order']}
  assert orders == set(itertools.permutations(range(4)))
  f = params['factors']
  assert f[:, 0].min() >= 0.6 and f[:, 0].max() <= 1.4 and f[:, 1].min() >= 0.6
  assert f[:, 1].max() <= 1.4 and f[:, 2].min() >= 0.8 and f[:, 2].max() <= 1.2
  assert f[:, 3].min() >= -0.1 and f[:, 3].max() <= 0.1 and f.std(0).min() > 0.05
  assert params['sigma'].min() >= 0.1 and params['sigma'].max() <= 2.0
  for p, (lo, hi) in [(params, (0.2, 1.0)), (jax.tree.map(np.asarray, draw(keys, small)),
                                              (0.05, 0.2))]:
    top, left, h, w = p['box'].T
    assert (top >= 0).all() and (top + h <= height).all() and (h > 0).all()
    assert (left >= 0).all() and (left + w <= width).all() and (w > 0).all()
    fraction, ratio = h * w / (height * width), w / h
    # Rounded sides: the area fraction and ratio within ~3% of their ranges.
    assert fraction.min() >= lo * 0.97 and fraction.max() <= hi * 1.03
    assert ratio.min() >= 0.75 * 0.97 and ratio.max() <= 4 / 3 * 1.03
    assert fraction.std() > (hi - lo) / 5
    # The top-left corner is uniform over the positions that fit.
    assert abs((top / np.maximum(height - h, 1)).mean() - 0.5) < 0.03
  # Where every box fits (the small group), log(ratio) ~ U[log 3/4, log 4/3] (std 0.166):
  # mean 0 within 4 SE.  (Large boxes of a 96x128 image favour the wide ones, which fit.)
  assert abs(np.log(ratio).mean()) < 4 * 0.166 / np.sqrt(n)
  # torchvision's fallback: no box of >= 99% area fits 10x100; a central crop, ratio 4/3.
  box = ad.crop_box(jax.random.key(0), 10, 100, (0.99, 1.0))
  assert tuple(int(t) for t in box) == (0, (100 - 13) // 2, 10, 13)


# ---------------------------------------------------------------------------
# device_views


def test_device_views_shapes_determinism_and_sharding():
  config = tiny_config(crops_nmb=(1, 2), crops_size=(32, 16), crops_min_scale=(0.2, 0.05),
                       crops_max_scale=(1.0, 0.2), gaussian_prob=(0.5, 0.5),
                       solarization_prob=(0.2, 0.0))  # weak + strong 32 px, two strong 16 px
  mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
  rng = np.random.default_rng(0)
  images = np.stack([natural_image(rng, 32, 3) for _ in range(16)])
  indices = np.arange(16)

  @jax.jit
  def views(key, images, indices):
    return (ad.device_views(key, images, config, normalize=False, indices=indices),
            ad.device_views(key, images, config, mean=mean, std=std, indices=indices))

  key = jax.random.key(3)
  raw, normed = views(key, images, indices)
  assert [v.shape for v in raw] == [(16, 32, 32, 3), (16, 32, 32, 3), (16, 16, 16, 3),
                                    (16, 16, 16, 3)]
  assert all(v.dtype == jnp.float32 for v in raw + normed)
  for r, n in zip(raw, normed):
    assert 0.0 <= float(r.min()) and float(r.max()) <= 1.0
    np.testing.assert_allclose(n, (np.asarray(r) - mean) / std, atol=1e-5)
  # Different views of one image, different images per view; the same key, the same views.
  assert not np.allclose(raw[2], raw[3]) and not np.allclose(raw[1][0], raw[1][1])
  for a, b in zip(raw, views(key, images, indices)[0]):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(raw[1], views(jax.random.key(4), images, indices)[0][1])
  # The views follow the global index, not the position in the array: rows fed in
  # another order (as a host feeding its own rows would) with their indices.
  for a, b in zip(raw, views(key, images[::-1], indices[::-1])[0]):
    np.testing.assert_array_equal(a[::-1], b)

  # The batch sharded over 8 devices: the same views (keys from the global index).  Equal
  # to float rounding: XLA may order float sums differently for 2 images per device than
  # for 16 (measured max 7.7e-7 in [0, 1], 3.1e-6 normalised; the weak views bit-equal);
  # a different random choice would differ by far more.
  mesh = Mesh(np.array(jax.devices()[:8]), ('data',))
  batch = NamedSharding(mesh, P('data'))
  sharded_raw, sharded_normed = views(key, jax.device_put(images, batch),
                                      jax.device_put(indices, batch))
  for a, b in zip(raw + normed, sharded_raw + sharded_normed):
    assert b.sharding.is_equivalent_to(batch, b.ndim)
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize('images, match', [
    (np.zeros((2, 8, 8, 3), np.float32), 'uint8 images'),  # floats in [0, 1]
    (np.zeros((8, 8, 3), np.uint8), 'uint8 images'),  # one image, no batch axis
    (np.zeros((2, 8, 8, 4), np.uint8), 'C 1 or 3'),  # RGBA
])
def test_device_views_refuses_what_it_cannot_read(images, match):
  config = tiny_config()
  with pytest.raises(ValueError, match=match) as error:
    ad.device_views(jax.random.key(0), images, config, mean=(0.5,) * 3, std=(0.5,) * 3)
  assert '\n' not in str(error.value)
  with pytest.raises(ValueError, match='per-channel'):
    ad.device_views(jax.random.key(0), np.zeros((2, 8, 8, 3), np.uint8), config,
                    mean=(0.5,), std=(0.5,))
  with pytest.raises(ValueError, match='takes the 2 views'):
    ad.colour_views(jax.random.key(0), [np.zeros((2, 16, 16, 3), np.uint8)], config,
                    mean=(0.5,) * 3, std=(0.5,) * 3)


@pytest.mark.slow
def test_the_data_package_imports_without_tensorflow():
  code = ("import sys; sys.modules['tensorflow'] = None; import resa_jax.data; "
          "assert 'tensorflow' not in [m.split('.')[0] for m in "
          "sys.modules if sys.modules[m] is not None]")
  subprocess.run([sys.executable, '-c', code], check=True, timeout=120,
                 cwd=pathlib.Path(__file__).resolve().parents[1])
