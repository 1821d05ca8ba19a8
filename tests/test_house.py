"""The code's structure, as shared/docs/house.md describes it: imports point one way, no file or function grows
past its limits, and importing mimo changes nothing process-wide.

Checked from the source (ast), so a violation names the file and line, whatever the tests import.
"""

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "parallel", "data", "train", "recipes")
"""The folders installed as mimo's subpackages (setup.py)."""
CONFIG_MODULES = frozenset(
    {
        "mimo.model.config",
        "mimo.parallel.config",
        "mimo.data.config",
        "mimo.train.config",
        "mimo.recipes.schema",
        "mimo.recipes.errors",
    }
)
"""Plain dataclasses (and the error base): every package may import them, so cycles through them are allowed."""
MAX_FILE_LINES = 500
MAX_PARAMETERS = 8
MEGATRON_SIGNATURES = ("__init__", "forward")
"""Methods whose parameters megatron-core's module interfaces dictate (mimo's modules are built by its specs)."""
CODE_DIRS = (*PACKAGES, "tests", "bench")


def module_name(path: Path) -> str:
    parts = ["mimo", *path.relative_to(REPO).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))}


def code_files() -> Iterator[Path]:
    for folder in CODE_DIRS:
        yield from sorted((REPO / folder).rglob("*.py"))
    yield REPO / "setup.py"


def _top_level_imports(tree: ast.Module) -> Iterator[ast.stmt]:
    """Import statements that run when the module is imported (not those inside functions or TYPE_CHECKING)."""
    pending = list(tree.body)
    while pending:
        node = pending.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
            pending += node.body + node.orelse
        elif isinstance(node, ast.Try):
            pending += node.body + node.orelse + node.finalbody + [h for x in node.handlers for h in x.body]


def _with_parents(name: str, known: dict[str, Path]) -> list[str]:
    """Importing ``a.b.c`` runs ``a.b``'s and ``a``'s __init__ first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts) + 1) if ".".join(parts[:i]) in known]


def import_graph() -> dict[str, set[str]]:
    """Module -> the mimo modules it imports at module level (with the packages whose __init__ that runs)."""
    known = package_modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        targets: set[str] = set()
        for node in _top_level_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                imported = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
            for target in imported:
                if target.startswith("mimo."):
                    targets.update(_with_parents(target, known))
        targets.discard(name)
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_level_import_cycle():
    assert _cycles(import_graph()) == []


def test_packages_import_each_other_one_way_except_through_config_modules():
    graph = import_graph()
    # A package __init__ that imports nothing only runs on the way to a submodule: it ties no package to another.
    inert = {name for name, targets in graph.items() if not targets and package_modules()[name].name == "__init__.py"}
    packages: dict[str, set[str]] = {f"mimo.{package}": set() for package in PACKAGES}
    for source, targets in graph.items():
        for target in targets:
            if source in CONFIG_MODULES or target in CONFIG_MODULES or target in inert:
                continue
            a, b = ".".join(source.split(".")[:2]), ".".join(target.split(".")[:2])
            if a != b:
                packages[a].add(b)
    assert _cycles(packages) == [], {package: sorted(targets) for package, targets in packages.items()}


def test_the_graph_sees_real_imports():
    """The checks above would pass on an empty graph: make sure it holds edges that exist."""
    graph = import_graph()
    assert "mimo.train.checkpoint.manager" in graph["mimo.train.trainer"]
    assert "mimo.train.checkpoint" in graph["mimo.train.trainer"]  # the package __init__ runs first
    assert "mimo.parallel.context_parallel" in graph["mimo.model.core_attention"]


@pytest.mark.parametrize("path", list(code_files()), ids=lambda path: str(path.relative_to(REPO)))
def test_no_code_file_is_over_the_limit(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_FILE_LINES, f"{path.relative_to(REPO)} has {lines} lines; split it along its ideas"


def _megatron_bases(tree: ast.Module) -> set[str]:
    """Names a module imports from megatron-core (or torch's function-mode base)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron"):
            names.update(alias.asname or alias.name for alias in node.names)
    return names


def _too_many_parameters(path: Path) -> Iterator[str]:
    tree = ast.parse(path.read_text())
    megatron = _megatron_bases(tree)
    exempt: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(ast.unparse(base) in megatron for base in node.bases):
            exempt.update(
                id(item) for item in node.body if isinstance(item, ast.FunctionDef) and item.name in MEGATRON_SIGNATURES
            )
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and id(node) not in exempt:
            args = node.args
            names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
            count = len([name for name in names if name not in ("self", "cls")])
            if count > MAX_PARAMETERS:
                yield f"{path.relative_to(REPO)}:{node.lineno} {node.name} takes {count} parameters"


def test_no_function_takes_more_than_eight_parameters():
    offenders = [line for path in code_files() for line in _too_many_parameters(path)]
    assert offenders == [], "a long parameter list means a missing object:\n" + "\n".join(offenders)


def _external_modules() -> list[str]:
    """The non-mimo modules mimo's modules import at module level (they may set up what they like)."""
    names = set()
    for path in package_modules().values():
        for node in _top_level_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif node.level == 0 and not (node.module or "").startswith("mimo"):
                names.add(node.module)
    return sorted(name for name in names if not name.startswith("mimo"))


def test_importing_mimo_changes_no_process_wide_state():
    """Warning filters, logging and Hydra's config store are the commands' to set, not an import's. The libraries
    mimo imports are imported first: what they do at import is theirs."""
    probe = f"""
import importlib, logging, warnings
from hydra.core.config_store import ConfigStore
for name in {_external_modules()!r}:
    importlib.import_module(name)
filters, handlers = list(warnings.filters), list(logging.getLogger().handlers)
levels = {{name: logging.getLogger(name).level for name in ("mimo", "megatron")}}
store = set(ConfigStore.instance().repo)
for name in {sorted(package_modules())!r}:
    importlib.import_module(name)
assert list(warnings.filters) == filters, "warning filters changed"
assert list(logging.getLogger().handlers) == handlers, "logging configured"
assert {{name: logging.getLogger(name).level for name in levels}} == levels, "log levels changed"
assert set(ConfigStore.instance().repo) == store, "Hydra config store changed"
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
