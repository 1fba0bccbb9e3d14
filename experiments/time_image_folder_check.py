"""Times the check of an image folder's splits (resa_jax/data/image_folder.py): every
file decoded once when a split is first used.

    python experiments/jpeg_folder.py /tmp/jpegs --num=2000
    python experiments/time_image_folder_check.py /tmp/jpegs [--repeats=3]

Prints, per repeat, the seconds `data.dataset_info` takes (it checks train and val;
ImageFolder's listing is in `open_source`, timed apart) and the files checked a second.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from resa_jax import data  # noqa: E402
from resa_jax.configs import default  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('folder')
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  config = default.get_config()
  config.dataset, config.data_dir, config.eval_split = 'image_folder', args.folder, 'val'
  for _ in range(args.repeats):
    start = time.perf_counter()
    source = data.open_source(config)
    listed = time.perf_counter() - start
    start = time.perf_counter()
    info = data.dataset_info(config, source)
    checked = time.perf_counter() - start
    files = info.num_train_examples + info.num_eval_examples
    print(f'listing {listed:.2f} s; check of {files} files {checked:.2f} s: '
          f'{files / checked:,.0f} files/s', flush=True)


if __name__ == '__main__':
  main()
