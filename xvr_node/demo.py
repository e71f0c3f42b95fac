"""``make demo``: the main job on embedded defaults (SQLite, local store, CPU unless a GPU)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from xvr_node.catalog.db import current_revision, make_engine, upgrade
from xvr_node.config import load_settings
from xvr_node.geometry import Intrinsics, project
from xvr_node.phantom import PhantomSpec, build_phantom

DEMO_PHANTOM = PhantomSpec(
    seed=1,
    frames=4,
    columns=192,
    rows=192,
    multiframe=5,
    motion="dynamic",
    modality="XA",
    flip=True,
    bead=True,
)


def run_demo(output: Path, config_path: Path | None, echo: Callable[[str], None]) -> None:
    """Make the phantom patient, create the catalog, and say what was done and where."""
    output = Path(output).resolve()
    started = time.monotonic()
    environ = dict(os.environ)
    # The demo keeps everything it makes under its output folder unless the config says more.
    environ.setdefault("XVR_NODE__STORAGE__ROOT", str(output / "store"))
    settings = load_settings(config_path, environ=environ)

    echo(f"[1/2] phantom patient -> {output / 'phantom'}")
    summary = build_phantom(
        output / "phantom", DEMO_PHANTOM, progress=lambda line: echo(f"      {line}")
    )
    echo(f"      {summary.describe()}")

    echo(f"[2/2] catalog -> {settings.database_url_redacted}")
    settings.ensure_storage_root()
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        with engine.connect() as connection:
            tables = sorted(engine.dialect.get_table_names(connection))
    finally:
        engine.dispose()
    echo(
        f"      schema revision {current_revision(settings.database_url)}; "
        f"tables: {', '.join(t for t in tables if t != 'alembic_version')}"
    )

    echo("")
    echo(_truth_table(output / "phantom"))
    echo("")
    echo(f"done in {time.monotonic() - started:.0f} s. Look at:")
    echo(f"  {output / 'phantom' / 'xray'}   XA instances (any DICOM viewer)")
    echo(f"  {output / 'phantom' / 'truth.json'}   ground-truth poses, intrinsics, bead")
    echo(f"  {settings.storage_root}   the node's store and catalog")
    echo("Receiving, registration and export join this demo as the pipeline grows.")


def _truth_table(phantom: Path) -> str:
    """Per frame: what the C-arm reported, how far the truth is from it, where the bead is."""
    truth = json.loads((phantom / "truth.json").read_text())
    lines = [
        f"{'file':<20} {'frame':>5} {'LAO/RAO':>8} {'CRA/CAU':>8} {'mirrored':>8} "
        f"{'pos. error':>16} {'bead px':>14}"
    ]
    for record in truth["xrays"]:
        error = record["positioning_error"]
        rotation = np.linalg.norm(error["rotation_deg"])
        shift = np.linalg.norm(error["translation_mm"])
        intrinsics = Intrinsics(
            record["sid_mm"],
            record["rows"],
            record["columns"],
            *record["pixel_spacing_mm"],
            tuple(record["principal_point_px"]),
        )
        u, v = project(np.array(record["matrix"]), intrinsics, np.array(truth["bead_lps"]))[0]
        if record["mirrored"]:
            u = record["columns"] - 1 - u
        lines.append(
            f"{Path(record['file']).name:<20} {record['frame_number']:>5} "
            f"{record['positioner']['primary_deg']:>8.1f} "
            f"{record['positioner']['secondary_deg']:>8.1f} {record['mirrored']!s:>8} "
            f"{rotation:>5.1f} deg {shift:>4.0f} mm ({u:>5.1f}, {v:>5.1f})"
        )
    return "\n".join(lines)
