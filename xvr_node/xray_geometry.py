"""Read the projection geometry of an X-ray instance (XA, Enhanced XA, RF, DX), per frame."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from pydicom.dataset import Dataset

from xvr_node.geometry import CarmPose, Intrinsics, is_mirrored

#: The X-ray SOP classes this node registers, with the short name used in logs and reports.
XRAY_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.12.1": "XA",
    "1.2.840.10008.5.1.4.1.1.12.1.1": "Enhanced XA",
    "1.2.840.10008.5.1.4.1.1.12.2": "XRF",
    "1.2.840.10008.5.1.4.1.1.1.1": "DX for presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "DX for processing",
}

SID_NAME = "Distance Source to Detector (0018,1110)"
SPACING_NAME = "Imager Pixel Spacing (0018,1164)"
INTENSIFIER_NAME = "Intensifier Size (0018,1162)"
FIELD_OF_VIEW_NAME = "Field of View Dimensions (0018,1149)"

#: Pixel spacings estimated from the stated field size over the matrix, best first.
ESTIMATED_SPACING_SOURCES = ("FieldOfViewDimensions", "IntensifierSize")
#: Where a pixel spacing came from; the estimates come last, they are not measurements.
PIXEL_SPACING_SOURCES = (
    "ImagerPixelSpacing",
    "PixelSpacing",
    "profile",
    "config",
    *ESTIMATED_SPACING_SOURCES,
)
SID_SOURCES = ("DistanceSourceToDetector", "profile", "config")
FALLBACK_SOURCES = ("profile", "config")


class XrayGeometryError(ValueError):
    """The dataset is not an X-ray this node can register, or its geometry contradicts itself."""


class UnsupportedGeometryError(XrayGeometryError):
    """The geometry is stated consistently but this node cannot apply it (e.g. a quarter turn)."""


@dataclass(frozen=True)
class FrameGeometry:
    """The positioner angles of one frame, in degrees; ``None`` where the C-arm did not say.

    ``primary_deg`` is Positioner Primary Angle (+ LAO, − RAO); ``secondary_deg`` is
    Positioner Secondary Angle (+ cranial, − caudal).
    """

    primary_deg: float | None
    secondary_deg: float | None


@dataclass(frozen=True)
class XrayGeometry:
    """What an X-ray instance says about its projection geometry, as stored.

    Parameters
    ----------
    rows, columns
        Image size in pixels (0028,0010), (0028,0011).
    number_of_frames
        Number of Frames (0028,0008); 1 for a single image.
    sid_mm
        Distance Source to Detector (0018,1110), mm; ``None`` when absent or not positive.
    dsp_mm
        Distance Source to Patient (0018,1111), mm, about the source–isocentre distance
        (Enhanced XA: Distance Source to Isocenter (0018,9402)).
    pixel_spacing_mm
        ``(row, column)`` spacing at the detector, mm.
    pixel_spacing_source, sid_source
        Where each value came from: the DICOM attribute, or a C-arm ``"profile"`` / ``"config"``
        fallback (see :meth:`with_profile`).
    principal_point_px
        ``(u0, v0)``: column and row of the principal point from the top-left pixel centre;
        always the image centre (see :func:`read_xray_geometry`).
    patient_orientation
        Patient Orientation (0020,0020) as stored (row direction, column direction); may be
        empty.
    mirrored
        Whether the stored columns run opposite to the image-plane x axis: Field of View
        Horizontal Flip and Rotation 180 (0018,7034), (0018,7032), and a Patient Orientation
        that contradicts the positioner angles (a C-arm storing RAO views as seen from the source).
    motion
        Positioner Motion (0018,1500): ``"STATIC"``, ``"DYNAMIC"`` or ``None``.
    frames
        The angles of each frame, in frame order.
    manufacturer, model_name, station_name
        Manufacturer, Manufacturer's Model Name and Station Name: with the image size and the
        zoom they identify a C-arm and detector mode for :meth:`device_key`. Empty when absent.
    rows_reversed
        Whether the stored rows run opposite to the image-plane y axis (Field of View Rotation
        180): the image plane is the physical detector's grid, whatever the display rotation.
    intensifier_size_mm
        Intensifier Size (0018,1162): the diameter of the image intensifier's field, mm.
    field_of_view_mm
        Field of View Dimensions (0018,1149), mm, as stated (one value for a round field).
    """

    rows: int
    columns: int
    number_of_frames: int
    sid_mm: float | None
    dsp_mm: float | None
    pixel_spacing_mm: tuple[float, float] | None
    pixel_spacing_source: str | None
    sid_source: str | None
    principal_point_px: tuple[float, float]
    patient_orientation: tuple[str, ...]
    mirrored: bool
    motion: str | None
    frames: tuple[FrameGeometry, ...]
    manufacturer: str = ""
    model_name: str = ""
    station_name: str = ""
    rows_reversed: bool = False
    intensifier_size_mm: float | None = None
    field_of_view_mm: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        # An object that constructs is consistent: callers store it and build intrinsics from it.
        if self.rows <= 0 or self.columns <= 0:
            raise ValueError(f"image size must be positive, got {self.rows}x{self.columns}")
        if self.number_of_frames < 1:
            raise ValueError(f"number_of_frames must be at least 1, got {self.number_of_frames}")
        if len(self.frames) != self.number_of_frames:
            raise ValueError(
                f"{len(self.frames)} frame geometries for {self.number_of_frames} frames"
            )
        if self.sid_mm is not None and not self.sid_mm > 0:
            raise ValueError(f"sid_mm must be positive, got {self.sid_mm}")
        if self.dsp_mm is not None and not self.dsp_mm > 0:
            raise ValueError(f"dsp_mm must be positive, got {self.dsp_mm}")
        if self.pixel_spacing_mm is not None and not all(s > 0 for s in self.pixel_spacing_mm):
            raise ValueError(f"pixel spacing must be positive, got {self.pixel_spacing_mm}")
        _check_source("sid_source", self.sid_mm, self.sid_source, SID_SOURCES)
        _check_source(
            "pixel_spacing_source",
            self.pixel_spacing_mm,
            self.pixel_spacing_source,
            PIXEL_SPACING_SOURCES,
        )

    def missing(self) -> list[str]:
        """The attributes whose absence prevents registration, named as DICOM names them."""
        missing = []
        if self.sid_mm is None:
            missing.append(SID_NAME)
        if self.pixel_spacing_mm is None:
            missing.append(SPACING_NAME)
        return missing

    def explain_missing(self) -> str:
        """What is missing, and for the spacing why no estimate was possible; ``""`` if usable."""
        missing = self.missing()
        if not missing:
            return ""
        text = ", ".join(missing)
        no_field_size = self.intensifier_size_mm is None and self.field_of_view_mm is None
        if self.pixel_spacing_mm is None and no_field_size:
            text += (
                f" (and neither {INTENSIFIER_NAME} nor {FIELD_OF_VIEW_NAME} to estimate "
                "the spacing from)"
            )
        return text

    def usable(self) -> bool:
        """Whether the intrinsics can be built (the angles are only an initial guess)."""
        return not self.missing()

    @property
    def pixel_spacing_estimated(self) -> bool:
        """Whether the pixel spacing is an estimate from the field size, not a statement."""
        return self.pixel_spacing_source in ESTIMATED_SPACING_SOURCES

    def describe_spacing(self) -> str:
        """The pixel spacing and its origin in words, for reasons, logs and status."""
        if self.pixel_spacing_mm is None:
            return "pixel spacing unknown"
        row, column = self.pixel_spacing_mm
        if self.pixel_spacing_source == "IntensifierSize":
            origin = f"ESTIMATED from {INTENSIFIER_NAME} {self.intensifier_size_mm:g} mm"
        elif self.pixel_spacing_source == "FieldOfViewDimensions":
            dims = "x".join(f"{v:g}" for v in self.field_of_view_mm or ())
            origin = f"ESTIMATED from {FIELD_OF_VIEW_NAME} {dims} mm"
        else:
            origin = f"from {self.pixel_spacing_source}"
        return f"pixel spacing {row:.4g} x {column:.4g} mm {origin}"

    def intrinsics(self) -> Intrinsics:
        """The detector model for projection; ``ValueError`` names what is missing."""
        if self.missing():
            raise ValueError(f"cannot build X-ray intrinsics: missing {self.explain_missing()}")
        row_spacing, column_spacing = self.pixel_spacing_mm  # type: ignore[misc]
        return Intrinsics(
            sid_mm=self.sid_mm,  # type: ignore[arg-type]
            rows=self.rows,
            columns=self.columns,
            row_spacing_mm=row_spacing,
            column_spacing_mm=column_spacing,
            principal_point_px=self.principal_point_px,
        )

    def with_profile(
        self,
        sid_mm: float | None,
        pixel_spacing_mm: tuple[float, float] | None,
        source: str,
    ) -> XrayGeometry:
        """Fill only what the instance lacks from a C-arm profile or the configuration.

        What the C-arm wrote always wins: a profile is a guess about the device, the
        instance is a measurement of this acquisition.
        """
        if source not in FALLBACK_SOURCES:
            raise ValueError(f"source must be one of {FALLBACK_SOURCES}, not {source!r}")
        changes: dict[str, Any] = {}
        if self.sid_mm is None and sid_mm is not None:
            if not sid_mm > 0:
                raise ValueError(f"{source} SID must be positive, got {sid_mm}")
            changes.update(sid_mm=float(sid_mm), sid_source=source)
        if self.pixel_spacing_mm is None and pixel_spacing_mm is not None:
            row, column = (float(x) for x in pixel_spacing_mm)
            if not (row > 0 and column > 0):
                raise ValueError(f"{source} pixel spacing must be positive, got {pixel_spacing_mm}")
            changes.update(pixel_spacing_mm=(row, column), pixel_spacing_source=source)
        return replace(self, **changes) if changes else self

    def with_field_size_estimate(self) -> XrayGeometry:
        """Estimate a missing pixel spacing as the stated field size over the matrix.

        Field of View Dimensions (0018,1149) first: the exposed detector field, rows then
        columns, or one diameter for a ROUND field. Else Intensifier Size (0018,1162): an image
        intensifier's round field is inscribed in the stored matrix, so its diameter spans the
        shorter side. Both ignore distortion, vignetting and any electronic magnification: the
        result is labelled an estimate (:attr:`pixel_spacing_estimated`) and is used last,
        after the C-arm's statement, learned profiles and the configuration.
        """
        if self.pixel_spacing_mm is not None:
            return self
        field = self.field_of_view_mm
        if field is not None and len(field) in (1, 2):
            if len(field) == 1:
                spacing = (field[0] / min(self.rows, self.columns),) * 2
            else:
                spacing = (field[0] / self.rows, field[1] / self.columns)
            return replace(
                self, pixel_spacing_mm=spacing, pixel_spacing_source="FieldOfViewDimensions"
            )
        if self.intensifier_size_mm is not None:
            diameter_spacing = self.intensifier_size_mm / min(self.rows, self.columns)
            return replace(
                self,
                pixel_spacing_mm=(diameter_spacing, diameter_spacing),
                pixel_spacing_source="IntensifierSize",
            )
        return self

    def zoom_key(self) -> str:
        """The detector's field-of-view mode as stated, ``""`` when the C-arm did not say.

        Imager Pixel Spacing changes with the zoom at the same matrix, so a profile learned in
        one mode must not fill the spacing of another.
        """
        parts = []
        if self.field_of_view_mm:
            parts.append("FOV " + "x".join(f"{v:g}" for v in self.field_of_view_mm))
        if self.intensifier_size_mm is not None:
            parts.append(f"II {self.intensifier_size_mm:g}")
        return " ".join(parts)

    def device_key(self) -> tuple[str, str, str, int, int, str]:
        """(manufacturer, model, station, rows, columns, zoom): how a profile is looked up."""
        return (
            self.manufacturer,
            self.model_name,
            self.station_name,
            self.rows,
            self.columns,
            self.zoom_key(),
        )

    def to_json(self) -> dict:
        """Plain JSON types; :meth:`from_json` gives back an equal object."""
        return {
            "rows": self.rows,
            "columns": self.columns,
            "number_of_frames": self.number_of_frames,
            "sid_mm": self.sid_mm,
            "dsp_mm": self.dsp_mm,
            "pixel_spacing_mm": (
                None if self.pixel_spacing_mm is None else list(self.pixel_spacing_mm)
            ),
            "pixel_spacing_source": self.pixel_spacing_source,
            "sid_source": self.sid_source,
            "principal_point_px": list(self.principal_point_px),
            "patient_orientation": list(self.patient_orientation),
            "mirrored": self.mirrored,
            "motion": self.motion,
            "frames": [
                {"primary_deg": f.primary_deg, "secondary_deg": f.secondary_deg}
                for f in self.frames
            ],
            "manufacturer": self.manufacturer,
            "model_name": self.model_name,
            "station_name": self.station_name,
            "rows_reversed": self.rows_reversed,
            "intensifier_size_mm": self.intensifier_size_mm,
            "field_of_view_mm": (
                None if self.field_of_view_mm is None else list(self.field_of_view_mm)
            ),
            "pixel_spacing_estimated": self.pixel_spacing_estimated,
        }

    @classmethod
    def from_json(cls, data: dict) -> XrayGeometry:
        spacing = data["pixel_spacing_mm"]
        u0, v0 = data["principal_point_px"]
        field_of_view = data.get("field_of_view_mm")
        return cls(
            rows=int(data["rows"]),
            columns=int(data["columns"]),
            number_of_frames=int(data["number_of_frames"]),
            sid_mm=_optional_float(data["sid_mm"]),
            dsp_mm=_optional_float(data["dsp_mm"]),
            pixel_spacing_mm=None if spacing is None else (float(spacing[0]), float(spacing[1])),
            pixel_spacing_source=data["pixel_spacing_source"],
            sid_source=data["sid_source"],
            principal_point_px=(float(u0), float(v0)),
            patient_orientation=tuple(str(x) for x in data["patient_orientation"]),
            mirrored=bool(data["mirrored"]),
            motion=data["motion"],
            frames=tuple(
                FrameGeometry(
                    _optional_float(f["primary_deg"]), _optional_float(f["secondary_deg"])
                )
                for f in data["frames"]
            ),
            manufacturer=str(data.get("manufacturer", "")),
            model_name=str(data.get("model_name", "")),
            station_name=str(data.get("station_name", "")),
            rows_reversed=bool(data.get("rows_reversed", False)),
            intensifier_size_mm=_optional_float(data.get("intensifier_size_mm")),
            field_of_view_mm=(
                None if field_of_view is None else tuple(float(v) for v in field_of_view)
            ),
        )


def read_xray_geometry(ds: Dataset) -> XrayGeometry:
    """Read the geometry of an XA, Enhanced XA, RF or DX instance (pixel data not needed).

    Legacy XA/RF/DX keep everything at the top level. Enhanced XA keeps it in functional
    groups: Positioner Position Sequence (0018,9405) per frame or shared, Frame Pixel Data
    Properties Sequence (0028,9443) for Imager Pixel Spacing and X-Ray Geometry Sequence
    (0018,9476) for the distances; top-level attributes win when both are present.

    The principal point is the image centre for every SOP class. Legacy XA/RF/DX assume the
    isocentre projects there. Enhanced XA's Position of Isocenter Projection (0018,9430) is
    given in physical detector elements and reaches the stored grid only through Field of View
    Origin, Rotation, Horizontal Flip and detector binning; without real instances to check
    those conventions against, a formula could shift every registration silently, so it is
    not used.

    Raises
    ------
    XrayGeometryError
        The SOP class is not an X-ray one, Rows or Columns is missing, or the per-frame
        geometry has the wrong number of values for Number of Frames.
    UnsupportedGeometryError
        Field of View Rotation is a quarter turn or not a multiple of 90 degrees, or Field of
        View Horizontal Flip is neither YES nor NO.
    """
    sop_class = _sop_class(ds)
    if sop_class not in XRAY_SOP_CLASSES:
        raise XrayGeometryError(
            f"SOP Class UID {sop_class or '(absent)'} is not an X-ray image "
            f"({', '.join(sorted(set(XRAY_SOP_CLASSES.values())))})"
        )
    rows = _positive_int(_value(ds, "Rows"))
    columns = _positive_int(_value(ds, "Columns"))
    if rows is None:
        raise XrayGeometryError("Rows (0028,0010) is missing or not positive")
    if columns is None:
        raise XrayGeometryError("Columns (0028,0011) is missing or not positive")
    number_of_frames = _positive_int(_value(ds, "NumberOfFrames")) or 1
    per_frame = _per_frame_items(ds, number_of_frames)

    sid = _positive(_value(ds, "DistanceSourceToDetector"))
    if sid is None:
        sid = _positive(
            _group_value(ds, per_frame, 0, "XRayGeometrySequence", "DistanceSourceToDetector")
        )
    dsp = _positive(_value(ds, "DistanceSourceToPatient"))
    if dsp is None:
        dsp = _positive(
            _group_value(ds, per_frame, 0, "XRayGeometrySequence", "DistanceSourceToIsocenter")
        )
    spacing, spacing_source = _pixel_spacing(ds, per_frame)

    motion = _text(_value(ds, "PositionerMotion")).upper() or None
    frames = _frame_angles(ds, per_frame, number_of_frames, motion)

    rows_reversed, columns_reversed = _field_of_view_flips(ds)
    orientation = _patient_orientation(ds, per_frame)
    first = frames[0]
    mirrored_view = False
    if orientation and first.primary_deg is not None and first.secondary_deg is not None:
        view = CarmPose(first.primary_deg, first.secondary_deg, dsp or 1.0)
        # Patient Orientation describes the stored grid: undo the stated rotation and flip
        # first, so that only a mirroring the C-arm did not declare is detected here.
        detector_orientation = _undo_flips(orientation, rows_reversed, columns_reversed)
        mirrored_view = is_mirrored(detector_orientation, view.rotation()[:, 0])
    mirrored = columns_reversed != mirrored_view

    return XrayGeometry(
        rows=rows,
        columns=columns,
        number_of_frames=number_of_frames,
        sid_mm=sid,
        dsp_mm=dsp,
        pixel_spacing_mm=spacing,
        pixel_spacing_source=spacing_source,
        sid_source=None if sid is None else "DistanceSourceToDetector",
        principal_point_px=((columns - 1) / 2.0, (rows - 1) / 2.0),
        patient_orientation=orientation,
        mirrored=bool(mirrored),
        motion=motion,
        frames=frames,
        manufacturer=_text(_value(ds, "Manufacturer")),
        model_name=_text(_value(ds, "ManufacturerModelName")),
        station_name=_text(_value(ds, "StationName")),
        rows_reversed=rows_reversed,
        intensifier_size_mm=_positive(_value(ds, "IntensifierSize")),
        field_of_view_mm=_field_of_view_dimensions(ds),
    )


# --- the parts of read_xray_geometry ---------------------------------------------------------


def _sop_class(ds: Dataset) -> str:
    sop_class = _text(_value(ds, "SOPClassUID"))
    if not sop_class and hasattr(ds, "file_meta"):
        sop_class = _text(_value(ds.file_meta, "MediaStorageSOPClassUID"))
    return sop_class


def _per_frame_items(ds: Dataset, number_of_frames: int) -> list[Dataset] | None:
    """Per-frame Functional Groups items, one per frame, or ``None`` for legacy objects."""
    items = _value(ds, "PerFrameFunctionalGroupsSequence")
    if not items:
        return None
    if len(items) != number_of_frames:
        raise XrayGeometryError(
            f"Per-frame Functional Groups Sequence has {len(items)} items "
            f"for {number_of_frames} frames"
        )
    return list(items)


def _group_item(
    ds: Dataset, per_frame: list[Dataset] | None, index: int, sequence: str
) -> Dataset | None:
    """The first item of a functional group macro for a frame: per-frame first, then shared."""
    if per_frame is not None:
        item = _first_item(per_frame[index], sequence)
        if item is not None:
            return item
    shared = _value(ds, "SharedFunctionalGroupsSequence")
    if shared:
        return _first_item(shared[0], sequence)
    return None


def _group_value(
    ds: Dataset, per_frame: list[Dataset] | None, index: int, sequence: str, keyword: str
) -> Any:
    item = _group_item(ds, per_frame, index, sequence)
    return None if item is None else _value(item, keyword)


def _first_item(container: Dataset, sequence: str) -> Dataset | None:
    items = _value(container, sequence)
    return items[0] if items else None


def _pixel_spacing(
    ds: Dataset, per_frame: list[Dataset] | None
) -> tuple[tuple[float, float] | None, str | None]:
    """Detector spacing first: Pixel Spacing may be calibrated to the patient plane."""
    candidates = (
        ("ImagerPixelSpacing", _value(ds, "ImagerPixelSpacing")),
        (
            "ImagerPixelSpacing",
            _group_value(
                ds, per_frame, 0, "FramePixelDataPropertiesSequence", "ImagerPixelSpacing"
            ),
        ),
        ("PixelSpacing", _value(ds, "PixelSpacing")),
        ("PixelSpacing", _group_value(ds, per_frame, 0, "PixelMeasuresSequence", "PixelSpacing")),
    )
    for source, value in candidates:
        spacing = _spacing_pair(value)
        if spacing is not None:
            return spacing, source
    return None, None


def _frame_angles(
    ds: Dataset, per_frame: list[Dataset] | None, number_of_frames: int, motion: str | None
) -> tuple[FrameGeometry, ...]:
    """Enhanced XA: each frame's Positioner Position item; legacy: first angle + increments."""
    if _group_item(ds, per_frame, 0, "PositionerPositionSequence") is not None:
        frames = []
        for index in range(number_of_frames):
            item = _group_item(ds, per_frame, index, "PositionerPositionSequence")
            if item is None:
                frames.append(FrameGeometry(None, None))
                continue
            frames.append(
                FrameGeometry(
                    _number(_value(item, "PositionerPrimaryAngle")),
                    _number(_value(item, "PositionerSecondaryAngle")),
                )
            )
        return tuple(frames)
    primary = _legacy_axis(ds, "Primary", number_of_frames, motion)
    secondary = _legacy_axis(ds, "Secondary", number_of_frames, motion)
    return tuple(FrameGeometry(p, s) for p, s in zip(primary, secondary, strict=True))


