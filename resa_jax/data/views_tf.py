"""ReSA's image augmentations as TensorFlow ops on one image, with stateless randomness.

The views follow the authors' torchvision pipelines (docs/method.md, section 1.2 "Views"):

* the *weak* view (view 0): RandomResizedCrop (bilinear, as torchvision's default in
  the authors' weak transform) + horizontal flip, nothing else;
* every *strong* view: RandomResizedCrop (bicubic), colour jitter (brightness,
  contrast, saturation, hue, applied in a random order, as torchvision's
  ColorJitter) with probability `color_jitter_prob`, grayscale with probability
  `grayscale_prob`, Gaussian blur (sigma uniform in [0.1, 2]) with probability
  `gaussian_prob`, solarisation with probability `solarization_prob`, horizontal flip.

Every random draw is a function of an explicit `seed`, an int32 tensor of shape (2,)
(TensorFlow's stateless RNG), so an image's views depend only on the seed the input
pipeline derives from (config.seed, global step, position in the global batch), never
on thread scheduling or on what ran before.

Conventions: the input of a view is the decoded uint8 image (H, W, C), C in {1, 3};
intermediate images are float32 in [0, 1]; `normalize` turns them into
(x - mean) / std.  One-channel images (Fashion-MNIST) keep one channel: saturation,
hue and grayscale are colour-only operations and are no-ops there (brightness,
contrast, blur, solarisation and flips apply as usual).

Differences from the PIL pipeline, on purpose: the ops run on float images (PIL
rounds to uint8 after each op).  Not the blur: it is Pillow's own algorithm for the
authors' `ImageFilter.GaussianBlur(radius=sigma)` (three box blurs per axis of a
fractional radius from sigma, edge pixels extended, each pass rounded to uint8 levels;
in float64, as float32 mis-rounds Pillow's frequent exact ties), equal to PIL's on uint8
input (tests/test_augment.py).  It replaced SimCLR/BYOL's Gaussian of ~10% of the side,
9 taps at 96 px, too short near sigma 2; the rounding is needed too: Pillow rounds a
small-sigma pass back to the identity, a float box blur is ~1/255 off at sigma 0.1.

The same views made on the accelerator, in JAX without TensorFlow: `views_jax.py`.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import tensorflow as tf

from resa_jax.data.views import (BLUR_SIGMA_RANGE, CROP_ATTEMPTS, CROP_RATIO,
                                 EVAL_RESIZE_METHOD, LUMA, SOLARIZE_THRESHOLD, ViewSpec)


# ---------------------------------------------------------------------------
# Randomness helpers

def split_seed(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
  """`num` independent (2,) seeds from one (2,) seed."""
  return tf.unstack(tf.random.experimental.stateless_split(seed, num))


def _uniform(seed, shape=(), minval=0.0, maxval=1.0) -> tf.Tensor:
  return tf.random.stateless_uniform(shape, seed, minval=minval, maxval=maxval)


def _maybe(seed, prob: float, fn, image: tf.Tensor) -> tf.Tensor:
  """fn(image) with probability `prob` (static shortcuts for 0 and 1)."""
  if prob <= 0.0:
    return image
  if prob >= 1.0:
    return fn(image)
  return tf.cond(_uniform(seed) < prob, lambda: fn(image), lambda: image)


# ---------------------------------------------------------------------------
# Geometry


def random_resized_crop_box(seed, height, width, scale: Sequence[float],
                            ratio: Sequence[float] = CROP_RATIO):
  """torchvision's RandomResizedCrop.get_params: (top, left, h, w), int32 scalars.

  Up to 10 boxes of area fraction ~ U(scale) and log aspect ratio ~ U(log ratio)
  are drawn at once; the first that fits is used, else the central crop with the
  aspect ratio clamped to `ratio`.
  """
  height = tf.cast(height, tf.int32)
  width = tf.cast(width, tf.int32)
  h_f = tf.cast(height, tf.float32)
  w_f = tf.cast(width, tf.float32)
  s_area, s_ratio, s_top, s_left = split_seed(seed, 4)
  area = h_f * w_f * _uniform(s_area, [CROP_ATTEMPTS], scale[0], scale[1])
  aspect = tf.exp(_uniform(s_ratio, [CROP_ATTEMPTS], math.log(ratio[0]), math.log(ratio[1])))
  ws = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)  # (10,)
  hs = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)  # (10,)
  fits = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  found = tf.reduce_any(fits)

  # Fallback, as torchvision: whole image with the aspect ratio clamped, centred.
  in_ratio = w_f / h_f
  fallback_w = tf.where(in_ratio > ratio[1],
                        tf.cast(tf.round(h_f * ratio[1]), tf.int32), width)
  fallback_h = tf.where(in_ratio < ratio[0],
                        tf.cast(tf.round(w_f / ratio[0]), tf.int32), height)
  h = tf.where(found, hs[first], fallback_h)
  w = tf.where(found, ws[first], fallback_w)
  # torch.randint(0, H - h + 1): floor(u * (H - h + 1)), u in [0, 1).
  random_top = tf.cast(_uniform(s_top) * tf.cast(height - h + 1, tf.float32), tf.int32)
  random_left = tf.cast(_uniform(s_left) * tf.cast(width - w + 1, tf.float32), tf.int32)
  top = tf.where(found, tf.minimum(random_top, height - h), (height - h) // 2)
  left = tf.where(found, tf.minimum(random_left, width - w), (width - w) // 2)
  return top, left, h, w


def _crop(image: tf.Tensor, seed, scale: Sequence[float], ratio: Sequence[float]) -> tf.Tensor:
  """RandomResizedCrop's box of a uint8 (H, W, C) image: uint8 (h, w, C)."""
  shape = tf.shape(image)
  top, left, h, w = random_resized_crop_box(seed, shape[0], shape[1], scale, ratio)
  return tf.slice(image, tf.stack([top, left, 0]), tf.stack([h, w, -1]))


