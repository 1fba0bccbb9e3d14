"""Writes an image folder of ImageNet-sized JPEG files for input benchmarks, offline.

    python experiments/jpeg_folder.py /tmp/jpegs [--num=2000] [--width=500] [--height=375]

Makes `<dir>/train/<class>/<n>.jpg` and `<dir>/val/<class>/<n>.jpg` (config.dataset =
'image_folder') from the CIFAR-10 JPEG snapshot: each 32x32 image resized (bicubic) to
width x height (ImageNet's most common size is 500 x 375) plus mild noise, saved at JPEG
quality 90.  Their decode costs what a real photo of that size costs; their content is
CIFAR's, so use them for timing, not for accuracy.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from resa_jax.data import local_files  # noqa: E402


def write_folder(root: str, num: int, width: int, height: int) -> None:
  snapshot = local_files.load_cifar10_jpeg(local_files.cifar10_jpeg_path(None))
  images, labels = snapshot.rows('train', 0, len(snapshot.labels['train']))
  rng = np.random.default_rng(0)
  for split, count in (('train', num), ('val', max(10, num // 10))):
    for i in range(count):
      label = local_files.CIFAR10_CLASSES[labels[i]]
      folder = os.path.join(root, split, label)
      os.makedirs(folder, exist_ok=True)
      big = Image.fromarray(images[i]).resize((width, height), Image.BICUBIC)
      noisy = np.asarray(big, np.int16) + rng.integers(-8, 9, (height, width, 3))
      Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(
          os.path.join(folder, f'{i:06d}.jpg'), quality=90)


if __name__ == '__main__':
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('root')
  parser.add_argument('--num', type=int, default=2000)
  parser.add_argument('--width', type=int, default=500)
  parser.add_argument('--height', type=int, default=375)
  args = parser.parse_args()
  write_folder(args.root, args.num, args.width, args.height)
  print(f'wrote {args.num} training JPEGs of {args.width}x{args.height} under {args.root}')