def _legacy_axis(
    ds: Dataset, axis: str, number_of_frames: int, motion: str | None
) -> list[float | None]:
    """One angle per frame: increments are relative to the previous frame, the first is 0."""
    first = _number(_value(ds, f"Positioner{axis}Angle"))
    if number_of_frames == 1:
        return [first]
    increments = _numbers(_value(ds, f"Positioner{axis}AngleIncrement"))
    increment_name = f"Positioner {axis} Angle Increment"
    if increments:
        if len(increments) != number_of_frames:
            raise XrayGeometryError(
                f"{increment_name} has {len(increments)} values for {number_of_frames} frames"
            )
        if first is None:
            return [None] * number_of_frames
        if any(x is None for x in increments[1:]):
            raise XrayGeometryError(f"{increment_name} has a value that is not a number")
        angles = [first]
        for increment in increments[1:]:
            angles.append(angles[-1] + increment)  # type: ignore[operator]
        return angles
    if motion == "STATIC":
        return [first] * number_of_frames
    # DYNAMIC without increments, or Positioner Motion absent or empty (Type 2C: unknown):
    # only the first frame's angle is known.
    return [first] + [None] * (number_of_frames - 1)


def _field_of_view_flips(ds: Dataset) -> tuple[bool, bool]:
    """(rows reversed, columns reversed) of the stored grid relative to the physical detector.

    PS3.3 C.8.7.1.1: the stored image is the detector image rotated clockwise by Field of View
    Rotation (0018,7032), then flipped horizontally when Field of View Horizontal Flip
    (0018,7034) is YES. A half turn reverses rows and columns; a flip reverses columns. A
    quarter turn would swap rows and columns (and the pixel spacing and image size with them);
    it is refused rather than applied half-right.
    """
    rotation_value = _value(ds, "FieldOfViewRotation")
    rotation = _number(rotation_value)
    if rotation is None and _text(rotation_value):
        raise UnsupportedGeometryError(
            f"Field of View Rotation (0018,7032) {_text(rotation_value)!r} is not a number"
        )
    flip_text = _text(_value(ds, "FieldOfViewHorizontalFlip")).upper()
    if flip_text not in ("", "YES", "NO"):
        raise UnsupportedGeometryError(
            f"Field of View Horizontal Flip (0018,7034) {flip_text!r} is neither YES nor NO"
        )
    flipped = flip_text == "YES"
    turn = 0.0 if rotation is None else rotation % 360.0
    if turn == 0.0:
        return False, flipped
    if turn == 180.0:
        return True, not flipped
    if turn in (90.0, 270.0):
        raise UnsupportedGeometryError(
            f"Field of View Rotation (0018,7032) {rotation:g}: quarter-turn rotations are not "
            "applied by this node (detector rows and columns would swap)"
        )
    raise UnsupportedGeometryError(
        f"Field of View Rotation (0018,7032) {rotation:g} is not 0, 90, 180 or 270 degrees"
    )


