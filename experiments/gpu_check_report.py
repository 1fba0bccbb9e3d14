"""The Python side of experiments/gpu_check.sh: the machine, the training schedule that
fits the time left, and the one summary table with its RESULTS.md section.

    python experiments/gpu_check_report.py env FILE.json
    python experiments/gpu_check_report.py epochs --calibration=calib.json --seconds=S \
        --data=cifar10_jpeg.tar.gz --schedule=schedule.json   # prints: EPOCHS WARMUP
    python experiments/gpu_check_report.py summary --work=DIR --out=DIR [--commit=SHA]
    python experiments/gpu_check_report.py record RESULTS_gpu_check.md   # back here

`summary` reads what the script's parts left in its work folder (parts.tsv: one line per
part, `name rc seconds limit command`; env.json; schedule.json; calib.json, r50.json,
vit_s.json: bench_step.py --report; torch_r50.json: torch_reference_step.py --json;
train/results.json and config.json; eval/clustering.json), prints the summary table and
writes OUT/RESULTS_gpu_check.md (a RESULTS.md section: `record` puts it into
experiments/RESULTS.md) and OUT/gpu_check.json (everything it read).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import math
import pathlib
import subprocess
import sys
import tarfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from experiments import results_md  # noqa: E402

PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'ml-collections', 'clu',
            'numpy', 'pillow', 'scikit-learn', 'torch', 'tensorflow')
BENCHES = (('r50', '(b) ResNet-50'), ('vit_s', '(c) ViT-S/16'))
SECTION_TITLE = 'GPU check'


# ------------------------------------------------------------------ env ----

def environment(dry_run: bool = False) -> dict:
  """Versions, devices, the hardware line and nvidia-smi's view of the GPU."""
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  import jax  # pylint: disable=import-outside-toplevel
  try:
    smi = subprocess.run(['nvidia-smi', '--query-gpu=name,memory.total,driver_version',
                          '--format=csv,noheader'], capture_output=True, text=True,
                         timeout=30).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    smi = None
  return {'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
          'python': sys.version.split()[0], 'versions': versions,
          'tensorflow_importable': importlib.util.find_spec('tensorflow') is not None,
          'backend': jax.default_backend(), 'devices': [str(d) for d in jax.devices()],
          'device_kind': jax.devices()[0].device_kind, 'hardware': results_md.hardware(),
          'nvidia_smi': smi, 'dry_run': dry_run}


# --------------------------------------------------------------- epochs ----

def count_train_images(path: str) -> int:
  """JPEG files under train/ in the snapshot (a .tar.gz or its unpacked folder)."""
  root = pathlib.Path(path)
  if root.is_dir():
    return sum(1 for _ in (root / 'train').glob('*/*.jpg'))
  with tarfile.open(root) as archive:
    return sum(1 for m in archive if m.isfile() and m.name.strip('./').startswith('train/')
               and m.name.lower().endswith('.jpg'))


