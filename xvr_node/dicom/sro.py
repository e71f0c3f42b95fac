"""The Spatial Registration object: an X-ray's registered pose in its CT, for PACS and machines."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

from xvr_node.dicom.results import (
    CONVENTIONS_TEXT,
    MANUFACTURER,
    PRIVATE_COLUMNS,
    PRIVATE_CONVENTIONS,
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    PRIVATE_INITIALIZER,
    PRIVATE_ITERATIONS,
    PRIVATE_MIRRORED,
    PRIVATE_MODEL_ID,
    PRIVATE_PIXEL_SPACING,
    PRIVATE_PRINCIPAL_POINT,
    PRIVATE_ROWS,
    PRIVATE_ROWS_REVERSED,
    PRIVATE_SID,
    PRIVATE_SIMILARITY,
    PRIVATE_SPACING_ESTIMATED,
    PRIVATE_WALL_TIME,
    RUN_CONVENTIONS_TEXT,
    SERIES_DESCRIPTION_REGISTRATION,
    SERIES_NUMBER_REGISTRATION,
    RegistrationResult,
    check_run,
    check_xray,
    copy_patient_extras,
    format_ds,
    now_date_time,
    series_and_instance_uids,
    set_body_part_or_laterality,
)
from xvr_node.geometry import Intrinsics

SPATIAL_REGISTRATION_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.1"

#: Content Label (0070,0080) of every registration xvr-node writes (CS, ≤ 16 characters).
CONTENT_LABEL = "XVR_REGISTRATION"

#: Registration Type Code Sequence (0070,0311) items.
FRAME_OF_REFERENCE_IDENTITY = ("125021", "DCM", "Frame of Reference Identity")
IMAGE_CONTENT_BASED_ALIGNMENT = ("125024", "DCM", "Image Content-based Alignment")

MAX_COMMENT = 64  # Frame of Reference Transformation Comment is LO
MAX_DS = 16

_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
)
_TYPE_2 = {"PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate"}
_TYPE_2 |= {"StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"}


def build_spatial_registration(
    xray: Dataset,
    ct_slices: Sequence[Dataset],
    result: RegistrationResult,
    *,
    series_instance_uid: str | None = None,
    instance_number: int = 1,
    content_creator: str = "",
    series_number: int = SERIES_NUMBER_REGISTRATION,
) -> Dataset:
    """Build the Spatial Registration object (Modality REG) of one registered X-ray pose.

    The object lives in the X-ray's study, in its own series, in the CT's Frame of Reference:
    Registration Sequence item 1 is the CT's Frame of Reference (identity), item 2 the X-ray
    instance (frames) with the ``RIGID`` matrix image plane → CT LPS (docs/dicom-results.md).

    Parameters
    ----------
    xray
        The registered XA/RF instance (header only is enough): patient, study, Referenced
        Image Sequence, Body Part Examined.
    ct_slices
        Headers of the CT instances the X-ray was registered to: one Frame of Reference UID
        (0020,0052); all are listed in the Common Instance Reference module.
    result
        Pose, intrinsics and figures of the registration.
    series_instance_uid
        Series Instance UID (0020,000E) of the new series; a new UID when ``None``.
    instance_number
        Instance Number (0020,0013), also the Content Identification's.
    content_creator
        Content Creator's Name (0070,0084), PN; may be empty for an automatic result.
    series_number
        Series Number (0020,0011) of the new series.

    Returns
    -------
    pydicom.Dataset
        A Part 10-ready dataset (file meta, Explicit VR Little Endian).

    Raises
    ------
    ValueError
        Naming the attribute when the X-ray or the CT cannot be referenced as required.
    """
    return _build(
        xray,
        ct_slices,
        [result],
        run=False,
        series_instance_uid=series_instance_uid,
        instance_number=instance_number,
        content_creator=content_creator,
        series_number=series_number,
    )


def build_run_registration(
    xray: Dataset,
    ct_slices: Sequence[Dataset],
    results: Sequence[RegistrationResult],
    *,
    series_instance_uid: str | None = None,
    instance_number: int = 1,
    content_creator: str = "",
    series_number: int = SERIES_NUMBER_REGISTRATION,
) -> Dataset:
    """Build one Spatial Registration object for the frame poses of a multi-frame X-ray.

    PS3.3 C.20.2 allows several Registration Sequence items: item 1 is the CT's Frame of
    Reference (identity), as in :func:`build_spatial_registration`; then one item per frame
    pose, in frame order, each referencing the X-ray with its Referenced Frame Number and
    holding that frame's ``RIGID`` matrix image plane → CT LPS. The image-plane convention is
    the single pose's. Each frame item carries its own private block (intrinsics, similarity,
    iterations, model, initializer, wall time); the top-level block holds the first frame's
    values, the X-ray's flags and the conventions, so one object stays self-contained.

    Parameters
    ----------
    xray
        The registered multi-frame XA/RF instance (header only is enough).
    ct_slices
        Headers of the CT instances the X-ray was registered to.
    results
        One result per frame pose, each with ``frame_numbers`` (1-based; a frame in one
        result only), all with the same software version and stored-image flags.
    series_instance_uid, instance_number, content_creator, series_number
        As for :func:`build_spatial_registration`.

    Returns
    -------
    pydicom.Dataset
        A Part 10-ready dataset (file meta, Explicit VR Little Endian).

    Raises
    ------
    ValueError
        When ``results`` is empty, a result has no frame numbers, a frame repeats, or the
        results disagree on the X-ray's flags; or as :func:`build_spatial_registration`.
    """
    return _build(
        xray,
        ct_slices,
        check_run(results),
        run=True,
        series_instance_uid=series_instance_uid,
        instance_number=instance_number,
        content_creator=content_creator,
        series_number=series_number,
    )


def _build(
    xray: Dataset,
    ct_slices: Sequence[Dataset],
    results: Sequence[RegistrationResult],
    *,
    run: bool,
    series_instance_uid: str | None,
    instance_number: int,
    content_creator: str,
    series_number: int,
) -> Dataset:
    """The SRO of one pose (``run=False``) or of a cine run's frame poses."""
    for result in results:
        check_xray(xray, result)
    ct = _check_ct(ct_slices, xray)
    if instance_number < 1:
        raise ValueError(f"Instance Number (0020,0013) must be positive, got {instance_number}")

    series_uid, sop_instance_uid = series_and_instance_uids(series_instance_uid, instance_number)
    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SPATIAL_REGISTRATION_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128

    date, time = now_date_time()
    ds.SpecificCharacterSet = xray.get("SpecificCharacterSet", "ISO_IR 100")
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    ds.SOPClassUID = SPATIAL_REGISTRATION_SOP_CLASS
    ds.SOPInstanceUID = sop_instance_uid

    # Patient and General Study: those of the X-ray, so the result files with it.
    for keyword in _PATIENT_STUDY:
        if keyword in xray:
            ds[keyword] = xray[keyword]
        elif keyword in _TYPE_2:
            setattr(ds, keyword, "")
    copy_patient_extras(ds, xray)

    # General Series + Spatial Registration Series.
    ds.Modality = "REG"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate = date
    ds.SeriesTime = time
    ds.SeriesDescription = SERIES_DESCRIPTION_REGISTRATION
    set_body_part_or_laterality(ds, xray, ct)

    # Frame of Reference: the CT's patient space is the registered space.
    ds.FrameOfReferenceUID = ct.FrameOfReferenceUID
    ds.PositionReferenceIndicator = ""

    # General Equipment.
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MANUFACTURER
    ds.SoftwareVersions = results[0].software_version

    # Spatial Registration + Content Identification.
    ds.ContentDate = date
    ds.ContentTime = time
    ds.InstanceNumber = instance_number
    ds.ContentLabel = CONTENT_LABEL
    ds.ContentDescription = _content_description(xray, results, run)
    ds.ContentCreatorName = content_creator
    ds.RegistrationSequence = DicomSequence(
        [_ct_item(ct.FrameOfReferenceUID)]
        + [_xray_item(xray, result, frame_block=run) for result in results]
    )

    # Common Instance Reference.
    _add_common_instance_reference(ds, [xray], ct_slices)

    _add_private_block(ds, results[0], RUN_CONVENTIONS_TEXT if run else CONVENTIONS_TEXT)
    return ds


