"""Assemble one DICOM CT series into a validated HU volume with its voxel → LPS affine."""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from xvr_node.ct_volume import CtVolume

MIN_SLICES = 3
#: Largest difference allowed between two slices' ImageOrientationPatient components.
ORIENTATION_TOLERANCE = 1e-4
#: Row and column cosines written with few decimals are still accepted as unit and orthogonal.
ORTHONORMAL_TOLERANCE = 1e-3
#: Beyond this angle between the slice stack and the slice normal the series is tilted.
MAX_TILT_RAD = 0.01
#: Two slices closer than this along the normal are at the same position.
DUPLICATE_MM = 0.01
#: A gap within max(1 % of the nominal spacing, 0.05 mm) of it is regular.
SPACING_RELATIVE_TOLERANCE = 0.01
SPACING_ABSOLUTE_TOLERANCE_MM = 0.05
PIXEL_SPACING_TOLERANCE_MM = 1e-3
#: Below this GantryDetectorTilt is formatting noise, not a tilt.
GANTRY_TILT_TOLERANCE_DEG = 0.01


class VolumeRefusedError(ValueError):
    """A series that cannot become a volume; .reason is a sentence a person understands."""

    reason: str

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class AssembledVolume:
    """A CT volume built from a series, with the identifiers needed to reference its source.

    ``volume.hu`` is float32 HU indexed [i, j, k] = [column, row, slice]; ``volume.affine_lps``
    maps voxel (i, j, k) to DICOM patient LPS mm. ``sop_instance_uids[k]`` is the instance
    holding slice k (for Enhanced CT the same UID repeats, one entry per frame).
    """

    volume: CtVolume
    series_instance_uid: str
    frame_of_reference_uid: str | None
    sop_instance_uids: list[str]
    slice_spacing_mm: float


@dataclass(frozen=True, eq=False)
class _Slice:
    """One 2D image of the series (a single-frame instance or one frame of a multi-frame)."""

    label: str
    sop_instance_uid: str
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: np.ndarray  # [row spacing, column spacing], as DICOM PixelSpacing
    rows: int
    columns: int
    slope: float
    intercept: float
    rescale_type: str | None
    gantry_tilt_deg: float
    is_ct: bool
    dataset_index: int
    frame_index: int | None  # None for a single-frame instance


def read_series_files(paths: Iterable[Path]) -> list[pydicom.Dataset]:
    """Read each file with its pixel data, so the series can be assembled in memory."""
    datasets = []
    for path in paths:
        try:
            datasets.append(pydicom.dcmread(path))
        except InvalidDicomError as exc:
            raise VolumeRefusedError(f"{path} is not a DICOM file") from exc
    return datasets


def assemble_volume(datasets: Sequence[pydicom.Dataset]) -> AssembledVolume:
    """Validate a series' geometry and stack its slices into one HU volume.

    Everything a registration relies on is checked (one series and orientation, no tilt, no
    duplicate or missing slices, uniform spacing, one pixel grid, valid rescale) so that a
    volume that assembles is one whose affine places every voxel where the scanner put it.
    Raises :class:`VolumeRefusedError` with the reason otherwise.
    """
    datasets = list(datasets)
    count = sum(_frame_count(ds) for ds in datasets)
    if count < MIN_SLICES:
        raise VolumeRefusedError(f"a volume needs at least {MIN_SLICES} slices; series has {count}")
    series_uid = _common_series_uid(datasets)
    frame_of_reference_uid = _common_frame_of_reference(datasets)
    slices = [s for index, ds in enumerate(datasets) for s in _slices_of(ds, index)]
    row, column = _common_orientation(slices)
    _check_same_grid(slices)
    _check_rescale(slices)
    _check_gantry_tilt_attribute(slices)

    direction = _slice_direction(row, column)
    ordered = sorted(slices, key=lambda s: float(s.position @ direction))
    z = np.array([float(s.position @ direction) for s in ordered])
    _check_duplicates(ordered, z)
    _check_perpendicular(ordered, direction)
    spacing = _uniform_spacing(z)

    row_spacing, column_spacing = ordered[0].pixel_spacing
    affine = np.eye(4)
    affine[:3, 0] = row * column_spacing
    affine[:3, 1] = column * row_spacing
    affine[:3, 2] = direction * spacing
    affine[:3, 3] = ordered[0].position
    hu = _stack_hu(ordered, datasets)
    return AssembledVolume(
        volume=CtVolume(hu, affine),
        series_instance_uid=series_uid,
        frame_of_reference_uid=frame_of_reference_uid,
        sop_instance_uids=[s.sop_instance_uid for s in ordered],
        slice_spacing_mm=spacing,
    )


