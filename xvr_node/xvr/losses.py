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


def sobel(image: torch.Tensor, kernel: torch.Tensor = _SOBEL) -> torch.Tensor:
    """x and y Sobel gradients (B, 2, H−2, W−2), without padding so borders add no edges.

    A caller that calls it often passes ``kernel`` already on the image's device and dtype,
    which saves a copy per call."""
    return F.conv2d(image, kernel.to(image), padding=0)


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

#: Similarity methods :class:`MaskedTarget` knows. ``mncc_gncc`` is XVR.md's reference;
#: ``robust`` first removes each image's smooth background (scatter, table, heel effect,
#: vignetting, a vendor's LUT curvature over the field), then scores the same three terms.
SIMILARITIES = ("robust", "mncc_gncc")


def inside(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Windows of ``size``² pixels that lie wholly inside ``mask`` (B, 1, H−size+1, W−size+1)."""
    return F.avg_pool2d(mask, size, stride=1) > 0.999


def _masked_standardize(
    image: torch.Tensor, weight: torch.Tensor, total: torch.Tensor
) -> torch.Tensor:
    """Zero mean and unit variance over ``weight`` (whose per-image sums are ``total``), 0
    outside it."""
    total = total[:, None, None, None]
    mean = (image * weight).sum(dim=(-1, -2, -3), keepdim=True) / total
    var = ((image - mean).square() * weight).sum(dim=(-1, -2, -3), keepdim=True) / total
    # The tiny floor keeps the gradient finite when the mask leaves nothing (var = 0).
    return (image - mean) / ((var + 1e-12).sqrt() + 1e-8 * (1.0 + mean.abs())) * weight


def _centred(image: torch.Tensor, weight: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``image`` less its mean over ``weight``, and 0 outside it."""
    mean = (image * weight).sum(dim=(-1, -2, -3)) / total
    return (image - mean[:, None, None, None]) * weight


class _Windows:
    """The fixed image's statistics over every ``size``² window wholly inside a mask, so a
    moving image's windowed NCC needs only its own half (see :func:`local_ncc`)."""

    def __init__(self, fixed: torch.Tensor, mask: torch.Tensor, patch_size: int) -> None:
        self.size = min(patch_size, fixed.shape[-1], fixed.shape[-2])
        self.mean = F.avg_pool2d(fixed, self.size, stride=1)
        self.var = (F.avg_pool2d(fixed * fixed, self.size, stride=1) - self.mean * self.mean).clamp(
            min=0.0
        )
        self.fixed = fixed
        valid = inside(mask, self.size).to(fixed.dtype)
        self.valid = valid.expand(-1, fixed.shape[1], -1, -1)
        self.count = self.valid.sum(dim=(1, 2, 3)).clamp(min=1.0)

    def ncc(self, moving: torch.Tensor) -> torch.Tensor:
        """Mean NCC with ``moving`` over the valid windows (channels averaged): (B,)."""
        size = self.size
        mean = F.avg_pool2d(moving, size, stride=1)
        var = (F.avg_pool2d(moving * moving, size, stride=1) - mean * mean).clamp(min=0.0)
        cov = F.avg_pool2d(self.fixed * moving, size, stride=1) - self.mean * mean
        ncc = cov / torch.sqrt((self.var + EPS) * (var + EPS))
        return (ncc * self.valid).sum(dim=(1, 2, 3)) / self.count


class MaskedTarget:
    """An X-ray (the fixed image) and its mask (1 inside, 0 outside), ready to be compared
    with many DRRs: :meth:`score` gives their similarity counted inside the mask.

    ``mncc_gncc`` is β·mNCC + (1 − β)·gradient-NCC (XVR.md), every term restricted to the
    mask: global moments are weighted by it, and only patches wholly inside it count. With
    ``robust`` each image first loses its smooth background (a Gaussian of 1/8 of the image,
    normalised over the mask), which the X-ray has and the DRR lacks. Both are invariant to a
    positive affine change of either image's intensities.

    A refinement compares every new DRR with the same X-ray over the same mask, so the
    X-ray's half (its background, standardisation, Sobel gradients, window statistics, the
    valid windows) is computed once here and each :meth:`score` computes the DRR's half
    alone: less work, and fewer small operations (on a GPU, each one is a kernel launch).
    """

    def __init__(
        self,
        fixed: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        method: str = "robust",
        beta: float = 0.5,
        patch_ncc: int = 9,
        patch_grad: int = 11,
    ) -> None:
        if method not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, not {method!r}")
        if fixed.dim() != 4 or fixed.shape[1] != 1:
            raise ValueError(f"expected (B, 1, H, W) images, got {tuple(fixed.shape)}")
        if mask is None:
            mask = torch.ones_like(fixed[:1])
        batch = max(fixed.shape[0], mask.shape[0])
        self.shape = (batch, 1, *fixed.shape[-2:])
        self.mask = mask.to(fixed.dtype).expand(self.shape)
        fixed = fixed.expand(self.shape)
        self.method, self.beta = method, beta
        self.total = self.mask.sum(dim=(-1, -2, -3)).clamp(min=1.0)
        if method == "robust":
            # The smooth background: a Gaussian of 1/8 of the image, normalised over the mask.
            self.kernel = _gaussian(max(1.0, min(fixed.shape[-2:]) / 8.0), fixed)
            self.smooth_mask = _blur(self.mask, self.kernel).clamp(min=1e-3)
            fixed = fixed - _blur(fixed * self.mask, self.kernel) / self.smooth_mask
        fixed = _masked_standardize(fixed, self.mask, self.total)
        self.centred = _centred(fixed, self.mask, self.total)
        self.variance = self.centred.square().sum(dim=(-1, -2, -3)) / self.total
        self.windows = _Windows(fixed, self.mask, patch_ncc)
        if beta < 1.0:
            # A Sobel gradient is valid where its 3x3 neighbourhood is inside the field.
            gradient_mask = inside(self.mask, 3).to(fixed.dtype)
            self.sobel = _SOBEL.to(fixed)
            self.gradients = _Windows(sobel(fixed, self.sobel), gradient_mask, patch_grad)

    def score(self, moving: torch.Tensor) -> torch.Tensor:
        """Similarity of each moving image (B, 1, H, W) to the X-ray: (B,), higher is better."""
        if moving.shape[-3:] != self.shape[-3:] or self.shape[0] not in (1, moving.shape[0]):
            raise ValueError(
                f"images differ in shape: {self.shape} (fixed) vs {tuple(moving.shape)}"
            )
        mask = self.mask
        if self.method == "robust":
            moving = moving - _blur(moving * mask, self.kernel) / self.smooth_mask
        moving = _masked_standardize(moving, mask, self.total)
        centred = _centred(moving, mask, self.total)
        cov = (self.centred * centred).sum(dim=(-1, -2, -3)) / self.total
        variance = centred.square().sum(dim=(-1, -2, -3)) / self.total
        global_ncc = cov / torch.sqrt((self.variance + EPS) * (variance + EPS))
        score = self.beta * (0.5 * global_ncc + 0.5 * self.windows.ncc(moving))
        if self.beta < 1.0:
            score = score + (1.0 - self.beta) * self.gradients.ncc(sobel(moving, self.sobel))
        return score


def _gaussian(sigma_px: float, like: torch.Tensor) -> torch.Tensor:
    """A normalised 1-D Gaussian kernel reaching 3σ (at least one pixel) each side."""
    radius = max(1, int(3 * sigma_px))
    x = torch.arange(-radius, radius + 1, dtype=like.dtype, device=like.device)
    kernel = torch.exp(-0.5 * (x / sigma_px) ** 2)
    return kernel / kernel.sum()


def _blur(values: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """A separable blur by ``kernel`` along rows then columns, borders replicated."""
    radius = (kernel.numel() - 1) // 2
    values = F.conv2d(
        F.pad(values, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1)
    )
    return F.conv2d(
        F.pad(values, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1)
    )


def geodesic_distance(
    pred: RigidTransform, true: RigidTransform, sdd_mm: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """diffdrr's double geodesic: (rotation · SDD/2, translation, combined), each (B,) in mm."""
    return DoubleGeodesicSE3(sdd_mm)(pred, true)


def geodesic_loss(pred: RigidTransform, true: RigidTransform, sdd_mm: float) -> torch.Tensor:
    """The combined double-geodesic SE(3) distance (mm) between two batches of poses: (B,)."""
    return geodesic_distance(pred, true, sdd_mm)[2]
