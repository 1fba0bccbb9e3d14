"""experiments/gpu_check.sh, the prepared GPU run: its schedule and summary arithmetic,
and its CPU dry run (GPU_CHECK_TINY=1: tiny widths, a few steps, a small synthetic
CIFAR-10 JPEG snapshot), which must run every part, print the summary table and write the
RESULTS.md section with numbers, leave in $OUT only what the device tool brings back, and
write nothing into the repository."""

import colorsys
import io
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import tarfile

import numpy as np
from PIL import Image
import pytest

import helpers
from experiments import gpu_check_report as report_lib
from experiments import results_md

CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship',
           'truck')
NUMBER = r'-?\d+(\.\d+)?'


def write_snapshot(path: pathlib.Path, per_class: dict) -> pathlib.Path:
  """A .tar.gz laid out as the CIFAR-10 JPEG snapshot: SPLIT/CLASS/NNNN.jpg, 32x32 RGB,
  each class a noisy colour of its own."""
  rng = np.random.default_rng(0)
  with tarfile.open(path, 'w:gz') as archive:
    for split, count in per_class.items():
      for label, name in enumerate(CLASSES):
        colour = 255 * np.asarray(colorsys.hsv_to_rgb(label / 10, 0.6, 0.7))
        for i in range(count):
          pixels = np.clip(colour + rng.normal(0, 60, (32, 32, 3)), 0, 255).astype(np.uint8)
          data = io.BytesIO()
          Image.fromarray(pixels).save(data, format='JPEG', quality=75)
          member = tarfile.TarInfo(f'{split}/{name}/{i:04d}.jpg')
          member.size = data.tell()
          data.seek(0)
          archive.addfile(member, data)
  return path


# ------------------------------------------------------------ arithmetic ----

def test_schedule_fits_the_steps_in_the_time_left(tmp_path):
  calibration = {'compile_s': 20.0, 'device_views': {'images_per_s': 5000.0,
                                                     'views_compile_s': 5.0}}
  plan = report_lib.schedule(calibration, 300.0, 50_000, batch_size=256, fixed_overhead_s=50.0,
                             fallback_images_per_s=1.0, min_epochs=1, max_epochs=1000)
  # 300 - (50 + 20 + 5) = 225 s of steps; an epoch is 195 x 256 images at 5000/s.
  assert plan['overhead_s'] == 75.0 and plan['steps_per_epoch'] == 195
  assert plan['epochs'] == math.floor(225 / (195 * 256 / 5000)) == 22
  assert plan['warmup_epochs'] == 2.0 and plan['images_per_s_from'] == 'calibration'
  short = report_lib.schedule(None, 60.0, 1000, batch_size=100, fixed_overhead_s=50.0,
                              fallback_images_per_s=100.0, min_epochs=1, max_epochs=5)
  assert short['images_per_s_from'] == 'fallback guess'
  assert short['epochs'] == 1.0 and short['warmup_epochs'] == 0.2  # 10 s: one epoch at least
  assert report_lib.schedule(None, 1e6, 1000, batch_size=100, fixed_overhead_s=0.0,
                             fallback_images_per_s=100.0, min_epochs=1,
                             max_epochs=5)['epochs'] == 5.0
  archive = write_snapshot(tmp_path / 'snapshot.tar.gz', {'train': 3, 'test': 1})
  assert report_lib.count_train_images(str(archive)) == 30


def test_encoding_ranks():
  results = {'encoding': {'class': dict(silhouette_mean=0.2, silhouette_std=0.1, ari=0.3,
                                        nmi=0.5)},
             'projector_hidden0': {'class': dict(silhouette_mean=0.1, silhouette_std=0.2,
                                                 ari=0.4, nmi=0.5)},
             'embedding': {'class': dict(silhouette_mean=0.3, silhouette_std=0.05, ari=0.1,
                                         nmi=0.4)}}
  assert report_lib.encoding_ranks(results) == {'silhouette_mean': 2, 'silhouette_std': 2,
                                                'ari': 2, 'nmi': 1}


def test_summary_names_each_part_that_did_not_finish(tmp_path):
  work, out = tmp_path / 'work', tmp_path / 'out'
  work.mkdir()
  (work / 'parts.tsv').write_text('\n'.join('\t'.join(f) for f in (
      ('r50', '1', '3', '140', 'python experiments/bench_step.py ...'),
      ('torch', 'skipped', '0', '0', 'no PyTorch with CUDA on this machine'),
      ('train', '124', '200', '200', 'python -m resa_jax.main ...'))) + '\n')
  (work / 'env.json').write_text(json.dumps({'device_kind': 'NVIDIA H200', 'date': 'today',
                                             'versions': {'jax': '0.11.2'}}))
  table = report_lib.write_summary(work, out, 'abc1234')
  assert '| (b) ResNet-50 | status | failed (exit 1;' in table
  assert '| (d) PyTorch ResNet-50 | status | skipped: no PyTorch with CUDA' in table
  assert '| (a) training | status | stopped by its time limit (200 s) |' in table
  section = (out / 'RESULTS_gpu_check.md').read_text()
  assert section.startswith('## GPU check: NVIDIA H200, today\n') and 'abc1234' in section
  assert table in section and json.loads((out / 'gpu_check.json').read_text())['commit']

  results = tmp_path / 'RESULTS.md'
  results.write_text(results_md.HEADER + '\n## Other\n\nkept\n')
  assert report_lib.record(out / 'RESULTS_gpu_check.md', results) == 'GPU check: NVIDIA H200, today'
  text = results.read_text()
  assert '## Other\n\nkept' in text and table in text