_OPPOSITE_LETTER = {"L": "R", "R": "L", "A": "P", "P": "A", "H": "F", "F": "H"}


def _undo_flips(
    orientation: tuple[str, ...], rows_reversed: bool, columns_reversed: bool
) -> tuple[str, ...]:
    """Patient Orientation of the detector grid, from that of a stored grid with flips."""

    def opposite(direction: str) -> str:
        return "".join(_OPPOSITE_LETTER.get(c, c) for c in direction.upper())

    values = list(orientation) + [""] * (2 - len(orientation))
    row_direction, column_direction = values[0], values[1]
    if columns_reversed:
        row_direction = opposite(row_direction)
    if rows_reversed:
        column_direction = opposite(column_direction)
    return (row_direction, column_direction, *values[2:])


def _field_of_view_dimensions(ds: Dataset) -> tuple[float, ...] | None:
    values = _numbers(_value(ds, "FieldOfViewDimensions"))
    if not values or any(v is None or v <= 0 for v in values):
        return None
    return tuple(float(v) for v in values)  # type: ignore[arg-type]


def _patient_orientation(ds: Dataset, per_frame: list[Dataset] | None) -> tuple[str, ...]:
    value = _value(ds, "PatientOrientation")
    if not _strings(value):
        value = _group_value(
            ds, per_frame, 0, "PatientOrientationInFrameSequence", "PatientOrientation"
        )
    return _strings(value)


