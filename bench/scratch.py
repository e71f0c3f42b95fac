"""Scratch folders for the benchmarks, removed at exit so repeated runs do not fill the disk.

A benchmark's phantoms, stores and catalogs take tens to hundreds of megabytes a run. Set
``XVR_BENCH_KEEP=1`` to keep them (each path is printed at exit), for instance to reuse
generated phantoms with ``bench/robustness.py --phantoms``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

KEEP_VARIABLE = "XVR_BENCH_KEEP"


def keep_requested() -> bool:
    """Whether the user asked to keep scratch folders (``XVR_BENCH_KEEP`` set and not 0)."""
    return os.environ.get(KEEP_VARIABLE, "") not in ("", "0")


def scratch_folder(prefix: str, under: str | None = None) -> Path:
    """A new folder, removed when this process exits (also after an error; not after a kill).

    ``under`` picks the parent (``/tmp`` where a server's socket path must stay short). Worker
    processes of a pool leave without running exit handlers, so only the creator removes it."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=under))
    atexit.register(_finish, folder)
    return folder


def _finish(folder: Path) -> None:
    if keep_requested():
        print(f"kept {folder}", file=sys.stderr, flush=True)
    else:
        shutil.rmtree(folder, ignore_errors=True)
