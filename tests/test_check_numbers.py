"""experiments/check_numbers.py: every quoted number is found in its document, README
shows what the demo prints, and a number that moved is reported."""

import json
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from experiments import check_numbers  # noqa: E402  pylint: disable=g-import-not-at-top


def test_every_quoted_number_is_found_once(capsys):
  assert check_numbers.main(['--list', '--demo']) == 0
  listed = capsys.readouterr().out.splitlines()
  assert [line.split()[0] for line in listed] == [c.name for c in check_numbers.CHECKS]


def test_readme_shows_what_the_demo_prints(tmp_path, monkeypatch, capsys):
  """scripts/demo.sh's report, run on the stored results of the seed-0 demo, is the
  output README's Quick start shows (up to the workdir's path)."""
  results = json.loads((ROOT / 'experiments/figures/fashion_mnist_demo_results.json').read_text())
  assert results['knn_top1'] == 81.68  # the seed-0 row of RESULTS.md, "Fashion-MNIST demo"
  (tmp_path / 'results.json').write_text(json.dumps(results))
  demo = (ROOT / 'scripts' / 'demo.sh').read_text()
  printer = re.search(r"<<'PY'\n(.*?)\nPY\n", demo, re.S).group(1)
  monkeypatch.setattr(sys, 'argv', ['-', str(tmp_path / 'results.json')])
  capsys.readouterr()
  exec(printer, {})  # pylint: disable=exec-used  (what `python - FILE <<'PY'` runs)
  printed = capsys.readouterr().out.strip()
  shown = printed.replace(str(tmp_path), '.../workdirs/fashion_mnist_demo')
  assert f'```\n{shown}\n```' in (ROOT / 'README.md').read_text()


@pytest.mark.parametrize('text,expected', [
    ('| 0 | **81.25%** | 78.00% |\n', 0),
    ('| 0 | **81.30%** | 78.00% |\n', 1),   # moved past the tolerance
    ('| 0 | **81.25%** | 78.00% |\n| 0 | **81.25%** | 78.00% |\n', 2),  # quoted twice
    ('nothing here\n', 2),
])
def test_a_moved_or_missing_number_fails(tmp_path, monkeypatch, text, expected):
  document = tmp_path / 'DOC.md'
  document.write_text(text)
  check = check_numbers.Check('fake', document, r'^\| 0 \| \*\*([\d.]+)%\*\* \| ([\d.]+)% \|',
                              lambda: [81.25, 78.0], tolerance=0.011)
  monkeypatch.setattr(check_numbers, 'CHECKS', [check])
  monkeypatch.setattr(check_numbers, 'ROOT', tmp_path)
  assert check_numbers.main([]) == expected
