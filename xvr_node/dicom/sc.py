"""The overlay: the X-ray with the registered CT drawn on it, as an RGB Secondary Capture."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from highdicom.sc import SCImage
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian

from xvr_node.dicom.results import (
    MANUFACTURER,
    SERIES_DESCRIPTION_OVERLAY,
    SERIES_NUMBER_OVERLAY,
    RegistrationResult,
    check_run,
    check_xray,
    copy_patient_extras,
    series_and_instance_uids,
    set_body_part_or_laterality,
)
from xvr_node.geometry import patient_orientation

#: Colours of the projected CT anatomy: thin lines, each structure its own hue.
EDGE_COLOUR = (0, 255, 0)
CONTOUR_COLOURS = {
    "bone": (255, 214, 0),  # amber
    "lung": (0, 200, 255),  # cyan
    "body": (120, 255, 120),  # pale green
}
FIELD_COLOUR = (150, 150, 255)  # the open field the similarity counted
LEGEND_TEXT = (255, 255, 255)
LEGEND_BACKGROUND = (0, 0, 0)
RELIABLE_COLOUR = (0, 200, 0)
UNRELIABLE_COLOUR = (230, 0, 0)

#: Multi-frame True Color Secondary Capture Image Storage: a run's overlays in one object.
MULTIFRAME_TRUE_COLOR_SC = "1.2.840.10008.5.1.4.1.1.7.4"

#: Frame Increment Pointer (0028,0009) of a run's overlay: Frame Label Vector (0018,2002).
FRAME_LABEL_VECTOR = 0x00182002

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
    contours: np.ndarray | Mapping[str, np.ndarray],
    legend: list[str],
    *,
    field_outline: np.ndarray | None = None,
    reliable: bool | None = None,
    colour: tuple[int, int, int] = EDGE_COLOUR,
) -> np.ndarray:
    """The picture of a registration: grey X-ray, thin anatomy contours, field, verdict.

    Parameters
    ----------
    xray_pixels
        One frame of the X-ray as stored, ``(rows, columns)``, any numeric dtype
        (MONOCHROME2: higher is brighter).
    contours
        Boolean ``(rows, columns)`` lines of the registered CT's projected anatomy in the
        stored pixel grid: one array (drawn in ``colour``) or a mapping of structure name
        (``bone``, ``lung``, ``body``) to array, each drawn in its :data:`CONTOUR_COLOURS`.
    legend
        Text lines burned into the image corner that hides the fewest contour pixels; the
        first line is the quality gate's verdict when ``reliable`` is given.
    field_outline
        Boolean outline of the open field the registration counted, drawn faintly.
    reliable
        The gate's verdict: ``False`` frames the image in red and puts the legend on red, so
        a wrong result never looks like a good one; ``None``: not assessed.

    Returns
    -------
    numpy.ndarray
        ``(rows, columns, 3)`` uint8 RGB.
    """
    pixels = np.asarray(xray_pixels)
    if pixels.ndim != 2:
        raise ValueError(f"xray_pixels must be one frame (rows, columns), got {pixels.shape}")
    layers = (
        {"": np.asarray(contours, dtype=bool)}
        if isinstance(contours, np.ndarray)
        else {name: np.asarray(mask, dtype=bool) for name, mask in contours.items()}
    )
    for name, mask in layers.items():
        if mask.shape != pixels.shape:
            raise ValueError(
                f"contour {name or 'edges'} has shape {mask.shape}, X-ray {pixels.shape}"
            )
    grey = window_to_uint8(pixels)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    if field_outline is not None:
        rgb[np.asarray(field_outline, dtype=bool)] = FIELD_COLOUR
    drawn = np.zeros(pixels.shape, dtype=bool)
    for name, mask in layers.items():
        rgb[mask] = CONTOUR_COLOURS.get(name, colour)
        drawn |= mask
    if reliable is False:
        border = max(2, round(min(pixels.shape) / 100))
        rgb[:border], rgb[-border:] = UNRELIABLE_COLOUR, UNRELIABLE_COLOUR
        rgb[:, :border], rgb[:, -border:] = UNRELIABLE_COLOUR, UNRELIABLE_COLOUR
    if legend:
        image = Image.fromarray(rgb)
        draw = ImageDraw.Draw(image)
        font = _legend_font(pixels.shape[0])
        text = "\n".join(legend)
        _, _, width, height = draw.multiline_textbbox((0, 0), text, font=font, spacing=2)
        x, y = _quietest_corner(drawn, width + 6, height + 5)
        background = {False: UNRELIABLE_COLOUR}.get(reliable, LEGEND_BACKGROUND)
        draw.rectangle((x, y, x + width + 5, y + height + 4), fill=background)
        if reliable is True:
            first = legend[0]
            draw.text((x + 3, y + 2), first, fill=RELIABLE_COLOUR, font=font)
            rest = "\n".join(legend[1:])
            _, _, _, first_height = draw.textbbox((0, 0), first, font=font)
            if rest:
                draw.multiline_text(
                    (x + 3, y + 4 + first_height), rest, fill=LEGEND_TEXT, font=font, spacing=2
                )
        else:
            draw.multiline_text((x + 3, y + 2), text, fill=LEGEND_TEXT, font=font, spacing=2)
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
    """The legend: the gate's verdict first, then where the pose came from and who drew it."""
    lines = []
    if result.reliable is not None:
        confidence = "" if result.confidence is None else f" (confidence {result.confidence:.2f})"
        lines.append(("reliable" if result.reliable else "NOT RELIABLE") + confidence)
        if not result.reliable:
            lines.extend(f"- {reason}" for reason in result.quality_reasons[:3])
    lines += [f"pose: {result.initializer}", f"similarity {result.similarity:.3f}"]
    if result.frame_numbers is not None:
        lines.append("frame " + ",".join(str(f) for f in result.frame_numbers))
    lines.append("amber: bone, cyan: lung (CT at this pose)")
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
    series_uid, sop_uid = series_and_instance_uids(series_instance_uid, instance_number)
    sc = SCImage.from_ref_dataset(
        ref_dataset=xray,
        pixel_array=np.ascontiguousarray(rgb),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
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
    if result.reliable is not None:
        sc.ImageComments = f"Registration {result.verdict_words}"[:10240]
    sc.SourceImageSequence = DicomSequence([_source_image(xray, result.frame_numbers)])
    return sc


def build_run_overlay(
    xray: Dataset,
    frames_rgb: np.ndarray,
    results: Sequence[RegistrationResult],
    *,
    series_instance_uid: str | None = None,
    instance_number: int = 1,
    series_number: int = SERIES_NUMBER_OVERLAY,
) -> Dataset:
    """Build one Multi-frame True Color Secondary Capture showing every frame pose of a run.

    highdicom's ``SCImage`` writes single-frame Secondary Capture only, so the object is
    made by it from the first frame (patient, study, series, equipment, orientation as in
    :func:`build_overlay`) and turned into the Multi-frame True Color SC IOD (PS3.3 A.8.5):
    all frames' pixels, Number of Frames, and Frame Increment Pointer to a Frame Label
    Vector naming the X-ray frame each overlay frame shows. The Source Image Sequence lists
    the X-ray with every frame shown; the Image Comments give each frame's verdict.

    Parameters
    ----------
    xray
        The registered multi-frame XA/RF instance.
    frames_rgb
        ``(frames, rows, columns, 3)`` uint8 RGB, one picture per result in frame order
        (e.g. from :func:`compose_overlay`), each in the X-ray's stored pixel grid.
    results
        One result per frame pose, each with ``frame_numbers``.
    series_instance_uid, instance_number, series_number
        As for :func:`build_overlay`.

    Returns
    -------
    pydicom.Dataset
        Multi-frame True Color Secondary Capture Image Storage, Explicit VR Little Endian.
    """
    results = check_run(results)
    for result in results:
        check_xray(xray, result)
    pixels = np.asarray(frames_rgb)
    expected = (len(results), int(xray.Rows), int(xray.Columns), 3)
    if pixels.shape != expected:
        raise ValueError(
            f"frames_rgb has shape {pixels.shape}; {len(results)} frame poses of the X-ray's "
            f"Rows/Columns (0028,0010/0011) need {expected}"
        )
    if pixels.dtype != np.uint8:
        raise ValueError(f"frames_rgb must be uint8 (Bits Allocated 8), got {pixels.dtype}")
    sc = build_overlay(
        xray,
        pixels[0],
        results[0],
        series_instance_uid=series_instance_uid,
        instance_number=instance_number,
        series_number=series_number,
    )
    sc.SOPClassUID = MULTIFRAME_TRUE_COLOR_SC
    sc.file_meta.MediaStorageSOPClassUID = MULTIFRAME_TRUE_COLOR_SC
    sc.NumberOfFrames = len(results)
    sc.FrameIncrementPointer = FRAME_LABEL_VECTOR
    # SH values of at most 16 characters: "XA frame 12345".
    sc.FrameLabelVector = [frame_label(xray, result) for result in results]
    sc.PixelData = np.ascontiguousarray(pixels).tobytes()
    frames = [f for result in results for f in result.frame_numbers or []]
    sc.SourceImageSequence = DicomSequence([_source_image(xray, frames)])
    verdicts = [
        f"frame {','.join(map(str, result.frame_numbers or []))}: {result.verdict_words}"
        for result in results
        if result.reliable is not None
    ]
    if verdicts:
        sc.ImageComments = ("Registration " + "; ".join(verdicts))[:10240]
    elif "ImageComments" in sc:
        del sc.ImageComments
    return sc


def frame_label(xray: Dataset, result: RegistrationResult) -> str:
    """The Frame Label Vector value of an overlay frame: the X-ray frame it shows."""
    frames = ",".join(map(str, result.frame_numbers or []))
    return f"{xray.get('Modality', '')} frame {frames}".strip()[:16]


def _patient_orientation(xray: Dataset, result: RegistrationResult) -> tuple[str, str]:
    """The X-ray's Patient Orientation, or the one its registered pose implies."""
    stated = [str(v) for v in (xray.get("PatientOrientation") or [])]
    if len(stated) == 2 and all(stated):
        return stated[0], stated[1]
    row, column = patient_orientation(
        result.matrix, mirrored=result.mirrored, rows_reversed=result.rows_reversed
    )
    return row, column


def _source_image(xray: Dataset, frame_numbers: list[int] | None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = xray.SOPClassUID
    item.ReferencedSOPInstanceUID = xray.SOPInstanceUID
    if frame_numbers is not None:
        item.ReferencedFrameNumber = list(frame_numbers)
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = SOURCE_IMAGE_PURPOSE
    item.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
    return item
