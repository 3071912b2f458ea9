"""The package's import structure (docs/architecture.md): no import cycles between modules, and
every import runs down the floors (a room imports rooms of its own floor or below)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "distillm2_jax"

# docs/architecture.md, "The rooms": top-level module or subpackage -> floor.
FLOORS = {
    "errors": 1, "jsonio": 1, "objectives": 1, "sharding": 1, "distributed": 1, "stats": 1,
    "answers": 1,
    "config": 2, "data": 2,
    "models": 3,
    "hf": 4, "sampling": 4,
    "generation": 5, "toy": 5,
    "train": 6,
    "evaluate": 7, "planning": 7, "protocols": 7,
    "demo": 8, "api": 8, "cli": 8, "commands": 9,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every distillm2_jax module a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("distillm2_jax")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("distillm2_jax"):
            # `from pkg import mod` depends on the submodule; `from pkg import name` on pkg
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                path = PACKAGE.parent / sub.replace(".", "/")
                found.add(sub if path.with_suffix(".py").exists() or path.is_dir() else node.module)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(p) if m in files and m != name} for name, p in files.items()}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_import_cycles():
    graph = _graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):   # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_imports_run_down_the_floors():
    graph = _graph()
    rooms = {_room(m) for m in graph} - {"__init__"}
    assert rooms == set(FLOORS), f"rooms without a floor or floors without a room: {rooms ^ set(FLOORS)}"
    upward = [(a, b) for a, deps in graph.items() for b in deps
              if _room(a) != "__init__" and _room(b) != "__init__" and FLOORS[_room(b)] > FLOORS[_room(a)]]
    assert not upward, f"imports that run back up: {sorted(upward)}"
