"""The layout's rules (DESIGN.md), read from the source: imports point one way, serving/ never imports torch,
and no private name of another library is used unless it is one of the few kept with their guards."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("serving", "trainer", "loadtest")
# Private names of other libraries that serving/ keeps, each with a version gate, a fallback and a test
# (docs/serving.md, "Private names kept"): (file, name).
KEPT_PRIVATE = {("serving/server/batching.py", "_ready")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "_proto" not in path.parts:
                found[module_name(path)] = path
    return found


def imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports, at any depth of its code (lazy imports count too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules and "." in name:
                name = name.rpartition(".")[0]
            if name in modules:
                found.add(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = sources()
    names = {*modules, "serving._proto"}  # the generated stubs: a leaf
    return {"serving._proto": set()} | {name: imports(path, names) for name, path in modules.items()}


def all_imports_of(graph, prefix: str) -> set[tuple[str, str]]:
    return {(src, dst) for src, dsts in graph.items() if src == prefix or src.startswith(prefix + ".") for dst in dsts}


def test_there_is_no_import_cycle(graph):
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_server_never_imports_the_command_layer_or_the_client(graph):
    wrong = {
        (s, d) for s, d in all_imports_of(graph, "serving.server") if d.startswith(("serving.cli", "serving.client"))
    }
    assert not wrong


def test_trainer_and_loadtest_import_only_leaf_modules_of_serving(graph):
    leaves = (
        "serving.cli.flags",
        "serving.devices",
        "serving.runtime",
        "serving.protocol",
        "serving.lifetime",
        "serving._proto",
    )
    allowed = (*leaves, "serving.client")
    for package in ("trainer", "loadtest"):
        for src, dst in all_imports_of(graph, package):
            if dst.startswith("serving"):
                assert dst in allowed or dst.startswith("serving.client."), f"{src} imports {dst}"
    # The command layer and the server are reached only through the console script's table, by name.
    assert not any(d.startswith(("serving.server", "serving.cli.main")) for _, d in all_imports_of(graph, "trainer"))


def test_nothing_under_serving_imports_torch_or_the_trainer():
    for path in (ROOT / "serving").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in ("torch", "trainer"), f"{path.relative_to(ROOT)} imports {name}"


def private_uses(path: Path) -> set[str]:
    """Names beginning with one underscore read off anything but self, cls or a module of this project."""
    tree = ast.parse(path.read_text())
    own = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(PACKAGES))
        for alias in node.names
    }
    found = set()
    for node in ast.walk(tree):
        private = isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
        if private and not (isinstance(node.value, ast.Name) and node.value.id in ({"self", "cls"} | own)):
            found.add(node.attr)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr", "setattr")
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
            and str(node.args[1].value).startswith("_")
        ):
            found.add(node.args[1].value)
    return found


def test_serving_uses_no_private_name_of_another_library_but_those_kept_and_documented():
    used = set()
    for path in (ROOT / "serving").rglob("*.py"):
        if "_proto" not in path.parts:
            used |= {(path.relative_to(ROOT).as_posix(), name) for name in private_uses(path)}
    assert used == KEPT_PRIVATE
    documented = (ROOT / "docs" / "serving.md").read_text()
    for file, name in KEPT_PRIVATE:
        assert f"`{name}`" in documented and file in documented