def write_volume_nifti(assembled: AssembledVolume, path: Path) -> None:
    """Write the volume as NIfTI (RAS affine; .nii or .nii.gz) so a crash never leaves half a file.

    The data go to a temporary file in the same folder, are flushed to disk, and the file is
    renamed over ``path``; the folder is then synced so the rename itself survives a crash.
    """
    path = Path(path)
    if path.name.endswith(".nii.gz"):
        compress = True
    elif path.name.endswith(".nii"):
        compress = False
    else:
        raise ValueError(f"a NIfTI path must end with .nii or .nii.gz: {path}")
    volume = assembled.volume
    affine_ras = volume.affine_ras
    image = nib.Nifti1Image(volume.hu.astype(np.float32, copy=False), affine_ras)
    # Scanner coordinates: the affine comes straight from the DICOM patient coordinate system.
    image.set_qform(affine_ras, code=1)
    image.set_sform(affine_ras, code=1)
    image.header.set_xyzt_units("mm")

    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw:
            if compress:
                # Level 1 as nibabel does: CTs are large and compress little better at 9.
                with gzip.GzipFile(
                    filename="", mode="wb", fileobj=raw, compresslevel=1, mtime=0
                ) as gz:
                    image.to_stream(gz)
            else:
                image.to_stream(raw)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


# --- reading slices -------------------------------------------------------------------------


def _instance_label(ds: Dataset, index: int) -> str:
    number = ds.get("InstanceNumber")
    if number is not None and str(number).strip():
        return f"instance {number}"
    uid = ds.get("SOPInstanceUID")
    if uid:
        return f"instance {uid}"
    return f"dataset {index + 1}"


