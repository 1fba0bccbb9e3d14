"""The library's shape (README "Layout"): imports only go down, no circle, small modules.

Reads the source with `ast` (nothing is imported), so function-level imports count
as much as top-level ones.  `LAYERS` is the declared order, bottom first: a module
may import only modules listed before it.  A new module must be placed in it.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'resa_jax'

# Bottom first.  Each module may import only the modules before it.  The groups are the
# rows of README's layout table, in its order (test_readme_layout_table_follows_the_layers).
LAYERS = (
    'resa_jax',  # __init__: the version only
    'resa_jax.sinkhorn',
    'resa_jax.reporting', 'resa_jax.progress', 'resa_jax.plots', 'resa_jax.interrupts',
    'resa_jax.losses',
    'resa_jax.sharding',
    'resa_jax.cli',
    # The input: one package, its front door (resa_jax.data) last.
    'resa_jax.data.views', 'resa_jax.data.order', 'resa_jax.data.sources',
    'resa_jax.data.views_jax', 'resa_jax.data.local_files', 'resa_jax.data.tfds_sources',
    'resa_jax.data.image_folder', 'resa_jax.data.views_tf', 'resa_jax.data.host',
    'resa_jax.data.device',
    'resa_jax.data.subsets', 'resa_jax.data',
    'resa_jax.models.onednn', 'resa_jax.models.cpu_conv', 'resa_jax.models.layers',
    'resa_jax.models.resnet', 'resa_jax.models.vit',
    'resa_jax.models.heads', 'resa_jax.models',
    'resa_jax.step',
    'resa_jax.checkpoints', 'resa_jax.workdir', 'resa_jax.validation',
    'resa_jax.convert.state_dict', 'resa_jax.convert.architecture', 'resa_jax.convert.files',
    'resa_jax.convert', 'resa_jax.convert.__main__',
    'resa_jax.evaluate.common', 'resa_jax.evaluate.features', 'resa_jax.evaluate.knn',
    'resa_jax.evaluate.kmeans', 'resa_jax.evaluate.clustering', 'resa_jax.evaluate.linear',
    'resa_jax.evaluate.model', 'resa_jax.evaluate.checkpoint_config',
    'resa_jax.evaluate.run', 'resa_jax.evaluate.training_knn', 'resa_jax.evaluate',
    'resa_jax.evaluate.__main__',
    'resa_jax.train_metrics', 'resa_jax.train', 'resa_jax.main',
)
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
# sinkhorn.py is one standalone file to copy into any JAX project (imports jax only), so it
# cannot lean on the rest of the package; a third of it is its docstring.
LONGER_MODULES = {'resa_jax.sinkhorn': 480}


def module_name(path: pathlib.Path) -> str:
  parts = ('resa_jax',) + path.relative_to(PACKAGE).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def modules() -> dict[str, pathlib.Path]:
  """The library's modules; the configs (data, not layers) are checked on their own."""
  return {module_name(p): p for p in sorted(PACKAGE.rglob('*.py'))
          if p.parent.name != 'configs'}


def project_imports(path: pathlib.Path) -> set[str]:
  """The resa_jax modules `path` imports anywhere (top level or inside functions)."""
  known = set(modules())
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.startswith('resa_jax'))
    elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith('resa_jax'):
      for alias in node.names:  # `from resa_jax import x`: x may be a module or a name
        candidate = f'{node.module}.{alias.name}'
        found.add(candidate if candidate in known else node.module)
  return found


def test_every_module_is_placed_in_the_layers():
  assert set(modules()) == set(LAYERS), (
      f'unplaced: {sorted(set(modules()) - set(LAYERS))}, '
      f'gone: {sorted(set(LAYERS) - set(modules()))}')


@pytest.mark.parametrize('name', LAYERS)
def test_imports_only_go_down(name):
  rank = {n: i for i, n in enumerate(LAYERS)}
  path = modules()[name]
  upward = sorted(m for m in project_imports(path) if m != name and rank[m] >= rank[name])
  assert not upward, f'{name} imports {upward}, which are not below it in LAYERS'


