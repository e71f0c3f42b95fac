"""X-ray-like augmentations of training DRRs, and the input normalisation the network expects."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def normalize_image(image: torch.Tensor) -> torch.Tensor:
    """Network input: zero mean and unit standard deviation per image (B, C, H, W).

    Training and prediction both go through this, so a DRR's line integrals and a
    log-converted X-ray's grey values end up on the same scale.
    """
    mean = image.mean(dim=(-1, -2, -3), keepdim=True)
    std = image.std(dim=(-1, -2, -3), keepdim=True, correction=0)
    return (image - mean) / (std + 1e-6)


def rescale_min_max(image: torch.Tensor) -> torch.Tensor:
    """Per image to [0, 1], the range the augmentations below are written for."""
    low = image.amin(dim=(-1, -2, -3), keepdim=True)
    high = image.amax(dim=(-1, -2, -3), keepdim=True)
    return (image - low) / (high - low).clamp(min=1e-6)


def _uniform(
    low: float, high: float, count: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    return low + (high - low) * torch.rand(count, generator=generator).to(device)


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def _gaussian_kernels(sigmas: torch.Tensor, size: int) -> torch.Tensor:
    """One normalised 2D Gaussian per sigma: (B, 1, size, size)."""
    offsets = torch.arange(size, device=sigmas.device, dtype=sigmas.dtype) - (size - 1) / 2
    one_d = torch.exp(-0.5 * (offsets[None] / sigmas[:, None]) ** 2)
    one_d = one_d / one_d.sum(dim=1, keepdim=True)
    return (one_d[:, :, None] * one_d[:, None, :]).unsqueeze(1)


def blur(image: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Gaussian blur with a different sigma (pixels) per image; the size is kept."""
    batch, channels, height, width = image.shape
    size = 2 * math.ceil(3 * float(sigmas.max())) + 1
    kernels = _gaussian_kernels(sigmas, size).repeat_interleave(channels, dim=0)
    padded = F.pad(image, [size // 2] * 4, mode="replicate")
    grouped = padded.reshape(1, batch * channels, *padded.shape[-2:])
    return F.conv2d(grouped, kernels, groups=batch * channels).view(batch, channels, height, width)


class XrayAugmentation:
    """Random degradations that make a clean DRR look like a clinical X-ray.

    Each transform is applied to each image independently with probability ``p``. Images
    are first rescaled to [0, 1] (min-max) and finally normalised by :func:`normalize_image`.
    All randomness comes from the ``generator`` passed in, so a restarted run draws exactly
    the same augmentations.
    """

    def __init__(self, p: float = 1 / 3, max_collimation: float = 0.15) -> None:
        self.p = p
        self.max_collimation = max_collimation

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = rescale_min_max(image)
        for transform in (
            self.window,
            self.gamma,
            self.blur,
            self.sharpen,
            self.noise,
            self.erase,
            self.collimate,
        ):
            chosen = torch.rand(len(x), generator=generator).to(x.device) < self.p
            # Parameters are drawn for every image either way, so the stream of random
            # numbers does not depend on which images were chosen.
            changed = transform(x, generator)
            x = torch.where(_per_image(chosen), changed, x)
        return normalize_image(x)

    def window(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Contrast: a narrower display window with saturation, as on a monitor."""
        low = _per_image(_uniform(0.0, 0.25, len(x), generator, x.device))
        high = _per_image(_uniform(0.75, 1.0, len(x), generator, x.device))
        return ((x - low) / (high - low)).clamp(0.0, 1.0)

    def gamma(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        exponent = _per_image(_uniform(0.7, 1.8, len(x), generator, x.device))
        return x.clamp(min=0.0) ** exponent

    def blur(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return blur(x, _uniform(0.5, 1.5, len(x), generator, x.device))

    def sharpen(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Unsharp masking, as detector post-processing does."""
        amount = _per_image(_uniform(0.5, 2.0, len(x), generator, x.device))
        smooth = blur(x, torch.ones(len(x), device=x.device))
        return (x + amount * (x - smooth)).clamp(0.0, 1.0)

    def noise(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        std = _per_image(_uniform(0.005, 0.03, len(x), generator, x.device))
        return x + std * torch.randn(x.shape, generator=generator).to(x.device)

    def erase(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Blank one rectangle (2–20 % of the image) per image: tools, labels, occlusions."""
        batch, _, height, width = x.shape
        area = _uniform(0.02, 0.2, batch, generator, x.device) * height * width
        aspect = torch.exp(_uniform(math.log(0.3), math.log(3.3), batch, generator, x.device))
        box_h = (area * aspect).sqrt().clamp(1, height)
        box_w = (area / aspect).sqrt().clamp(1, width)
        top = _uniform(0.0, 1.0, batch, generator, x.device) * (height - box_h)
        left = _uniform(0.0, 1.0, batch, generator, x.device) * (width - box_w)
        fill = _uniform(0.0, 1.0, batch, generator, x.device)
        rows = torch.arange(height, device=x.device).view(1, height, 1)
        cols = torch.arange(width, device=x.device).view(1, 1, width)
        inside = (
            (rows >= top.view(-1, 1, 1))
            & (rows < (top + box_h).view(-1, 1, 1))
            & (cols >= left.view(-1, 1, 1))
            & (cols < (left + box_w).view(-1, 1, 1))
        ).unsqueeze(1)
        return torch.where(inside, _per_image(fill), x)

    def collimate(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Shutters: each side loses up to ``max_collimation`` of the image, black or white."""
        batch, _, height, width = x.shape
        sides = _uniform(0.0, self.max_collimation, 4 * batch, generator, x.device).view(batch, 4)
        white = _uniform(0.0, 1.0, batch, generator, x.device) < 0.5
        rows = torch.arange(height, device=x.device).view(1, height, 1)
        cols = torch.arange(width, device=x.device).view(1, 1, width)
        top, bottom = sides[:, 0] * height, height - sides[:, 1] * height
        left, right = sides[:, 2] * width, width - sides[:, 3] * width
        inside = (
            (rows >= top.view(-1, 1, 1))
            & (rows < bottom.view(-1, 1, 1))
            & (cols >= left.view(-1, 1, 1))
            & (cols < right.view(-1, 1, 1))
        ).unsqueeze(1)
        return torch.where(inside, x, _per_image(white.to(x.dtype)))
