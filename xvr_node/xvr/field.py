"""Which pixels of an X-ray see the patient through the open field: the similarity's mask.

Sources, combined by intersection:

* the collimator attributes (Collimator Shape and edges, PS3.3 C.8.7.3 / C.8.19.6);
* the display shutters (Shutter Shape RECTANGULAR / CIRCULAR / POLYGONAL, PS3.3 C.7.6.11);
* the image itself: dark or bright, flat borders that touch the image edge (lead shutters
  and image-intensifier circles that no attribute describes).

DICOM edges and vertices are 1-based (row 1, column 1 is the top-left pixel); masks here are
0-based arrays on the *stored* pixel grid. The caller mirrors them with the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset
from scipy import ndimage

from xvr_node.xray_geometry import ShutterOutline, read_collimator, read_display_shutter

#: Smallest open field, as a fraction of the image, that a source may claim: below it the
#: source is taken for wrong (a vendor's zero edges) rather than for a pinhole field.
MIN_OPEN_FRACTION = 0.05

#: Gaussian smoothing (pixels) before a shutter's flat level is looked for, and how far that
#: smoothing moves a shutter edge into the field.
SMOOTHING_PX = 1.0
REACH_PX = 3

#: Margin dropped inside every field edge (penumbra, detector blur), as a fraction of the
#: image's shorter side, and at least 2 pixels.
EDGE_MARGIN = 0.01


@dataclass
class FieldOfView:
    """The open field as a boolean mask on the stored grid, and what said so."""

    mask: np.ndarray
    sources: list[str] = field(default_factory=list)

    @property
    def open_fraction(self) -> float:
        return float(self.mask.mean())

    def bounds(self) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) of the mask's bounding box, bottom/right exclusive."""
        rows = np.flatnonzero(self.mask.any(axis=1))
        columns = np.flatnonzero(self.mask.any(axis=0))
        if rows.size == 0:
            return 0, self.mask.shape[0], 0, self.mask.shape[1]
        return int(rows[0]), int(rows[-1]) + 1, int(columns[0]), int(columns[-1]) + 1

    def outline(self) -> np.ndarray:
        """The mask's one-pixel boundary, for drawing."""
        return self.mask & ~ndimage.binary_erosion(self.mask, border_value=0)


def edge_margin(rows: int, columns: int) -> int:
    """Pixels dropped inside every field edge of an image of this size."""
    return max(2, round(EDGE_MARGIN * min(rows, columns)))


def field_of_view(ds: Dataset, pixels: np.ndarray, detect: bool = True) -> FieldOfView:
    """The open field of one stored frame (``pixels``: rows × columns) from every source."""
    rows, columns = pixels.shape[-2:]
    mask = np.ones((rows, columns), dtype=bool)
    sources: list[str] = []
    for name, candidate in (
        ("collimator", outline_mask(read_collimator(ds), rows, columns)),
        ("shutter", outline_mask(read_display_shutter(ds), rows, columns)),
        ("image", detect_open_field(pixels) if detect else None),
    ):
        if candidate is None or candidate.mean() < MIN_OPEN_FRACTION:
            continue
        combined = mask & candidate
        if combined.mean() < MIN_OPEN_FRACTION:
            continue  # contradicts the sources before it: keep theirs
        mask, sources = combined, [*sources, name]
    if sources:
        mask = ndimage.binary_erosion(mask, iterations=edge_margin(rows, columns), border_value=1)
    return FieldOfView(mask, sources)


def outline_mask(outline: ShutterOutline | None, rows: int, columns: int) -> np.ndarray | None:
    """The open area of a stated shutter or collimator: the intersection of its shapes."""
    if outline is None:
        return None
    mask: np.ndarray | None = None

    def narrow(part: np.ndarray) -> None:
        nonlocal mask
        mask = part if mask is None else mask & part

    if outline.rectangle is not None:
        top, bottom, left, right = outline.rectangle
        top, left = max(top, 0), max(left, 0)
        bottom, right = min(bottom, rows), min(right, columns)
        if bottom - top >= 8 and right - left >= 8:
            rectangle = np.zeros((rows, columns), dtype=bool)
            rectangle[top:bottom, left:right] = True
            narrow(rectangle)
    if outline.circle is not None:
        row, column, radius = outline.circle
        yy, xx = np.mgrid[0:rows, 0:columns]
        narrow((yy - row) ** 2 + (xx - column) ** 2 <= radius**2)
    if outline.polygon is not None:
        canvas = Image.new("1", (columns, rows), 0)
        ImageDraw.Draw(canvas).polygon([(c, r) for r, c in outline.polygon], fill=1)
        narrow(np.asarray(canvas, dtype=bool))
    return mask


