"""ReSA's views as pure JAX functions on a uint8 batch, made on the accelerator.

The same views as the host pipeline (`augment.py`, TensorFlow; docs/method.md, section
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

What each op follows (torchvision on the authors' PIL images, as `augment.py`):

* crop box: torchvision's `RandomResizedCrop.get_params`: 10 attempts of area fraction
  ~ U[scale] and log aspect ratio ~ U[log 3/4, log 4/3], rounded sides, the first that
  fits; else the centred crop of the whole image with the ratio clamped.
* resize of the box: our own separable resampling matrices, (size, H) and (size, W)
  per example, applied as two matmuls.  The kernels and their normalisation are
  TensorFlow's `ScaleAndTranslate` (which `jax.image.scale_and_translate` ports):
  triangle (bilinear) and Keys cubic with a = -0.5 (bicubic, PIL's; torchvision's
  tensor bicubic uses -0.75), widened by the shrink factor when antialiasing (PIL's
  and the host's behaviour, on by default; torchvision on tensors does not
  antialias), weights renormalised over the pixels *inside the box*.  That last point
  is why this is our own code: `jax.image.scale_and_translate` resamples the whole
  image, so its kernel would read pixels just outside the box at the box's edges,
  where a crop-then-resize (torchvision, PIL, the host) renormalises within it.
  Bicubic overshoot is clipped to [0, 1].
* flip, brightness (multiplicative, clip(f x)), contrast (blend with the mean luma,
  a scalar), saturation (blend with the luma image), hue (rotation in HSV, with
  torchvision's `_rgb2hsv` / `_hsv2rgb`), grayscale (luma 0.299, 0.587, 0.114,
  replicated to 3 channels), solarisation: torchvision's formulas, our own few lines.
  dm-pix (not a dependency) has these ops but follows TensorFlow's colour semantics:
  additive brightness, contrast against the per-channel mean, saturation scaled in
  HSV; its hue rotation (unclipped) and solarisation agree with torchvision, not
  enough to take a dependency for.  Colour jitter draws the four factors and a random
  order of the four ops per example (torchvision's ColorJitter); a zero strength
  skips the op.
* solarisation threshold: x >= 128/255, as PIL's `ImageOps.solarize` on the authors'
  uint8 images and the host (torchvision's tensor RandomSolarize(0.5) would be 0.5).
* Gaussian blur: a separable Gaussian of standard deviation sigma ~ U[0.1, 2],
  truncated at radius floor(4 sigma + 0.5) (scipy.ndimage's rule; a static 17-tap
  kernel with the taps beyond the radius zeroed), edge pixels extended (Pillow's
  border), in float; equal to scipy.ndimage.gaussian_filter(mode='nearest') to 4e-7.
  Our own: dm-pix's gaussian_blur pads with zeros (darker borders) and takes a fixed
  kernel size.  This is NOT the host's blur: the host reproduces Pillow's
  `GaussianBlur(radius=sigma)` exactly, three box blurs per axis of a fractional
  radius, each rounded to uint8 levels.  Measured on noisy 24-96 px test images
  (tests/test_device_augment.py): mean |difference| 0.38-0.94/255 for sigma in [0.5, 2],
  0 at sigma 0.1 (both leave the image as it is), 2.6/255 at sigma 0.31, where
  Pillow's rounding still returns the image unchanged and ours blurs; single pixels
  differ by up to 15/255.
* One-channel images: saturation, hue and grayscale are no-ops (as on the host).

Known differences from the host besides the blur: none by design; the random numbers
differ (JAX's threefry here, TensorFlow's stateless RNG there), so the two pipelines
give different views of the same seed, with the same distributions.

Used by `device_input.py`: `device_views` makes every view of a split held on the
devices; `colour_views` finishes views whose crop, resize and flip the host made from
files.  The key is fold_in(seed's views key, step),
so the views are a function of (seed, step, global index), the host pipeline's contract.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

from resa_jax.views import (BLUR_SIGMA_RANGE, CROP_ATTEMPTS, CROP_RATIO, LUMA,
                            SOLARIZE_THRESHOLD, ViewSpec, view_specs)

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
  method = 'bilinear' if spec.weak else 'bicubic'
  view = apply_colour(resized_crop(image, params['box'], spec.size, method, antialias),
                      params, spec)
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


def _normalized(view, normalize: bool, mean, std):
  if not normalize:
    return view
  return (view - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def device_views(key, images, config, normalize: bool = True, mean=None, std=None,
                 indices=None, antialias: bool = True) -> list[jax.Array]:
  """The V = 1 + sum(config.crops_nmb) views of a uint8 batch (N, H, W, C), C in {1, 3}.

  Returns V float32 arrays (N, S_v, S_v, C) in `view_specs(config)`'s order (the weak
  view, then the strong views of each crop group): (x - mean) / std with the per-channel
  `mean` and `std` when `normalize`, else in [0, 1].  `indices` (N,) are the examples'
  positions in the global batch (default arange(N): right for a global jax.Array,
  sharded or not; a host feeding its local rows passes their global positions).
  """
  if normalize and (mean is None or std is None):
    raise ValueError('device_views(normalize=True) needs the per-channel mean and std')
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
  datasets with `config.augment_on='device'`, host_input.py): V uint8 arrays
  (N, S_v, S_v, C) -> V float32 arrays as `device_views` returns them, the colour
  jitter, grayscale, blur and solarisation chosen as `device_views` chooses them for
  the same key (the crop box and flip it would draw are the host's instead).
  """
  if normalize and (mean is None or std is None):
    raise ValueError('colour_views(normalize=True) needs the per-channel mean and std')
  if indices is None:
    indices = jnp.arange(views[0].shape[0])
  out = []
  for view, (spec, params) in zip(views, _views_params(key, indices, config, 1, 1)):
    view = jax.vmap(lambda x, p, spec=spec: apply_colour(x.astype(jnp.float32) / 255.0, p,
                                                          spec))(view, params)
    out.append(_normalized(view, normalize, mean, std))
  return out