# --- robust value parsing ----------------------------------------------------------------------


def _value(ds: Dataset, keyword: str) -> Any:
    """An attribute's value, or ``None`` when absent or too malformed for pydicom to convert."""
    try:
        return ds.get(keyword)
    except (ValueError, TypeError, OverflowError, KeyError, AttributeError):
        return None


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    if isinstance(value, str):
        value = value.strip()
        return value.split("\\") if value else []
    if isinstance(value, Iterable):
        return list(value)
    return [value]


def _number(value: Any) -> float | None:
    """A DS/IS/FL value as a float; the first of several, ``None`` for empty or garbage."""
    values = _numbers(value)
    return values[0] if values else None


def _numbers(value: Any) -> list[float | None]:
    parsed: list[float | None] = []
    for item in _as_list(value):
        if isinstance(item, bytes):
            item = item.decode("ascii", errors="replace")
        if isinstance(item, str):
            item = item.strip()
        try:
            number = float(item)
        except (TypeError, ValueError):
            parsed.append(None)
            continue
        parsed.append(number if math.isfinite(number) else None)
    return parsed


def _positive(value: Any) -> float | None:
    """A distance or spacing; zero or negative means the device did not know it."""
    number = _number(value)
    return number if number is not None and number > 0 else None


def _positive_int(value: Any) -> int | None:
    number = _number(value)
    if number is None or number <= 0 or number != int(number):
        return None
    return int(number)


