"""segpipe stands on its libraries' public APIs: no private module or underscore name of another
package is used anywhere in segpipe/, tasks/ or flows/, read from the source itself."""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

from tests.conftest import ROOT

PROJECT = ("segpipe", "tasks", "flows")
SOURCES = sorted(path for package in PROJECT for path in (ROOT / package).rglob("*.py"))


def private(name: str) -> bool:
    """A name its package keeps to itself: one leading underscore (dunders such as __future__ are public)."""
    return name.startswith("_") and not name.startswith("__")


def third_party(module: str) -> bool:
    return module.split(".")[0] not in PROJECT


def private_uses(source: str) -> list[str]:
    """Every import of a private module or name of another package, of zarr.core, and every
    attribute with a single leading underscore read from anything but self or cls."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and third_party(node.module):
            modules = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Attribute) and private(node.attr):
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
            continue
        else:
            continue
        found += [f"line {node.lineno}: import {m}" for m in modules
                  if third_party(m) and (any(map(private, m.split("."))) or m.startswith("zarr.core"))]
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_private_module_or_underscore_name_of_another_package_is_used(path):
    assert private_uses(path.read_text()) == []


def test_memory_tuning_is_not_done_by_library_code():
    assert not [p for p in SOURCES if "mallopt" in p.read_text()]


def test_the_check_itself_finds_what_it_forbids():
    source = """
from zarr.core.sync import sync
from zarr.storage import _common
from numpy import _private_helper
import zarr.core.array
array._async_array.setitem(1, 2)
self._mine = other._theirs
from segpipe import store
x.__class__
"""
    assert sorted(private_uses(source)) == sorted([
        "line 2: import zarr.core.sync", "line 2: import zarr.core.sync.sync",
        "line 3: import zarr.storage._common", "line 4: import numpy._private_helper",
        "line 5: import zarr.core.array", "line 6: array._async_array", "line 7: other._theirs",
    ])


def test_requires_python_has_no_upper_bound():
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert "<" not in requires and requires.startswith(">=")
