"""What each view is: the constants of the authors' transforms, and `ViewSpec` /
`view_specs` from the config (no TensorFlow, no JAX).

Shared by the host views (`views_tf.py`, TensorFlow) and the device views
(`views_jax.py`, JAX), so either can be imported without the other's framework; the
rules both follow are stated here once (the resize of each view kind:
`ViewSpec.resize_method`; the un-augmented evaluation image: `EVAL_RESIZE_METHOD`).
"""

from __future__ import annotations

import dataclasses

# What the authors' transforms fix (torchvision on PIL images), for both pipelines.
LUMA = (0.299, 0.587, 0.114)  # rgb_to_grayscale's weights (ITU-R 601-2 luma)
CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range
CROP_ATTEMPTS = 10  # RandomResizedCrop tries 10 boxes, then falls back to a central one
BLUR_SIGMA_RANGE = (0.1, 2.0)  # the authors' blur sigma ~ U[0.1, 2]
SOLARIZE_THRESHOLD = 128 / 255  # PIL's ImageOps.solarize: levels >= 128 inverted
# An evaluation image of another side than crops_size[0] (small fixed-size data) is
# resized with this kernel, antialiased; ImageNet-sized ones are resized then
# centre-cropped with the method the evaluation asks for.
EVAL_RESIZE_METHOD = 'bilinear'


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  """How to make one view.  `weak` views use only the crop and the flip."""
  size: int
  min_scale: float
  max_scale: float
  weak: bool = False
  flip_prob: float = 0.5
  color_jitter_prob: float = 0.8
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.2
  hue: float = 0.1
  grayscale_prob: float = 0.2
  gaussian_prob: float = 0.5
  solarization_prob: float = 0.2

  @property
  def resize_method(self) -> str:
    """The crop's resampling kernel: bilinear for the weak view (torchvision's default in
    the authors' weak transform), bicubic for the strong ones (theirs, explicitly)."""
    return 'bilinear' if self.weak else 'bicubic'


def view_specs(config) -> list[ViewSpec]:
  """The V = 1 + sum(config.crops_nmb) views of a config: the weak view, then the strong.

  As the authors' flags (`src/transform.py` of winci-ai/resa): `crops_nmb[g]` counts
  the *strong* views of crop group g, of side `crops_size[g]`, scale range
  [crops_min_scale[g], crops_max_scale[g]] and blur / solarisation probabilities
  `gaussian_prob[g]` / `solarization_prob[g]`; the weak view (view 0, crop and flip
  only) comes on top, at group 0's size and scale range.  `--crops_nmb 1 6
  --crops_size 224 96` is weak 224 + strong 224 + six strong 96 px views.
  """
  weak = ViewSpec(size=int(config.crops_size[0]), min_scale=float(config.crops_min_scale[0]),
                  max_scale=float(config.crops_max_scale[0]), weak=True,
                  flip_prob=float(config.flip_prob))
  specs = [weak]
  for g, count in enumerate(config.crops_nmb):
    for _ in range(count):
      specs.append(ViewSpec(
          size=int(config.crops_size[g]),
          min_scale=float(config.crops_min_scale[g]),
          max_scale=float(config.crops_max_scale[g]),
          weak=False,
          flip_prob=float(config.flip_prob),
          color_jitter_prob=float(config.color_jitter_prob),
          brightness=float(config.brightness),
          contrast=float(config.contrast),
          saturation=float(config.saturation),
          hue=float(config.hue),
          grayscale_prob=float(config.grayscale_prob),
          gaussian_prob=float(config.gaussian_prob[g]),
          solarization_prob=float(config.solarization_prob[g])))
  return specs
