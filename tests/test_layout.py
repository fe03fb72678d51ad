"""The package's layering, read from the source: imports go one way down, none loops, the kernels stay free of
transformers, and no test or bench switches behaviour by writing another module's globals."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# lower levels never import higher ones; a module may import its own package's modules (without a cycle)
LEVELS = {
    "fastjudge._C": 0, "fastjudge.kernels": 0,
    "fastjudge.core": 1,
    "fastjudge.data": 2,
    "fastjudge.report": 2.5, "fastjudge.report_html": 2.5, "fastjudge.curves": 2.5,
    "fastjudge.engine": 3,
    "fastjudge.models": 4,
    "fastjudge.stages": 5, "fastjudge.gate": 5, "fastjudge.sampler": 5, "fastjudge.cost": 5, "fastjudge.judge": 5,
    "fastjudge.toy": 6, "fastjudge.serve": 6.5,
    "fastjudge.config": 7,
    "fastjudge.ablations": 7.5,
    "fastjudge.loop": 8,
    "fastjudge.cli": 9,
    "fastjudge.__main__": 10,
}


def _modules() -> dict[str, Path]:
    """Module name -> file, for the driver package and the kernels (installed as fastjudge.kernels)."""
    out = {}
    for path in sorted((ROOT / "fastjudge").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        out["fastjudge.kernels." + path.stem] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module `name` imports, at any depth of the file (function-level imports included), resolved to
    the longest known module name; imports outside fastjudge come back as their top-level package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from package import module` names a module; `from module import name` names the module
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            if not target.startswith("fastjudge"):
                found.add(target.split(".")[0])
                continue
            while target not in MODULES and "." in target:
                target = target.rpartition(".")[0]
            if target != name:
                found.add(target)
    return found


def _level(name: str) -> int:
    if name == "fastjudge":  # the package's __init__ (its version; `from fastjudge import _C` lands here too)
        return 0
    for prefix in sorted(LEVELS, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "."):
            return LEVELS[prefix]
    raise AssertionError(f"{name}: no layer; add it to LEVELS in {Path(__file__).name}")


def _package(name: str) -> str:
    if name == "fastjudge":
        return name
    for prefix in sorted(LEVELS, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "."):
            return prefix
    return name


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_every_module_has_a_layer():
    for name in MODULES:
        _level(name)


# what the package itself re-exports on its top (`fastjudge.Judge`, imported lazily by its `__getattr__`)
FACADE = {"fastjudge": {"fastjudge.judge"}}


def test_imports_go_down_only():
    upward = []
    for name, targets in GRAPH.items():
        for target in targets:
            if target in FACADE.get(name, ()):
                continue
            if target.startswith("fastjudge") and _package(target) != _package(name) and \
                    _level(target) >= _level(name):
                upward.append(f"{name} (level {_level(name)}) imports {target} (level {_level(target)})")
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    internal = {name: {t for t in targets if t in MODULES} for name, targets in GRAPH.items()}
    # a package's __init__ importing its own submodules is how it re-exports them, not a cycle through them
    for name, targets in internal.items():
        if MODULES[name].name == "__init__.py":
            internal[name] = {t for t in targets if not t.startswith(name + ".")}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for target in sorted(internal[name]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[name] = 2

    for name in sorted(internal):
        if name not in state:
            visit(name)


def test_no_module_imports_its_own_package():
    """A submodule that imports its own package's __init__ (which imports the submodules) is a cycle the
    graph above cannot see once a package's re-exports are set aside."""
    inward = [f"{name} imports {target}" for name, targets in GRAPH.items() for target in targets
              if target != "fastjudge" and MODULES.get(target, Path()).name == "__init__.py"
              and name.startswith(target + ".")]
    assert not inward, "\n".join(inward)


def test_kernels_import_neither_transformers_nor_the_driver():
    for name, targets in GRAPH.items():
        if name.startswith("fastjudge.kernels"):
            bad = {t for t in targets if t == "transformers" or (t.startswith("fastjudge")
                                                                  and not t.startswith("fastjudge.kernels"))}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_the_checker_sees_an_upward_import(tmp_path):
    """The walk is not vacuous: a function-level upward import in a core module is found."""
    source = tmp_path / "bad.py"
    source.write_text("def f():\n    from fastjudge.loop import run\n    return run\n")
    targets = _imports("fastjudge.core.bad", source)
    assert "fastjudge.loop" in targets and _level("fastjudge.loop") > _level("fastjudge.core.bad")


def _module_switch_writes(path: Path) -> list[str]:
    """`module.NAME = ...` and `monkeypatch.setattr(module, "NAME", ...)` with NAME in capitals and `module`
    one of fastjudge's modules imported under that name: a switch flipped from outside."""
    tree = ast.parse(path.read_text(), str(path))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastjudge"):
            for alias in node.names:
                if f"{node.module}.{alias.name}" in MODULES:
                    imported.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("fastjudge") and alias.asname:
                    imported.add(alias.asname)
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Assign):
            targets = [t for t in node.targets if isinstance(t, ast.Attribute)]
            targets = [(t.value, t.attr) for t in targets]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "setattr" \
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
            targets = [(node.args[0], node.args[1].value)]
        for owner, attr in targets:
            if isinstance(owner, ast.Name) and owner.id in imported and isinstance(attr, str) and attr.isupper():
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {owner.id}.{attr}")
    return found


def test_no_module_switch_is_written_from_outside():
    files = [p for folder in ("fastjudge", "kernels", "tests", "bench") for p in (ROOT / folder).rglob("*.py")]
    writes = [w for path in files if path.name != Path(__file__).name for w in _module_switch_writes(path)]
    assert not writes, "\n".join(writes)


def test_no_module_is_over_400_lines():
    """Modules small enough to read whole: a module that grows past this is split by job."""
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > 400}
    assert not long, long