def test_no_import_cycle():
  graph = {name: project_imports(path) - {name} for name, path in modules().items()}
  state = {}

  def visit(node, trail):
    if state.get(node) == 'done':
      return
    assert state.get(node) != 'open', 'import cycle: ' + ' -> '.join(trail + [node])
    state[node] = 'open'
    for child in sorted(graph[node]):
      visit(child, trail + [node])
    state[node] = 'done'

  for name in graph:
    visit(name, [])


def test_the_evaluators_never_import_the_trainer():
  for name, path in modules().items():
    if name.startswith('resa_jax.evaluate'):
      assert 'resa_jax.train' not in project_imports(path), name


@pytest.mark.parametrize('path', sorted((PACKAGE / 'configs').glob('*.py')), ids=lambda p: p.stem)
def test_configs_import_only_ml_collections_and_other_configs(path):
  """Loading a config is cheap (no JAX, no TensorFlow) and works from any directory."""
  for node in ast.walk(ast.parse(path.read_text())):
    names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
             [node.module] if isinstance(node, ast.ImportFrom) else [])
    for name in names:
      assert name == 'ml_collections' or name.startswith('resa_jax.configs'), (path, name)


def test_sinkhorn_imports_nothing_but_jax():
  tree = ast.parse((PACKAGE / 'sinkhorn.py').read_text())
  roots = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      roots.update(a.name.split('.')[0] for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      roots.add(node.module.split('.')[0])
  assert roots <= {'jax', '__future__', 'functools', 'math', 'typing', 'dataclasses'}, roots


@pytest.mark.parametrize('name', sorted(modules()))
def test_module_and_function_sizes(name):
  path = modules()[name]
  text = path.read_text()
  limit = LONGER_MODULES.get(name, MAX_MODULE_LINES)
  assert len(text.splitlines()) <= limit, f'{name}: {len(text.splitlines())} lines'
  for node in ast.walk(ast.parse(text)):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      length = node.end_lineno - node.lineno + 1
      assert length <= MAX_FUNCTION_LINES, f'{name}.{node.name}: {length} lines'


def test_readme_layout_table_follows_the_layers():
  """README's rule, "a module imports only the modules of the rows above its own, or
  before it in its own row", is LAYERS' rule: every module has a row, and the rows come
  in LAYERS' order."""
  readme = (PACKAGE.parent / 'README.md').read_text()
  table = readme.split('\n## Layout\n', 1)[1].split('\n## ', 1)[0]
  rows = [line.split('|')[1] for line in table.splitlines()
          if line.startswith('| `resa_jax')]
  paths = []
  for row in rows:  # a name after the row's first path is in the first path's folder
    first, *rest = [p.rstrip('/') for p in row.split('`')[1::2]]
    paths.append([first] + [f'{first.rsplit("/", 1)[0]}/{p}' for p in rest])

  def row_of(module):
    path = module.replace('.', '/')
    matches = [(len(p), i) for i, row in enumerate(paths) for p in row
               if path in (p, p.removesuffix('.py')) or path.startswith(p + '/')]
    assert matches, f'{module} has no row in README\'s layout table'
    return max(matches)[1]

  ranks = [row_of(module) for module in LAYERS[1:]]
  assert ranks == sorted(ranks), [m for m, r, n in zip(LAYERS[1:], ranks, ranks[1:]) if r > n]


def test_the_reliability_page_names_tests_that_exist():
  """docs/reliability.md's table names the test of each promise: each must exist."""
  import re  # pylint: disable=g-import-not-at-top
  tests = PACKAGE.parent / 'tests'
  text = (PACKAGE.parent / 'docs' / 'reliability.md').read_text()
  named = set(re.findall(r'`(test_\w+\.py)::(test_\w+)(?:\[[^\]]*\])?`', text))
  assert len(named) > 40, len(named)
  for file, name in sorted(named):
    source = (tests / file).read_text()
    assert re.search(rf'^def {name}\(', source, re.M), f'{file}::{name}'
