"""The packages import in one direction only, and inference needs neither torch nor Ray.

The layering (README, "Layout"): a package may import only the packages listed for it; every other
import of one of ours by another, at module level or inside a function, is refused, naming the file
and line. ``registry.pull`` is what a simulation framework (Geant4, Athena) embeds: pulling a model and
generating showers with it must work where importing torch or Ray fails.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: package → the packages of ours it may import (the README's table).
LAYERS = {
    "showers": set(),
    "zoo": {"showers"},
    "validate": {"showers"},
    "trainers": {"showers", "zoo", "validate"},
    "tune": {"showers", "zoo", "validate", "trainers"},
    "registry": {"showers", "zoo"},
    "calozoo": {"showers", "zoo", "validate", "trainers", "tune", "registry"},
}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in ``source``, at any depth (functions, classes,
    ``try``), ``importlib.import_module("...")`` with a literal name included; ``if TYPE_CHECKING:``
    blocks and relative imports left out."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))):
            arg = node.args[0]
            if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
                arg = arg.values[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and not arg.value.startswith("."):
                found.append((node.lineno, arg.value))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


def forbidden_arrows() -> list[str]:
    """``file:line: A imports B (A may import ...)`` for every import against :data:`LAYERS`."""
    bad = []
    for package, allowed in LAYERS.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, module in imported_modules(path.read_text()):
                target = module.split(".")[0]
                if target in LAYERS and target != package and target not in allowed:
                    bad.append(f"{path.relative_to(ROOT)}:{line}: {package} imports {module} "
                               f"({package} may import {', '.join(sorted(allowed)) or 'nothing of ours'})")
    return bad


def test_the_table_names_every_package():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages == set(LAYERS), "a new package needs its row in LAYERS and in the README's layout table"


def test_the_scan_sees_local_imports_and_skips_type_checking():
    source = textwrap.dedent("""
        import registry.pull
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from trainers.loop import train
        def f():
            from zoo import create_model
            import importlib
            importlib.import_module(f"tune.{'sweep'}")
        from . import sibling
        """)
    assert imported_modules(source) == [(2, "registry.pull"), (3, "typing"), (7, "zoo"), (8, "importlib"),
                                        (9, "tune.")]


def test_the_contributing_page_states_the_same_table():
    rows = re.findall(r"^\| `(\w+)` \| (.+?) \|$", (ROOT / "docs" / "contributing.md").read_text(), re.M)
    stated = {package: set(re.findall(r"`(\w+)`", allowed)) for package, allowed in rows}
    assert stated == LAYERS, "docs/contributing.md's import table differs from LAYERS"


def test_packages_import_in_one_direction_only():
    bad = forbidden_arrows()
    assert not bad, "imports against the layering (README, Layout):\n" + "\n".join(bad)


# -- inference without training dependencies ---------------------------------------------------------
_BLOCKED_RUN = """
import json, sys

BLOCKED = ("torch", "ray")
attempts = []

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            attempts.append(name)
            raise ModuleNotFoundError(f"{name} is blocked in this test", name=name)
        return None

sys.meta_path.insert(0, Blocker())
for name in BLOCKED:
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} could still be imported")
attempts.clear()

from registry import pull  # noqa: F401 - the inference entry point itself must import
from registry.contract import contract  # what `calozoo export` writes, too
from registry.pull import ShowerGenerator

local = ShowerGenerator(sys.argv[1], name="layering.fastcalogan.r0", version="1")
pulled = pull("layering.fastcalogan.r0@champion", uri=sys.argv[2])  # by name, through MLflow, into the cache
energies = [4096.0] * 5 + [65536.0] * 3
showers = pulled.generate(energies, seed=1)
assert contract(pulled)["readout"]["n_voxels"] == pulled.n_voxels
ours = sorted({m.split(".")[0] for m in sys.modules} & {"zoo", "trainers", "tune", "validate", "calozoo"})
print(json.dumps({"shape": list(showers.shape), "n_voxels": pulled.n_voxels, "dtype": str(showers.dtype),
                  "version": pulled.version, "finite": bool((showers == showers).all()),
                  "same_as_local": bool((showers == local.generate(energies, seed=1)).all()),
                  "attempts": attempts, "ours": ours}))
"""


@pytest.mark.timeout(300)
def test_pull_generates_without_torch_or_ray(registered, tmp_path):
    path, uri, n_voxels = registered
    env = {**os.environ, "CALOZOO_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", _BLOCKED_RUN, str(path), uri], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["shape"] == [8, n_voxels] and out["n_voxels"] == n_voxels and out["dtype"] == "float32"
    assert out["version"] == "1" and out["finite"] and out["same_as_local"]
    assert (tmp_path / "cache" / "layering.fastcalogan.r0" / "v1" / "model.onnx").exists()
    assert out["attempts"] == [], f"the inference path tried to import {out['attempts']}"
    assert out["ours"] == [], f"the inference path imported {out['ours']}"
