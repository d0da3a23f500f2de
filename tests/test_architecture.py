"""The layers of ARCHITECTURE.md hold: every module is placed, no import goes up, no cycle, no function-level
import of our own modules (read with ast, so imports inside functions count too)."""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("compress", "criteria", "exporters")


def declared_layers(root: Path = ROOT) -> list[tuple[int, str, list[str]]]:
    """(level, name, module patterns) from the ```layers block of ARCHITECTURE.md."""
    text = (root / "ARCHITECTURE.md").read_text()
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "ARCHITECTURE.md has no ```layers block"
    layers = []
    for line in block.group(1).strip().splitlines():
        head, _, patterns = line.partition(":")
        level, name = head.split(maxsplit=1)
        layers.append((int(level), name, patterns.split()))
    return layers


def module_files(root: Path = ROOT) -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = path
    return files


def _targets(module: str, node: ast.AST, is_package: bool, known: set[str]) -> list[str]:
    """Our modules an import statement loads (the deepest known module of each imported name)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".")
            base = base[: len(base) - node.level + (1 if is_package else 0)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in known else prefix for alias in node.names]
    out = []
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            out.append(name)
    return out


def import_graph(root: Path = ROOT) -> tuple[dict[str, set[str]], list[str]]:
    """Edges module -> our modules it imports, and the function-level imports of our modules."""
    files = module_files(root)
    known = set(files)
    edges: dict[str, set[str]] = {m: set() for m in files}
    nested: list[str] = []
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        top_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = [t for t in _targets(module, node, path.name == "__init__.py", known) if t != module]
                edges[module].update(targets)
                if targets and id(node) not in top_level and not _guarded_top_level(tree, node):
                    nested.append(f"{module}:{node.lineno} imports {', '.join(dict.fromkeys(targets))} inside a function")
    return edges, nested


def _guarded_top_level(tree: ast.Module, node: ast.AST) -> bool:
    """An import inside a module-level if/try (e.g. TYPE_CHECKING) is still a module-level import."""
    for stmt in tree.body:
        if isinstance(stmt, (ast.If, ast.Try)) and any(n is node for n in ast.walk(stmt)):
            return True
    return False


def layer_of(module: str, layers: list[tuple[int, str, list[str]]]) -> int | None:
    matches = [level for level, _, patterns in layers for p in patterns if fnmatch.fnmatchcase(module, p)]
    return max(matches) if matches else None


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def violations(root: Path = ROOT) -> list[str]:
    """Every breach of the declared layers under ``root`` (empty when the architecture holds)."""
    layers = declared_layers(root)
    edges, nested = import_graph(root)
    problems = [f"{m} is in no layer of ARCHITECTURE.md" for m in edges if layer_of(m, layers) is None]
    for module, targets in sorted(edges.items()):
        here = layer_of(module, layers)
        for target in sorted(targets):
            there = layer_of(target, layers)
            if here is not None and there is not None and there > here:
                problems.append(f"{module} (layer {here}) imports {target} (layer {there}): up the layers")
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(edges)]
    return problems + nested


def test_layers_hold() -> None:
    problems = violations()
    assert not problems, "\n".join(problems)


def test_every_layer_is_declared_once() -> None:
    layers = declared_layers()
    assert [level for level, _, _ in layers] == list(range(len(layers)))
    assert layer_of("compress", layers) == len(layers) - 1, "the facade is the top layer"


def test_checker_finds_each_breach(tmp_path: Path) -> None:
    """The checker itself: an upward import, a cycle, a function-level import and an unplaced module all fail."""
    (tmp_path / "ARCHITECTURE.md").write_text("```layers\n0 core: compress.low\n1 top: compress.high compress\n```\n")
    pkg = tmp_path / "compress"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("from compress.high import x\n")
    (pkg / "high.py").write_text("def f():\n    from . import low\n")
    (pkg / "stray.py").write_text("")
    for package in ("criteria", "exporters"):
        (tmp_path / package).mkdir()
    problems = "\n".join(violations(tmp_path))
    assert "compress.low (layer 0) imports compress.high (layer 1): up the layers" in problems
    assert "import cycle: compress.high -> compress.low" in problems
    assert "compress.high:2 imports compress.low inside a function" in problems
    assert "compress.stray is in no layer" in problems