# --------------------------------------------------------------- dry run ----

def _git_status():
  try:
    return subprocess.run(['git', 'status', '--porcelain', '--untracked-files=all'],
                          cwd=helpers.ROOT, capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return None


def _rows(table: str) -> dict:
  """{(part, measurement): value} of the summary table's rows."""
  rows = {}
  for line in table.splitlines():
    cells = [c.strip() for c in line.strip().strip('|').split('|')]
    if len(cells) == 3 and cells[0] not in ('part', '---'):
      rows[cells[0], cells[1]] = cells[2]
  return rows


def _value(rows: dict, part: str, measurement_start: str) -> str:
  found = [v for (p, m), v in rows.items() if p == part and m.startswith(measurement_start)]
  assert len(found) == 1, (part, measurement_start, sorted(rows))
  return found[0]


def _assert_numbers(value: str, count: int):
  numbers = [float(m.group()) for m in re.finditer(NUMBER, value)]
  assert len(numbers) >= count and all(math.isfinite(x) for x in numbers), value
  return numbers


# On the GPU machine there is no TensorFlow (nor TFDS, nor maybe matplotlib): every Python
# the dry run starts finds them unimportable, through this sitecustomize on its path.
NO_TENSORFLOW = ('import sys\n'
                 'for name in ("tensorflow", "tensorflow_datasets", "matplotlib"):\n'
                 '  sys.modules[name] = None\n')


@pytest.mark.slow
def test_cpu_dry_run(tmp_path):
  archive = write_snapshot(tmp_path / 'cifar10_jpeg.tar.gz', {'train': 16, 'test': 4})
  out, work = tmp_path / 'out', tmp_path / 'work'
  (tmp_path / 'no_tensorflow').mkdir()
  (tmp_path / 'no_tensorflow' / 'sitecustomize.py').write_text(NO_TENSORFLOW)
  env = helpers.cli_env(
      devices=1, cache_dir=os.environ.get('JAX_COMPILATION_CACHE_DIR'), OUT=str(out),
      GPU_CHECK_WORK=str(work), GPU_CHECK_SITE=str(tmp_path / 'site'), GPU_CHECK_TINY='1',
      GPU_CHECK_DATA=str(archive), GPU_CHECK_COMMIT='dryrun', PYTHON=sys.executable,
      GPU_CHECK_BUDGET_S='300', GPU_CHECK_T_BENCH='100', GPU_CHECK_T_TORCH='60',
      GPU_CHECK_T_CALIB='60', GPU_CHECK_T_TRAIN_MIN='60', GPU_CHECK_T_EVAL='60')
  env['PYTHONPATH'] = f'{tmp_path / "no_tensorflow"}:{env["PYTHONPATH"]}'
  before = _git_status()
  proc = subprocess.run(['bash', 'experiments/gpu_check.sh'], cwd=helpers.ROOT, env=env,
                        capture_output=True, text=True, timeout=420)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  assert _git_status() == before  # nothing written into the repository

  data = json.loads((out / 'gpu_check.json').read_text())
  assert {name: p['rc'] for name, p in data['parts'].items()} == {
      name: '0' for name in ('env', 'r50', 'torch', 'vit_s', 'calib', 'train', 'clustering')}
  table = proc.stdout[proc.stdout.index('| part | measurement | value |'):]
  rows = _rows(table)
  for measurement in ('5-NN Euclidean top-1', 'weighted kNN top-1'):
    assert len(re.findall(r'\d+\.\d\d%', _value(rows, '(a) training', measurement))) == 3
  assert data['train']['epoch'] == data['schedule']['epochs'] >= 1
  assert 'augment_on=device' in _value(rows, '(a) training', 'schedule')
  for name in ('encoding', 'projector_hidden0', 'projector_hidden1', 'embedding'):
    _assert_numbers(_value(rows, '(a) clustering', f'{name} (class)'), 4)
  for part in ('(a) calibration: its step', '(b) ResNet-50', '(c) ViT-S/16'):
    assert _assert_numbers(_value(rows, part, 'step alone'), 3)[0] > 0
    assert _assert_numbers(_value(rows, part, 'views made on the device'), 3)[1] > 0
  assert _assert_numbers(_value(rows, '(d) PyTorch ResNet-50', 'images/s'), 1)[0] > 0
  assert _assert_numbers(_value(rows, '(b) / (d)', 'ours / theirs'), 2)[0] > 0

  section = (out / 'RESULTS_gpu_check.md').read_text()
  assert section.startswith('## GPU check: cpu, ') and 'CPU dry run' in section
  assert all(f'| {p} | {m} | {v} |' in section for (p, m), v in rows.items())
  assert '--config.augment_on=device' in section and 'dryrun' in section
  # What the device tool brings back: at most 8 plain files with plain names.
  files = sorted(p.name for p in out.iterdir())
  assert files == ['RESULTS_gpu_check.md', 'gpu_check.json', 'gpu_check.log',
                   'gpu_check_files.tar.gz']
  assert sum(p.stat().st_size for p in out.iterdir()) < 16 * 2**20
  with tarfile.open(out / 'gpu_check_files.tar.gz') as packed:
    names = set(packed.getnames())
  assert {'./logs/train.log', './train/results.json', './train/metrics.jsonl',
          './eval/clustering.json', './r50.json'} <= names
  assert not any('checkpoints' in n for n in names)
