"""The decisive test: a bead rendered by the registration renderer lands where the exported
matrix says."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xvr_node.ct_volume import CtVolume
from xvr_node.geometry import CarmPose, Intrinsics, project
from xvr_node.phantom import example_ct
from xvr_node.xvr.register import downsample_volume
from xvr_node.xvr.renderer import Projector

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
    matrix: np.ndarray,
) -> np.ndarray:
    """The bead's own contribution: render with and without it, subtract."""
    ijk = np.round(volume.lps_to_voxel(bead_lps)[0]).astype(int)
    with_bead = CtVolume(volume.hu.copy(), volume.affine_lps)
    i, j, k = ijk  # a 3 x 3 voxel block, so that no ray spacing can step over it
    with_bead.hu[i - 1 : i + 2, j - 1 : j + 2, k] = 20000.0
    images = [
        Projector(v, intrinsics).render_numpy(matrix)[0, 0].numpy() for v in (with_bead, volume)
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


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bead_projects_onto_its_pixel(small_ct, case):
    intrinsics, primary = case
    matrix = CarmPose(primary, 12.0, 720.0, tuple(small_ct.center_lps)).to_matrix(intrinsics)
    target = small_ct.center_lps + np.array([30.0, -10.0, 20.0])
    difference, bead = bead_image(small_ct, target, intrinsics, matrix)
    expected = project(matrix, intrinsics, bead)[0]
    np.testing.assert_allclose(centroid(difference), expected, atol=0.5)


def test_patient_left_is_on_the_image_right_at_zero_zero(small_ct):
    intrinsics = CASES["square"][0]
    matrix = CarmPose(0.0, 0.0, 720.0, tuple(small_ct.center_lps)).to_matrix(intrinsics)
    left = small_ct.center_lps + np.array([60.0, 0.0, 0.0])  # LPS +x: the patient's left
    difference, _ = bead_image(small_ct, left, intrinsics, matrix)
    column, _ = centroid(difference)
    assert column > intrinsics.columns / 2 + 5


def test_a_coarser_ct_and_detector_render_the_same_view(small_ct):
    """The pyramid's premise: resampling the CT or the detector moves nothing in the image."""
    intrinsics = CASES["off-centre principal point"][0]
    matrix = CarmPose(-20.0, 10.0, 700.0, tuple(small_ct.center_lps)).to_matrix(intrinsics)
    fine = Projector(small_ct, intrinsics, step_voxels=0.5).render_numpy(matrix)[0, 0].numpy()
    coarse_ct = downsample_volume(small_ct, (2, 2, 1))
    coarse = Projector(coarse_ct, intrinsics, (32, 32)).render_numpy(matrix)[0, 0].numpy()
    pooled = fine.reshape(32, 2, 32, 2).mean(axis=(1, 3))
    assert np.corrcoef(pooled.ravel(), coarse.ravel())[0, 1] > 0.995
    weights = np.indices(pooled.shape).reshape(2, -1)
    centre = [(w * pooled.ravel()).sum() / pooled.sum() for w in weights]
    centre_coarse = [(w * coarse.ravel()).sum() / coarse.sum() for w in weights]
    np.testing.assert_allclose(centre_coarse, centre, atol=0.05)


def test_a_crop_renders_the_same_pixels(small_ct):
    intrinsics = CASES["non-square"][0]
    matrix = CarmPose(15.0, -5.0, 700.0, tuple(small_ct.center_lps)).to_matrix(intrinsics)
    projector = Projector(small_ct, intrinsics)
    whole = projector.render_numpy(matrix)
    part = projector(torch.as_tensor(matrix)[None], (5, 30, 12, 70))
    torch.testing.assert_close(part, whole[..., 5:30, 12:70])


def test_a_view_split_over_threads_renders_and_differentiates_the_same(small_ct):
    """On CPU a lone view is marched in one part per thread; the parts must join seamlessly
    (padding rays dropped, order kept) and give the same gradient through the view."""
    intrinsics = CASES["non-square"][0]
    matrix = CarmPose(15.0, -5.0, 700.0, tuple(small_ct.center_lps)).to_matrix(intrinsics)
    projector = Projector(small_ct, intrinsics)
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 3):  # 3 parts: 48 × 80 rays do not divide evenly
            torch.set_num_threads(threads)
            view = torch.as_tensor(matrix, dtype=torch.float32)[None].requires_grad_(True)
            image = projector(view, (3, 45, 2, 77))
            (image * torch.linspace(0, 1, image.numel()).reshape(image.shape)).sum().backward()
            results.append((image.detach(), view.grad))
    finally:
        torch.set_num_threads(previous)
    (one, gradient_one), (split, gradient_split) = results
    torch.testing.assert_close(split, one)
    torch.testing.assert_close(gradient_split, gradient_one, rtol=1e-4, atol=1e-4)


def test_chosen_rays_render_as_the_whole_grid_and_leave_the_rest_dark(small_ct):
    """Marching only the rays a similarity reads gives those pixels, and their gradient
    through the view, exactly as the whole box does."""
    intrinsics = CASES["non-square"][0]
    matrix = CarmPose(15.0, -5.0, 700.0, tuple(small_ct.center_lps)).to_matrix(intrinsics)
    projector = Projector(small_ct, intrinsics)
    box = (3, 45, 2, 77)
    height, width = box[1] - box[0], box[3] - box[2]
    rows, columns = np.mgrid[:height, :width]
    chosen = torch.as_tensor(((rows - 20) ** 2 + (columns - 37) ** 2 < 18**2).ravel())
    rays = torch.nonzero(chosen).flatten()
    results = []
    for subset in (None, rays):
        view = torch.as_tensor(matrix, dtype=torch.float32)[None].requires_grad_(True)
        image = projector(view, box, rays=subset)
        weights = torch.linspace(0, 1, image.numel()).reshape(image.shape) * chosen.reshape(
            image.shape
        )
        (image * weights).sum().backward()
        results.append((image.detach(), view.grad))
    (whole, gradient_whole), (part, gradient_part) = results
    inside = chosen.reshape(whole.shape)
    torch.testing.assert_close(part[inside], whole[inside])
    assert (part[~inside] == 0).all() and (whole[~inside] > 0).any()
    torch.testing.assert_close(gradient_part, gradient_whole, rtol=1e-4, atol=1e-4)