def schedule(calibration: dict | None, seconds: float, train_images: int, *, batch_size: int,
             fixed_overhead_s: float, fallback_images_per_s: float, min_epochs: float,
             max_epochs: float) -> dict:
  """The epochs that fit in `seconds` of training command.

  Steps time = seconds - overhead, overhead = fixed_overhead_s (start, decoding, the
  baselines, the final kNN, writing results) + the calibration's compile times of the
  step and the views program (the command compiles both again); at the calibration's
  images/s with the views made on the device (`fallback_images_per_s` without one).
  Whole epochs (steps per epoch = N // batch), clipped to [min_epochs, max_epochs];
  the warm-up is the authors' 2 epochs, or a fifth of a run shorter than 10 epochs.
  """
  views = (calibration or {}).get('device_views') or {}
  images_per_s = views.get('images_per_s') or fallback_images_per_s
  overhead = fixed_overhead_s + float((calibration or {}).get('compile_s', 0.0)) + float(
      views.get('views_compile_s', 0.0))
  steps_per_epoch = max(1, train_images // batch_size)
  epoch_s = steps_per_epoch * batch_size / images_per_s
  fitted = math.floor(max(0.0, seconds - overhead) / epoch_s)
  epochs = float(min(max(fitted, min_epochs), max_epochs))
  return {'epochs': epochs, 'warmup_epochs': min(2.0, epochs / 5), 'seconds': seconds,
          'overhead_s': overhead, 'images_per_s': images_per_s,
          'images_per_s_from': 'calibration' if views else 'fallback guess',
          'train_images': train_images, 'batch_size': batch_size,
          'steps_per_epoch': steps_per_epoch, 'epochs_that_fit': fitted}


# -------------------------------------------------------------- summary ----

def _read_json(path: pathlib.Path):
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def read_work(work: pathlib.Path) -> dict:
  """Everything the parts left in the work folder (None where a file is missing)."""
  parts = {}
  if (work / 'parts.tsv').exists():
    for line in (work / 'parts.tsv').read_text().splitlines():
      name, rc, seconds, limit, command = (line.split('\t') + [''] * 5)[:5]
      parts[name] = {'rc': rc, 'seconds': int(seconds or 0), 'limit': int(limit or 0),
                     'command': command}
  files = {'env': 'env.json', 'schedule': 'schedule.json', 'calib': 'calib.json',
           'r50': 'r50.json', 'vit_s': 'vit_s.json', 'torch': 'torch_r50.json',
           'train': 'train/results.json', 'train_config': 'train/config.json',
           'clustering': 'eval/clustering.json', 'eval_knn': 'eval/knn.json'}
  return {'parts': parts, **{k: _read_json(work / v) for k, v in files.items()}}


def _pct(x) -> str:
  return '-' if x is None else f'{x:.2f}%'


def _gib(n) -> str:
  return '-' if n is None else f'{n / 2**30:.2f} GiB'


def _status(part) -> str | None:
  """None for a part that ran to the end, else what happened to it."""
  if part is None:
    return 'not run'
  if part['rc'] == '0':
    return None
  if part['rc'] == 'skipped':
    return f'skipped: {part["command"]}'
  if part['rc'] in ('124', '137'):
    return f'stopped by its time limit ({part["limit"]} s)'
  return f'failed (exit {part["rc"]}; its log is in gpu_check_files.tar.gz)'


def _train_rows(data: dict) -> list[tuple[str, str, str]]:
  results, sched, config = data['train'] or {}, data['schedule'] or {}, data['train_config'] or {}
  part = data['parts'].get('train')
  rows = []
  status = _status(part)
  if status:
    rows.append(('(a) training', 'status', status))
  if sched:
    rows.append(('(a) training', 'schedule (scaled to the time left)',
                 f'{sched["epochs"]:g} epochs x {sched["steps_per_epoch"]} steps of batch '
                 f'{sched["batch_size"]} ({sched["train_images"]} images), warm-up '
                 f'{sched["warmup_epochs"]:g} epochs, {config.get("dtype", "?")}, '
                 f'augment_on={config.get("augment_on", "?")}'))
  knn = data['eval_knn'] or {}
  if results.get('finished'):
    rows += [
        ('(a) training', '5-NN Euclidean top-1 (the authors\' CIFAR metric): momentum '
         'encoder / raw pixels / random init',
         f'{_pct(results.get("knn5_euclidean_top1"))} / '
         f'{_pct(results.get("knn5_euclidean_top1_raw_pixels"))} / '
         f'{_pct(results.get("knn5_euclidean_top1_random_init"))}'),
        ('(a) training', f'weighted kNN top-1 (k {results.get("knn_k")}): momentum encoder / '
         'raw pixels / random init',
         f'{_pct(results.get("knn_top1"))} / {_pct(results.get("knn_top1_raw_pixels"))} / '
         f'{_pct(results.get("knn_top1_random_init"))}'),
        ('(a) training', 'steps, images/s (compiled steps), wall time',
         f'{results.get("step")}, {results.get("images_per_sec", 0):.0f}, '
         f'{results.get("wall_time_sec", 0):.0f} s (command: {part and part["seconds"]} s)')]
  elif knn:  # stopped early: the kNN of its last checkpoint, by resa_jax.evaluate
    rows.append(('(a) training', 'kNN of the last checkpoint (resa_jax.evaluate): 5-NN '
                 'Euclidean / weighted', f'{_pct(knn["majority"]["top1"])} / '
                 + ' '.join(f'{_pct(v)} (k {k[len("top1_k"):]})' for k, v in
                            knn['weighted'].items() if k.startswith('top1_k'))))
  return rows


def _clustering_rows(data: dict) -> list[tuple[str, str, str]]:
  clustering = data['clustering']
  status = _status(data['parts'].get('clustering'))
  if not clustering:
    return [('(a) clustering', 'status', status or 'no clustering.json')]
  rows = []
  for name, by_labels in clustering['results'].items():
    for labels, v in by_labels.items():
      rows.append(('(a) clustering', f'{name} ({labels}): silhouette mean / std, ARI, NMI',
                   f'{v["silhouette_mean"]:.4f} / {v["silhouette_std"]:.4f}, '
                   f'{v["ari"]:.4f}, {v["nmi"]:.4f}'))
  ranks = encoding_ranks(clustering['results'])
  if ranks:
    rows.append(('(a) clustering', 'rank of the encoding among the '
                 f'{len(clustering["results"])} representations (1 = best)',
                 ', '.join(f'{k} {v}' for k, v in ranks.items())))
  return rows


def encoding_ranks(results: dict) -> dict[str, int]:
  """Rank (1 = best) of 'encoding' on each metric of the first label granularity:
  higher silhouette mean, ARI and NMI are better, a lower silhouette std is."""
  if 'encoding' not in results:
    return {}
  labels = next(iter(results['encoding']))
  ranks = {}
  for metric, larger_is_better in (('silhouette_mean', True), ('silhouette_std', False),
                                   ('ari', True), ('nmi', True)):
    values = [v[labels][metric] for v in results.values()]
    mine = results['encoding'][labels][metric]
    ranks[metric] = 1 + sum((v > mine) if larger_is_better else (v < mine) for v in values)
  return ranks


def _bench_rows(data: dict, key: str, label: str) -> list[tuple[str, str, str]]:
  report, status = data[key], _status(data['parts'].get(key))
  if not report:
    return [(label, 'status', status or 'no report')]
  rows = [(label, 'step alone: images/s, peak memory, compile',
           f'{report["images_per_s"]:.1f}, {_gib(report["memory"].get("peak_bytes"))}, '
           f'{report["compile_s"]:.1f} s')]
  views = report.get('device_views')
  if views:
    rows.append((label, f'views made on the device ({views["source_image_size"]} px uint8 '
                 'source) + step: images/s, peak memory; the views alone',
                 f'{views["images_per_s"]:.1f}, {_gib(views["memory"].get("peak_bytes"))}; '
                 f'{views["views_median_s"] * 1e3:.2f} ms'))
  return [(label, 'config', report['summary'])] + rows


def _torch_rows(data: dict) -> list[tuple[str, str, str]]:
  result, status = data['torch'], _status(data['parts'].get('torch'))
  if not result:
    return [('(d) PyTorch ResNet-50', 'status', status or 'no result')]
  label = '(d) PyTorch ResNet-50'
  predictor = 'on' if result['predictor'] else 'off'
  rows = [(label, 'config', f'the authors\' step (experiments/torch_reference_step.py), '
           f'{result["arch"]} w{result["width"]}, predictor {predictor}, '
           f'{result["views"]} x {result["image_size"]} px, batch {result["batch"]}, '
           f'{result["dtype"]}, torch {result["torch_version"]} on {result["device_name"]}'),
          (label, 'images/s, peak memory', f'{result["images_per_s"]:.1f}, '
           f'{_gib(result.get("peak_memory_bytes"))}')]
  ours = data['r50']
  if ours:
    ratio = f'{ours["images_per_s"] / result["images_per_s"]:.2f}'
    if ours.get('device_views'):
      ratio += (f' (with the views made on the device: '
                f'{ours["device_views"]["images_per_s"] / result["images_per_s"]:.2f})')
    rows.append(('(b) / (d)', 'ours / theirs, images/s (same device, same run)', ratio))
  return rows


def summary_rows(data: dict) -> list[tuple[str, str, str]]:
  rows = (_train_rows(data) + _bench_rows(data, 'calib', '(a) calibration: its step')
          + _clustering_rows(data))
  for key, label in BENCHES:
    rows += _bench_rows(data, key, label)
  return rows + _torch_rows(data)


def markdown_table(rows) -> str:
  return '\n'.join(['| part | measurement | value |', '|---|---|---|'] +
                   [f'| {a} | {b} | {c} |' for a, b, c in rows])


def results_section(data: dict, rows, commit: str) -> str:
  """The RESULTS.md section: what ran where, the table, the commands."""
  env = data['env'] or {}
  versions = env.get('versions', {})
  tiny = env.get('dry_run', False)
  title = (f'{SECTION_TITLE}: {env.get("device_kind", "?")}, {env.get("date", "?")}'
           + (' (CPU dry run, tiny widths: no GPU numbers)' if tiny else ''))
  stack = ', '.join(f'{k} {v}' for k, v in versions.items() if v and k != 'tensorflow')
  lines = [
      f'## {title}', '',
      f'`bash experiments/gpu_check.sh` (its header says what each part runs) at commit '
      f'{commit}; {env.get("hardware", "?")}; nvidia-smi: {env.get("nvidia_smi") or "-"}; '
      f'Python {env.get("python", "?")}, {stack}; TensorFlow '
      f'{"installed" if env.get("tensorflow_importable") else "not installed"}.  Parts and '
      'the seconds each took: ' + ', '.join(
          f'{name} {p["seconds"]} s' + ('' if p['rc'] == '0' else f' ({p["rc"]})')
          for name, p in data['parts'].items()) + '.', '',
      markdown_table(rows), '', 'Commands:']
  lines += [f'- {name}: `{p["command"]}`' for name, p in data['parts'].items()
            if p['command'] and p['rc'] != 'skipped']
  return '\n'.join(lines) + '\n'


def write_summary(work: pathlib.Path, out: pathlib.Path, commit: str) -> str:
  data = read_work(work)
  rows = summary_rows(data)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'RESULTS_gpu_check.md').write_text(results_section(data, rows, commit))
  (out / 'gpu_check.json').write_text(json.dumps(dict(data, commit=commit), indent=1,
                                                 sort_keys=True, default=str) + '\n')
  return markdown_table(rows)


