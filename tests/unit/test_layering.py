"""The package's shape: no import cycles, function-level imports only for optional dependencies,
modules of one job (about 500 lines), and the protocol layer free of I/O.

Read from the source with ``ast`` (nothing is imported), so a cycle that Python happens to
tolerate at run time, or one hidden inside a function, still fails here.
"""
from __future__ import annotations

import ast
import pathlib
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / 'rpcresults'

#: Third-party packages rpcresults may use without depending on them: imported where they are used.
OPTIONAL = {'gevent', 'eventlet', 'celery', 'redis', 'tqdm', 'tblib'}

#: Modules allowed past the size budget, and why.
LONG_MODULES: Dict[str, str] = {}

LINE_BUDGET = 550

#: What the protocol layer may import: no sockets, no threads of its own making, no kombu/py-amqp.
PROTOCOL_ALLOWED = {'array', 'codecs', 'encodings', 'json', 'json.scanner', 'logging', 'threading', 'weakref',
                    'collections', 'collections.abc', 'typing', 'os', 'importlib', 'types', '__future__',
                    'rpcresults.exceptions'}


def modules() -> Iterator[Tuple[str, pathlib.Path]]:
    for path in sorted(PACKAGE.rglob('*.py')):
        parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
        if parts[-1] == '__init__':
            parts = parts[:-1]
        yield '.'.join(parts), path


MODULES = dict(modules())


def _is_package(name: str) -> bool:
    return MODULES.get(name, pathlib.Path()).name == '__init__.py'


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ''
    base = module.split('.')
    if not _is_package(module):
        base = base[:-1]
    base = base[:len(base) - node.level + 1]
    return '.'.join(base + ([node.module] if node.module else []))


def _type_checking_nodes(tree: ast.AST) -> Set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and 'TYPE_CHECKING' in ast.unparse(node.test):
            skipped.update(id(sub) for stmt in node.body for sub in ast.walk(stmt))
    return skipped


def imports(module: str, source: Optional[str] = None) -> Tuple[Set[str], List[Tuple[int, str]]]:
    """``(rpcresults modules imported at module level, (line, name) of imports inside functions)``."""
    tree = ast.parse(MODULES[module].read_text() if source is None else source)
    skipped = _type_checking_nodes(tree)
    in_functions = {id(sub) for node in ast.walk(tree)
                    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) for sub in ast.walk(node)}
    top: Set[str] = set()
    inner: List[Tuple[int, str]] = []
    for node in ast.walk(tree):
        if id(node) in skipped or not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            source = _absolute(module, node)
            names = [f'{source}.{alias.name}' if f'{source}.{alias.name}' in MODULES else source
                     for alias in node.names]
        if id(node) in in_functions:
            inner.extend((node.lineno, name) for name in names)
        else:
            top.update(name for name in names if name in MODULES and name != module)
    return top, inner


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Every cycle a depth-first walk of ``graph`` meets (each as the path that closes it)."""
    cycles: List[List[str]] = []
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_there_are_no_import_cycles() -> None:
    cycles = find_cycles({module: imports(module)[0] for module in MODULES})
    assert not cycles, 'import cycles:\n' + '\n'.join(' -> '.join(cycle) for cycle in cycles)


def test_the_checker_finds_cycles_and_hidden_imports() -> None:
    assert find_cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == [['a', 'b', 'c', 'a']]
    assert find_cycles({'a': {'b'}, 'b': set()}) == []
    source = ('from typing import TYPE_CHECKING\nfrom . import states\nif TYPE_CHECKING:\n'
              '    from .app import App\ndef f():\n    from .app import App\n    return App\n')
    top, inner = imports('rpcresults.asyncresult', source)
    assert top == {'rpcresults.states'}  # the TYPE_CHECKING import is for type checkers only
    assert inner == [(6, 'rpcresults.app')]


@pytest.mark.parametrize('module', sorted(MODULES))
def test_imports_inside_functions_are_for_optional_dependencies_only(module: str) -> None:
    _, inner = imports(module)
    wrong = [(line, name) for line, name in inner if name.split('.')[0] not in OPTIONAL]
    assert not wrong, f'{module}: function-level imports that belong at the top: {wrong}'


@pytest.mark.parametrize('module', sorted(MODULES))
def test_modules_stay_within_the_line_budget(module: str) -> None:
    lines = len(MODULES[module].read_text().splitlines())
    if module in LONG_MODULES:
        return
    assert lines <= LINE_BUDGET, (f'{module} has {lines} lines: split it by job, or write down in '
                                  f'LONG_MODULES why it is one job')


@pytest.mark.parametrize('module', [name for name in MODULES if name.startswith('rpcresults.protocol.')])
def test_the_protocol_layer_does_no_io(module: str) -> None:
    tree = ast.parse(MODULES[module].read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(_absolute(module, node))
    assert imported <= PROTOCOL_ALLOWED, f'{module} imports {sorted(imported - PROTOCOL_ALLOWED)}'