def random_resized_crop(image: tf.Tensor, seed, size: int, scale: Sequence[float],
                        method: str = 'bilinear',
                        ratio: Sequence[float] = CROP_RATIO) -> tf.Tensor:
  """uint8 (H, W, C) -> float32 (size, size, C) in [0, 1].

  Resampling is antialiased (as PIL's) when shrinking; bicubic overshoot is clipped.
  """
  crop = _crop(image, seed, scale, ratio)
  resized = tf.image.resize(crop, (size, size), method=method, antialias=True)
  resized = tf.ensure_shape(resized, [size, size, image.shape[-1]])
  return tf.clip_by_value(resized / 255.0, 0.0, 1.0)


def random_flip(image: tf.Tensor, seed, prob: float = 0.5) -> tf.Tensor:
  return _maybe(seed, prob, tf.image.flip_left_right, image)


# ---------------------------------------------------------------------------
# Colour (float images in [0, 1])


def grayscale(image: tf.Tensor) -> tf.Tensor:
  """(H, W, 3) -> (H, W, 1) luma; one-channel images are returned as they are."""
  if image.shape[-1] == 1:
    return image
  return tf.tensordot(image, tf.constant(LUMA, image.dtype), axes=[[-1], [0]])[..., None]


def _blend(image, other, factor):
  return tf.clip_by_value(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def adjust_brightness(image, factor):
  return tf.clip_by_value(image * factor, 0.0, 1.0)


def adjust_contrast(image, factor):
  # Blend with the mean luma, a scalar (torchvision).
  return _blend(image, tf.reduce_mean(grayscale(image)), factor)


def adjust_saturation(image, factor):
  if image.shape[-1] == 1:  # colour-only
    return image
  return _blend(image, grayscale(image), factor)


def adjust_hue(image, delta):
  if image.shape[-1] == 1:  # colour-only
    return image
  return tf.clip_by_value(tf.image.adjust_hue(image, delta), 0.0, 1.0)


def color_jitter(image: tf.Tensor, seed, brightness: float, contrast: float,
                 saturation: float, hue: float) -> tf.Tensor:
  """torchvision's ColorJitter: four factors drawn once, applied in a random order.

  Factors: brightness, contrast, saturation ~ U[max(0, 1 - s), 1 + s]; hue shift
  ~ U[-hue, hue] (a fraction of the colour circle).  A zero strength skips the op.
  """
  s_order, s_b, s_c, s_s, s_h = split_seed(seed, 5)

  def factor(s, strength):
    return _uniform(s, (), max(0.0, 1.0 - strength), 1.0 + strength)

  ops = [
      (brightness, lambda x: adjust_brightness(x, factor(s_b, brightness))),
      (contrast, lambda x: adjust_contrast(x, factor(s_c, contrast))),
      (saturation, lambda x: adjust_saturation(x, factor(s_s, saturation))),
      (hue, lambda x: adjust_hue(x, _uniform(s_h, (), -hue, hue))),
  ]
  order = tf.argsort(_uniform(s_order, [len(ops)]))  # a random permutation of 0..3
  branches = [fn if strength > 0 else (lambda x: x) for strength, fn in ops]
  for position in range(len(ops)):
    image = tf.switch_case(
        order[position], [lambda fn=fn, x=image: fn(x) for fn in branches])
  return image


def random_grayscale(image: tf.Tensor, seed, prob: float) -> tf.Tensor:
  if image.shape[-1] == 1:  # colour-only
    return image
  return _maybe(seed, prob, lambda x: tf.tile(grayscale(x), [1, 1, 3]), image)


# PIL's GaussianBlur is ImagingGaussianBlur in Pillow's src/libImaging/BoxBlur.c.
_BLUR_PASSES = 3
_BLUR_MAX_SIGMA = BLUR_SIGMA_RANGE[1]


def _box_radius(sigma, passes: int, floor, sqrt):
  sigma2 = sigma * sigma / passes
  l = floor((sqrt(12.0 * sigma2 + 1.0) - 1.0) / 2.0)  # integer part of the box radius
  return l + (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * sigma2) / (
      6.0 * (sigma2 - (l + 1.0) * (l + 1.0)))


def box_blur_radius(sigma, passes: int = _BLUR_PASSES):
  """Pillow's `_gaussian_blur_radius`: the fractional radius of each of `passes` box
  blurs whose composition has variance sigma^2 (a float for a Python number, else a
  float32 tensor)."""
  if isinstance(sigma, (int, float)):
    return _box_radius(float(sigma), passes, math.floor, math.sqrt)
  return _box_radius(tf.cast(sigma, tf.float32), passes, tf.floor, tf.sqrt)


def box_blur_weights(radius: tf.Tensor, taps: int) -> tf.Tensor:
  """The (2 * taps + 1,) float64 kernel of one of Pillow's box passes of fractional
  radius `radius` (r = floor(radius) < taps) in Pillow's 24-bit fixed point: the 2r + 1
  central pixels weigh ww = floor(2^24 / (2 radius + 1)), the next one on either side
  floor((2^24 - (2r + 1) ww) / 2), all over 2^24."""
  r = tf.floor(radius)
  inner = tf.floor(2.0 ** 24 / (2.0 * radius + 1.0))  # float32, as Pillow's C
  outer = tf.floor((2.0 ** 24 - (2.0 * r + 1.0) * inner) / 2.0)  # integers < 2^24: exact
  k = tf.abs(tf.range(-taps, taps + 1, dtype=tf.float32))
  weights = tf.where(k <= r, inner, tf.where(k <= r + 1.0, outer, 0.0))
  return tf.cast(weights, tf.float64) / 2.0 ** 24


def _box_pass(x: tf.Tensor, weights: tf.Tensor, axis: int) -> tf.Tensor:
  """One box pass along `axis`, edge pixels extended, rounded as Pillow's
  (bulk + 2^23) >> 24.  In float64, exact on integer levels (Pillow's sums < 2^32)."""
  taps = (weights.shape[0] - 1) // 2
  n = x.shape[axis]
  padded = tf.gather(x, np.clip(np.arange(-taps, n + taps), 0, n - 1), axis=axis)
  window = [slice(None)] * len(x.shape)
  total = 0.0
  for j in range(2 * taps + 1):
    window[axis] = slice(j, j + n)
    total += weights[j] * padded[tuple(window)]
  return tf.floor(total + 0.5)


def gaussian_blur(image: tf.Tensor, sigma, max_sigma: float = _BLUR_MAX_SIGMA,
                  passes: int = _BLUR_PASSES) -> tf.Tensor:
  """PIL's `ImageFilter.GaussianBlur(radius=sigma)` of an (H, W, C) float image in [0, 1].

  As Pillow: the image rounded to uint8 levels, `passes` box blurs along W, then along
  H, of radius box_blur_radius(sigma) (Gwosdek et al., SSVM 2011) with Pillow's weights,
  edge pixels extended, each rounded to a level; the output (k / 255) is Pillow's
  exactly.  `sigma` may be a traced scalar (one per image); the kernel has a static
  2 * floor(box_blur_radius(max_sigma)) + 3 taps, so sigma <= max_sigma (checked).
  """
  taps = int(math.floor(box_blur_radius(float(max_sigma), passes))) + 1
  if isinstance(sigma, (int, float)) and not 0.0 <= sigma <= max_sigma:
    raise ValueError(f'sigma {sigma} outside [0, max_sigma={max_sigma}]')
  sigma = tf.cast(sigma, tf.float32)  # the radius in float32, as Pillow's C
  check = tf.debugging.assert_less_equal(sigma, tf.constant(max_sigma, tf.float32),
                                         message='gaussian_blur: sigma above max_sigma')
  with tf.control_dependencies([check]):
    weights = box_blur_weights(box_blur_radius(sigma, passes), taps)
  x = tf.round(tf.cast(image, tf.float64) * 255.0)
  for axis in (1, 0):  # W first, as Pillow (the passes commute but for rounding)
    for _ in range(passes):
      x = _box_pass(x, weights, axis)
  return tf.cast(x / 255.0, image.dtype)


def random_gaussian_blur(image, seed, prob: float,
                         sigma_range=BLUR_SIGMA_RANGE) -> tf.Tensor:
  """`gaussian_blur` with sigma ~ U[sigma_range], with probability `prob`."""
  s_apply, s_sigma = split_seed(seed, 2)
  # (the minimum guards against float32 rounding past the bound gaussian_blur checks)
  sigma = tf.minimum(_uniform(s_sigma, (), sigma_range[0], sigma_range[1]), sigma_range[1])
  return _maybe(s_apply, prob,
                lambda x: gaussian_blur(x, sigma, max_sigma=sigma_range[1]), image)


def solarize(image: tf.Tensor) -> tf.Tensor:
  """PIL's ImageOps.solarize (threshold 128 of 255): invert the bright pixels."""
  return tf.where(image >= SOLARIZE_THRESHOLD, 1.0 - image, image)


# ---------------------------------------------------------------------------
# Views and evaluation preprocessing


def make_view(image: tf.Tensor, seed, spec: ViewSpec) -> tf.Tensor:
  """uint8 (H, W, C) -> float32 (spec.size, spec.size, C) in [0, 1]."""
  s_crop, s_jitter, s_jitter_apply, s_gray, s_blur, s_solar, s_flip = split_seed(seed, 7)
  scale = (spec.min_scale, spec.max_scale)
  view = random_resized_crop(image, s_crop, spec.size, scale, method=spec.resize_method)
  if spec.weak:
    return random_flip(view, s_flip, spec.flip_prob)
  view = _maybe(s_jitter_apply, spec.color_jitter_prob,
                lambda x: color_jitter(x, s_jitter, spec.brightness, spec.contrast,
                                       spec.saturation, spec.hue), view)
  view = random_grayscale(view, s_gray, spec.grayscale_prob)
  view = random_gaussian_blur(view, s_blur, spec.gaussian_prob)
  view = _maybe(s_solar, spec.solarization_prob, solarize, view)
  return random_flip(view, s_flip, spec.flip_prob)


def cropped_view(image: tf.Tensor, seed, spec: ViewSpec, channels: int) -> tf.Tensor:
  """The host half of a view whose colour the device adds (`augment_on='device'` on a
  streamed dataset; views_jax.colour_views): `make_view`'s crop, resize and flip,
  with the same seeds, rounded to uint8 (spec.size, spec.size, channels), as PIL's
  resize of the authors' uint8 images rounds.  `image`: uint8 (H, W, C), decoded once for
  all its views: decoding only each view's crop (`tf.image.decode_and_crop_jpeg`) was
  measured slower with two views of 224 px (experiments/RESULTS.md, 'Input pipeline
  throughput')."""
  s_crop, *_, s_flip = split_seed(seed, 7)
  crop = _crop(image, s_crop, (spec.min_scale, spec.max_scale), CROP_RATIO)
  method, size = spec.resize_method, (spec.size, spec.size)
  # Antialiasing changes nothing when neither side shrinks (bilinear: the same pixels;
  # bicubic: within 0.2/255), and TensorFlow's plain kernels are 2-3x faster there.
  grows = tf.reduce_all(tf.shape(crop)[:2] <= spec.size)
  view = tf.cond(grows, lambda: tf.image.resize(crop, size, method=method),
                 lambda: tf.image.resize(crop, size, method=method, antialias=True))
  view = tf.ensure_shape(view, [spec.size, spec.size, channels])
  view = tf.cast(tf.round(tf.clip_by_value(view, 0.0, 255.0)), tf.uint8)
  return random_flip(view, s_flip, spec.flip_prob)


def classifier_view(image: tf.Tensor, seed, size: int) -> tf.Tensor:
  """uint8 (H, W, C) -> float32 (size, size, C) in [0, 1]: the view a linear probe or
  fine-tuning trains on, RandomResizedCrop(size, scale 0.08-1, bilinear) + flip
  (the authors' eval_linear.py)."""
  crop_seed, flip_seed = split_seed(seed, 2)
  view = random_resized_crop(image, crop_seed, size, (0.08, 1.0), method='bilinear')
  return random_flip(view, flip_seed, 0.5)


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """float [0, 1] (..., C) -> (x - mean) / std."""
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def resize_shorter_and_center_crop(image: tf.Tensor, resize: int, size: int,
                                   method: str = 'bilinear') -> tf.Tensor:
  """uint8 (H, W, C) -> float32 (size, size, C) in [0, 1].

  torchvision's Resize(resize) (shorter side to `resize`, the longer one truncated,
  `method` 'bilinear' or 'bicubic', antialiased; bicubic overshoot is clipped) then
  CenterCrop(size).
  """
  shape = tf.shape(image)
  h = tf.cast(shape[0], tf.float32)
  w = tf.cast(shape[1], tf.float32)
  short = tf.minimum(h, w)
  new_h = tf.where(h <= w, resize, tf.cast(resize * h / short, tf.int32))
  new_w = tf.where(w <= h, resize, tf.cast(resize * w / short, tf.int32))
  resized = tf.image.resize(image, tf.stack([new_h, new_w]), method=method,
                            antialias=True)
  top = tf.cast(tf.round(tf.cast(new_h - size, tf.float32) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - size, tf.float32) / 2.0), tf.int32)
  crop = tf.slice(resized, tf.stack([top, left, 0]), tf.stack([size, size, -1]))
  crop = tf.ensure_shape(crop, [size, size, image.shape[-1]])
  return tf.clip_by_value(crop / 255.0, 0.0, 1.0)


def unaugmented(image: tf.Tensor, size: int) -> tf.Tensor:
  """uint8 (H, W, C) -> float32 (size, size, C) in [0, 1]: the image itself,
  resized (bilinear, antialiased) only when its side differs from `size`."""
  image = tf.cast(image, tf.float32)
  if image.shape[0] != size or image.shape[1] != size:
    image = tf.image.resize(image, (size, size), method=EVAL_RESIZE_METHOD, antialias=True)
  return tf.clip_by_value(image / 255.0, 0.0, 1.0)

