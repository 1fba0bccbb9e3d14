"""experiments/colab_tpu.ipynb runs headless (nbclient) on CPU, so that it cannot rot.

RESA_NOTEBOOK_SMOKE=1 makes the notebook skip its installs and train the tiny config
on fake data for one epoch of two steps; every cell must run without an error and
the evaluation and plot cells must show what they promise.
"""

import json
import pathlib

import nbclient  # requirements-test.txt: nbclient, nbformat, ipykernel
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / 'experiments' / 'colab_tpu.ipynb'


def test_notebook_is_committed_clean():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(notebook)
  code = [c for c in notebook.cells if c.cell_type == 'code']
  assert code and not any(c.outputs or c.execution_count for c in code), 'clear the outputs'


@pytest.mark.slow
def test_notebook_runs_headless_on_cpu(tmp_path, monkeypatch):
  workdir = tmp_path / 'run'
  monkeypatch.setenv('RESA_NOTEBOOK_SMOKE', '1')  # the kernel inherits this environment
  monkeypatch.setenv('RESA_NOTEBOOK_WORKDIR', str(workdir))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=240, kernel_name='python3',
                                   resources={'metadata': {'path': str(ROOT / 'experiments')}})
  client.execute()  # raises CellExecutionError, with the cell and its traceback, on an error

  def text(cell):
    return ''.join(o.get('text', '') for o in cell.outputs if o.output_type == 'stream')

  code = [c for c in notebook.cells if c.cell_type == 'code']
  assert 'smoke test: no installs' in text(code[1])
  results = json.loads((workdir / 'results.json').read_text())
  assert results['finished'] and results['step'] == 2
  assert 0 <= results['knn_top1'] <= 100
  evaluation = next(c for c in code if 'ReSA momentum encoder' in text(c))
  assert f"{results['knn_top1']:6.2f} %" in text(evaluation)
  plot = code[-1]
  images = [o for o in plot.outputs if 'image/png' in o.get('data', {})]
  assert len(images) == 2, [o.output_type for o in plot.outputs]  # the run's png and a new plot
