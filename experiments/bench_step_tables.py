"""bench_step.py's rows: the markdown tables, the stored rows (bench_step_results.json)
and the "Train step throughput" section of experiments/RESULTS.md rendered from them."""

from __future__ import annotations

import json
import pathlib

from experiments import results_md
from experiments.bench_step_parts import PART_LABELS

RESULTS_JSON = pathlib.Path(__file__).resolve().parent / 'bench_step_results.json'
SECTION = 'Train step throughput'


def _fmt_bytes(n) -> str:
  if n is None:
    return ''
  return f'{n / 2 ** 30:.2f} GiB' if n >= 2 ** 30 else f'{n / 2 ** 20:.1f} MiB'


def _ms(seconds) -> str:
  return '' if seconds is None else f'{seconds * 1e3:.1f}'


def render_tables(rows) -> str:
  """Markdown: a step table and a parts table, one line per stored row."""
  lines = ['| hardware | jax | config | compile (s) | step median (ms) | step mean (ms) | '
           'images/s | peak memory | XLA plan | views on the device + step: images/s, peak '
           'memory | PyTorch ref. median (ms) |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    mem = r['memory']
    torch_ms = _ms(r['torch']['median_s']) if r.get('torch') else ''
    views = r.get('device_views')
    with_views = (f'{views["images_per_s"]:.1f}, '
                  f'{_fmt_bytes(views["memory"].get("peak_bytes"))}' if views else '')
    lines.append(
        f'| {r["hardware"]} | {r["jax_version"]} | {r["summary"]} | {r["compile_s"]:.1f} | '
        f'{_ms(r["step_median_s"])} | {_ms(r["step_mean_s"])} | {r["images_per_s"]:.1f} | '
        f'{_fmt_bytes(mem.get("peak_bytes"))} ({mem.get("peak_kind", "")}) | '
        f'{_fmt_bytes(mem.get("xla_plan_bytes"))} | {with_views} | {torch_ms} |')
  with_parts = [r for r in rows if r.get('parts')]
  if with_parts:
    names = list(PART_LABELS)
    short = [f'{PART_LABELS[n]} (ms)' for n in names]
    lines += ['', '| hardware | config | ' + ' | '.join(short) +
              ' | rest of step (ms) | ReSA / supervised |',
              '|---|---|' + '---|' * len(names) + '---|---|']
    for r in with_parts:
      cells = [_ms(r['parts'][n]['median_s']) if n in r['parts'] else '' for n in names]
      lines.append(f'| {r["hardware"]} | {r["summary"]} | ' + ' | '.join(cells) +
                   f' | {_ms(r.get("rest_of_step_s"))} | '
                   f'{r.get("resa_over_supervised", float("nan")):.2f} |')
  return '\n'.join(lines)


def print_report(report) -> None:
  print()
  print(render_tables([report]))
  if report.get('torch'):
    print(f'\nPyTorch reference / JAX step time: {report["torch_over_jax"]:.2f}')


def write_results(report, command: str, path: pathlib.Path = RESULTS_JSON,
                  results_path: pathlib.Path = results_md.RESULTS) -> None:
  """Stores the row (replacing the one with the same hardware and config) and renders."""
  rows = json.loads(path.read_text()) if path.exists() else []
  row = dict(report, command=command)
  row.pop('step_times_s', None)
  rows = [r for r in rows if (r['hardware'], r['summary']) != (row['hardware'], row['summary'])]
  rows.append(row)
  path.write_text(json.dumps(rows, indent=1, sort_keys=True) + '\n')
  render_results(rows, results_path)


def render_results(rows, results_path: pathlib.Path = results_md.RESULTS) -> None:
  """(Re)writes the RESULTS.md section from the stored rows."""
  commands = '\n'.join(f'- `{r["command"]}`' for r in rows)
  body = ('ReSA train step on random device-resident views (no input pipeline), measured by '
          '`experiments/bench_step.py`; median / mean of the timed steps after warm-up, each '
          'blocked on; images/s = global batch / median step time (an image is one sample, '
          'not batch x views); compile time is XLA compilation, reported apart; no '
          'recompilation happened during the timed steps in any row.  Peak memory is the '
          "device's peak_bytes_in_use, or on CPU the process's peak RSS; XLA plan = arguments "
          '+ outputs + temporaries - donated.  The PyTorch reference is the authors\' step '
          're-implemented in experiments/torch_reference_step.py (float32, CPU), same batch '
          'and views.  Parts are each jit-compiled alone with the same shapes.  "Views on '
          'the device + step" (--device_views): each timed step also gathers its batch from '
          'a uint8 split held on the devices and makes its views there (device_views); its '
          'peak memory is the process peak after both modes.\n\n'
          f'{render_tables(rows)}\n\nCommands:\n{commands}')
  results_md.write_section(SECTION, body, results_path)

