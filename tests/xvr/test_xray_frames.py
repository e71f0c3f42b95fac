"""Reading X-ray frames onto the image plane: Field of View flips and 1-based collimator edges."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from tests.support.device_headers import innova_xa, save
from xvr_node.geometry import CarmPose, patient_orientation, project
from xvr_node.xray_geometry import read_xray_geometry
from xvr_node.xvr.field import edge_margin
from xvr_node.xvr.xray import read_xray_frames

ROWS, COLUMNS = 40, 48  # non-square, so that rows and columns cannot be confused


def stored_from_detector(detector: np.ndarray, rotation: int, flip: bool) -> np.ndarray:
    """PS3.3 C.8.7.1.1: rotate the detector image clockwise, then flip horizontally."""
    stored = np.rot90(detector, k=-(rotation // 90))
    return stored[:, ::-1] if flip else stored


def small_innova(pixels: np.ndarray, rotation: int, flip: bool, orientation=("", "")):
    ds = innova_xa(frames=1, matrix=COLUMNS, patient_id="P1")
    ds.Rows = ROWS
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    ds.FieldOfViewRotation = str(rotation)
    ds.FieldOfViewHorizontalFlip = "YES" if flip else "NO"
    ds.PatientOrientation = list(orientation)
    return ds


@pytest.mark.parametrize(("rotation", "flip"), [(0, False), (0, True), (180, False), (180, True)])
def test_a_projected_point_lands_on_its_pixel_whatever_the_display_rotation(
    tmp_path: Path, rotation: int, flip: bool
) -> None:
    plain = read_xray_geometry(small_innova(np.zeros((ROWS, COLUMNS)), 0, False))
    intrinsics = plain.intrinsics()
    pose = CarmPose(-28.5, 21.9, 720.0).to_matrix(intrinsics)
    (u, v), *_ = project(pose, intrinsics, np.array([[3.0, -2.0, 3.0]]))
    column, row = round(u), round(v)
    assert 0 <= row < ROWS and 0 <= column < COLUMNS
    detector = np.zeros((ROWS, COLUMNS), dtype=np.uint8)
    detector[row, column] = 255
    stored = stored_from_detector(detector, rotation, flip)
    path = save(small_innova(stored, rotation, flip), tmp_path / "xa.dcm")

    (frame,) = read_xray_frames(path)

    assert frame.intrinsics == intrinsics  # half turns and flips keep the detector model
    found = np.unravel_index(np.argmax(frame.pixels), frame.pixels.shape)
    assert found == (row, column)


@pytest.mark.parametrize(("rotation", "flip"), [(0, False), (0, True), (180, False), (180, True)])
def test_collimated_field_is_mapped_like_the_pixels(
    tmp_path: Path, rotation: int, flip: bool
) -> None:
    ds = small_innova(np.zeros((ROWS, COLUMNS)), rotation, flip)
    del ds.ShutterShape  # the collimator alone says where the field is
    # An asymmetric opening in stored, 1-based coordinates: rows 3..30, columns 5..44.
    ds.CollimatorUpperHorizontalEdge, ds.CollimatorLowerHorizontalEdge = "3", "30"
    ds.CollimatorLeftVerticalEdge, ds.CollimatorRightVerticalEdge = "5", "44"
    open_stored = np.zeros((ROWS, COLUMNS), dtype=bool)
    open_stored[2:30, 4:44] = True
    # Undo the flip, then the clockwise rotation: the opening on the detector (image plane).
    expected = open_stored[:, ::-1] if flip else open_stored
    expected = np.rot90(expected, k=rotation // 90)
    (frame,) = read_xray_frames(save(ds, tmp_path / "xa.dcm"))
    # The mask keeps a margin inside every stated edge (penumbra).
    margin = edge_margin(*expected.shape)
    expected = ndimage.binary_erosion(expected, iterations=margin, border_value=1)
    np.testing.assert_array_equal(frame.open_field(), expected)


def test_collimator_edges_of_a_real_device_shape_are_one_based(tmp_path: Path) -> None:
    ds = innova_xa(frames=1, patient_id="P1")  # L6 R511 U2 D509 on a 512 x 512 image
    (frame,) = read_xray_frames(save(ds, tmp_path / "innova.dcm"), detect_field=False)
    margin = edge_margin(512, 512)
    # Collimator U2 D509 L6 R511 (1-based) is 0-based rows 1..508, columns 5..510; the display
    # shutter U3 D510 L6 R512 narrows the top to row 2. Then the margin.
    assert frame.field == (2 + margin, 509 - margin, 5 + margin, 511 - margin)


def test_result_patient_orientation_describes_the_stored_grid_after_a_half_turn() -> None:
    plain = read_xray_geometry(small_innova(np.zeros((ROWS, COLUMNS)), 0, False))
    pose = CarmPose(0.0, 0.0, 720.0).to_matrix(plain.intrinsics())
    assert patient_orientation(pose) == ["L", "F"]  # 0/0: as seen from the detector
    assert patient_orientation(pose, mirrored=True, rows_reversed=True) == ["R", "H"]
