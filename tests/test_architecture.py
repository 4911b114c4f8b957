"""The layering holds: adapters -> guardrail -> shift_store, and no import cycle anywhere."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("adapters", "guardrail", "shift_store")


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Modules of this project that ``path`` imports (for type checking too)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] in PACKAGES}


GRAPH = {
    _module(path): _imports(path) for package in PACKAGES for path in (ROOT / package).rglob("*.py")
}


def _resolve(name: str) -> str | None:
    while name and name not in GRAPH:
        name = name.rpartition(".")[0]
    return name or None


def test_dependencies_point_one_way():
    allowed = {
        "adapters": set(PACKAGES),
        "guardrail": {"guardrail", "shift_store"},
        "shift_store": {"shift_store"},
    }
    for module, imports in GRAPH.items():
        wrong = {
            name for name in imports if name.split(".")[0] not in allowed[module.split(".")[0]]
        }
        assert not wrong, f"{module} imports {sorted(wrong)}"


def test_the_engine_never_imports_the_evaluation_harness_or_the_fixtures():
    engine_side = [
        m
        for m in GRAPH
        if m.startswith("guardrail")
        and not m.startswith(("guardrail.evaluation", "guardrail.testing", "guardrail.cli"))
    ]
    for module in engine_side:
        wrong = {
            n for n in GRAPH[module] if n.startswith(("guardrail.evaluation", "guardrail.testing"))
        }
        assert not wrong, f"{module} imports {sorted(wrong)}"


def test_no_import_cycle():
    edges = {
        m: {r for n in imports if (r := _resolve(n)) and r != m} for m, imports in GRAPH.items()
    }
    # a package's __init__ re-exporting its own modules is not a cycle through them
    edges = {m: {r for r in targets if not m.startswith(r + ".")} for m, targets in edges.items()}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges.get(module, ())):
            if state.get(target) == "open":
                raise AssertionError("import cycle: " + " -> ".join([*path, module, target]))
            if target not in state:
                visit(target, [*path, module])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [])


def test_the_server_never_goes_through_langchain():
    """OpenAI JSON becomes guard calls directly: no server module imports LangChain."""
    server = ROOT / "adapters" / "server"
    for path in [*server.rglob("*.py"), ROOT / "adapters" / "conversation.py"]:
        tree = ast.parse(path.read_text())
        names = {
            alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names
        }
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        found = {name for name in names if name.startswith(("langchain", "adapters.langchain"))}
        assert not found, f"{path.name} imports {sorted(found)}"