def _is_multiframe_functional(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


def _frame_count(ds: Dataset) -> int:
    try:
        return max(int(ds.get("NumberOfFrames") or 1), 1)
    except (TypeError, ValueError):
        return 1


def _common_series_uid(datasets: list[Dataset]) -> str:
    reference: tuple[str, str] | None = None
    for index, ds in enumerate(datasets):
        label = _instance_label(ds, index)
        uid = str(ds.get("SeriesInstanceUID") or "").strip()
        if not uid:
            raise VolumeRefusedError(
                f"{label} has no SeriesInstanceUID {_tag('SeriesInstanceUID')}"
            )
        if reference is None:
            reference = (uid, label)
        elif uid != reference[0]:
            raise VolumeRefusedError(
                f"{label} belongs to series {uid}, not {reference[0]} like {reference[1]}; "
                "a volume is built from one series"
            )
    assert reference is not None
    return reference[0]


def _common_frame_of_reference(datasets: list[Dataset]) -> str | None:
    """Positions from two frames of reference cannot be compared, so they cannot be stacked."""
    reference: tuple[str, str] | None = None
    for index, ds in enumerate(datasets):
        uid = str(ds.get("FrameOfReferenceUID") or "").strip()
        if not uid:
            continue
        label = _instance_label(ds, index)
        if reference is None:
            reference = (uid, label)
        elif uid != reference[0]:
            raise VolumeRefusedError(
                f"{label} has FrameOfReferenceUID {uid} but {reference[1]} has {reference[0]}; "
                "slice positions in different frames of reference cannot be combined"
            )
    return None if reference is None else reference[0]


def _tag(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _numbers(owner: Dataset | None, keyword: str, count: int, label: str) -> np.ndarray:
    """``count`` finite numbers from ``owner.keyword``, or a refusal naming what is wrong."""
    value = None if owner is None else owner.get(keyword)
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        items = [] if value is None or value in ("", b"") else [value]
    else:
        items = list(value)
    if not items:
        raise VolumeRefusedError(f"{label} has no {keyword} {_tag(keyword)}")
    try:
        numbers = np.array([float(item) for item in items], dtype=float)
    except (TypeError, ValueError):
        numbers = np.array([])
    if numbers.shape != (count,) or not np.all(np.isfinite(numbers)):
        shown = "\\".join(str(item) for item in items)
        raise VolumeRefusedError(
            f"{label} has an invalid {keyword} {_tag(keyword)}: expected {count} numbers, "
            f"got '{shown}'"
        )
    return numbers


def _optional_number(owner: Dataset | None, keyword: str, default: float, label: str) -> float:
    if owner is None or owner.get(keyword) in (None, ""):
        return default
    return float(_numbers(owner, keyword, 1, label)[0])


def _rows_columns(ds: Dataset, label: str) -> tuple[int, int]:
    rows, columns = (int(_numbers(ds, keyword, 1, label)[0]) for keyword in ("Rows", "Columns"))
    if rows < 1 or columns < 1:
        raise VolumeRefusedError(f"{label} has an empty image ({rows} rows, {columns} columns)")
    return rows, columns


def _check_image_pixels(ds: Dataset, label: str) -> None:
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise VolumeRefusedError(f"{label} has no pixel data")
    samples = int(ds.get("SamplesPerPixel") or 1)
    if samples != 1:
        raise VolumeRefusedError(
            f"{label} has {samples} samples per pixel; a volume needs grayscale images"
        )


def _slices_of(ds: Dataset, index: int) -> list[_Slice]:
    label = _instance_label(ds, index)
    _check_image_pixels(ds, label)
    rows, columns = _rows_columns(ds, label)
    common = {
        "sop_instance_uid": str(ds.get("SOPInstanceUID") or ""),
        "rows": rows,
        "columns": columns,
        "is_ct": str(ds.get("Modality") or "").strip().upper() == "CT",
        "dataset_index": index,
    }
    if _is_multiframe_functional(ds):
        return _frames_of(ds, label, common)
    frames = _frame_count(ds)
    if frames > 1:
        raise VolumeRefusedError(
            f"{label} holds {frames} frames without per-frame positions; only single-frame "
            "images or Enhanced CT can be assembled"
        )
    return [
        _Slice(
            label=label,
            position=_numbers(ds, "ImagePositionPatient", 3, label),
            orientation=_numbers(ds, "ImageOrientationPatient", 6, label),
            pixel_spacing=_pixel_spacing(ds, label),
            slope=_optional_number(ds, "RescaleSlope", 1.0, label),
            intercept=_optional_number(ds, "RescaleIntercept", 0.0, label),
            rescale_type=_rescale_type(ds),
            gantry_tilt_deg=_optional_number(ds, "GantryDetectorTilt", 0.0, label),
            frame_index=None,
            **common,
        )
    ]


def _frames_of(ds: Dataset, label: str, common: dict) -> list[_Slice]:
    """Enhanced CT: each frame's geometry and rescale come from its functional groups."""
    frames = _frame_count(ds)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared_sequence = ds.get("SharedFunctionalGroupsSequence") or []
    shared = shared_sequence[0] if len(shared_sequence) else None
    if per_frame and len(per_frame) != frames:
        raise VolumeRefusedError(
            f"{label} has {frames} frames but {len(per_frame)} per-frame functional groups"
        )

    def macro(frame: int, sequence: str) -> Dataset | None:
        own = per_frame[frame] if per_frame else None
        for groups in (own, shared):
            if groups is not None and len(groups.get(sequence) or []):
                return groups[sequence][0]
        return None

    slices = []
    for frame in range(frames):
        frame_label = f"frame {frame + 1} of {label}"
        transform = macro(frame, "PixelValueTransformationSequence")
        acquisition = macro(frame, "CTAcquisitionDetailsSequence")
        slices.append(
            _Slice(
                label=frame_label,
                position=_numbers(
                    macro(frame, "PlanePositionSequence"), "ImagePositionPatient", 3, frame_label
                ),
                orientation=_numbers(
                    macro(frame, "PlaneOrientationSequence"),
                    "ImageOrientationPatient",
                    6,
                    frame_label,
                ),
                pixel_spacing=_pixel_spacing(macro(frame, "PixelMeasuresSequence"), frame_label),
                slope=_optional_number(transform, "RescaleSlope", 1.0, frame_label),
                intercept=_optional_number(transform, "RescaleIntercept", 0.0, frame_label),
                rescale_type=_rescale_type(transform),
                gantry_tilt_deg=_optional_number(
                    acquisition, "GantryDetectorTilt", 0.0, frame_label
                ),
                frame_index=frame,
                **common,
            )
        )
    return slices


def _pixel_spacing(owner: Dataset | None, label: str) -> np.ndarray:
    spacing = _numbers(owner, "PixelSpacing", 2, label)
    if np.any(spacing <= 0):
        raise VolumeRefusedError(
            f"{label} has an invalid PixelSpacing {_tag('PixelSpacing')}: "
            f"{_mm(spacing[0])} × {_mm(spacing[1])} mm is not positive"
        )
    return spacing


def _rescale_type(owner: Dataset | None) -> str | None:
    value = None if owner is None else owner.get("RescaleType")
    text = str(value or "").strip()
    return text or None


# --- geometry checks ------------------------------------------------------------------------


def _common_orientation(slices: list[_Slice]) -> tuple[np.ndarray, np.ndarray]:
    """The series' unit row and column directions, after checking every slice shares them."""
    reference = slices[0]
    row, column = reference.orientation[:3], reference.orientation[3:]
    if (
        abs(np.linalg.norm(row) - 1) > ORTHONORMAL_TOLERANCE
        or abs(np.linalg.norm(column) - 1) > ORTHONORMAL_TOLERANCE
        or abs(row @ column) > ORTHONORMAL_TOLERANCE
    ):
        raise VolumeRefusedError(
            f"{reference.label} has an ImageOrientationPatient {_tag('ImageOrientationPatient')} "
            "whose row and column directions are not orthonormal"
        )
    for other in slices[1:]:
        if np.max(np.abs(other.orientation - reference.orientation)) > ORIENTATION_TOLERANCE:
            angle = _rotation_degrees(reference.orientation, other.orientation)
            rotated = f" (rotated by {_degrees(angle)}°)" if math.isfinite(angle) else ""
            raise VolumeRefusedError(
                f"{other.label} has a different orientation than {reference.label}{rotated}; "
                "a volume needs one orientation"
            )
    # Re-orthonormalise so that the affine is an exact rotation times the spacings.
    row = row / np.linalg.norm(row)
    column = column - (column @ row) * row
    return row, column / np.linalg.norm(column)


def _rotation_degrees(a: np.ndarray, b: np.ndarray) -> float:
    def frame(orientation: np.ndarray) -> np.ndarray:
        row, column = orientation[:3], orientation[3:]
        normal = np.cross(row, column)
        return np.column_stack([row, column, normal]) / np.linalg.norm(
            [row, column, normal], axis=1
        )

    with np.errstate(all="ignore"):
        relative = frame(a).T @ frame(b)
        cosine = np.clip((np.trace(relative) - 1) / 2, -1.0, 1.0)
        return float(np.degrees(np.arccos(cosine)))


def _check_same_grid(slices: list[_Slice]) -> None:
    reference = slices[0]
    for other in slices[1:]:
        if (other.rows, other.columns) != (reference.rows, reference.columns):
            raise VolumeRefusedError(
                f"{other.label} has {other.rows} rows and {other.columns} columns but "
                f"{reference.label} has {reference.rows} rows and {reference.columns} columns"
            )
        if np.max(np.abs(other.pixel_spacing - reference.pixel_spacing)) > (
            PIXEL_SPACING_TOLERANCE_MM
        ):
            raise VolumeRefusedError(
                f"{other.label} has pixel spacing {_spacing_text(other.pixel_spacing)} but "
                f"{reference.label} has {_spacing_text(reference.pixel_spacing)}"
            )


def _check_rescale(slices: list[_Slice]) -> None:
    for s in slices:
        if s.slope == 0:
            raise VolumeRefusedError(
                f"{s.label} has RescaleSlope 0; its pixel values cannot be converted"
            )
    reference = slices[0]
    for other in slices[1:]:
        if other.rescale_type != reference.rescale_type:
            raise VolumeRefusedError(
                f"{other.label} has RescaleType {_quoted(other.rescale_type)} but "
                f"{reference.label} has {_quoted(reference.rescale_type)}"
            )
    for s in slices:
        if s.is_ct and s.rescale_type is not None and s.rescale_type.upper() != "HU":
            raise VolumeRefusedError(
                f"{s.label} has RescaleType '{s.rescale_type}'; a CT volume must be in "
                "Hounsfield units (HU)"
            )


def _check_gantry_tilt_attribute(slices: list[_Slice]) -> None:
    for s in slices:
        if abs(s.gantry_tilt_deg) > GANTRY_TILT_TOLERANCE_DEG:
            raise VolumeRefusedError(
                f"gantry tilt of {_degrees(abs(s.gantry_tilt_deg))}° is not supported"
            )


def _slice_direction(row: np.ndarray, column: np.ndarray) -> np.ndarray:
    """The slice normal, signed so that slices run toward +L, +P or +S (whichever dominates).

    The sign does not depend on file order or InstanceNumber, so one series always gives the
    same voxel grid; axial series run feet to head, as the phantom writes them.
    """
    normal = np.cross(row, column)
    normal /= np.linalg.norm(normal)
    return normal if normal[np.argmax(np.abs(normal))] > 0 else -normal


def _check_duplicates(ordered: list[_Slice], z: np.ndarray) -> None:
    for k in range(len(ordered) - 1):
        if z[k + 1] - z[k] < DUPLICATE_MM:
            raise VolumeRefusedError(
                f"{ordered[k].label} and {ordered[k + 1].label} are both at z={_mm(z[k])}; "
                "a volume needs one slice per position"
            )


def _check_perpendicular(ordered: list[_Slice], direction: np.ndarray) -> None:
    """Slices must stack along their normal: a tilted stack is a sheared, not a regular, grid.

    Beyond MAX_TILT_RAD, or once the stack drifts half a pixel sideways (where the affine
    would misplace voxels), the series is refused.
    """
    offsets = np.array([s.position - ordered[0].position for s in ordered])
    along = offsets @ direction
    sideways = np.linalg.norm(offsets - along[:, None] * direction, axis=1)
    limit = 0.5 * float(np.min(ordered[0].pixel_spacing))
    tilt = math.atan2(sideways[-1], along[-1])
    if tilt > MAX_TILT_RAD or sideways[-1] > limit:
        raise VolumeRefusedError(f"gantry tilt of {_degrees(math.degrees(tilt))}° is not supported")
    worst = int(np.argmax(sideways))
    if sideways[worst] > limit:
        raise VolumeRefusedError(
            f"slice positions do not line up along the slice normal: {ordered[worst].label} "
            f"lies {_mm(sideways[worst])} mm sideways of {ordered[0].label}"
        )


def _uniform_spacing(z: np.ndarray) -> float:
    """The slice spacing, after checking that no slice is missing and spacing is regular.

    The nominal spacing is the median gap; a gap that is a whole multiple of it means missing
    slices. The returned spacing spreads the first-to-last distance evenly, which places both
    end slices exactly; a stack that drifts from that grid is refused too.
    """
    gaps = np.diff(z)
    nominal = float(np.median(gaps))
    tolerance = max(SPACING_RELATIVE_TOLERANCE * nominal, SPACING_ABSOLUTE_TOLERANCE_MM)
    missing: list[str] = []
    regular: list[float] = []
    irregular = False
    skipped = 0
    for k, gap in enumerate(gaps):
        multiple = round(gap / nominal)
        if abs(gap - nominal) <= tolerance:
            regular.append(float(gap))
        elif multiple >= 2 and abs(gap - multiple * nominal) <= tolerance * multiple:
            first = k + 2 + skipped  # 1-based index the first missing slice would have had
            count = multiple - 1
            where = f"between z={_mm(z[k])} and z={_mm(z[k + 1])}"
            if count == 1:
                missing.append(f"slice {first} missing {where}")
            else:
                missing.append(
                    f"{count} slices missing {where} (slices {first} to {first + count - 1})"
                )
            skipped += count
        else:
            irregular = True
            regular.append(float(gap))
    if irregular:
        raise VolumeRefusedError(
            f"spacing varies from {_mm(min(regular))} to {_mm(max(regular))} mm"
        )
    if missing:
        raise VolumeRefusedError("; ".join(missing))
    spacing = float(z[-1] - z[0]) / (len(z) - 1)
    drift = np.abs(z - (z[0] + spacing * np.arange(len(z))))
    worst = int(np.argmax(drift))
    if drift[worst] > tolerance:
        raise VolumeRefusedError(
            f"slice {worst + 1} lies {_mm(drift[worst])} mm off a uniform {_mm(spacing)} mm "
            "spacing; spacing drifts along the series"
        )
    return spacing


# --- pixels ---------------------------------------------------------------------------------


def _stack_hu(ordered: list[_Slice], datasets: list[Dataset]) -> np.ndarray:
    """HU [column, row, slice] as float32: each slice's own rescale applied to its pixels."""
    first = ordered[0]
    hu = np.empty((first.columns, first.rows, len(ordered)), dtype=np.float32)
    decoded: dict[int, np.ndarray] = {}
    for k, s in enumerate(ordered):
        if s.dataset_index not in decoded:
            ds = datasets[s.dataset_index]
            decoded[s.dataset_index] = _decode(ds, _instance_label(ds, s.dataset_index), s)
        pixels = decoded[s.dataset_index]
        image = pixels[0 if s.frame_index is None else s.frame_index]
        hu[:, :, k] = (image.astype(np.float64) * s.slope + s.intercept).T
        if s.frame_index is None:
            del decoded[s.dataset_index]  # single-frame: never needed again
    return hu


def _decode(ds: Dataset, label: str, s: _Slice) -> np.ndarray:
    """All frames of ``ds`` as [frame, row, column]; any installed pydicom plugin may decode."""
    try:
        pixels = np.asarray(ds.pixel_array)
    except Exception as exc:  # pydicom raises several types for missing codecs and bad data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = f" ({syntax.name})" if syntax is not None else ""
        raise VolumeRefusedError(
            f"the pixel data of {label}{name} cannot be decoded: {' '.join(str(exc).split())}"
        ) from exc
    frames = _frame_count(ds)
    if pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.shape != (frames, s.rows, s.columns):
        raise VolumeRefusedError(
            f"the pixel data of {label} decode to shape {pixels.shape}, not {frames} frame(s) "
            f"of {s.rows} rows × {s.columns} columns"
        )
    return pixels


# --- wording --------------------------------------------------------------------------------


def _mm(value: float) -> str:
    """Millimetres to 0.01 mm, without trailing zeros: -112.5, 2.56, -100.0."""
    text = f"{round(float(value), 2) + 0.0:.2f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _degrees(value: float) -> str:
    return f"{value:.1f}" if abs(value) >= 0.1 else f"{value:.2g}"


def _spacing_text(spacing: np.ndarray) -> str:
    return f"{_mm(spacing[0])} × {_mm(spacing[1])} mm"


def _quoted(value: str | None) -> str:
    return "none" if value is None else f"'{value}'"
