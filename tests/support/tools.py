"""Find the real external tools the tests talk to; skip locally, fail in CI when missing."""

from __future__ import annotations

import glob
import os
import shutil

import pytest


def in_ci() -> bool:
    """CI sets CI=true: there a missing tool is a failure, never a skip."""
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require_tool(name: str, *candidates: str) -> str:
    """Return the path of a tool, trying explicit candidates (globs allowed) before PATH.

    Call DCMTK tools by full path: pynetdicom installs console scripts with the same names
    (``storescu``, ``echoscu``) into the virtualenv.
    """
    for pattern in candidates:
        for path in sorted(glob.glob(pattern), reverse=True):
            if os.access(path, os.X_OK):
                return path
    if not candidates:
        found = shutil.which(name)
        if found:
            return found
    message = f"{name} is not installed (Debian package needed; `make test` installs it as root)"
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)
    raise AssertionError("unreachable")


def dciodvfy_errors(path) -> list[str]:
    """The ``Error`` lines dicom3tools' validator prints for a file (warnings are allowed)."""
    import subprocess

    validator = require_tool("dciodvfy", "/usr/bin/dciodvfy", "/usr/local/bin/dciodvfy")
    completed = subprocess.run([validator, str(path)], capture_output=True, text=True, check=False)
    lines = (completed.stdout + completed.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]
