"""The decisive test: a bead rendered by diffdrr lands where the exported matrix says."""

from __future__ import annotations

import numpy as np
import pytest

from xvr_node.ct_volume import CtVolume
from xvr_node.geometry import CarmPose, Intrinsics, project
from xvr_node.phantom import example_ct
from xvr_node.xvr.renderer import make_drr, render_matrices

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_ct() -> CtVolume:
    volume = example_ct()
    step = 4  # 128 x 128 x 34 voxels of 2.8 x 2.8 x 10 mm: fast on two cores
    return CtVolume(
        volume.hu[::step, ::step, ::step].copy(),
        volume.affine_lps @ np.diag([step, step, step, 1.0]),
    )


def bead_image(
    volume: CtVolume,
    bead_lps: np.ndarray,
    intrinsics: Intrinsics,
    orientation: str,
    matrix: np.ndarray,
) -> np.ndarray:
    """The bead's own contribution: render with and without it, subtract."""
    ijk = np.round(volume.lps_to_voxel(bead_lps)[0]).astype(int)
    with_bead = CtVolume(volume.hu.copy(), volume.affine_lps)
    i, j, k = ijk  # a 3 x 3 voxel block, so that no ray spacing can step over it
    with_bead.hu[i - 1 : i + 2, j - 1 : j + 2, k] = 20000.0
    images = [
        render_matrices(make_drr(v, intrinsics, orientation), v, orientation, intrinsics, matrix)[
            0, 0
        ].numpy()
        for v in (with_bead, volume)
    ]
    return images[0] - images[1], volume.voxel_to_lps(ijk)[0]


def centroid(image: np.ndarray) -> np.ndarray:
    weights = np.where(image > 0.2 * image.max(), image, 0.0)
    rows, columns = np.indices(image.shape)
    return np.array([(weights * columns).sum(), (weights * rows).sum()]) / weights.sum()


CASES = {
    "square": (Intrinsics(1000.0, 64, 64, 4.5, 4.5), 0.0),
    "non-square": (Intrinsics(1100.0, 48, 80, 4.0, 4.0), -35.0),
    "off-centre principal point": (Intrinsics(1000.0, 64, 64, 4.5, 4.5, (40.0, 25.0)), 20.0),
}


@pytest.mark.parametrize("orientation", ["AP", "PA"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bead_projects_onto_its_pixel(small_ct, orientation, case):
    intrinsics, primary = case
    matrix = CarmPose(primary, 12.0, 720.0, tuple(small_ct.center_lps)).to_matrix(intrinsics)
    target = small_ct.center_lps + np.array([30.0, -10.0, 20.0])
    difference, bead = bead_image(small_ct, target, intrinsics, orientation, matrix)
    expected = project(matrix, intrinsics, bead)[0]
    np.testing.assert_allclose(centroid(difference), expected, atol=0.5)


def test_patient_left_is_on_the_image_right_at_zero_zero(small_ct):
    intrinsics = CASES["square"][0]
    matrix = CarmPose(0.0, 0.0, 720.0, tuple(small_ct.center_lps)).to_matrix(intrinsics)
    left = small_ct.center_lps + np.array([60.0, 0.0, 0.0])  # LPS +x: the patient's left
    difference, _ = bead_image(small_ct, left, intrinsics, "PA", matrix)
    column, _ = centroid(difference)
    assert column > intrinsics.columns / 2 + 5


def test_ap_and_pa_render_the_same_view(small_ct):
    intrinsics = CASES["non-square"][0]
    matrix = CarmPose(-20.0, 10.0, 700.0, tuple(small_ct.center_lps)).to_matrix(intrinsics)
    images = [
        render_matrices(make_drr(small_ct, intrinsics, o), small_ct, o, intrinsics, matrix)[
            0, 0
        ].numpy()
        for o in ("AP", "PA")
    ]
    np.testing.assert_allclose(images[0], images[1], rtol=1e-3, atol=1e-2 * images[1].max())
