"""ReSA's views as pure JAX functions on a uint8 batch, made on the accelerator.

The same views as the host pipeline (`views_tf.py`, TensorFlow; docs/method.md, section
1.2 "Views"): view 0 is *weak* (RandomResizedCrop, bilinear, + horizontal flip); every
*strong* view is RandomResizedCrop (bicubic), colour jitter with probability
`color_jitter_prob`, grayscale, Gaussian blur, solarisation (each with its probability),
horizontal flip, in that order.  Images are float32 in [0, 1] between ops, clipped after
each colour op.

Randomness: every random choice of view v of example i comes from the key
`fold_in(fold_in(key, i), v)`, i the example's index in the *global* batch, so a batch
split over devices (or hosts, with `indices`) gets the views it would get on one device.
`draw_view_params` draws all of one view's choices as a small dict; `apply_view` applies
given choices to one image; `device_views` is draw, then apply, both vmapped over the
batch.  Tests inject choices into `apply_view` to compare each op with the host's.

What each op follows (torchvision on the authors' PIL images, as `views_tf.py`):

* crop box: torchvision's `RandomResizedCrop.get_params` (10 attempts, else the centred
  crop with the ratio clamped).
* resize of the box: our own separable resampling matrices, (size, H) and (size, W) per
  example, two matmuls; TensorFlow's `ScaleAndTranslate` kernels (triangle; Keys cubic,
  a = -0.5, PIL's), widened by the shrink factor (antialiasing, as PIL and the host),
  renormalised over the pixels *inside the box*: `jax.image.scale_and_translate` would
  read pixels just outside it, where a crop-then-resize does not.  Overshoot clipped.
* flip, brightness (clip(f x)), contrast (blend with the mean luma, a scalar),
  saturation (blend with the luma image), hue (rotation in HSV, torchvision's
  `_rgb2hsv` / `_hsv2rgb`), grayscale (luma 0.299, 0.587, 0.114), solarisation
  (x >= 128/255, PIL's `ImageOps.solarize`): torchvision's formulas in a few lines of
  our own (dm-pix follows TensorFlow's colour semantics: additive brightness, contrast
  against the per-channel mean).  Colour jitter draws four factors and a random order
  per example; a zero strength skips the op.
* Gaussian blur: separable, sigma ~ U[0.1, 2], truncated at floor(4 sigma + 0.5) (a
  static 17-tap kernel), edge pixels extended; scipy.ndimage.gaussian_filter(mode=
  'nearest') to 4e-7.  NOT the host's blur, which is Pillow's three rounded box blurs
  exactly: on noisy 24-96 px images (tests/test_device_augment.py) they differ by
  0.38-0.94/255 on average for sigma in [0.5, 2], 0 at 0.1, 2.6/255 at 0.31 (where
  Pillow's rounding leaves the image unchanged), up to 15/255 in single pixels.
* One-channel images: saturation, hue and grayscale are no-ops (as on the host).

Besides the blur the random numbers differ (threefry here, TensorFlow's stateless RNG
there): one seed, different views, the same distributions.  `device.py` calls
`device_views` (a split held on the devices) and `colour_views` (crops from the host)
with the key fold_in(views key of the seed, step): views are a function of (seed, step,
global index).  The public functions check their inputs: uint8 pixels of rank 4.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

from resa_jax.data.views import (BLUR_SIGMA_RANGE, CROP_ATTEMPTS, CROP_RATIO,
                                 EVAL_RESIZE_METHOD, LUMA, SOLARIZE_THRESHOLD, ViewSpec,
                                 view_specs)

_BLUR_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default
_HIGHEST = jax.lax.Precision.HIGHEST  # no bf16/tf32 passes in the resampling matmuls


# ---------------------------------------------------------------------------
# Random choices of one view


def crop_box(key, height: int, width: int, scale: Sequence[float],
             ratio: Sequence[float] = CROP_RATIO) -> jax.Array:
  """torchvision's RandomResizedCrop.get_params: int32 (4,) = (top, left, h, w)."""
  # One draw of 22 uniforms (each jax.random call inlines a threefry hash: fewer calls,
  # a smaller program to compile).
  u = jax.random.uniform(key, (2 * CROP_ATTEMPTS + 2,))
  area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:CROP_ATTEMPTS])
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = jnp.exp(log_lo + (log_hi - log_lo) * u[CROP_ATTEMPTS:2 * CROP_ATTEMPTS])
  ws = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)  # (10,)
  hs = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)  # (10,)
  fits = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
  first = jnp.argmax(fits)
  found = jnp.any(fits)
  # Fallback (static: the image size is static): the whole image, ratio clamped.
  fallback_h, fallback_w = height, width
  if width / height < min(ratio):
    fallback_h = int(round(width / min(ratio)))
  elif width / height > max(ratio):
    fallback_w = int(round(height * max(ratio)))
  h = jnp.where(found, hs[first], fallback_h)
  w = jnp.where(found, ws[first], fallback_w)
  # torch.randint(0, H - h + 1) = floor(u (H - h + 1)), u in [0, 1).
  random_top = jnp.minimum((u[-2] * (height - h + 1)).astype(jnp.int32), height - h)
  random_left = jnp.minimum((u[-1] * (width - w + 1)).astype(jnp.int32), width - w)
  top = jnp.where(found, random_top, (height - h) // 2)
  left = jnp.where(found, random_left, (width - w) // 2)
  return jnp.stack([top, left, h, w]).astype(jnp.int32)


def draw_view_params(key, spec: ViewSpec, height: int, width: int) -> dict:
  """All random choices of one view of an (height, width) image, as a dict:

  box int32 (4,) (top, left, h, w); flip, jitter, grayscale, blur, solarize: bool
  (whether each op applies); order int32 (4,): the jitter ops' order, a permutation of
  (brightness, contrast, saturation, hue); factors float32 (4,): brightness, contrast,
  saturation ~ U[max(0, 1 - s), 1 + s], hue shift ~ U[-hue, hue]; sigma float32.
  A weak view draws the same fields (one structure for every view); only its box and
  flip are used.
  """
  box_key, key = jax.random.split(key)
  u = jax.random.uniform(key, (14,))
  strengths = (spec.brightness, spec.contrast, spec.saturation)
  low = jnp.array([max(0.0, 1.0 - s) for s in strengths] + [-spec.hue], jnp.float32)
  high = jnp.array([1.0 + s for s in strengths] + [spec.hue], jnp.float32)
  return {
      'box': crop_box(box_key, height, width, (spec.min_scale, spec.max_scale)),
      'flip': u[0] < spec.flip_prob,
      'jitter': u[1] < spec.color_jitter_prob,
      'order': jnp.argsort(u[2:6]).astype(jnp.int32),  # a uniform random permutation
      'factors': low + (high - low) * u[6:10],
      'grayscale': u[10] < spec.grayscale_prob,
      'blur': u[11] < spec.gaussian_prob,
      'sigma': BLUR_SIGMA_RANGE[0] + (BLUR_SIGMA_RANGE[1] - BLUR_SIGMA_RANGE[0]) * u[12],
      'solarize': u[13] < spec.solarization_prob,
  }


# ---------------------------------------------------------------------------
# Geometry


def _triangle(x):
  return jnp.maximum(0.0, 1.0 - jnp.abs(x))


def _keys_cubic(x, a=-0.5):
  x = jnp.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
  return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0))