def record(path: pathlib.Path, results_path: pathlib.Path = results_md.RESULTS) -> str:
  """Puts a RESULTS_gpu_check.md (its first line `## TITLE`) into RESULTS.md."""
  first, _, body = path.read_text().partition('\n')
  title = first.removeprefix('## ').strip()
  results_md.write_section(title, body, results_path)
  return title


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest='command', required=True)
  env = sub.add_parser('env')
  env.add_argument('file')
  env.add_argument('--dry_run', action='store_true', help='A CPU dry run (tiny widths).')
  epochs = sub.add_parser('epochs')
  epochs.add_argument('--calibration', required=True)
  epochs.add_argument('--seconds', type=float, required=True)
  epochs.add_argument('--data', required=True)
  epochs.add_argument('--schedule', required=True, help='Writes the schedule here.')
  epochs.add_argument('--batch_size', type=int, default=256)
  epochs.add_argument('--fixed_overhead_s', type=float, default=60.0)
  epochs.add_argument('--fallback_images_per_s', type=float, default=2000.0)
  epochs.add_argument('--min_epochs', type=float, default=1.0)
  epochs.add_argument('--max_epochs', type=float, default=1000.0)
  summary = sub.add_parser('summary')
  summary.add_argument('--work', required=True)
  summary.add_argument('--out', required=True)
  summary.add_argument('--commit', default='unknown')
  sub.add_parser('record').add_argument('file')
  args = parser.parse_args(argv)
  if args.command == 'env':
    pathlib.Path(args.file).write_text(json.dumps(environment(args.dry_run), indent=1) + '\n')
  elif args.command == 'epochs':
    plan = schedule(_read_json(pathlib.Path(args.calibration)), args.seconds,
                    count_train_images(args.data), batch_size=args.batch_size,
                    fixed_overhead_s=args.fixed_overhead_s,
                    fallback_images_per_s=args.fallback_images_per_s,
                    min_epochs=args.min_epochs, max_epochs=args.max_epochs)
    pathlib.Path(args.schedule).write_text(json.dumps(plan, indent=1) + '\n')
    print(f'{plan["epochs"]:g} {plan["warmup_epochs"]:g}')
  elif args.command == 'summary':
    print(write_summary(pathlib.Path(args.work), pathlib.Path(args.out), args.commit))
  else:
    print(f'recorded "{record(pathlib.Path(args.file))}" in {results_md.RESULTS}')


if __name__ == '__main__':
  main()
