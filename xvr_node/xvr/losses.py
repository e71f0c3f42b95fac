"""Image similarity (mNCC, gradient-NCC) and the SE(3) geodesic loss used to train and register."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffdrr.metrics import DoubleGeodesicSE3
from diffdrr.pose import RigidTransform

#: Added to every variance, relative to a globally standardised image (unit variance).
EPS = 1e-5

_SOBEL = torch.tensor(
    [
        [[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]],
        [[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]],
    ]
).unsqueeze(1)


def standardize(image: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit std per image, so ``EPS`` is relative and scaling changes nothing."""
    mean = image.mean(dim=(-1, -2, -3), keepdim=True)
    std = image.std(dim=(-1, -2, -3), keepdim=True, correction=0)
    return (image - mean) / (std + 1e-8 * (1.0 + mean.abs()))


def global_ncc(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """NCC over each whole image, averaged over channels: (B,)."""
    x1 = x1 - x1.mean(dim=(-1, -2), keepdim=True)
    x2 = x2 - x2.mean(dim=(-1, -2), keepdim=True)
    cov = (x1 * x2).mean(dim=(-1, -2))
    var1 = x1.square().mean(dim=(-1, -2))
    var2 = x2.square().mean(dim=(-1, -2))
    return (cov / torch.sqrt((var1 + EPS) * (var2 + EPS))).mean(dim=1)


def windowed_ncc(x1: torch.Tensor, x2: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Mean NCC of all ``patch_size``² windows (stride 1, inside the image): (B,).

    The same number as diffdrr's ``NormalizedCrossCorrelation2d(patch_size)``, computed with
    box filters instead of unfolded patches: O(H·W) memory and time whatever the patch size,
    which is what makes full-resolution refinement and large training batches affordable.
    """
    return local_ncc(x1, x2, patch_size).mean(dim=(1, 2, 3))


def local_ncc(x1: torch.Tensor, x2: torch.Tensor, patch_size: int) -> torch.Tensor:
    """NCC of every ``patch_size``² window (stride 1): (B, C, H−size+1, W−size+1)."""
    size = min(patch_size, x1.shape[-1], x1.shape[-2])
    mean1 = F.avg_pool2d(x1, size, stride=1)
    mean2 = F.avg_pool2d(x2, size, stride=1)
    var1 = (F.avg_pool2d(x1 * x1, size, stride=1) - mean1 * mean1).clamp(min=0.0)
    var2 = (F.avg_pool2d(x2 * x2, size, stride=1) - mean2 * mean2).clamp(min=0.0)
    cov = F.avg_pool2d(x1 * x2, size, stride=1) - mean1 * mean2
    return cov / torch.sqrt((var1 + EPS) * (var2 + EPS))


def multiscale_ncc(fixed: torch.Tensor, moving: torch.Tensor, patch_size: int = 9) -> torch.Tensor:
    """mNCC: ½ global NCC + ½ ``patch_size``-patch NCC, per image (B,)."""
    fixed, moving = standardize(fixed), standardize(moving)
    return 0.5 * global_ncc(fixed, moving) + 0.5 * windowed_ncc(fixed, moving, patch_size)


def sobel(image: torch.Tensor) -> torch.Tensor:
    """x and y Sobel gradients (B, 2, H−2, W−2), without padding so borders add no edges."""
    return F.conv2d(image, _SOBEL.to(image), padding=0)


def gradient_ncc(fixed: torch.Tensor, moving: torch.Tensor, patch_size: int = 11) -> torch.Tensor:
    """Patch NCC of the Sobel gradients, averaged over both directions: (B,)."""
    grad_fixed = sobel(standardize(fixed))
    grad_moving = sobel(standardize(moving))
    return windowed_ncc(grad_fixed, grad_moving, patch_size)


def image_similarity(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    beta: float = 0.5,
    patch_ncc: int = 9,
    patch_grad: int = 11,
) -> torch.Tensor:
    """β·mNCC + (1 − β)·gradient-NCC of (B, 1, H, W) images: (B,), in [−1, 1], higher is better.

    Invariant to a positive affine change of either image's intensities, so a DRR's line
    integrals and a log-converted X-ray can be compared without calibrating either.
    """
    if fixed.shape != moving.shape:
        raise ValueError(f"images differ in shape: {tuple(fixed.shape)} vs {tuple(moving.shape)}")
    if fixed.dim() != 4 or fixed.shape[1] != 1:
        raise ValueError(f"expected (B, 1, H, W) images, got {tuple(fixed.shape)}")
    score = beta * multiscale_ncc(fixed, moving, patch_ncc)
    if beta < 1.0:
        score = score + (1.0 - beta) * gradient_ncc(fixed, moving, patch_grad)
    return score


# --- masked similarity: only pixels that see the patient through the open field ------------

#: Similarity methods :func:`masked_similarity` knows. ``mncc_gncc`` is XVR.md's reference;
#: ``robust`` first removes each image's smooth background (scatter, table, heel effect,
#: vignetting, a vendor's LUT curvature over the field), then scores the same three terms.
SIMILARITIES = ("robust", "mncc_gncc")


def inside(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Windows of ``size``² pixels that lie wholly inside ``mask`` (B, 1, H−size+1, W−size+1)."""
    return F.avg_pool2d(mask, size, stride=1) > 0.999


def _masked_moments(image: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    total = weight.sum(dim=(-1, -2, -3), keepdim=True).clamp(min=1.0)
    mean = (image * weight).sum(dim=(-1, -2, -3), keepdim=True) / total
    var = ((image - mean).square() * weight).sum(dim=(-1, -2, -3), keepdim=True) / total
    return mean, var


def _masked_standardize(image: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    mean, var = _masked_moments(image, weight)
    # The tiny floor keeps the gradient finite when the mask leaves nothing (var = 0).
    return (image - mean) / ((var + 1e-12).sqrt() + 1e-8 * (1.0 + mean.abs())) * weight


def _masked_global_ncc(x1: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    total = weight.sum(dim=(-1, -2, -3)).clamp(min=1.0)
    mean1 = (x1 * weight).sum(dim=(-1, -2, -3)) / total
    mean2 = (x2 * weight).sum(dim=(-1, -2, -3)) / total
    d1 = (x1 - mean1[:, None, None, None]) * weight
    d2 = (x2 - mean2[:, None, None, None]) * weight
    cov = (d1 * d2).sum(dim=(-1, -2, -3)) / total
    var1 = d1.square().sum(dim=(-1, -2, -3)) / total
    var2 = d2.square().sum(dim=(-1, -2, -3)) / total
    return cov / torch.sqrt((var1 + EPS) * (var2 + EPS))


def _masked_windowed_ncc(
    x1: torch.Tensor, x2: torch.Tensor, mask: torch.Tensor, patch_size: int
) -> torch.Tensor:
    """Mean NCC over the windows wholly inside ``mask`` (channels averaged): (B,)."""
    size = min(patch_size, x1.shape[-1], x1.shape[-2])
    ncc = local_ncc(x1, x2, size)
    valid = inside(mask, size).to(ncc.dtype).expand_as(ncc)
    return (ncc * valid).sum(dim=(1, 2, 3)) / valid.sum(dim=(1, 2, 3)).clamp(min=1.0)


def smooth_background(image: torch.Tensor, weight: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Normalised-convolution Gaussian blur of ``image`` over ``weight`` (the open field)."""
    radius = max(1, int(3 * sigma_px))
    x = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-0.5 * (x / sigma_px) ** 2)
    kernel = kernel / kernel.sum()

    def blur(values: torch.Tensor) -> torch.Tensor:
        values = F.conv2d(
            F.pad(values, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1)
        )
        return F.conv2d(
            F.pad(values, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1)
        )

    return blur(image * weight) / blur(weight).clamp(min=1e-3)


def masked_similarity(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    method: str = "robust",
    beta: float = 0.5,
    patch_ncc: int = 9,
    patch_grad: int = 11,
) -> torch.Tensor:
    """Similarity of (B, 1, H, W) images counted inside ``mask`` (1 inside, 0 outside): (B,).

    ``mncc_gncc`` is β·mNCC + (1 − β)·gradient-NCC (XVR.md), every term restricted to the
    mask: global moments are weighted by it, and only patches wholly inside it count. With
    ``robust`` each image first loses its smooth background (a Gaussian of 1/8 of the image,
    normalised over the mask), which the X-ray has and the DRR lacks. Both are invariant to a
    positive affine change of either image's intensities.
    """
    if method not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, not {method!r}")
    if fixed.shape != moving.shape:
        raise ValueError(f"images differ in shape: {tuple(fixed.shape)} vs {tuple(moving.shape)}")
    if mask is None:
        mask = torch.ones_like(fixed[:1])
    mask = mask.to(fixed.dtype).expand(fixed.shape[0], 1, *fixed.shape[-2:])
    if method == "robust":
        sigma = max(1.0, min(fixed.shape[-2:]) / 8.0)
        fixed = fixed - smooth_background(fixed, mask, sigma)
        moving = moving - smooth_background(moving, mask, sigma)
    fixed = _masked_standardize(fixed, mask)
    moving = _masked_standardize(moving, mask)
    score = beta * (
        0.5 * _masked_global_ncc(fixed, moving, mask)
        + 0.5 * _masked_windowed_ncc(fixed, moving, mask, patch_ncc)
    )
    if beta < 1.0:
        # A Sobel gradient is valid where its 3x3 neighbourhood is inside the field.
        gradient_mask = inside(mask, 3).to(fixed.dtype)
        score = score + (1.0 - beta) * _masked_windowed_ncc(
            sobel(fixed), sobel(moving), gradient_mask, patch_grad
        )
    return score


def geodesic_distance(
    pred: RigidTransform, true: RigidTransform, sdd_mm: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """diffdrr's double geodesic: (rotation · SDD/2, translation, combined), each (B,) in mm."""
    return DoubleGeodesicSE3(sdd_mm)(pred, true)


def geodesic_loss(pred: RigidTransform, true: RigidTransform, sdd_mm: float) -> torch.Tensor:
    """The combined double-geodesic SE(3) distance (mm) between two batches of poses: (B,)."""
    return geodesic_distance(pred, true, sdd_mm)[2]