_KERNELS = {'bilinear': _triangle, 'bicubic': _keys_cubic}


def _resample_matrix(start, length, in_size: int, out_size: int, kernel,
                     antialias: bool) -> jax.Array:
  """(out_size, in_size) weights resizing pixels [start, start + length) to out_size.

  As TensorFlow's ScaleAndTranslate on the cropped box: output pixel i samples box
  coordinate (i + 0.5) * length / out_size; input pixel j weighs
  kernel((j + 0.5 - sample) / kernel_scale), kernel_scale = max(1, length / out_size)
  when antialiasing; weights outside the box are 0 and each row sums to 1.
  """
  inv_scale = length.astype(jnp.float32) / out_size
  kernel_scale = jnp.maximum(inv_scale, 1.0) if antialias else 1.0
  sample = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * inv_scale  # (out,)
  j = jnp.arange(in_size) - start  # (in,) box coordinates
  weights = kernel((j[None, :] + 0.5 - sample[:, None]) / kernel_scale)
  weights = jnp.where((j >= 0) & (j < length), weights, 0.0)
  return weights / jnp.sum(weights, axis=1, keepdims=True)


def resized_crop(image, box, size: int, method: str = 'bilinear',
                 antialias: bool = True) -> jax.Array:
  """uint8 or float (H, W, C) in [0, 255] -> float32 (size, size, C) in [0, 1]: the box
  (top, left, h, w) resized with `method` ('bilinear' or 'bicubic'), clipped."""
  height, width = image.shape[:2]
  top, left, h, w = box[0], box[1], box[2], box[3]
  rows = _resample_matrix(top, h, height, size, _KERNELS[method], antialias)  # (S, H)
  cols = _resample_matrix(left, w, width, size, _KERNELS[method], antialias)  # (S, W)
  out = jnp.einsum('sh,hwc,tw->stc', rows, image.astype(jnp.float32), cols,
                   precision=_HIGHEST)
  return jnp.clip(out / 255.0, 0.0, 1.0)