def _check_ct(ct_slices: Sequence[Dataset], xray: Dataset) -> Dataset:
    if not ct_slices:
        raise ValueError("ct_slices is empty: the CT instances must be referenced")
    first = ct_slices[0]
    for keyword, tag in (
        ("FrameOfReferenceUID", "(0020,0052)"),
        ("StudyInstanceUID", "(0020,000D)"),
        ("SeriesInstanceUID", "(0020,000E)"),
    ):
        values = {str(s.get(keyword, "")) for s in ct_slices}
        if "" in values:
            raise ValueError(f"a CT instance has no {keyword} {tag}")
        if keyword == "FrameOfReferenceUID" and len(values) > 1:
            raise ValueError(f"the CT instances have {len(values)} Frame of Reference UIDs {tag}")
    for s in ct_slices:
        if not s.get("SOPInstanceUID") or not s.get("SOPClassUID"):
            raise ValueError("a CT instance has no SOP Class/Instance UID (0008,0016/0018)")
    ct_patient, xray_patient = first.get("PatientID"), xray.get("PatientID")
    if ct_patient and xray_patient and str(ct_patient) != str(xray_patient):
        raise ValueError(
            f"Patient ID (0010,0020) of the CT ({ct_patient}) is not the X-ray's ({xray_patient})"
        )
    return first


