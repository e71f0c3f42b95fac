"""Register X-ray files against one CT and write a JSON result per frame (``register``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xvr_node import __version__
from xvr_node.ct_volume import CtVolume
from xvr_node.geometry import reverse_x_axis_for
from xvr_node.xvr.register import Outcome, Registrar
from xvr_node.xvr.xray import XrayFrame, read_xray_frames

LOG = logging.getLogger(__name__)

MATRIX_CONVENTION = "4x4 row-major, image-plane mm -> CT LPS mm (docs/geometry.md)"


@dataclass(frozen=True)
class FixedStart:
    """A user-given start: C-arm angles and offsets, or a full matrix."""

    primary_deg: float = 0.0
    secondary_deg: float = 0.0
    source_isocenter_mm: float = 750.0
    offsets_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    inplane_deg: float = 0.0
    matrix: np.ndarray | None = None


def xray_files(paths: Iterable[Path]) -> list[Path]:
    """Files named, and the files inside folders named (sorted)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        else:
            files.append(path)
    return files


def initial_matrix(
    registrar: Registrar, frame: XrayFrame, initializer: str, fixed: FixedStart
) -> np.ndarray:
    """The start pose from the named initializer."""
    if initializer == "dicom":
        return registrar.dicom_pose(frame)
    if initializer == "fixed":
        if fixed.matrix is not None:
            return np.asarray(fixed.matrix, dtype=float)
        return registrar.fixed_pose(
            frame,
            fixed.primary_deg,
            fixed.secondary_deg,
            fixed.source_isocenter_mm,
            fixed.offsets_mm,
            fixed.inplane_deg,
        )
    raise ValueError(f"unknown initializer {initializer!r}")


def register_files(
    volume: CtVolume,
    files: Sequence[Path],
    out_dir: Path,
    registrar: Registrar,
    initializer: str,
    fixed: FixedStart | None = None,
    track: bool = True,
    starts: Callable[[XrayFrame], np.ndarray] | None = None,
    echo: Callable[[str], None] = print,
) -> list[Path]:
    """Register every frame of every file; multi-frame runs are tracked frame to frame.

    ``starts`` overrides the initializer (the model initializer passes its prediction).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    fixed = fixed or FixedStart()
    written = []
    for file in files:
        frames = read_xray_frames(file)
        previous: Outcome | None = None
        for index, frame in enumerate(frames):
            warm = previous if track else None
            if warm is not None:
                start = registrar.tracked_pose(frame, frames[index - 1], warm.final_matrix)
                used = "tracking"
            elif starts is not None:
                start, used = starts(frame), initializer
            else:
                start, used = initial_matrix(registrar, frame, initializer, fixed), initializer
            outcome = registrar.register(frame, start, warm=warm)
            previous = outcome
            path = out_dir / f"{Path(file).stem}{_frame_suffix(frame)}.json"
            path.write_text(json.dumps(result_json(frame, outcome, used, registrar), indent=1))
            written.append(path)
            echo(
                f"{frame.name}: {used}, similarity {outcome.similarity:.4f}, "
                f"{outcome.iterations} iterations, {outcome.wall_time_s:.1f} s -> {path.name}"
            )
    return written


def _frame_suffix(frame: XrayFrame) -> str:
    return f"_f{frame.frame_number:03d}" if frame.frame_number else ""


def result_json(frame: XrayFrame, outcome: Outcome, initializer: str, registrar: Registrar) -> dict:
    """Everything needed to use and reproduce one registration."""
    settings = registrar.settings
    return {
        "file": frame.source,
        "sop_instance_uid": frame.sop_instance_uid,
        "frame_number": frame.frame_number,
        "initializer": initializer,
        "initial_matrix": outcome.initial_matrix.tolist(),
        "final_matrix": outcome.final_matrix.tolist(),
        "intrinsics": frame.intrinsics.to_json(),
        "conventions": {
            "matrix": MATRIX_CONVENTION,
            "orientation": registrar.orientation,
            "reverse_x_axis": reverse_x_axis_for(registrar.orientation),
            "hu_to_density": "xvr-node-linear-v1",
        },
        "similarity": outcome.similarity,
        "iterations": outcome.iterations,
        "wall_time_s": outcome.wall_time_s,
        "trajectory": outcome.trajectory,
        "settings": {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.__dict__.items()
        },
        "software": f"xvr-node {__version__}",
    }