def flip_left_right(image):
  return image[:, ::-1]


# ---------------------------------------------------------------------------
# Colour (float (H, W, C) in [0, 1])


def grayscale(image):
  """(H, W, 3) -> (H, W, 1) luma; one-channel images are returned as they are."""
  if image.shape[-1] == 1:
    return image
  # Elementwise, not a dot: a dot would run at the accelerator's default (bf16 / tf32)
  # matmul precision.
  return sum(weight * image[..., c:c + 1] for c, weight in enumerate(LUMA))


def _blend(image, other, factor):
  return jnp.clip(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def adjust_brightness(image, factor):
  return jnp.clip(image * factor, 0.0, 1.0)


def adjust_contrast(image, factor):
  return _blend(image, jnp.mean(grayscale(image)), factor)  # the mean luma, a scalar


def adjust_saturation(image, factor):
  if image.shape[-1] == 1:  # colour-only
    return image
  return _blend(image, grayscale(image), factor)


def _rgb_to_hsv(image):
  """torchvision's _rgb2hsv: (H, W, 3) -> h, s, v, each (H, W), h in [0, 1)."""
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  maxc = jnp.max(image, axis=-1)
  minc = jnp.min(image, axis=-1)
  equal = maxc == minc
  chroma = maxc - minc
  s = chroma / jnp.where(equal, 1.0, maxc)
  divisor = jnp.where(equal, 1.0, chroma)
  rc, gc, bc = (maxc - r) / divisor, (maxc - g) / divisor, (maxc - b) / divisor
  h = jnp.where(maxc == r, bc - gc,
                jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
  return jnp.mod(h / 6.0 + 1.0, 1.0), s, maxc


def _hsv_to_rgb(h, s, v):
  """torchvision's _hsv2rgb: h, s, v (H, W) -> (H, W, 3)."""
  i = jnp.floor(h * 6.0)
  f = h * 6.0 - i
  i = i.astype(jnp.int32) % 6
  p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
  q = jnp.clip(v * (1.0 - s * f), 0.0, 1.0)
  t = jnp.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
  r = jnp.select([i == k for k in range(6)], [v, q, p, p, t, v])
  g = jnp.select([i == k for k in range(6)], [t, v, v, q, p, p])
  b = jnp.select([i == k for k in range(6)], [p, p, t, v, v, q])
  return jnp.stack([r, g, b], axis=-1)


def adjust_hue(image, delta):
  """Rotate the hue by `delta`, a fraction of the colour circle in [-0.5, 0.5]."""
  if image.shape[-1] == 1:  # colour-only
    return image
  h, s, v = _rgb_to_hsv(image)
  return jnp.clip(_hsv_to_rgb(jnp.mod(h + delta, 1.0), s, v), 0.0, 1.0)


def color_jitter(image, order, factors, strengths: Sequence[float]):
  """torchvision's ColorJitter with drawn `factors` (brightness, contrast, saturation,
  hue) applied in `order`; a zero entry of the static `strengths` skips that op."""
  ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
  branches = [(lambda x, op=op, k=k: op(x, factors[k])) if strengths[k] > 0
              else (lambda x: x) for k, op in enumerate(ops)]
  for position in range(len(ops)):
    image = jax.lax.switch(order[position], branches, image)
  return image


def gaussian_blur(image, sigma, max_sigma: float = BLUR_SIGMA_RANGE[1]):
  """Separable Gaussian of std `sigma` (a traced scalar <= max_sigma) over H and W, as
  scipy.ndimage.gaussian_filter(mode='nearest', truncate=4): radius floor(4 sigma + 0.5)."""
  taps = int(_BLUR_TRUNCATE * max_sigma + 0.5)
  x = jnp.arange(-taps, taps + 1, dtype=jnp.float32)
  radius = jnp.floor(_BLUR_TRUNCATE * sigma + 0.5)
  kernel = jnp.where(jnp.abs(x) <= radius, jnp.exp(-0.5 * (x / sigma) ** 2), 0.0)
  kernel = kernel / jnp.sum(kernel)
  for axis in (0, 1):
    n = image.shape[axis]
    pad = [(0, 0)] * image.ndim
    pad[axis] = (taps, taps)
    padded = jnp.pad(image, pad, mode='edge')
    image = sum(kernel[k] * jax.lax.slice_in_dim(padded, k, k + n, axis=axis)
                for k in range(2 * taps + 1))
  return image


def solarize(image, threshold: float = SOLARIZE_THRESHOLD):
  return jnp.where(image >= threshold, 1.0 - image, image)


# ---------------------------------------------------------------------------
# Views


def apply_colour(view, params: dict, spec: ViewSpec) -> jax.Array:
  """float32 (S, S, C) in [0, 1] -> a strong view's colour jitter, grayscale, blur and
  solarisation, as `params` choose; a weak view is returned as it is."""
  if spec.weak:
    return view
  if spec.color_jitter_prob > 0:
    strengths = (spec.brightness, spec.contrast, spec.saturation, spec.hue)
    jittered = color_jitter(view, params['order'], params['factors'], strengths)
    view = jnp.where(params['jitter'], jittered, view)
  if spec.grayscale_prob > 0 and view.shape[-1] == 3:
    view = jnp.where(params['grayscale'], jnp.tile(grayscale(view), (1, 1, 3)), view)
  if spec.gaussian_prob > 0:
    view = jnp.where(params['blur'], gaussian_blur(view, params['sigma']), view)
  if spec.solarization_prob > 0:
    view = jnp.where(params['solarize'], solarize(view), view)
  return view


def apply_view(image, params: dict, spec: ViewSpec, antialias: bool = True) -> jax.Array:
  """uint8 (H, W, C) and one view's `params` -> float32 (spec.size, spec.size, C) in [0, 1]."""
  view = apply_colour(resized_crop(image, params['box'], spec.size, spec.resize_method,
                                   antialias), params, spec)
  if spec.flip_prob > 0:  # last, as the authors' transforms (it commutes with the rest)
    view = jnp.where(params['flip'], flip_left_right(view), view)
  return view


def _views_params(key, indices, config, height: int, width: int):
  """[(spec, params of every example)] of each view: the choices of view v of example i
  come from fold_in(fold_in(key, i), v)."""
  example_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)
  result = []
  for v, spec in enumerate(view_specs(config)):
    keys = jax.vmap(lambda k, v=v: jax.random.fold_in(k, v))(example_keys)
    result.append((spec, jax.vmap(
        lambda k, spec=spec: draw_view_params(k, spec, height, width))(keys)))
  return result


def normalize(images, mean, std):
  """float (..., C) in [0, 1] -> (x - mean) / std, per channel, in float32: the one
  normalisation of every input made on the devices."""
  return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def unaugmented(images, size: int) -> jax.Array:
  """uint8 (N, H, W, C) -> float32 (N, size, size, C) in [0, 1]: the evaluation image of
  fixed-size data, the image itself, resized (EVAL_RESIZE_METHOD, antialiased) only when
  its side is not `size` (the host's `views_tf.unaugmented`)."""
  if images.shape[1:3] == (size, size):
    return images.astype(jnp.float32) / 255.0
  box = jnp.asarray([0, 0, images.shape[1], images.shape[2]], jnp.int32)
  return jax.vmap(lambda image: resized_crop(image, box, size, EVAL_RESIZE_METHOD))(images)


def _normalized(view, normalize_: bool, mean, std):
  return normalize(view, mean, std) if normalize_ else view


def _check_inputs(name: str, images, normalize_: bool, mean, std) -> None:
  """The input domain of the view functions: uint8 pixels (N, H, W, C), C 1 or 3, and
  with `normalize_` a positive std and a mean per channel."""
  shape, dtype = getattr(images, 'shape', ()), getattr(images, 'dtype', None)
  if len(shape) != 4 or dtype != jnp.uint8 or shape[-1] not in (1, 3):
    raise ValueError(f'{name} takes uint8 images (N, H, W, C), C 1 or 3 (pixels 0-255), '
                     f'got {dtype} {tuple(shape)}')
  if normalize_ and (mean is None or std is None or len(mean) != shape[-1]
                     or len(std) != shape[-1] or min(std) <= 0):
    raise ValueError(f'{name}(normalize=True) needs {shape[-1]} per-channel means and '
                     f'positive stds, got {mean} and {std}')


def device_views(key, images, config, normalize: bool = True, mean=None, std=None,
                 indices=None, antialias: bool = True) -> list[jax.Array]:
  """The V = 1 + sum(config.crops_nmb) views of a uint8 batch (N, H, W, C), C in {1, 3}.

  Returns V float32 arrays (N, S_v, S_v, C) in `view_specs(config)`'s order (the weak
  view, then the strong views of each crop group): (x - mean) / std with the per-channel
  `mean` and `std` when `normalize`, else in [0, 1].  `indices` (N,) are the examples'
  positions in the global batch (default arange(N): right for a global jax.Array,
  sharded or not; a host feeding its local rows passes their global positions).
  """
  _check_inputs('device_views', images, normalize, mean, std)
  _, height, width, _ = images.shape
  if indices is None:
    indices = jnp.arange(images.shape[0])
  views = []
  for spec, params in _views_params(key, indices, config, height, width):
    view = jax.vmap(lambda x, p, spec=spec: apply_view(x, p, spec, antialias))(images, params)
    views.append(_normalized(view, normalize, mean, std))
  return views


def colour_views(key, views, config, normalize: bool = True, mean=None, std=None,
                 indices=None) -> list[jax.Array]:
  """The device half of views whose crop, resize and flip the host made (streamed
  datasets with `config.augment_on='device'`, host.py): V uint8 arrays
  (N, S_v, S_v, C) -> V float32 arrays as `device_views` returns them, the colour
  jitter, grayscale, blur and solarisation chosen as `device_views` chooses them for
  the same key (the crop box and flip it would draw are the host's instead).
  """
  specs = view_specs(config)
  if len(views) != len(specs):
    raise ValueError(f'colour_views takes the {len(specs)} views of the config, got '
                     f'{len(views)}')
  for view, spec in zip(views, specs):
    _check_inputs('colour_views', view, normalize, mean, std)
    if view.shape[1:3] != (spec.size, spec.size) or view.shape[0] != views[0].shape[0]:
      raise ValueError(f'colour_views: a view of {spec.size} px is {tuple(view.shape)}')
  if indices is None:
    indices = jnp.arange(views[0].shape[0])
  out = []
  for view, (spec, params) in zip(views, _views_params(key, indices, config, 1, 1)):
    view = jax.vmap(lambda x, p, spec=spec: apply_colour(x.astype(jnp.float32) / 255.0, p,
                                                          spec))(view, params)
    out.append(_normalized(view, normalize, mean, std))
  return out