def _content_description(xray: Dataset, results: Sequence[RegistrationResult], run: bool) -> str:
    first = results[0]
    if not run:
        text = (
            f"X-ray {xray.get('Modality', '')} to CT, {first.initializer} initializer, "
            f"similarity {first.similarity:.4g}"
        )
    else:
        lowest = min(result.similarity for result in results)
        text = (
            f"X-ray {xray.get('Modality', '')} run to CT, {len(results)} frame poses, "
            f"similarity >= {lowest:.4g}"
        )
    return text[:64]


def _code_item(code: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    return item


def _matrix_registration(
    matrix: np.ndarray, code: tuple[str, str, str], comment: str
) -> DicomSequence:
    matrix_item = Dataset()
    matrix_item.FrameOfReferenceTransformationMatrix = matrix_values(matrix)
    matrix_item.FrameOfReferenceTransformationMatrixType = "RIGID"
    registration = Dataset()
    registration.FrameOfReferenceTransformationComment = comment[:MAX_COMMENT]
    registration.RegistrationTypeCodeSequence = DicomSequence([_code_item(code)])
    registration.MatrixSequence = DicomSequence([matrix_item])
    return DicomSequence([registration])


def matrix_values(matrix: np.ndarray) -> list[str]:
    """The 16 DS strings (row-major, each ≤ 16 characters) of a 4×4 matrix."""
    values = np.asarray(matrix, dtype=np.float64).reshape(-1)
    if values.size != 16:
        raise ValueError("Frame of Reference Transformation Matrix needs 16 values (4x4)")
    # Round-off below 1e-12 is noise in a rotation or a translation in mm.
    return [format_ds(0.0 if abs(v) < 1e-12 else v) for v in values]


def _ct_item(frame_of_reference_uid: str) -> Dataset:
    item = Dataset()
    item.FrameOfReferenceUID = frame_of_reference_uid
    item.MatrixRegistrationSequence = _matrix_registration(
        np.eye(4), FRAME_OF_REFERENCE_IDENTITY, "CT patient space (LPS, mm) is the registered space"
    )
    return item


def _xray_item(xray: Dataset, result: RegistrationResult, *, frame_block: bool) -> Dataset:
    """The Registration Sequence item of one pose; a run's items carry their own figures."""
    reference = Dataset()
    reference.ReferencedSOPClassUID = xray.SOPClassUID
    reference.ReferencedSOPInstanceUID = xray.SOPInstanceUID
    if result.frame_numbers is not None:
        reference.ReferencedFrameNumber = list(result.frame_numbers)
    item = Dataset()
    item.ReferencedImageSequence = DicomSequence([reference])
    item.MatrixRegistrationSequence = _matrix_registration(
        result.matrix, IMAGE_CONTENT_BASED_ALIGNMENT, "X-ray image plane (mm) to CT LPS (mm)"
    )
    if frame_block:
        _add_private_block(item, result, None)
    return item


def _add_common_instance_reference(
    ds: Dataset, xrays: Iterable[Dataset], ct_slices: Iterable[Dataset]
) -> None:
    """Referenced Series Sequence (this study) and Studies Containing Other Referenced Instances."""
    studies: dict[str, dict[str, list[Dataset]]] = defaultdict(lambda: defaultdict(list))
    seen: set[str] = set()
    for source in [*xrays, *ct_slices]:
        if source.SOPInstanceUID in seen:
            continue
        seen.add(source.SOPInstanceUID)
        instance = Dataset()
        instance.ReferencedSOPClassUID = source.SOPClassUID
        instance.ReferencedSOPInstanceUID = source.SOPInstanceUID
        studies[str(source.StudyInstanceUID)][str(source.SeriesInstanceUID)].append(instance)

    def series_items(series: dict[str, list[Dataset]]) -> DicomSequence:
        items = []
        for series_uid, instances in series.items():
            item = Dataset()
            item.SeriesInstanceUID = series_uid
            item.ReferencedInstanceSequence = DicomSequence(instances)
            items.append(item)
        return DicomSequence(items)

    own = studies.pop(str(ds.StudyInstanceUID), None)
    if own:
        ds.ReferencedSeriesSequence = series_items(own)
    if studies:
        others = []
        for study_uid, series in studies.items():
            item = Dataset()
            item.StudyInstanceUID = study_uid
            item.ReferencedSeriesSequence = series_items(series)
            others.append(item)
        ds.StudiesContainingOtherReferencedInstancesSequence = DicomSequence(others)


def _add_private_block(ds: Dataset, result: RegistrationResult, conventions: str | None) -> None:
    """xvr-node's private block; without ``conventions``, only a frame's own values.

    A run's Registration Sequence items each carry the per-frame part (intrinsics and
    figures); the flags of the X-ray and the conventions are the object's, at the top.
    """
    intrinsics = result.intrinsics
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(PRIVATE_SID, "FD", float(intrinsics.sid_mm))
    block.add_new(
        PRIVATE_PIXEL_SPACING,
        "FD",
        [float(intrinsics.row_spacing_mm), float(intrinsics.column_spacing_mm)],
    )
    block.add_new(PRIVATE_PRINCIPAL_POINT, "FD", [float(intrinsics.u0), float(intrinsics.v0)])
    block.add_new(PRIVATE_ROWS, "US", int(intrinsics.rows))
    block.add_new(PRIVATE_COLUMNS, "US", int(intrinsics.columns))
    block.add_new(PRIVATE_SIMILARITY, "FD", float(result.similarity))
    block.add_new(PRIVATE_ITERATIONS, "UL", int(result.iterations))
    block.add_new(PRIVATE_MODEL_ID, "LO", result.model_id or "")
    block.add_new(PRIVATE_INITIALIZER, "CS", result.initializer.upper())
    block.add_new(PRIVATE_WALL_TIME, "FD", float(result.wall_time_s))
    if conventions is None:
        return
    block.add_new(PRIVATE_MIRRORED, "CS", "YES" if result.mirrored else "NO")
    block.add_new(PRIVATE_ROWS_REVERSED, "CS", "YES" if result.rows_reversed else "NO")
    block.add_new(
        PRIVATE_SPACING_ESTIMATED, "CS", "YES" if result.pixel_spacing_estimated else "NO"
    )
    block.add_new(PRIVATE_CONVENTIONS, "UT", conventions)


# --- reading back ---------------------------------------------------------------------------


def read_registration(
    ds: Dataset, frame: int | None = None
) -> tuple[np.ndarray, Intrinsics, list[int] | None]:
    """The X-ray pose of an xvr-node SRO: matrix (image plane → CT LPS), intrinsics, frames.

    Parameters
    ----------
    ds
        A Spatial Registration object written by :func:`build_spatial_registration` or
        :func:`build_run_registration` (or read back from its file).
    frame
        1-based frame whose pose is wanted; required when the object holds several poses
        (a cine run), see :func:`read_registrations` for all of them.

    Returns
    -------
    tuple
        The 4×4 matrix, the :class:`~xvr_node.geometry.Intrinsics` from the private block,
        and the 1-based Referenced Frame Numbers (``None``: the whole image).
    """
    result = read_registration_result(ds, frame)
    return result.matrix, result.intrinsics, result.frame_numbers


def read_registration_result(ds: Dataset, frame: int | None = None) -> RegistrationResult:
    """Everything an xvr-node SRO carries about one pose, as a :class:`RegistrationResult`.

    ``frame`` picks the pose of that 1-based frame; without it the object must hold one pose.
    """
    results = read_registrations(ds)
    if frame is None:
        if len(results) != 1:
            frames = [f for result in results for f in result.frame_numbers or []]
            raise ValueError(
                f"Registration Sequence (0070,0308) has {len(results)} image items (frames "
                f"{frames}): name the frame, or read them all with read_registrations"
            )
        return results[0]
    for result in results:
        if result.frame_numbers is None or frame in result.frame_numbers:
            return result
    raise ValueError(f"no Registration Sequence item references frame {frame}")


def read_registrations(ds: Dataset) -> list[RegistrationResult]:
    """Every pose of an xvr-node SRO, in item order: one for an image, one per frame of a run."""
    if ds.get("SOPClassUID") != SPATIAL_REGISTRATION_SOP_CLASS:
        raise ValueError("SOP Class UID (0008,0016) is not Spatial Registration Storage")
    items = list(ds.get("RegistrationSequence", []))
    images = [item for item in items if "ReferencedImageSequence" in item]
    if not images:
        raise ValueError("Registration Sequence (0070,0308) has no image item")
    space = [item for item in items if item.get("FrameOfReferenceUID") == ds.FrameOfReferenceUID]
    # Item 1 maps the CT's Frame of Reference into the registered space (identity for us).
    registered_to_ct = np.linalg.inv(_single_matrix(space[0])) if space else np.eye(4)
    top = read_private_block(ds)
    software = ds.get("SoftwareVersions", "")
    if isinstance(software, MultiValue | list):
        software = software[0] if software else ""
    results = []
    for item in images:
        block = read_private_block(ds, item) if len(images) > 1 else top
        frames = item.ReferencedImageSequence[0].get("ReferencedFrameNumber")
        if frames is not None:
            many = isinstance(frames, MultiValue | list)
            frames = [int(f) for f in (frames if many else [frames])]
        results.append(
            RegistrationResult(
                matrix=registered_to_ct @ _single_matrix(item),
                intrinsics=block["intrinsics"],
                similarity=block["similarity"],
                iterations=block["iterations"],
                wall_time_s=block["wall_time_s"],
                initializer=block["initializer"],
                model_id=block["model_id"],
                software_version=str(software) or "unknown",
                frame_numbers=frames,
                mirrored=top["mirrored"],
                rows_reversed=top["rows_reversed"],
                pixel_spacing_estimated=top["pixel_spacing_estimated"],
            )
        )
    return results


def read_private_block(ds: Dataset, item: Dataset | None = None) -> dict:
    """The values of xvr-node's private block (see ``results.PRIVATE_DICTIONARY``).

    With ``item`` (a run's Registration Sequence item), that frame's values come from the
    item's own block and the X-ray's flags from the object's.

    Returns a dict with ``intrinsics``, ``similarity``, ``iterations``, ``wall_time_s``,
    ``initializer``, ``model_id`` (``None`` when empty), ``mirrored``, ``rows_reversed`` and
    ``pixel_spacing_estimated`` (the last two ``False`` in objects written before they were).
    """
    block = _find_block(ds, "the object")
    frame_block = block if item is None else _find_block(item, "a Registration Sequence item")

    def value(offset: int, source=frame_block):
        try:
            return source[offset].value
        except KeyError:
            raise ValueError(
                f"private element ({PRIVATE_GROUP:04X},xx{offset:02X}) of {PRIVATE_CREATOR!r} "
                "is missing"
            ) from None

    row_spacing, column_spacing = (float(x) for x in value(PRIVATE_PIXEL_SPACING))
    u0, v0 = (float(x) for x in value(PRIVATE_PRINCIPAL_POINT))
    return {
        "intrinsics": Intrinsics(
            float(value(PRIVATE_SID)),
            int(value(PRIVATE_ROWS)),
            int(value(PRIVATE_COLUMNS)),
            row_spacing,
            column_spacing,
            (u0, v0),
        ),
        "similarity": float(value(PRIVATE_SIMILARITY)),
        "iterations": int(value(PRIVATE_ITERATIONS)),
        "wall_time_s": float(value(PRIVATE_WALL_TIME)),
        "initializer": str(value(PRIVATE_INITIALIZER)).lower(),
        "model_id": str(value(PRIVATE_MODEL_ID) or "") or None,
        "mirrored": str(value(PRIVATE_MIRRORED, block)).upper() == "YES",
        "rows_reversed": _optional_flag(block, PRIVATE_ROWS_REVERSED),
        "pixel_spacing_estimated": _optional_flag(block, PRIVATE_SPACING_ESTIMATED),
    }


def _find_block(ds: Dataset, where: str):
    try:
        return ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    except KeyError:
        raise ValueError(
            f"private block {PRIVATE_CREATOR!r} in group {PRIVATE_GROUP:04X} of {where} is "
            "missing: the intrinsics cannot be read"
        ) from None


def _optional_flag(block, offset: int) -> bool:
    """A YES/NO private flag added in a later version: absent means NO."""
    try:
        return str(block[offset].value).upper() == "YES"
    except KeyError:
        return False


def _single_matrix(item: Dataset) -> np.ndarray:
    registrations = item.get("MatrixRegistrationSequence", [])
    if len(registrations) != 1 or len(registrations[0].get("MatrixSequence", [])) != 1:
        raise ValueError(
            "expected one Matrix Registration item with one Matrix Sequence (0070,030A) item"
        )
    values = registrations[0].MatrixSequence[0].FrameOfReferenceTransformationMatrix
    return np.array([float(v) for v in values], dtype=np.float64).reshape(4, 4)


# --- our own checks -------------------------------------------------------------------------


def validate_registration(
    ds: Dataset,
    *,
    xray: Dataset | None = None,
    ct_slices: Sequence[Dataset] | None = None,
) -> list[str]:
    """Problems of a Spatial Registration object that ``dciodvfy`` does not report.

    Checks each matrix (16 DS values of ≤ 16 characters, last row 0 0 0 1, ``RIGID``
    rotations orthonormal with det +1), the Frame of Reference Transformation Comment
    (≤ 64 characters), Content Identification, the Common Instance Reference module
    (registered images in Referenced Series Sequence, the CT in Studies Containing Other
    Referenced Instances Sequence) and xvr-node's private block. With ``xray`` and
    ``ct_slices`` the references are checked against those exact instances.

    Returns
    -------
    list of str
        One sentence per problem, naming the attribute; empty when the object is sound.
    """
    problems: list[str] = []
    if ds.get("SOPClassUID") != SPATIAL_REGISTRATION_SOP_CLASS:
        problems.append("SOP Class UID (0008,0016) is not Spatial Registration Storage")
    frame_of_reference = ds.get("FrameOfReferenceUID")
    if not frame_of_reference:
        problems.append("Frame of Reference UID (0020,0052) is missing")

    problems += _content_identification_problems(ds)

    items = list(ds.get("RegistrationSequence", []))
    if not items:
        problems.append("Registration Sequence (0070,0308) is missing or empty")
    registered_images: list[str] = []
    for index, item in enumerate(items, 1):
        where = f"Registration Sequence item {index}"
        if "FrameOfReferenceUID" not in item and "ReferencedImageSequence" not in item:
            problems.append(f"{where}: no Frame of Reference UID and no Referenced Image Sequence")
        for reference in item.get("ReferencedImageSequence", []):
            registered_images.append(str(reference.get("ReferencedSOPInstanceUID", "")))
        problems += _matrix_problems(item, where)
    if (
        frame_of_reference
        and items
        and not any(item.get("FrameOfReferenceUID") == frame_of_reference for item in items)
    ):
        problems.append(
            "no Registration Sequence item registers the object's own Frame of Reference (the CT)"
        )

    problems += _reference_problems(ds, registered_images)
    if xray is not None or ct_slices is not None:
        problems += _source_problems(ds, xray, ct_slices)
    problems += _private_block_problems(ds)
    return problems


def _content_identification_problems(ds: Dataset) -> list[str]:
    problems = []
    for keyword, tag in (
        ("InstanceNumber", "(0020,0013)"),
        ("ContentLabel", "(0070,0080)"),
        ("ContentDate", "(0008,0023)"),
        ("ContentTime", "(0008,0033)"),
    ):
        if ds.get(keyword) in (None, ""):
            problems.append(f"{keyword} {tag} is missing or empty (Type 1)")
    if "ContentDescription" not in ds or "ContentCreatorName" not in ds:
        problems.append("Content Description / Content Creator's Name (Type 2) are missing")
    label = str(ds.get("ContentLabel", ""))
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_ ")
    if len(label) > 16 or not set(label) <= allowed:
        problems.append(f"Content Label (0070,0080) {label!r} is not a valid CS value")
    return problems


def _matrix_problems(item: Dataset, where: str) -> list[str]:
    problems = []
    registrations = item.get("MatrixRegistrationSequence", [])
    if not registrations:
        problems.append(f"{where}: Matrix Registration Sequence (0070,0309) is missing")
    for registration in registrations:
        comment = str(registration.get("FrameOfReferenceTransformationComment", ""))
        if len(comment) > MAX_COMMENT:
            problems.append(
                f"{where}: Frame of Reference Transformation Comment (3006,00C8) has "
                f"{len(comment)} characters, LO allows {MAX_COMMENT}"
            )
        if "RegistrationTypeCodeSequence" not in registration:
            problems.append(f"{where}: Registration Type Code Sequence (0070,030D) is missing")
        matrices = registration.get("MatrixSequence", [])
        if not matrices:
            problems.append(f"{where}: Matrix Sequence (0070,030A) is missing")
        for matrix_item in matrices:
            problems += _one_matrix_problems(matrix_item, where)
    return problems


def _one_matrix_problems(matrix_item: Dataset, where: str) -> list[str]:
    name = "Frame of Reference Transformation Matrix (3006,00C6)"
    values = matrix_item.get("FrameOfReferenceTransformationMatrix")
    if values is None:
        return [f"{where}: {name} is missing"]
    values = list(values) if isinstance(values, MultiValue | list | tuple) else [values]
    if len(values) != 16:
        return [f"{where}: {name} has {len(values)} values, expected 16"]
    problems = []
    long_values = [str(v) for v in values if len(str(v)) > MAX_DS]
    if long_values:
        problems.append(f"{where}: {name} values longer than 16 characters: {long_values}")
    matrix = np.array([float(v) for v in values]).reshape(4, 4)
    if not np.allclose(matrix[3], [0, 0, 0, 1], atol=1e-9):
        problems.append(f"{where}: {name} last row is {matrix[3].tolist()}, not 0 0 0 1")
    kind = str(matrix_item.get("FrameOfReferenceTransformationMatrixType", ""))
    if kind not in ("RIGID", "RIGID_SCALE", "AFFINE"):
        problems.append(f"{where}: Frame of Reference Transformation Matrix Type is {kind!r}")
    if kind == "RIGID":
        rotation = matrix[:3, :3]
        if not np.allclose(rotation.T @ rotation, np.eye(3), atol=1e-6):
            problems.append(f"{where}: {name} rotation is not orthonormal (RIGID)")
        elif np.linalg.det(rotation) < 0:
            problems.append(f"{where}: {name} rotation has det -1, a reflection (RIGID)")
    return problems


def _referenced_instances(series_sequence: Iterable[Dataset], where: str, problems: list[str]):
    """(series UID, instance UID) pairs of a Referenced Series Sequence, noting gaps."""
    pairs = []
    for series in series_sequence:
        series_uid = str(series.get("SeriesInstanceUID", ""))
        if not series_uid:
            problems.append(f"{where}: a Referenced Series item has no Series Instance UID")
        instances = series.get("ReferencedInstanceSequence", [])
        if not instances:
            problems.append(f"{where}: series {series_uid} lists no Referenced Instance Sequence")
        for instance in instances:
            if not instance.get("ReferencedSOPClassUID") or not instance.get(
                "ReferencedSOPInstanceUID"
            ):
                problems.append(f"{where}: a referenced instance lacks its SOP Class/Instance UID")
            pairs.append((series_uid, str(instance.get("ReferencedSOPInstanceUID", ""))))
    return pairs


def _reference_problems(ds: Dataset, registered_images: list[str]) -> list[str]:
    problems: list[str] = []
    own = _referenced_instances(
        ds.get("ReferencedSeriesSequence", []), "Referenced Series Sequence (0008,1115)", problems
    )
    own_instances = {instance for _, instance in own}
    for image in registered_images:
        if image not in own_instances:
            problems.append(
                f"registered image {image} is not in the Referenced Series Sequence (0008,1115)"
            )
    others: set[str] = set()
    where = "Studies Containing Other Referenced Instances Sequence (0008,1200)"
    for study in ds.get("StudiesContainingOtherReferencedInstancesSequence", []):
        if not study.get("StudyInstanceUID"):
            problems.append(f"{where}: an item has no Study Instance UID")
        if study.get("StudyInstanceUID") == ds.get("StudyInstanceUID"):
            problems.append(f"{where}: lists this object's own study")
        series = study.get("ReferencedSeriesSequence", [])
        if not series:
            problems.append(f"{where}: study {study.get('StudyInstanceUID')} lists no series")
        others |= {instance for _, instance in _referenced_instances(series, where, problems)}
    if not (own_instances | others) - set(registered_images):
        problems.append(
            "Common Instance Reference lists no instance of the registered Frame of Reference "
            "(the CT study, series and instances are missing)"
        )
    return problems


def _source_problems(
    ds: Dataset, xray: Dataset | None, ct_slices: Sequence[Dataset] | None
) -> list[str]:
    problems = []
    own = {
        (str(s.get("SeriesInstanceUID")), str(i.get("ReferencedSOPInstanceUID")))
        for s in ds.get("ReferencedSeriesSequence", [])
        for i in s.get("ReferencedInstanceSequence", [])
    }
    other = {
        (
            str(st.get("StudyInstanceUID")),
            str(s.get("SeriesInstanceUID")),
            str(i.get("ReferencedSOPInstanceUID")),
        )
        for st in ds.get("StudiesContainingOtherReferencedInstancesSequence", [])
        for s in st.get("ReferencedSeriesSequence", [])
        for i in s.get("ReferencedInstanceSequence", [])
    }
    study = str(ds.get("StudyInstanceUID", ""))
    if xray is not None:
        if str(xray.StudyInstanceUID) != study:
            problems.append("Study Instance UID (0020,000D) is not the X-ray's study")
        if (str(xray.SeriesInstanceUID), str(xray.SOPInstanceUID)) not in own:
            problems.append("the X-ray series/instance is not in Referenced Series Sequence")
    for ct in ct_slices or []:
        if str(ct.get("FrameOfReferenceUID")) != str(ds.get("FrameOfReferenceUID")):
            problems.append("Frame of Reference UID (0020,0052) is not the CT's")
            break
    missing = 0
    for ct in ct_slices or []:
        key = (str(ct.SeriesInstanceUID), str(ct.SOPInstanceUID))
        if str(ct.StudyInstanceUID) == study:
            missing += key not in own
        else:
            missing += (str(ct.StudyInstanceUID), *key) not in other
    if missing:
        problems.append(
            f"{missing} CT instance(s) are missing from the Common Instance Reference module"
        )
    return problems


def _private_block_problems(ds: Dataset) -> list[str]:
    """The object's block, and each frame item's when it holds a run's several poses."""
    images = [
        item for item in ds.get("RegistrationSequence", []) if "ReferencedImageSequence" in item
    ]
    problems = []
    for item in [None, *images] if len(images) > 1 else [None]:
        try:
            read_private_block(ds, item)
        except (ValueError, TypeError) as error:
            problems.append(f"cannot read the intrinsics back: {error}")
    return problems