def detect_open_field(pixels: np.ndarray) -> np.ndarray | None:
    """The open field as the image shows it: shutter straight edges and an intensifier circle.

    A lead shutter, or the ring around an image-intensifier's circular field, stores an
    almost constant value at one end of the range. Whole rows and columns at that value along
    the border are shuttered (a rectangle); when the corners of what remains are at that
    value too, a circle is fitted to where each row and column leaves it. Fitting shapes,
    rather than taking every pixel near the shutter's value, keeps dark anatomy that touches
    the field's edge inside. ``None`` when the image shows no shutter.
    """
    image = np.asarray(pixels, dtype=np.float64)
    if image.ndim != 2 or min(image.shape) < 16:
        return None
    near = _near_shutter_level(image)
    if near is None:
        return None
    rows, columns = image.shape
    top, bottom = _run_of_lines(near.mean(axis=1))
    left, right = _run_of_lines(near.mean(axis=0))
    # Smoothing spreads the field into the shutter by a few pixels: take them back.
    top, left = top + (REACH_PX if top else 0), left + (REACH_PX if left else 0)
    bottom -= REACH_PX if bottom < rows else 0
    right -= REACH_PX if right < columns else 0
    if bottom - top < 8 or right - left < 8:
        return None
    mask = np.zeros(image.shape, dtype=bool)
    mask[top:bottom, left:right] = True
    inner = near[top:bottom, left:right]
    disc = _fit_circle(inner)
    if disc is not None:
        centre_row, centre_column, radius = disc
        radius -= REACH_PX
        yy, xx = np.mgrid[0:rows, 0:columns]
        mask &= (yy - top - centre_row) ** 2 + (xx - left - centre_column) ** 2 <= radius**2
    if mask.all():
        return None
    return mask


def _near_shutter_level(image: np.ndarray) -> np.ndarray | None:
    """Pixels at the border's flat extreme value (dark or bright), or ``None`` if none."""
    smooth = ndimage.gaussian_filter(image, SMOOTHING_PX)
    low, high = np.percentile(smooth, [0.5, 99.5])
    spread = high - low
    if spread <= 0:
        return None
    border = np.zeros(image.shape, dtype=bool)
    border[:2, :] = border[-2:, :] = border[:, :2] = border[:, -2:] = True
    best: np.ndarray | None = None
    for extreme in (low, high):
        at_border = border & (np.abs(smooth - extreme) < 0.06 * spread)
        if at_border.sum() < 0.2 * border.sum():
            continue
        values = smooth[at_border]
        level = float(np.median(values))
        # The shutter's own noise sets the tolerance: dark anatomy is darker than the field's
        # mean, but rarely as flat and as dark as lead.
        noise = 1.4826 * float(np.median(np.abs(values - level)))
        near = np.abs(smooth - level) < max(5.0 * noise, 0.015 * spread)
        if best is None or near[border].mean() > best[border].mean():
            best = near
    return best


def _run_of_lines(fraction_near: np.ndarray, full: float = 0.9) -> tuple[int, int]:
    """[first, last) of the lines between the shuttered runs at both ends."""
    open_lines = np.flatnonzero(fraction_near < full)
    if open_lines.size == 0:
        return 0, 0
    return int(open_lines[0]), int(open_lines[-1]) + 1


def _fit_circle(near: np.ndarray) -> tuple[float, float, float] | None:
    """(row, column, radius) of a circular field inside ``near``'s box, if its corners say so."""
    rows, columns = near.shape
    patch = max(2, min(rows, columns) // 16)
    corners = [
        near[:patch, :patch],
        near[:patch, -patch:],
        near[-patch:, :patch],
        near[-patch:, -patch:],
    ]
    if sum(corner.mean() > 0.8 for corner in corners) < 3:
        return None
    points = []
    for row in range(rows):
        line = near[row]
        if line.all():
            continue
        first, last = np.flatnonzero(~line)[[0, -1]]
        if first > 0:
            points.append((row, first - 0.5))
        if last < columns - 1:
            points.append((row, last + 0.5))
    for column in range(columns):
        line = near[:, column]
        if line.all():
            continue
        first, last = np.flatnonzero(~line)[[0, -1]]
        if first > 0:
            points.append((first - 0.5, column))
        if last < rows - 1:
            points.append((last + 0.5, column))
    if len(points) < 12:
        return None
    xy = np.asarray(points, dtype=np.float64)
    keep = np.ones(len(xy), dtype=bool)
    circle = None
    for _ in range(5):
        circle = _algebraic_circle(xy[keep])
        residual = np.abs(np.hypot(xy[:, 0] - circle[0], xy[:, 1] - circle[1]) - circle[2])
        # Dark anatomy at the rim pulls its points inward: those are the outliers.
        keep = residual < max(2.0, np.percentile(residual[keep], 70))
        if keep.sum() < 12:
            return None
    return circle


def _algebraic_circle(points: np.ndarray) -> tuple[float, float, float]:
    """Least-squares circle through (row, column) points (Kasa's linear fit)."""
    y, x = points[:, 0], points[:, 1]
    design = np.column_stack([x, y, np.ones_like(x)])
    solution, *_ = np.linalg.lstsq(design, x**2 + y**2, rcond=None)
    cx, cy = solution[0] / 2.0, solution[1] / 2.0
    radius = float(np.sqrt(max(solution[2] + cx**2 + cy**2, 0.0)))
    return float(cy), float(cx), radius
