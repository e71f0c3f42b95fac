"""Pictures of a registration: DRR edges over the X-ray (PNG) and the optimisation (GIF)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from xvr_node.ct_volume import CtVolume
from xvr_node.geometry import Intrinsics
from xvr_node.xvr.register import downsample_volume
from xvr_node.xvr.renderer import Projector
from xvr_node.xvr.xray import XrayFrame, line_integrals, read_xray_frames

#: DRRs for pictures are rendered on at most this many pixels per side, then upsampled:
#: edges for the eye need no more, and a 1024² Siddon render per GIF frame would crawl.
RENDER_SIDE = 256

#: GIF frames are shrunk to at most this many pixels per side.
GIF_SIDE = 512

#: Share of the DRR's pixels drawn as edges (the strongest gradients).
EDGE_FRACTION = 0.12

EDGE_COLOUR = (255, 72, 0)

#: Poses rendered per renderer call (bounds memory on large detectors).
_CHUNK = 16


def _detector(intrinsics: Intrinsics, max_side: int) -> Intrinsics:
    """The same field of view on at most ``max_side`` pixels per side."""
    factor = max(1.0, max(intrinsics.rows, intrinsics.columns) / max_side)
    return intrinsics.resampled(
        max(1, round(intrinsics.rows / factor)), max(1, round(intrinsics.columns / factor))
    )


def render_views(
    intrinsics: Intrinsics,
    volume: CtVolume,
    matrices: Sequence[np.ndarray],
    max_side: int = RENDER_SIDE,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """DRRs (N, rows, columns) at exported matrices, on the X-ray's pixel grid.

    Rendered on a coarser detector and a CT block-averaged to about that pixel's footprint
    (the exported matrices are in CT LPS, so any resampling of the CT renders the same view).
    """
    detector = _detector(intrinsics, max_side)
    # A pixel's footprint at a typical isocentre magnification (~1.4 on C-arms).
    pixel_mm = max(detector.row_spacing_mm, detector.column_spacing_mm) / 1.4
    factors = tuple(int(max(1, math.floor(pixel_mm / s))) for s in volume.spacing_mm)
    coarse = downsample_volume(volume, factors)
    projector = Projector(coarse, intrinsics, (detector.rows, detector.columns), device=device)
    rendered = projector.render_numpy(np.asarray(matrices, dtype=float)).float().cpu()
    if (detector.rows, detector.columns) != (intrinsics.rows, intrinsics.columns):
        rendered = F.interpolate(
            rendered, size=(intrinsics.rows, intrinsics.columns), mode="bilinear"
        )
    return rendered[:, 0].numpy()


def edges(image: np.ndarray, fraction: float = EDGE_FRACTION) -> np.ndarray:
    """The strongest-gradient ``fraction`` of pixels: bone and skin outlines of a DRR."""
    rows, columns = np.gradient(np.asarray(image, dtype=float))
    magnitude = np.hypot(rows, columns)
    if not np.any(magnitude > 0):
        return np.zeros(magnitude.shape, dtype=bool)
    threshold = np.quantile(magnitude, 1.0 - fraction)
    return (magnitude >= threshold) & (magnitude > 0)


#: HU ranges that outline what a reader recognises: cortical and trabecular bone, aerated lung.
BONE_HU = 250.0
LUNG_HU = (-950.0, -400.0)


def _outline(image: np.ndarray, fraction: float) -> np.ndarray:
    """One-pixel boundary of where ``image`` exceeds ``fraction`` of its 99th percentile."""
    from scipy import ndimage

    top = float(np.percentile(image, 99.0))
    if top <= 0:
        return np.zeros(image.shape, dtype=bool)
    # Smooth first: a reader wants the shape of a structure, not every voxel step of it.
    smooth = ndimage.gaussian_filter(np.asarray(image, dtype=float), max(image.shape) / 200.0)
    region = ndimage.binary_opening(smooth > fraction * top, iterations=2)
    return region & ~ndimage.binary_erosion(region, border_value=0)


def anatomy_contours(
    intrinsics: Intrinsics,
    volume: CtVolume,
    matrix: np.ndarray,
    device: str | torch.device = "cpu",
) -> dict[str, np.ndarray]:
    """Thin bone and lung outlines of the CT projected at ``matrix``, on the X-ray's grid.

    Each structure is rendered alone (the CT thresholded to its HU range, everything else
    air), and its projection is outlined at a fixed share of its brightest: a few closed
    lines a reader checks against the X-ray, instead of every gradient of a full DRR.
    """
    hu = volume.hu
    bone = CtVolume(np.where(hu > BONE_HU, hu, -1000.0).astype(np.float32), volume.affine_lps)
    lung_voxels = (hu > LUNG_HU[0]) & (hu < LUNG_HU[1])
    lung = CtVolume(np.where(lung_voxels, 0.0, -1000.0).astype(np.float32), volume.affine_lps)
    contours = {}
    for name, structure, fraction in (("bone", bone, 0.3), ("lung", lung, 0.3)):
        (drr,) = render_views(intrinsics, structure, [matrix], device=device)
        contours[name] = _outline(drr, fraction)
    return contours


def windowed(frame: XrayFrame) -> np.ndarray:
    """The X-ray as 8-bit grey: line integrals windowed on the field's 1st–99th percentiles."""
    values = line_integrals(frame)
    top, bottom, left, right = frame.field
    low, high = np.percentile(values[top:bottom, left:right], [1.0, 99.0])
    scaled = (values - low) / max(float(high - low), 1e-6)
    return (np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def compose(
    grey: np.ndarray, outline: np.ndarray, colour: tuple[int, int, int] = EDGE_COLOUR
) -> np.ndarray:
    """RGB (rows, columns, 3): the grey X-ray with the outline painted in ``colour``."""
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    rgb[outline] = colour
    return rgb


def overlay_png(
    frame: XrayFrame,
    volume: CtVolume,
    matrix: np.ndarray,
    path: Path,
    colour: tuple[int, int, int] = EDGE_COLOUR,
) -> Path:
    """Write a PNG of the DRR's edges at ``matrix`` over the X-ray: misregistration at a glance."""
    (drr,) = render_views(frame.intrinsics, volume, [matrix])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(compose(windowed(frame), edges(drr), colour)).save(path)
    return path


def animate(
    frame: XrayFrame,
    volume: CtVolume,
    poses: Sequence[np.ndarray],
    path: Path,
    every: int = 5,
    duration_ms: int = 80,
    colour: tuple[int, int, int] = EDGE_COLOUR,
) -> Path:
    """Write a GIF of the optimisation: DRR edges over the X-ray at every ``every``-th pose.

    The last pose is always shown, and held longer, so the animation ends on the result.
    """
    if not len(poses):
        raise ValueError("no poses to animate: register with keep_poses=True")
    if every < 1:
        raise ValueError(f"every must be at least 1, got {every}")
    chosen = list(range(0, len(poses), every))
    if chosen[-1] != len(poses) - 1:
        chosen.append(len(poses) - 1)
    drrs = render_views(frame.intrinsics, volume, [poses[i] for i in chosen])
    grey = windowed(frame)
    scale = min(1.0, GIF_SIDE / max(grey.shape))
    size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
    pictures = []
    for index, drr in zip(chosen, drrs, strict=True):
        picture = Image.fromarray(compose(grey, edges(drr), colour))
        if size != picture.size:
            picture = picture.resize(size, Image.Resampling.BILINEAR)
        ImageDraw.Draw(picture).text((2, 1), f"{index + 1}/{len(poses)}", fill=(255, 255, 0))
        pictures.append(picture)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    durations = [duration_ms] * (len(pictures) - 1) + [max(duration_ms, 1500)]
    pictures[0].save(
        path,
        save_all=True,
        append_images=pictures[1:],
        duration=durations,
        loop=0,
        disposal=1,
    )
    return path


# --- from result files -------------------------------------------------------------------


def frame_of_result(result: dict) -> XrayFrame:
    """The X-ray frame a result JSON (:func:`xvr_node.xvr.run.result_json`) was registered on."""
    frames = read_xray_frames(result["file"])
    for frame in frames:
        if frame.frame_number == result.get("frame_number"):
            return frame
    raise ValueError(f"{result['file']} has no frame {result.get('frame_number')}")


def write_overlays(volume: CtVolume, results: Sequence[Path]) -> list[Path]:
    """An overlay PNG at each result's final matrix, next to the result (same stem)."""
    written = []
    for result_path in results:
        result = json.loads(Path(result_path).read_text())
        frame = frame_of_result(result)
        written.append(
            overlay_png(
                frame,
                volume,
                np.array(result["final_matrix"]),
                Path(result_path).with_suffix(".png"),
            )
        )
    return written
