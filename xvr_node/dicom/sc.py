"""The overlay: the X-ray with the registered CT drawn on it, as an RGB Secondary Capture."""

from __future__ import annotations

import numpy as np
from highdicom.sc import SCImage
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from xvr_node.dicom.results import (
    MANUFACTURER,
    SERIES_DESCRIPTION_OVERLAY,
    SERIES_NUMBER_OVERLAY,
    RegistrationResult,
    check_xray,
    copy_patient_extras,
    set_body_part_or_laterality,
)
from xvr_node.geometry import patient_orientation

#: Colour of the projected CT anatomy: saturated green is visible on any grey level.
EDGE_COLOUR = (0, 255, 0)
LEGEND_TEXT = (255, 255, 255)
LEGEND_BACKGROUND = (0, 0, 0)

#: Purpose of Reference of the Source Image Sequence item.
SOURCE_IMAGE_PURPOSE = ("121322", "DCM", "Source image for image processing operation")

DERIVATION_DESCRIPTION = (
    "X-ray with the registered CT's projected anatomy drawn in colour by xvr-node; "
    "legend burned in. Not for diagnosis."
)


def window_to_uint8(
    pixels: np.ndarray, low_percentile: float = 1.0, high_percentile: float = 99.5
) -> np.ndarray:
    """Grey levels 0–255 of an image of any dtype, windowed on its own percentiles."""
    values = np.asarray(pixels, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape, dtype=np.uint8)
    low, high = np.percentile(finite, [low_percentile, high_percentile])
    if high <= low:
        high = low + 1.0
    scaled = (np.nan_to_num(values, nan=low) - low) / (high - low)
    return np.rint(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def compose_overlay(
    xray_pixels: np.ndarray,
    edges: np.ndarray,
    legend: list[str],
    *,
    colour: tuple[int, int, int] = EDGE_COLOUR,
) -> np.ndarray:
    """The picture of a registration: windowed grey X-ray, coloured edges, a small legend.

    Parameters
    ----------
    xray_pixels
        One frame of the X-ray as stored, ``(rows, columns)``, any numeric dtype
        (MONOCHROME2: higher is brighter).
    edges
        Boolean ``(rows, columns)``: where the registered CT's projected anatomy has an
        edge, in the stored pixel grid.
    legend
        Text lines burned into the image corner that hides the fewest edge pixels
        (top-left when none is hidden): pose source, similarity, ….
    colour
        RGB of the edges.

    Returns
    -------
    numpy.ndarray
        ``(rows, columns, 3)`` uint8 RGB.
    """
    pixels = np.asarray(xray_pixels)
    if pixels.ndim != 2:
        raise ValueError(f"xray_pixels must be one frame (rows, columns), got {pixels.shape}")
    edges = np.asarray(edges, dtype=bool)
    if edges.shape != pixels.shape:
        raise ValueError(f"edges has shape {edges.shape}, the X-ray {pixels.shape}")
    grey = window_to_uint8(pixels)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    rgb[edges] = colour
    if legend:
        image = Image.fromarray(rgb)
        draw = ImageDraw.Draw(image)
        font = _legend_font(pixels.shape[0])
        text = "\n".join(legend)
        _, _, width, height = draw.multiline_textbbox((0, 0), text, font=font, spacing=1)
        x, y = _quietest_corner(edges, width + 4, height + 3)
        draw.rectangle((x, y, x + width + 3, y + height + 2), fill=LEGEND_BACKGROUND)
        draw.multiline_text((x + 2, y + 1), text, fill=LEGEND_TEXT, font=font, spacing=1)
        rgb = np.asarray(image, dtype=np.uint8).copy()
    return rgb


def _quietest_corner(edges: np.ndarray, width: int, height: int) -> tuple[int, int]:
    """Top-left corner of the image corner box that hides the fewest edge pixels."""
    rows, columns = edges.shape
    corners = [
        (0, 0),
        (max(0, columns - width), 0),
        (0, max(0, rows - height)),
        (max(0, columns - width), max(0, rows - height)),
    ]
    hidden = [int(edges[y : y + height, x : x + width].sum()) for x, y in corners]
    return corners[int(np.argmin(hidden))]


def _legend_font(rows: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's default font, about 1/30 of the image height where FreeType can scale it."""
    try:
        return ImageFont.load_default(size=max(10, round(rows / 30)))
    except (ImportError, OSError, TypeError):
        return ImageFont.load_default()


def overlay_legend(result: RegistrationResult) -> list[str]:
    """The default legend: where the pose came from, how well it fits, who drew it."""
    lines = [f"pose: {result.initializer}", f"similarity {result.similarity:.3f}"]
    if result.frame_numbers is not None:
        lines.append("frame " + ",".join(str(f) for f in result.frame_numbers))
    lines.append(f"xvr-node {result.software_version}")
    return lines


def build_overlay(
    xray: Dataset,
    overlay_rgb: np.ndarray,
    result: RegistrationResult,
    *,
    series_instance_uid: str | None = None,
    instance_number: int = 1,
    series_number: int = SERIES_NUMBER_OVERLAY,
) -> Dataset:
    """Build the RGB Secondary Capture that shows a registration on the X-ray.

    Parameters
    ----------
    xray
        The registered XA/RF instance: patient, study, Patient Orientation, Source Image.
    overlay_rgb
        ``(rows, columns, 3)`` uint8 RGB, the X-ray's stored pixel grid (e.g. from
        :func:`compose_overlay`); legend already burned in.
    result
        The registration shown: frames referenced, orientation when the X-ray has none.
    series_instance_uid
        Series Instance UID (0020,000E) of the new series; a new UID when ``None``.
    instance_number
        Instance Number (0020,0013).
    series_number
        Series Number (0020,0011) of the new series.

    Returns
    -------
    pydicom.Dataset
        A highdicom ``SCImage`` (Explicit VR Little Endian, RGB, 8 bits).
    """
    check_xray(xray, result)
    rgb = np.asarray(overlay_rgb)
    expected = (int(xray.Rows), int(xray.Columns), 3)
    if rgb.shape != expected:
        raise ValueError(
            f"overlay_rgb has shape {rgb.shape}; Rows/Columns (0028,0010/0011) of the X-ray "
            f"need {expected}"
        )
    if rgb.dtype != np.uint8:
        raise ValueError(f"overlay_rgb must be uint8 (Bits Allocated 8), got {rgb.dtype}")
    if instance_number < 1:
        raise ValueError(f"Instance Number (0020,0013) must be positive, got {instance_number}")

    orientation = _patient_orientation(xray, result)
    sc = SCImage.from_ref_dataset(
        ref_dataset=xray,
        pixel_array=np.ascontiguousarray(rgb),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        # highdicom accepts one letter per axis; the full value is set below.
        patient_orientation=(orientation[0][:1], orientation[1][:1]),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=SERIES_DESCRIPTION_OVERLAY,
        manufacturer_model_name=MANUFACTURER,
        software_versions=result.software_version,
    )
    sc.PatientOrientation = list(orientation)
    copy_patient_extras(sc, xray)
    set_body_part_or_laterality(sc, xray)
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.DerivationDescription = DERIVATION_DESCRIPTION
    sc.SourceImageSequence = DicomSequence([_source_image(xray, result)])
    return sc


def _patient_orientation(xray: Dataset, result: RegistrationResult) -> tuple[str, str]:
    """The X-ray's Patient Orientation, or the one its registered pose implies."""
    stated = [str(v) for v in (xray.get("PatientOrientation") or [])]
    if len(stated) == 2 and all(stated):
        return stated[0], stated[1]
    row, column = patient_orientation(
        result.matrix, mirrored=result.mirrored, rows_reversed=result.rows_reversed
    )
    return row, column


def _source_image(xray: Dataset, result: RegistrationResult) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = xray.SOPClassUID
    item.ReferencedSOPInstanceUID = xray.SOPInstanceUID
    if result.frame_numbers is not None:
        item.ReferencedFrameNumber = list(result.frame_numbers)
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = SOURCE_IMAGE_PURPOSE
    item.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
    return item
