"""experiments/check_numbers.py: every quoted number is found in its document, the counts
the documents quote still hold, and a number that moved is reported."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from experiments import check_numbers  # noqa: E402  pylint: disable=g-import-not-at-top


def test_every_quoted_number_is_found_once(capsys):
  assert check_numbers.main(['--list', '--demo']) == 0
  listed = capsys.readouterr().out.splitlines()
  assert [line.split()[0] for line in listed] == [c.name for c in check_numbers.CHECKS]


def test_the_quoted_counts_hold(capsys):
  names = 'tiny_steps,reliability_cases,reliability_tool_cases'
  assert check_numbers.main([f'--only={names}']) == 0
  assert capsys.readouterr().out.count(' ok ') == 3


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
