"""Differentiable DRRs of a CT for exported matrices (nanodrr's ray marcher, node geometry).

A view is its exported matrix ``M`` (image-plane mm → CT LPS, see :mod:`xvr_node.geometry`):
rays run from the X-ray source to each pixel centre of the image plane, ``M`` carries them
into LPS, and the CT sits in LPS by its own affine. No renderer-specific world, centring or
re-orientation enters the picture, so a downsampled CT or a cropped detector needs no
correcting shift. The marching itself is ``nanodrr.drr.render``: each ray is clipped to the
volume's box and sampled at equal steps with trilinear interpolation (a fused kernel on GPUs
that have one, ``grid_sample`` elsewhere).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from nanodrr.data import Subject
from nanodrr.drr import render as march

from xvr_node.ct_volume import CtVolume
from xvr_node.geometry import Intrinsics

#: Linear attenuation of water at a typical fluoroscopy effective energy (~60 keV), per mm.
MU_WATER_PER_MM = 0.0206

#: HU above which voxels count as bone for the bone-contrast factor.
BONE_THRESHOLD_HU = 350.0

#: Distance between samples along a ray, in the volume's smallest voxel side. Two keep line
#: integrals within about 0.5 % of a finely sampled reference at every level
#: (``bench/renderers.py``), and registration succeeds as often as at 1.5 in 85 % of the time
#: (``bench/robustness.py``); the trilinear interpolation already smooths within a voxel.
STEP_VOXELS = 2.0

#: Samples per no-gradient render call, to bound the memory of large batches.
NO_GRAD_SAMPLES = 64_000_000

#: Fewest rays worth a part of their own when a view is split over CPU threads.
MIN_RAYS_PER_PART = 256

#: A crop of the detector grid: first row, row after the last, first column, column after.
Box = tuple[int, int, int, int]


def hu_to_density(hu: torch.Tensor | np.ndarray, bone_contrast: float = 1.0) -> torch.Tensor:
    """Attenuation relative to water (air 0, water 1), with bone scaled by ``bone_contrast``.

    Linear in HU and continuous at the bone threshold, so a bone-contrast factor of 1 is
    physical and larger factors only steepen the bone part. It is not normalised by the
    volume's maximum, so a dense bead does not dim the rest of the anatomy.
    """
    hu = torch.as_tensor(hu, dtype=torch.float32)
    density = torch.clamp(1.0 + hu / 1000.0, min=0.0)
    bone = torch.clamp(hu - BONE_THRESHOLD_HU, min=0.0) / 1000.0
    return density + (bone_contrast - 1.0) * bone


class Projector:
    """Line integrals (density·mm) of one CT on one detector grid, differentiable in the view.

    ``shape`` resamples the detector: pixel centres of a ``rows × columns`` grid over the same
    area (what area-averaging the X-ray to that size gives), still in the full detector's
    image plane, so the same matrices serve every level of a pyramid.
    """

    def __init__(
        self,
        volume: CtVolume,
        intrinsics: Intrinsics,
        shape: tuple[int, int] | None = None,
        *,
        bone_contrast: float = 1.0,
        labels: list[int] | None = None,
        device: str | torch.device = "cpu",
        step_voxels: float = STEP_VOXELS,
    ) -> None:
        self.device = torch.device(device)
        self.rows, self.columns = shape or (intrinsics.rows, intrinsics.columns)
        keep = None
        if labels is not None:
            if volume.labels is None:
                raise ValueError("labels were asked for but the CT has no label map")
            keep = torch.as_tensor(np.isin(volume.labels, labels), dtype=torch.float32)
        # nanodrr's layout is (1, 1, D, H, W) with W the first voxel index.
        hu = torch.as_tensor(volume.hu, dtype=torch.float32)
        self._hu = (hu if keep is None else torch.where(keep > 0, hu, -1000.0)).permute(2, 1, 0)
        self._hu = self._hu[None, None].contiguous().to(self.device)
        self._image = self.density(bone_contrast)
        affine = torch.as_tensor(volume.affine_lps, dtype=torch.float64)
        self.subject = Subject(
            self._image,
            torch.zeros(1, 1, 1, 1, 1),  # no label channels: one line integral per pixel
            affine.float(),
            affine.inverse().float(),
            Subject._make_voxel_to_grid(self._image.shape),
            torch.as_tensor(volume.center_lps, dtype=torch.float32),
            max_label=0,
            convert_to_mu=False,
        ).to(self.device)
        # Pixel centres of the resampled grid, in full-detector pixels, then image-plane mm.
        u = (np.arange(self.columns) + 0.5) * intrinsics.columns / self.columns - 0.5
        v = (np.arange(self.rows) + 0.5) * intrinsics.rows / self.rows - 0.5
        uu, vv = np.meshgrid(u * intrinsics.column_spacing_mm, v * intrinsics.row_spacing_mm)
        pixels = np.stack([uu, vv, np.zeros_like(uu)], axis=-1)
        self._pixels = torch.as_tensor(pixels, dtype=torch.float32, device=self.device)
        self._source = torch.as_tensor(
            intrinsics.source_in_image_plane, dtype=torch.float32, device=self.device
        )[None, None]
        diagonal = float(np.linalg.norm(np.array(volume.hu.shape) * volume.spacing_mm))
        self.samples = max(2, math.ceil(diagonal / (step_voxels * float(volume.spacing_mm.min()))))

    def density(self, bone_contrast: float) -> torch.Tensor:
        """The CT's density with another bone contrast, for :meth:`__call__`'s ``density``."""
        return hu_to_density(self._hu, bone_contrast)

    def __call__(
        self,
        matrices: torch.Tensor,
        box: Box | None = None,
        density: torch.Tensor | None = None,
        rays: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Line integrals (B, 1, h, w) for matrices (B, 4, 4), over ``box`` or the whole grid.

        ``density`` (from :meth:`density`) replaces the CT's for this call only. ``rays``, flat
        indices into the box's pixels, marches those rays only and leaves the others 0: a
        similarity that reads the open field only need not pay for its corners.
        """
        self.subject._image_hu = self._image if density is None else density
        top, bottom, left, right = box or (0, self.rows, 0, self.columns)
        matrices = matrices.to(device=self.device, dtype=torch.float32)
        batch = matrices.shape[0]
        height, width = bottom - top, right - left
        targets = self._pixels[top:bottom, left:right].reshape(1, -1, 3)
        if rays is not None:
            rays = rays.to(self.device)
            targets = targets[:, rays]
        targets = targets.expand(batch, -1, -1)
        count = targets.shape[1]
        # On CPU, torch samples a volume in parallel over the batch only: a view alone is
        # split into one part per thread so that every core marches rays.
        parts = 1
        if self.device.type == "cpu":
            parts = max(1, min(torch.get_num_threads() // batch, count // MIN_RAYS_PER_PART))
        per_part = -(-count // parts)
        padding = per_part * parts - count
        if padding:
            targets = torch.cat([targets, targets[:, -1:].expand(-1, padding, -1)], dim=1)
        image = march(
            self.subject,
            None,
            matrices.repeat_interleave(parts, dim=0),
            None,
            1,
            per_part,
            n_samples=self.samples,
            src=self._source.expand(batch * parts, -1, -1),
            tgt=targets.reshape(batch * parts, per_part, 3),
        )
        image = image.reshape(batch, 1, -1)[..., :count]
        if rays is not None:
            image = image.new_zeros(batch, 1, height * width).index_copy(2, rays, image)
        return image.reshape(batch, 1, height, width)

    def render_numpy(self, matrices: np.ndarray) -> torch.Tensor:
        """Line integrals (N, 1, H, W) for exported matrices, without gradient, in chunks."""
        stack = torch.as_tensor(np.asarray(matrices, dtype=float).reshape(-1, 4, 4))
        chunk = max(1, NO_GRAD_SAMPLES // (self.rows * self.columns * self.samples))
        with torch.no_grad():
            return torch.cat([self(stack[i : i + chunk]) for i in range(0, len(stack), chunk)])
