"""Registration metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xvr_node.geometry import CarmPose, Intrinsics, rigid, rotation_about
from xvr_node.xvr.metrics import (
    Summary,
    double_geodesic,
    format_table,
    mean_projection_error,
    mean_reprojection_error,
    mean_target_registration_error,
    summarize,
)

# Source at image-plane (u0·Δc, v0·Δr, SID) = (50·0.5, 50·0.4, 1000) = (25, 20, 1000) mm.
# Distinct row/column spacings, so that a swapped scaling would show.
INTRINSICS = Intrinsics(
    sid_mm=1000.0, rows=101, columns=101, row_spacing_mm=0.4, column_spacing_mm=0.5
)
SOURCE = np.array([25.0, 20.0, 1000.0])
IDENTITY = np.eye(4)


def translation(offset) -> np.ndarray:
    return rigid(np.eye(3), offset)


def carm_matrix() -> np.ndarray:
    """A generic true pose: an oblique C-arm view about a non-zero isocentre."""
    view = CarmPose(30.0, -20.0, 700.0, isocenter_lps=(12.0, -40.0, 85.0), inplane_deg=7.0)
    return view.to_matrix(INTRINSICS)


def points_in_front(truth: np.ndarray, count: int = 6, seed: int = 0) -> np.ndarray:
    """CT LPS points 300–700 mm from the detector, i.e. between source and detector."""
    rng = np.random.default_rng(seed)
    in_plane = np.c_[rng.uniform(-50, 80, (count, 2)), rng.uniform(300, 700, count)]
    return (truth @ np.c_[in_plane, np.ones(count)].T).T[:, :3]


# --- identity -------------------------------------------------------------------------------


def test_identity_gives_zero_everywhere() -> None:
    truth = carm_matrix()
    points = points_in_front(truth)
    assert mean_target_registration_error(truth, truth, points) == 0.0
    assert mean_projection_error(truth, truth, INTRINSICS, points) == 0.0
    assert mean_reprojection_error(truth, truth, INTRINSICS, points) == pytest.approx(0, abs=1e-9)
    assert double_geodesic(truth, truth, 1000.0) == pytest.approx((0, 0, 0), abs=1e-9)
    assert double_geodesic(truth, truth, 1000.0, intrinsics=INTRINSICS) == pytest.approx(
        (0, 0, 0), abs=1e-9
    )


# --- mTRE -----------------------------------------------------------------------------------


@pytest.mark.parametrize("truth", [IDENTITY, carm_matrix()], ids=["identity", "carm"])
def test_mtre_of_a_3_4_0_translation_is_5_for_any_points(truth: np.ndarray) -> None:
    # estimate⁻¹·p = T(−3,−4,0)·truth⁻¹·p: every point is off by (−3, −4, 0), length 5.
    estimate = truth @ translation([3.0, 4.0, 0.0])
    rng = np.random.default_rng(1)
    points = rng.uniform(-500, 500, (20, 3))
    assert mean_target_registration_error(estimate, truth, points) == pytest.approx(5.0, abs=1e-9)


def test_mtre_of_a_90_degree_rotation_about_z() -> None:
    # estimate = Rz(90°): estimate⁻¹ maps (x, y, z) → (y, −x, z).
    # (10, 0, 0) → (0, −10, 0): distance 10√2.  (0, 0, 7) → itself: 0.
    # (3, 4, 5) → (4, −3, 5): difference (1, −7, 0), distance √50 = 5√2.
    estimate = rigid(rotation_about("z", 90.0), [0.0, 0.0, 0.0])
    points = np.array([[10.0, 0.0, 0.0], [0.0, 0.0, 7.0], [3.0, 4.0, 5.0]])
    expected = (10 * math.sqrt(2) + 0.0 + 5 * math.sqrt(2)) / 3  # = 5√2
    assert mean_target_registration_error(estimate, IDENTITY, points) == pytest.approx(expected)
    assert expected == pytest.approx(5 * math.sqrt(2))


def test_mtre_is_symmetric() -> None:
    truth = carm_matrix()
    estimate = truth @ rigid(rotation_about("x", 4.0) @ rotation_about("y", -3.0), [2, -7, 11])
    points = points_in_front(truth)
    forward = mean_target_registration_error(estimate, truth, points)
    assert forward > 1.0
    assert mean_target_registration_error(truth, estimate, points) == pytest.approx(forward)


# --- mPE and mRPE ---------------------------------------------------------------------------


def test_mpe_of_a_shift_parallel_to_the_detector() -> None:
    # truth = identity: image plane = LPS. The estimate shifted by (3, 4, 0) sees every point
    # moved by (−3, −4, 0) mm parallel to the detector, i.e. 5 mm, magnified by SID/depth:
    # (0, 0, 500) is 500 mm from the source → ×2 → 10 mm on the detector;
    # (40, 30, 750) is 250 mm from the source → ×4 → 20 mm. Mean: 15 mm.
    estimate = translation([3.0, 4.0, 0.0])
    points = np.array([[0.0, 0.0, 500.0], [40.0, 30.0, 750.0]])
    assert mean_projection_error(estimate, IDENTITY, INTRINSICS, points) == pytest.approx(15.0)


def test_mpe_scales_columns_and_rows_by_their_own_spacing() -> None:
    # A 6 mm shift along x at magnification 2 is 12 mm on the detector = 24 columns of 0.5 mm;
    # the same shift along y is 12 mm = 30 rows of 0.4 mm. Both read 12 mm.
    point = np.array([[25.0, 20.0, 500.0]])
    along_x = mean_projection_error(translation([6.0, 0, 0]), IDENTITY, INTRINSICS, point)
    along_y = mean_projection_error(translation([0, 6.0, 0]), IDENTITY, INTRINSICS, point)
    assert along_x == pytest.approx(12.0)
    assert along_y == pytest.approx(12.0)


def test_mrpe_of_a_shift_parallel_to_the_detector() -> None:
    # The point (25, 20, 500) sits on the true central ray, 500 mm from the source. Shifted by
    # (−3, −4, 0) it projects along the direction (−6, −8, −1000) from the source. Back-projected
    # 500 mm along that ray with the true matrix, it is 500·‖(−6, −8, −1000)/√1000100 − (0, 0, −1)‖
    # from the point = 500·sqrt(2 − 2000/√1000100) ≈ 5 mm (the chord of the angle between rays).
    estimate = translation([3.0, 4.0, 0.0])
    point = np.array([[25.0, 20.0, 500.0]])
    expected = 500.0 * math.sqrt(2.0 - 2000.0 / math.sqrt(1_000_100.0))
    got = mean_reprojection_error(estimate, IDENTITY, INTRINSICS, point)
    assert got == pytest.approx(expected, rel=1e-9)
    assert got == pytest.approx(5.0, abs=0.01)


def test_mpe_refuses_points_behind_the_source() -> None:
    behind = np.array([[25.0, 20.0, 1200.0]])
    with pytest.raises(ValueError, match="behind"):
        mean_projection_error(IDENTITY, IDENTITY, INTRINSICS, behind)


def test_metrics_do_not_depend_on_the_ct_frame() -> None:
    # Moving the CT (matrices and points) by the same rigid transform G changes nothing.
    truth = carm_matrix()
    estimate = truth @ rigid(rotation_about("y", 2.0), [1.5, -2.0, 6.0])
    points = points_in_front(truth)
    g = rigid(rotation_about("z", 40.0) @ rotation_about("x", -25.0), [100.0, -30.0, 5.0])
    moved = (g @ np.c_[points, np.ones(len(points))].T).T[:, :3]
    for metric in (mean_projection_error, mean_reprojection_error):
        before = metric(estimate, truth, INTRINSICS, points)
        assert before > 0.1
        assert metric(g @ estimate, g @ truth, INTRINSICS, moved) == pytest.approx(before)
    before = mean_target_registration_error(estimate, truth, points)
    assert mean_target_registration_error(g @ estimate, g @ truth, moved) == pytest.approx(before)
    assert double_geodesic(g @ estimate, g @ truth, 1000.0) == pytest.approx(
        double_geodesic(estimate, truth, 1000.0)
    )


def test_bad_input_is_refused() -> None:
    reflection = np.diag([-1.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="estimate"):
        mean_target_registration_error(reflection, IDENTITY, np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        mean_target_registration_error(IDENTITY, IDENTITY, np.zeros((2, 2)))


# --- double geodesic ------------------------------------------------------------------------


def test_double_geodesic_of_a_rotation_about_z() -> None:
    theta = 0.3
    estimate = rigid(rotation_about("z", math.degrees(theta)), [0.0, 0.0, 0.0])
    # 0.3 rad · 1000/2 = 150 mm, no translation.
    assert double_geodesic(estimate, IDENTITY, 1000.0) == pytest.approx((150.0, 0.0, 150.0))


@pytest.mark.parametrize("degrees", [90.0, 170.0, 180.0])
def test_double_geodesic_angle_up_to_pi(degrees: float) -> None:
    estimate = rigid(rotation_about("x", degrees), [0.0, 0.0, 0.0])
    rotation, _, _ = double_geodesic(estimate, IDENTITY, 1000.0)
    assert rotation == pytest.approx(math.radians(degrees) * 500.0)


def test_double_geodesic_of_a_translation_and_of_both() -> None:
    assert double_geodesic(translation([3.0, 4.0, 0.0]), IDENTITY, 1000.0) == pytest.approx(
        (0.0, 5.0, 5.0)
    )
    both = rigid(rotation_about("z", math.degrees(0.3)), [3.0, 4.0, 0.0])
    assert double_geodesic(both, IDENTITY, 1000.0) == pytest.approx(
        (150.0, 5.0, math.sqrt(150.0**2 + 5.0**2))
    )


def test_double_geodesic_translation_measured_at_the_source() -> None:
    # Rz(90°) about the image-plane origin moves the source (25, 20, 1000) to (−20, 25, 1000):
    # (45, −5, 0), √2050 mm. About the source itself it moves nothing.
    about_origin = rigid(rotation_about("z", 90.0), [0.0, 0.0, 0.0])
    rotation, moved, _ = double_geodesic(about_origin, IDENTITY, 1000.0, intrinsics=INTRINSICS)
    assert rotation == pytest.approx(math.pi / 2 * 500.0)
    assert moved == pytest.approx(math.sqrt(2050.0))

    about_source = translation(SOURCE) @ about_origin @ translation(-SOURCE)
    _, moved, _ = double_geodesic(about_source, IDENTITY, 1000.0, intrinsics=INTRINSICS)
    assert moved == pytest.approx(0.0, abs=1e-9)
    # ... whereas at the image-plane origin (0, 0, 0) it is ‖(I − Rz)·(25, 20, 0)‖ = √2050 too.
    _, at_origin, _ = double_geodesic(about_source, IDENTITY, 1000.0)
    assert at_origin == pytest.approx(math.sqrt(2050.0))


# --- summary and table ----------------------------------------------------------------------


def test_summarize() -> None:
    summary = summarize([0.2, 0.5, 1.5, 3.0, 12.0])
    assert summary == Summary(
        n=5,
        median_mtre_mm=1.5,
        mean_mtre_mm=pytest.approx(3.44),
        success_1mm=0.4,
        success_2mm=0.6,
        gross_failure_10mm=0.2,
        median_mpe_mm=None,
        mean_mpe_mm=None,
    )


def test_summarize_thresholds_are_strict_and_mpe_is_summarised() -> None:
    summary = summarize([1.0, 2.0, 10.0], mpes=[1.0, 2.0, 6.0])
    assert (summary.success_1mm, summary.success_2mm) == (0.0, pytest.approx(1 / 3))
    assert summary.gross_failure_10mm == 0.0
    assert (summary.median_mpe_mm, summary.mean_mpe_mm) == (2.0, 3.0)


def test_summarize_inf_is_a_failure_nan_is_refused_empty_is_nan() -> None:
    summary = summarize([0.5, math.inf, 0.7])
    assert summary.gross_failure_10mm == pytest.approx(1 / 3)
    assert summary.median_mtre_mm == 0.7
    with pytest.raises(ValueError, match="NaN"):
        summarize([0.5, math.nan])
    empty = summarize([])
    assert empty.n == 0
    assert math.isnan(empty.median_mtre_mm)
    assert math.isnan(empty.success_1mm)


def test_format_table() -> None:
    rows = [
        {
            "name": "frame 1",
            "initial_mtre_mm": 25.0,
            "final_mtre_mm": 0.5,
            "mpe_mm": 0.812,
            "dgeo_mm": 3.14159,
            "iterations": 120,
            "seconds": 4.26,
        },
        {"name": "frame|2", "initial_mtre_mm": 30.0, "final_mtre_mm": 12.0, "iterations": 80},
    ]
    table = format_table(rows)
    lines = table.splitlines()
    assert lines[0] == (
        "| X-ray | initial mTRE (mm) | final mTRE (mm) | mPE (mm) | dgeo (mm) | iterations "
        "| time (s) |"
    )
    assert lines[2] == "| frame 1 | 25.00 | 0.50 | 0.81 | 3.14 | 120 | 4.3 |"
    assert lines[3] == "| frame\\|2 | 30.00 | 12.00 | – | – | 80 | – |"
    # Summary over final mTREs [0.5, 12]: median 6.25, mean 6.25, 50 % < 1 and < 2 mm,
    # 50 % > 10 mm; median mPE over [0.812] = 0.81.
    assert "median mTRE (mm)" in table
    assert "| 2 | 6.25 | 6.25 | 50.0 % | 50.0 % | 50.0 % | 0.81 |" in lines
    assert table.endswith("\n")
