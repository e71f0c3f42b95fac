"""X-ray frames as registration needs them: image-plane pixels, intrinsics, C-arm reading."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from xvr_node.geometry import CarmPose, Intrinsics
from xvr_node.xray_geometry import XrayGeometry, read_xray_geometry
from xvr_node.xvr.field import FieldOfView, field_of_view


@dataclass
class XrayFrame:
    """One frame on the image-plane grid (mirroring and Field of View flips already undone).

    ``mask`` is the open field (collimators, shutters, and what the image shows; see
    :mod:`xvr_node.xvr.field`) on that grid: similarity counts only the pixels inside it.
    ``field`` is its bounding box as (top, bottom, left, right), bottom/right exclusive.
    """

    pixels: np.ndarray
    intrinsics: Intrinsics
    sop_instance_uid: str
    frame_number: int | None
    carm: CarmPose | None
    field: tuple[int, int, int, int]
    log_stored: bool = False
    source: str = ""
    mask: np.ndarray | None = None
    field_sources: tuple[str, ...] = ()

    def open_field(self) -> np.ndarray:
        """The mask, or the ``field`` rectangle when no mask was given."""
        if self.mask is not None:
            return self.mask
        top, bottom, left, right = self.field
        mask = np.zeros(self.pixels.shape, dtype=bool)
        mask[top:bottom, left:right] = True
        return mask

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
    detect_field: bool = True,
) -> list[XrayFrame]:
    """Read an XA/RF/DX file into frames; ``reduce`` is frames|first|max|mean for cine runs.

    ``sid_mm`` and ``pixel_spacing_mm`` fill what the header lacks (as a C-arm profile would);
    failing those, the pixel spacing is estimated from the stated field size, as the node does.
    ``detect_field`` adds the open field the image shows to what its attributes say.
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
    # Shutters are the same for every frame of a run: one detection keeps a long run cheap.
    view = field_of_view(ds, pixels[0], detect=detect_field)
    pixels = to_image_plane(pixels, geometry)
    mask = np.ascontiguousarray(to_image_plane(view.mask, geometry))
    field = FieldOfView(mask, view.sources).bounds()
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
                mask=mask,
                field_sources=tuple(view.sources),
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


def line_integrals(frame: XrayFrame) -> np.ndarray:
    """Convert stored intensities to attenuation line integrals (what a DRR renders).

    Linear detector output (``LIN``) is log-converted: ``−log(I / I0)`` with ``I0`` the
    brightest value in the field; ``LOG`` data is already proportional to attenuation
    (up to sign and offset, which the normalised similarity ignores).
    """
    inside = frame.pixels[frame.open_field()]
    if frame.log_stored:
        return frame.pixels.max() - frame.pixels
    reference = float(np.percentile(inside, 99.9)) + 1.0
    return -np.log(np.clip(frame.pixels + 1.0, 1.0, None) / reference)