def _spacing_pair(value: Any) -> tuple[float, float] | None:
    values = _numbers(value)
    if len(values) != 2:
        return None
    row, column = values
    if row is None or column is None or row <= 0 or column <= 0:
        return None
    return row, column


def _strings(value: Any) -> tuple[str, ...]:
    """A multi-valued CS as stored; all-empty (common in XA) becomes ``()``."""
    values = tuple(str(x).strip() for x in _as_list(value))
    return values if any(values) else ()


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _check_source(name: str, value: Any, source: str | None, allowed: tuple[str, ...]) -> None:
    if (value is None) != (source is None):
        raise ValueError(f"{name} must be set exactly when its value is, got {source!r}")
    if source is not None and source not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, not {source!r}")


# --- shutters and collimators ------------------------------------------------------------------


@dataclass(frozen=True)
class ShutterOutline:
    """A display shutter or collimator as stated, converted to 0-based stored-pixel indices.

    DICOM gives edges, centres and vertices 1-based (row 1, column 1 is the top-left pixel;
    PS3.3 C.7.6.11 and C.8.7.3). Everything here is on the *stored* grid: apply mirroring and
    Field of View flips yourself when working on the image plane.

    Parameters
    ----------
    shapes
        The stated shapes, e.g. ``("CIRCULAR", "RECTANGULAR")``; the open field is their
        intersection.
    rectangle
        ``(top, bottom, left, right)``: first open row, one past the last open row, first open
        column, one past the last open column (numpy slice bounds).
    circle
        ``(centre row, centre column, radius)`` in pixels, centre 0-based.
    polygon
        Vertices as ``(row, column)``, 0-based.
    presentation_value
        Shutter Presentation Value (0018,1622) (display shutters only).
    """

    shapes: tuple[str, ...]
    rectangle: tuple[int, int, int, int] | None = None
    circle: tuple[float, float, float] | None = None
    polygon: tuple[tuple[float, float], ...] | None = None
    presentation_value: int | None = None


