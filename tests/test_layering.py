"""The layering rule (design.md §2): core -> passes -> API; the core never imports the passes.

Checked two ways: statically (every import statement anywhere in a core module, function bodies
included) and dynamically (importing every core module in a fresh interpreter where any import
of ``lrfx.passes`` fails).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: The core: what every pass builds on.
CORE = (
    "analysis", "cost", "decompositions", "errors", "facts", "frozen", "inputs", "io", "latency",
    "layers", "modules", "pipeline", "plan", "progress", "report", "schemes", "tracing",
    "_version",
)
#: Above the passes: the public entry points and the tools.
UPPER = ("lrfx.api", "lrfx.cli", "lrfx.contrib", "lrfx.methods")

#: The one deliberate upward call, kept for compatibility (RankPlan.validate with inputs).
ALLOWED_UPWARD = {("plan", "lrfx.api")}


def _imports(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, node.lineno))
    return out


def test_every_core_module_exists() -> None:
    for name in CORE:
        assert (ROOT / "lrfx" / f"{name}.py").is_file(), name


@pytest.mark.parametrize("name", CORE)
def test_core_never_imports_passes_or_the_api(name: str) -> None:
    for module, line in _imports(ROOT / "lrfx" / f"{name}.py"):
        assert not module.startswith(("lrfx.passes", "passes")), (
            f"lrfx/{name}.py:{line} imports {module}: the core must not import the passes; "
            "move the function up a layer")
        if (name, module) in ALLOWED_UPWARD:
            continue
        assert not module.startswith(UPPER), f"lrfx/{name}.py:{line} imports {module}"


def test_passes_never_import_the_api() -> None:
    for path in (ROOT / "passes").rglob("*.py"):
        for module, line in _imports(path):
            assert not module.startswith(UPPER), f"{path}:{line} imports {module}"


def test_core_imports_with_the_passes_package_blocked() -> None:
    code = f"""
import importlib, importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "lrfx.passes" or name.startswith("lrfx.passes."):
            raise ImportError("blocked: " + name)
        return None
sys.meta_path.insert(0, Block())
for name in {CORE!r}:
    importlib.import_module("lrfx." + name)
import lrfx
lrfx.RankPlan, lrfx.trace, lrfx.Pipeline, lrfx.get_scheme  # core names resolve lazily
assert not any(m.startswith("lrfx.passes") for m in sys.modules), "passes were imported"
assert "lrfx.api" not in sys.modules, "the API was imported by the core"
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok")


def test_public_names_resolve_and_are_listed() -> None:
    import lrfx

    for name in lrfx.__all__:
        assert getattr(lrfx, name) is not None, name
    assert "compress" in dir(lrfx)
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        lrfx.nonexistent  # noqa: B018
