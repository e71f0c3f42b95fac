"""X-ray frames as registration needs them: image-plane pixels, intrinsics, C-arm reading."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from xvr_node.geometry import CarmPose, Intrinsics
from xvr_node.xray_geometry import XrayGeometry, read_collimator, read_xray_geometry


@dataclass
class XrayFrame:
    """One frame on the image-plane grid (mirroring and Field of View flips already undone).

    ``field`` is the collimated field as (top, bottom, left, right) pixel bounds on that grid
    (bottom/right exclusive): similarity is computed inside it only.
    """

    pixels: np.ndarray
    intrinsics: Intrinsics
    sop_instance_uid: str
    frame_number: int | None
    carm: CarmPose | None
    field: tuple[int, int, int, int]
    log_stored: bool = False
    source: str = ""

    @property
    def name(self) -> str:
        frame = f"#{self.frame_number}" if self.frame_number else ""
        return f"{Path(self.source).name or self.sop_instance_uid}{frame}"


def read_xray_frames(
    path: str | Path,
    *,
    sid_mm: float | None = None,
    pixel_spacing_mm: tuple[float, float] | None = None,
    reduce: str = "frames",
) -> list[XrayFrame]:
    """Read an XA/RF/DX file into frames; ``reduce`` is frames|first|max|mean for cine runs.

    ``sid_mm`` and ``pixel_spacing_mm`` fill what the header lacks (as a C-arm profile would);
    failing those, the pixel spacing is estimated from the stated field size, as the node does.
    """
    ds = pydicom.dcmread(str(path))
    geometry = read_xray_geometry(ds)
    if not geometry.usable() and (sid_mm or pixel_spacing_mm):
        geometry = geometry.with_profile(sid_mm, pixel_spacing_mm, "config")
    geometry = geometry.with_field_size_estimate()
    intrinsics = geometry.intrinsics()  # raises, naming what is missing
    pixels = ds.pixel_array.astype(np.float32)
    if pixels.ndim == 2:
        pixels = pixels[None]
    elif pixels.ndim == 4:  # colour: use luminance
        pixels = pixels.mean(axis=-1)
    pixels = to_image_plane(pixels, geometry)
    field = _collimated_field(ds, geometry)
    log_stored = str(ds.get("PixelIntensityRelationship", "")).upper() == "LOG"
    frames = []
    indices: list[int | None]
    if reduce == "frames":
        stack, indices = pixels, list(range(len(pixels)))
    elif reduce in ("max", "mean"):
        stack = (
            pixels.max(axis=0, keepdims=True)
            if reduce == "max"
            else pixels.mean(axis=0, keepdims=True)
        )
        indices = [None]
    elif reduce == "first":
        stack, indices = pixels[:1], [0]
    else:
        raise ValueError(f"reduce must be frames, first, max or mean, not {reduce!r}")
    single = geometry.number_of_frames == 1
    for image, index in zip(stack, indices, strict=True):
        frame_geometry = geometry.frames[index or 0]
        carm = None
        if (
            frame_geometry.primary_deg is not None
            and frame_geometry.secondary_deg is not None
            and geometry.dsp_mm is not None
        ):
            carm = CarmPose(
                frame_geometry.primary_deg, frame_geometry.secondary_deg, geometry.dsp_mm
            )
        frames.append(
            XrayFrame(
                pixels=np.ascontiguousarray(image),
                intrinsics=intrinsics,
                sop_instance_uid=str(ds.SOPInstanceUID),
                frame_number=None if single or index is None else index + 1,
                carm=carm,
                field=field,
                log_stored=log_stored,
                source=str(path),
            )
        )
    return frames


def to_image_plane(pixels: np.ndarray, geometry: XrayGeometry) -> np.ndarray:
    """Stored frames (frames, rows, columns) onto the image-plane grid (a view, no copy)."""
    if geometry.mirrored:
        pixels = pixels[..., :, ::-1]
    if geometry.rows_reversed:
        pixels = pixels[..., ::-1, :]
    return pixels


def _collimated_field(ds: pydicom.Dataset, geometry: XrayGeometry) -> tuple[int, int, int, int]:
    """The rectangular collimator opening on the image-plane grid (whole image if unknown).

    Collimator edges are 1-based (PS3.3 C.8.7.3): :func:`read_collimator` converts them.
    """
    rows, columns = geometry.rows, geometry.columns
    collimator = read_collimator(ds)
    if collimator is None or collimator.rectangle is None:
        return 0, rows, 0, columns
    top, bottom, left, right = collimator.rectangle
    if geometry.mirrored:
        left, right = columns - right, columns - left
    if geometry.rows_reversed:
        top, bottom = rows - bottom, rows - top
    top, left = max(0, top), max(0, left)
    bottom, right = min(rows, bottom), min(columns, right)
    if bottom - top < 8 or right - left < 8:
        return 0, rows, 0, columns
    return top, bottom, left, right


def line_integrals(frame: XrayFrame) -> np.ndarray:
    """Convert stored intensities to attenuation line integrals (what a DRR renders).

    Linear detector output (``LIN``) is log-converted: ``−log(I / I0)`` with ``I0`` the
    brightest value in the field; ``LOG`` data is already proportional to attenuation
    (up to sign and offset, which the normalised similarity ignores).
    """
    top, bottom, left, right = frame.field
    inside = frame.pixels[top:bottom, left:right]
    if frame.log_stored:
        return frame.pixels.max() - frame.pixels
    reference = float(np.percentile(inside, 99.9)) + 1.0
    return -np.log(np.clip(frame.pixels + 1.0, 1.0, None) / reference)