def read_display_shutter(ds: Dataset) -> ShutterOutline | None:
    """The Display Shutter module (0018,1600…1622), or ``None`` when absent or unreadable."""
    outline = _read_outline(ds, "Shutter")
    if outline is None:
        return None
    value = _number(_value(ds, "ShutterPresentationValue"))
    return replace(outline, presentation_value=None if value is None else int(value))


def read_collimator(ds: Dataset) -> ShutterOutline | None:
    """The X-Ray Collimator attributes (0018,1700…1720), or ``None`` when absent or unreadable."""
    return _read_outline(ds, "Collimator")


def _read_outline(ds: Dataset, prefix: str) -> ShutterOutline | None:
    shapes = tuple(s.upper() for s in _strings(_value(ds, f"{prefix}Shape")) if s)
    if not shapes:
        return None
    rectangle = circle = polygon = None
    if "RECTANGULAR" in shapes:
        edges = [
            _number(_value(ds, f"{prefix}{name}"))
            for name in (
                "UpperHorizontalEdge",
                "LowerHorizontalEdge",
                "LeftVerticalEdge",
                "RightVerticalEdge",
            )
        ]
        if all(e is not None for e in edges):
            upper, lower, left, right = (round(e) for e in edges)  # type: ignore[arg-type]
            # 1-based inclusive edges -> 0-based slice bounds.
            rectangle = (upper - 1, lower, left - 1, right)
    if "CIRCULAR" in shapes:
        centre = _numbers(_value(ds, f"CenterOfCircular{prefix}"))
        radius = _positive(_value(ds, f"RadiusOfCircular{prefix}"))
        if len(centre) == 2 and None not in centre and radius is not None:
            circle = (centre[0] - 1.0, centre[1] - 1.0, radius)  # type: ignore[operator]
    if "POLYGONAL" in shapes:
        values = _numbers(_value(ds, f"VerticesOfThePolygonal{prefix}"))
        if len(values) >= 6 and len(values) % 2 == 0 and None not in values:
            polygon = tuple(
                (values[i] - 1.0, values[i + 1] - 1.0)  # type: ignore[operator]
                for i in range(0, len(values), 2)
            )
    return ShutterOutline(shapes=shapes, rectangle=rectangle, circle=circle, polygon=polygon)
