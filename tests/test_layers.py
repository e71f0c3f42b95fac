"""Imports run one way: stages (cli, node, jobs) above; dicom, xvr, catalog, geometry below."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "xvr_node"

#: What each lower layer must never import (a prefix matches the module and its children).
FORBIDDEN = {
    "dicom": ("xvr_node.jobs", "xvr_node.node", "xvr_node.cli", "xvr_node.monitor"),
    "catalog": ("xvr_node.jobs", "xvr_node.dicom", "xvr_node.xvr", "xvr_node.node"),
    "xvr": ("xvr_node.jobs", "xvr_node.catalog", "xvr_node.node", "sqlalchemy", "pynetdicom"),
    "geometry.py": ("xvr_node", "torch", "sqlalchemy", "pydicom"),
}


def imported(path: Path) -> set[str]:
    """Every module a file imports, absolute names (this package uses no relative imports)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            names.add(node.module or "")
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_lower_layer_imports_nothing_above_it(layer):
    root = PACKAGE / layer
    files = [root] if root.is_file() else sorted(root.rglob("*.py"))
    assert files, f"no module in {root}"
    wrong = [
        f"{path.relative_to(PACKAGE)} imports {name}"
        for path in files
        for name in sorted(imported(path))
        if any(name == banned or name.startswith(banned + ".") for banned in FORBIDDEN[layer])
    ]
    assert not wrong, wrong


def test_the_listener_starts_without_the_registration_stack():
    """``serve`` listens before torch and timm load (seconds); its workers import them later."""
    heavy = ("torch", "timm", "torchvision", "diffdrr")
    probe = (
        "import sys, xvr_node.node, xvr_node.cli; "
        f"print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split()
    assert loaded == []
