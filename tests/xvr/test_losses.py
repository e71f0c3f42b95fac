"""The masked similarity that registration maximises, against a plain reference of its formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from xvr_node.xvr.losses import EPS, MaskedTarget

SOBEL_X = np.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])


def _windowed_ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray, size: int) -> float:
    """Mean NCC of every size² window wholly inside ``mask``, one window at a time."""
    values = []
    for i in range(a.shape[0] - size + 1):
        for j in range(a.shape[1] - size + 1):
            if not mask[i : i + size, j : j + size].all():
                continue
            x, y = a[i : i + size, j : j + size], b[i : i + size, j : j + size]
            cov = ((x - x.mean()) * (y - y.mean())).mean()
            values.append(cov / np.sqrt((x.var() + EPS) * (y.var() + EPS)))
    return float(np.mean(values))


def reference(fixed, moving, mask, *, robust: bool, beta: float, patch_ncc: int, patch_grad: int):
    """The similarity written out in float64 with scipy: background removed by a normalised
    Gaussian over the mask (robust), each image standardised over the mask, then
    β·(½ global NCC + ½ windowed NCC) + (1 − β)·windowed NCC of the Sobel gradients."""
    mask = mask.astype(bool)
    weight = mask.astype(float)

    def prepared(image: np.ndarray) -> np.ndarray:
        if robust:
            sigma = max(1.0, min(image.shape) / 8.0)
            radius = max(1, int(3 * sigma))
            kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
            kernel /= kernel.sum()

            def blur(values: np.ndarray) -> np.ndarray:
                rows = ndimage.convolve1d(values, kernel, axis=1, mode="nearest")
                return ndimage.convolve1d(rows, kernel, axis=0, mode="nearest")

            image = image - blur(image * weight) / np.maximum(blur(weight), 1e-3)
        mean = image[mask].mean()
        std = image[mask].std()
        return (image - mean) / (std + 1e-8 * (1.0 + abs(mean))) * weight

    a, b = prepared(fixed.astype(float)), prepared(moving.astype(float))
    x, y = a[mask], b[mask]
    cov = ((x - x.mean()) * (y - y.mean())).mean()
    global_ncc = cov / np.sqrt((x.var() + EPS) * (y.var() + EPS))
    score = beta * (0.5 * global_ncc + 0.5 * _windowed_ncc(a, b, mask, patch_ncc))
    if beta < 1.0:
        inner = ndimage.binary_erosion(mask, np.ones((3, 3)), border_value=0)[1:-1, 1:-1]
        terms = []
        for kernel in (SOBEL_X, SOBEL_X.T):
            ga = ndimage.correlate(a, kernel)[1:-1, 1:-1]
            gb = ndimage.correlate(b, kernel)[1:-1, 1:-1]
            terms.append(_windowed_ncc(ga, gb, inner, patch_grad))
        score += (1.0 - beta) * float(np.mean(terms))
    return score


def images(seed: int, shape=(22, 26)):
    """An X-ray-like pair: smooth anatomy, a background ramp on one, noise, and a round field."""
    rng = np.random.default_rng(seed)
    anatomy = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)
    rows, columns = np.mgrid[: shape[0], : shape[1]]
    ramp = 0.02 * rows + 0.01 * columns
    fixed = anatomy + ramp + 0.05 * rng.normal(size=shape)
    moving = 3.0 * np.roll(anatomy, 1, axis=1) + 7.0
    radius = 0.47 * min(shape)
    mask = (rows - shape[0] / 2) ** 2 + (columns - shape[1] / 2) ** 2 < radius**2
    return fixed, moving, mask


def tensor(array: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array, dtype=np.float32))[None, None]


@pytest.mark.parametrize(
    ("method", "beta"), [("robust", 0.5), ("mncc_gncc", 0.5), ("robust", 1.0), ("mncc_gncc", 0.2)]
)
def test_the_similarity_is_the_written_out_formula(method, beta):
    fixed, moving, mask = images(seed=3)
    expected = reference(
        fixed, moving, mask, robust=method == "robust", beta=beta, patch_ncc=5, patch_grad=7
    )
    target = MaskedTarget(
        tensor(fixed), tensor(mask), method=method, beta=beta, patch_ncc=5, patch_grad=7
    )
    got = target.score(tensor(moving))
    assert got.shape == (1,)
    assert abs(float(got) - expected) < 2e-5, (float(got), expected)
    # Not a formula that any pair passes: the images agree only in part.
    assert 0.05 < expected < 0.95


def test_a_prepared_xray_scores_a_batch_as_each_image_alone():
    """One target, many DRRs (multi-start's candidates, each with its own footprint mask):
    every score is the one that image gets compared alone with its own mask."""
    fixed, _, mask = images(seed=5)
    movings, masks = [], []
    for seed in range(3):
        _, moving, _ = images(seed=seed)
        movings.append(moving)
        masks.append(mask & (np.arange(mask.shape[1]) < mask.shape[1] - 2 * seed)[None, :])
    target = MaskedTarget(tensor(fixed), torch.cat([tensor(m) for m in masks]))
    batch = target.score(torch.cat([tensor(m) for m in movings]))
    for index, (moving, own_mask) in enumerate(zip(movings, masks, strict=True)):
        alone = MaskedTarget(tensor(fixed), tensor(own_mask)).score(tensor(moving))
        assert abs(float(batch[index]) - float(alone)) < 1e-6
    assert len({round(float(value), 4) for value in batch}) == 3


def test_pixels_outside_the_mask_change_nothing_and_the_slope_reaches_only_the_drr():
    fixed, moving, mask = images(seed=8)
    target = MaskedTarget(tensor(fixed), tensor(mask))
    drr = tensor(moving).requires_grad_(True)
    score = target.score(drr)
    score.sum().backward()
    assert drr.grad is not None and float(drr.grad[0, 0][~torch.as_tensor(mask)].abs().max()) == 0
    assert float(drr.grad.abs().max()) > 0
    elsewhere = np.where(mask, moving, 1e3 * np.random.default_rng(0).normal(size=moving.shape))
    assert abs(float(target.score(tensor(elsewhere))) - float(score.detach())) < 1e-6
    # The same X-ray against itself scores 1, whatever its scale and offset.
    assert abs(float(target.score(tensor(2.5 * fixed - 4.0))) - 1.0) < 1e-3


def test_images_that_do_not_fit_the_target_are_refused():
    fixed, moving, mask = images(seed=1)
    target = MaskedTarget(tensor(fixed), tensor(mask))
    with pytest.raises(ValueError, match="differ in shape"):
        target.score(tensor(moving[:-1]))
    with pytest.raises(ValueError, match="similarity must be one of"):
        MaskedTarget(tensor(fixed), method="ssim")
