"""The layering ARCHITECTURE.md describes, enforced over the source: every import of every module of jobs/, workers/
and schemas/ read from its AST (at module level, inside functions, under `TYPE_CHECKING`, in `try` blocks; relative
imports resolved), so a cycle or a wrong-way import hidden in a function fails here, not in review.

Rules, each with a self-test on a synthetic tree proving the checker catches its violation:
- no module cycles, and no cycles between packages (a package is a directory: jobs.output, jobs.label, workers);
  a package and the packages inside it may import each other (the parent holds what its subpackages share, such as
  jobs/errors.py, and what drives them, such as jobs/cli.py), so only packages that do not contain one another count;
- `schemas/` imports neither `jobs` nor `workers`; `workers/` never imports `jobs`;
- the driver (`jobs/`) imports no torch, and only torch-free worker modules, anywhere in its code (in a function
  too): a module is torch-free when importing it loads no torch: neither it nor anything it imports within the
  project, at any depth (the parent packages an import runs count too), imports torch or torchvision when
  imported. An import inside a worker module's function is left out of that, since it runs where the function
  runs: workers/label/remote.py is the actor's torch-free front, its __init__ importing the real worker in the actor's
  process. The set is derived from the imports, never kept by hand.
Messages name each offending import by file:line.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jobs", "workers", "schemas")
TORCH = frozenset({"torch", "torchvision", "torchcodec"})


@dataclass(frozen=True)
class Import:
    """One written import: `source` imports `target` (a project module, or the dotted name of an outside one)."""

    source: str
    target: str
    path: Path
    line: int
    project: bool  # target is a module of the tree
    deferred: bool = False  # inside a function or under `if TYPE_CHECKING:`: not run by importing the source

    def where(self, root: Path) -> str:
        return f"{self.path.relative_to(root)}:{self.line}: {self.source} imports {self.target}"


class Tree:
    """The modules of `packages` under `root` and every import they write."""

    def __init__(self, root: Path, packages: Iterable[str] = PACKAGES):
        self.root = root
        self.modules: dict[str, Path] = {}
        self.is_package: set[str] = set()
        for package in packages:
            for path in sorted((root / package).rglob("*.py")):
                parts = path.relative_to(root).with_suffix("").parts
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                    self.is_package.add(".".join(parts))
                self.modules[".".join(parts)] = path
        # One per imported module and line: `from a import b, c` of one module is one import.
        found = (imp for name, path in self.modules.items() for imp in self._imports_of(name, path))
        self.imports = sorted(dict.fromkeys(found), key=lambda imp: (str(imp.path), imp.line, imp.target))

    def package_of(self, module: str) -> str:
        """The directory a module lives in, as a dotted name (a package's __init__ lives in its own)."""
        return module if module in self.is_package else module.rpartition(".")[0]

    def _imports_of(self, module: str, path: Path) -> Iterator[Import]:
        """Every import statement of the module, wherever it is (functions, classes, try, TYPE_CHECKING too)."""
        todo: list[tuple[ast.AST, bool]] = [(ast.parse(path.read_text(), str(path)), False)]
        while todo:
            node, deferred = todo.pop()
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield self._resolved(module, path, node, alias.name, None, deferred)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = self.package_of(module).split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                for alias in node.names:
                    yield self._resolved(module, path, node, base, alias.name, deferred)
            inner = deferred or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            for child in ast.iter_child_nodes(node):
                guarded = isinstance(node, ast.If) and _type_checking(node) and child in node.body
                todo.append((child, inner or guarded))

    def _resolved(self, module: str, path: Path, node: ast.stmt, name: str, member: str | None, deferred: bool):
        """`from name import member` names the submodule `name.member` when there is one, else `name` itself; an
        `import a.b.c` of the tree names its longest existing module."""
        line = node.lineno
        if member is not None and f"{name}.{member}" in self.modules:
            return Import(module, f"{name}.{member}", path, line, True, deferred)
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in self.modules:
                return Import(module, ".".join(parts[:end]), path, line, True, deferred)
        return Import(module, name, path, line, False, deferred)

    def project_imports(self) -> list[Import]:
        return [imp for imp in self.imports if imp.project and imp.target != imp.source]


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


# ---------------------------------------------------------------------------------------------------- the checks


def _cycles(nodes: Iterable[str], edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan's algorithm, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(nodes):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def module_cycles(tree: Tree) -> list[str]:
    edges: dict[str, set[str]] = {}
    for imp in tree.project_imports():
        edges.setdefault(imp.source, set()).add(imp.target)
    problems = []
    for component in _cycles(tree.modules, edges):
        members = set(component)
        within = [imp for imp in tree.project_imports() if imp.source in members and imp.target in members]
        problems.append(
            f"module cycle {' <-> '.join(component)}:\n  " + "\n  ".join(imp.where(tree.root) for imp in within)
        )
    return problems


def _nested(a: str, b: str) -> bool:
    return a == b or a.startswith(f"{b}.") or b.startswith(f"{a}.")


def package_cycles(tree: Tree) -> list[str]:
    crossing = [
        imp for imp in tree.project_imports() if not _nested(tree.package_of(imp.source), tree.package_of(imp.target))
    ]
    edges: dict[str, set[str]] = {}
    for imp in crossing:
        edges.setdefault(tree.package_of(imp.source), set()).add(tree.package_of(imp.target))
    packages = {tree.package_of(m) for m in tree.modules}
    problems = []
    for component in _cycles(packages, edges):
        members = set(component)
        within = [imp for imp in crossing if {tree.package_of(imp.source), tree.package_of(imp.target)} <= members]
        problems.append(
            f"package cycle {' <-> '.join(component)}:\n  " + "\n  ".join(imp.where(tree.root) for imp in within)
        )
    return problems


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def forbidden_imports(tree: Tree, rules: dict[str, tuple[str, ...]]) -> list[str]:
    """Imports from a package (rules' key) of a name under one it must not import (rules' value), project or not."""
    return sorted(
        imp.where(tree.root)
        for imp in tree.imports
        for importer, refused in rules.items()
        if _top(imp.source) == importer and _top(imp.target) in refused
    )


def torch_loaders(tree: Tree) -> dict[str, tuple[list[str], Import]]:
    """Every project module that loads torch when it is imported: one running an import of torch/torchvision, or of
    a module that loads it (through any chain, and through the parent packages an import runs first); with the
    chain of modules to the import of torch. Imports inside functions run only when called, and a module's functions
    may run in another process (remote.py's actor, a Ray task): such a front is torch-free; the driver itself
    imports no torch-loading module, even in a function (driver_torch_imports)."""
    run = [imp for imp in tree.imports if not imp.deferred]
    loads = {imp.source: ([imp.source], imp) for imp in reversed(run) if _top(imp.target) in TORCH}
    edges = [(imp.source, imp.target) for imp in run if imp.project and imp.source != imp.target]
    for module in tree.modules:  # importing a.b.c runs a/__init__ and a/b/__init__ first
        parts = module.split(".")
        edges += [(module, ".".join(parts[:end])) for end in range(1, len(parts))]
    changed = True
    while changed:
        changed = False
        for source, target in edges:
            if source not in loads and target in loads:
                chain, torch = loads[target]
                loads[source] = ([source, *chain], torch)
                changed = True
    return loads


def driver_torch_imports(tree: Tree, driver: str = "jobs") -> list[str]:
    """The driver's imports, anywhere in its code, of torch itself and of worker (or schemas) modules that load
    torch; a driver module importing torch is named by its own import."""
    loads = torch_loaders(tree)
    problems = []
    for imp in tree.imports:
        if _top(imp.source) != driver:
            continue
        if _top(imp.target) in TORCH:
            problems.append(f"{imp.where(tree.root)} (the driver imports no torch)")
        elif imp.project and _top(imp.target) != driver and imp.target in loads:
            chain, torch = loads[imp.target]
            problems.append(
                f"{imp.where(tree.root)}, which loads torch ({' -> '.join(chain)}; {torch.where(tree.root)})"
            )
    return problems


LAYERS = {"schemas": ("jobs", "workers"), "workers": ("jobs",)}


def _fail_on(problems: list[str]) -> None:
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------- the tree


@pytest.fixture(scope="module")
def tree() -> Tree:
    return Tree(ROOT)


def test_the_tree_has_no_module_cycles(tree):
    _fail_on(module_cycles(tree))


def test_the_tree_has_no_package_cycles(tree):
    _fail_on(package_cycles(tree))


def test_schemas_and_workers_import_no_layer_above_them(tree):
    _fail_on(forbidden_imports(tree, LAYERS))


def test_the_driver_imports_only_torch_free_worker_modules(tree):
    _fail_on(driver_torch_imports(tree))


def test_the_checker_reads_the_real_tree(tree):
    """Guards the checks above against passing on an empty or misread tree."""
    assert {"jobs.cli", "workers.io.storage", "schemas.specs", "workers.finetune.artifacts"} <= set(tree.modules)
    assert any(imp.target == "workers.io.storage" and imp.source.startswith("jobs.") for imp in tree.imports)
    assert "workers.models" in torch_loaders(tree) and "workers.io.storage" not in torch_loaders(tree)


# ---------------------------------------------------------------------------------------------------- self-tests


def _write(root: Path, files: dict[str, str]) -> Tree:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in ("jobs", "workers", "schemas"):
        (root / package).mkdir(exist_ok=True)
        (root / package / "__init__.py").touch()
    return Tree(root)


def test_a_cycle_through_a_function_and_type_checking_import_is_found(tmp_path):
    tree = _write(
        tmp_path,
        {
            "schemas/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from schemas.b import B\n",
            "schemas/b.py": "def f():\n    from . import a\n",
            "schemas/c.py": "import schemas.a\n",  # imports into the cycle, not part of it
        },
    )
    problems = module_cycles(tree)
    assert len(problems) == 1
    assert "schemas.a <-> schemas.b" in problems[0]
    assert "schemas/a.py:3: schemas.a imports schemas.b" in problems[0]
    assert "schemas/b.py:2: schemas.b imports schemas.a" in problems[0]
    assert "schemas.c" not in problems[0]


def test_a_package_cycle_between_sibling_packages_is_found_and_parent_child_is_not(tmp_path):
    tree = _write(
        tmp_path,
        {
            "jobs/output/__init__.py": "",
            "jobs/output/read.py": "from ..label.plan import x\n",
            "jobs/label/__init__.py": "",
            "jobs/label/plan.py": "from jobs.errors import E\n",
            "jobs/label/commit.py": "def f():\n    from jobs.output import read\n",
            "jobs/errors.py": "",
            "jobs/cli.py": "import jobs.output.read\n",  # a parent importing its child, which imports the parent
        },
    )
    assert module_cycles(tree) == []
    problems = package_cycles(tree)
    assert len(problems) == 1
    assert "jobs.label <-> jobs.output" in problems[0]
    assert "jobs/output/read.py:1: jobs.output.read imports jobs.label.plan" in problems[0]
    assert "jobs/label/commit.py:2: jobs.label.commit imports jobs.output.read" in problems[0]


def test_schemas_importing_jobs_or_workers_and_workers_importing_jobs_are_found(tmp_path):
    tree = _write(
        tmp_path,
        {
            "schemas/specs.py": "import pydantic\nfrom jobs.errors import BadInput\n",
            "schemas/catalog.py": "def read():\n    from workers.io import storage\n",
            "workers/io/storage.py": "import schemas.specs\n",
            "jobs/output/layout.py": "",
            "workers/io/writer.py": "try:\n    from jobs.output.layout import DATA\nexcept ImportError:\n    pass\n",
            "jobs/errors.py": "import workers.io.storage\n",
        },
    )
    assert forbidden_imports(tree, LAYERS) == [  # jobs importing workers is the right way
        "schemas/catalog.py:2: schemas.catalog imports workers.io.storage",
        "schemas/specs.py:2: schemas.specs imports jobs.errors",
        "workers/io/writer.py:2: workers.io.writer imports jobs.output.layout",
    ]


def test_the_driver_importing_torch_through_any_chain_is_found(tmp_path):
    tree = _write(
        tmp_path,
        {
            "workers/io/storage.py": "import json\n",
            "workers/front.py": "from workers.model import Model\n",
            "workers/model.py": "from .weights import load\n",
            "workers/weights.py": "try:\n    import torch.nn\nexcept ImportError:\n    pass\n",
            "workers/heavy/__init__.py": "import torchvision\n",
            "workers/heavy/plan.py": "import json\n",  # torch-free itself, but its package loads torch
            "schemas/tensors.py": "from workers.weights import load\n",
            "jobs/runner.py": "from workers.io import storage\nfrom workers.front import start\n",
            "jobs/cli.py": "def main():\n    import workers.heavy.plan\n    from torch import nn\n",
            # A front whose method imports the torch side where it runs (an actor), and a TYPE_CHECKING import:
            # neither loads torch on import.
            "workers/label/remote.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n"
            "class Actor:\n    def __init__(self):\n        from workers.model import Model\n",
            "jobs/actors.py": "from workers.label.remote import Actor\nimport schemas.tensors\n",
        },
    )
    problems = driver_torch_imports(tree)
    assert problems == [
        "jobs/actors.py:2: jobs.actors imports schemas.tensors, which loads torch (schemas.tensors -> workers.weights; "
        "workers/weights.py:2: workers.weights imports torch.nn)",
        "jobs/cli.py:2: jobs.cli imports workers.heavy.plan, which loads torch (workers.heavy.plan -> "
        "workers.heavy; workers/heavy/__init__.py:1: workers.heavy imports torchvision)",
        "jobs/cli.py:3: jobs.cli imports torch (the driver imports no torch)",
        "jobs/runner.py:2: jobs.runner imports workers.front, which loads torch (workers.front -> workers.model -> "
        "workers.weights; workers/weights.py:2: workers.weights imports torch.nn)",
    ]
    assert {"workers.io.storage", "workers.label.remote"}.isdisjoint(torch_loaders(tree))
