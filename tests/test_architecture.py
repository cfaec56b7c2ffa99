"""The layering of DESIGN.md, checked on the source: imports flow one way and never in a cycle.

ernie, proto <- workers <- router <- cluster; inside cluster, config <- runtime <- api <- cli.
Every import counts, those inside functions too (parsed with `ast`, nothing is imported).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ernie", "proto", "workers", "router", "cluster")
# a module may import only from its own layer or a lower one; one name per layer
LAYERS = {
    "ernie": 0,
    "proto": 0,
    "workers": 1,
    "router": 2,
    "cluster.config": 3,
    "cluster.runtime": 4,
    "cluster.api": 5,
    "cluster.cli": 6,
}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports (absolute `expertmesh.X` or relative)."""
    is_pkg = path.name == "__init__.py"
    package = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            t = t.removeprefix("expertmesh.")
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def layer_of(module: str) -> str:
    for layer in sorted(LAYERS, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    return module.split(".")[0]


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def test_every_module_is_in_a_layer():
    unplaced = [m for m in modules() if layer_of(m) not in LAYERS and m != "cluster"]
    assert unplaced == []


def violations(g: dict[str, set[str]]) -> list[str]:
    wrong = []
    for mod, deps in g.items():
        here = layer_of(mod)
        for dep in deps:
            there = layer_of(dep)
            if there != here and dep != "cluster" and LAYERS[there] >= LAYERS[here]:
                wrong.append(f"{mod} imports {dep}")
    return sorted(wrong)


def test_imports_flow_one_way():
    wrong = violations(graph())
    assert wrong == [], "imports against the layering:\n" + "\n".join(wrong)


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """A cycle of module imports, if there is one (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycles():
    assert find_cycle(graph()) is None


def test_the_checks_catch_a_violation(tmp_path):
    """A worker module importing the router, relatively and absolutely, is caught."""
    (tmp_path / "x.py").write_text(
        "from expertmesh.router.engine import EngineConfig\n"
        "def f():\n    from ..router import loop\n"
    )
    known = set(modules())
    deps = imports_of("workers.x", tmp_path / "x.py", known)
    assert deps == {"router", "router.engine", "router.loop"}
    assert len(violations({"workers.x": deps})) == 3
    g = graph()
    g["router.engine"] = g["router.engine"] | {"router.loop"}  # loop imports engine
    assert find_cycle(g) is not None


def test_every_package_and_its_sources_are_installed():
    """A non-editable install (the Docker image, a wheel) carries every package folder, and the
    kernels' C++ sources and headers that are built on first use."""
    import tomllib

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    data = tool["package-data"]
    for pkg in PACKAGES:
        for init in sorted((ROOT / pkg).rglob("__init__.py")):
            folder = init.parent.relative_to(ROOT)
            name = "expertmesh." + ".".join(folder.parts)
            assert name in listed, f"{folder}/ is not in pyproject's packages"
            for src in [*(ROOT / folder).glob("*.cpp"), *(ROOT / folder).glob("*.h")]:
                patterns = data.get(name, [])
                assert any(src.match(p) for p in patterns), f"{src} is not in package-data"
