"""What a registration produced, and the pieces the three result objects share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom.datadict import add_private_dict_entries
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from xvr_node import clock
from xvr_node.geometry import Intrinsics, check_rigid

#: How the pose search started (the ``initializer`` of a :class:`RegistrationResult`).
INITIALIZERS = ("model", "dicom", "fixed", "multistart", "tracking")

#: Manufacturer (0008,0070) of every object xvr-node writes.
MANUFACTURER = "xvr-node"

#: Series Description (0008,103E) of each result series.
SERIES_DESCRIPTION_REGISTRATION = "xvr-node registration"
SERIES_DESCRIPTION_REPORT = "xvr-node registration report"
SERIES_DESCRIPTION_OVERLAY = "xvr-node overlay"

#: Default Series Number (0020,0011) of each result series.
SERIES_NUMBER_REGISTRATION = 900
SERIES_NUMBER_REPORT = 901
SERIES_NUMBER_OVERLAY = 902

# --- the private block of the Spatial Registration object ----------------------------------

#: Private group and Private Creator (0071,00xx) of the block that mirrors the intrinsics.
PRIVATE_GROUP = 0x0071
PRIVATE_CREATOR = "XVR-NODE 1.0"

#: Element offsets inside the block: tag (0071,xxEE) where xx is the reserved block.
PRIVATE_SID = 0x01  # FD, mm: Distance Source to Detector used
PRIVATE_PIXEL_SPACING = 0x02  # FD VM 2, mm: row spacing, column spacing at the detector
PRIVATE_PRINCIPAL_POINT = 0x03  # FD VM 2, pixels: u0 (column), v0 (row)
PRIVATE_ROWS = 0x04  # US
PRIVATE_COLUMNS = 0x05  # US
PRIVATE_SIMILARITY = 0x06  # FD, unitless: final image similarity
PRIVATE_ITERATIONS = 0x07  # UL: optimiser iterations
PRIVATE_MODEL_ID = 0x08  # LO: pose-regression model identifier (empty: none)
PRIVATE_MIRRORED = 0x09  # CS: YES when stored columns run opposite to image-plane x
PRIVATE_INITIALIZER = 0x0A  # CS: MODEL, DICOM, FIXED, MULTISTART or TRACKING
PRIVATE_WALL_TIME = 0x0B  # FD, s: registration wall time
PRIVATE_ROWS_REVERSED = 0x0C  # CS: YES when stored rows run opposite to image-plane y
PRIVATE_SPACING_ESTIMATED = 0x0D  # CS: YES when the pixel spacing is an estimate, not stated
PRIVATE_CONVENTIONS = 0x10  # UT: the image-plane convention, in words

#: (offset, VR, VM, keyword, name) of each private element, for the conformance statement.
PRIVATE_DICTIONARY: tuple[tuple[int, str, str, str, str], ...] = (
    (PRIVATE_SID, "FD", "1", "XvrSourceToDetectorDistance", "Source to Detector Distance"),
    (PRIVATE_PIXEL_SPACING, "FD", "2", "XvrDetectorPixelSpacing", "Detector Pixel Spacing"),
    (PRIVATE_PRINCIPAL_POINT, "FD", "2", "XvrPrincipalPoint", "Principal Point"),
    (PRIVATE_ROWS, "US", "1", "XvrRows", "Image Rows"),
    (PRIVATE_COLUMNS, "US", "1", "XvrColumns", "Image Columns"),
    (PRIVATE_SIMILARITY, "FD", "1", "XvrSimilarity", "Final Image Similarity"),
    (PRIVATE_ITERATIONS, "UL", "1", "XvrIterations", "Optimizer Iterations"),
    (PRIVATE_MODEL_ID, "LO", "1", "XvrModelID", "Pose Model Identifier"),
    (PRIVATE_MIRRORED, "CS", "1", "XvrMirrored", "Stored Image Mirrored"),
    (PRIVATE_INITIALIZER, "CS", "1", "XvrInitializer", "Pose Initializer"),
    (PRIVATE_WALL_TIME, "FD", "1", "XvrWallTime", "Registration Wall Time"),
    (PRIVATE_ROWS_REVERSED, "CS", "1", "XvrRowsReversed", "Stored Image Rows Reversed"),
    (PRIVATE_SPACING_ESTIMATED, "CS", "1", "XvrSpacingEstimated", "Pixel Spacing Estimated"),
    (PRIVATE_CONVENTIONS, "UT", "1", "XvrConventions", "Coordinate Conventions"),
)

#: The image-plane convention, written into the private block (and the docs).
CONVENTIONS_TEXT = (
    "Registration item 2 matrix M (RIGID, row-major) maps X-ray image-plane mm to the CT "
    "patient coordinates (LPS, mm) of the Frame of Reference of this object. Image plane: "
    "origin at the centre of the top-left pixel of the image as seen from the detector looking "
    "toward the source; +x along a row (increasing column); +y down a column (increasing "
    "row); +z = x cross y, toward the X-ray source; mm on the detector (Imager Pixel Spacing). "
    "The source is at M (u0*column spacing, v0*row spacing, SID, 1). When Mirrored is YES the "
    "stored column j is image-plane column (Columns - 1 - j); when Rows Reversed is YES the "
    "stored row i is image-plane row (Rows - 1 - i)."
)

#: The convention as a cine run's SRO states it: one image item per frame, same geometry.
RUN_CONVENTIONS_TEXT = CONVENTIONS_TEXT.replace(
    "Registration item 2 matrix M",
    "The matrix M of each Registration item from item 2 on (one per frame, see its "
    "Referenced Frame Number; per-frame intrinsics in the item's private block)",
)

add_private_dict_entries(
    PRIVATE_CREATOR,
    {
        (PRIVATE_GROUP << 16) | 0x1000 | offset: (vr, vm, name, keyword)
        for offset, vr, vm, keyword, name in PRIVATE_DICTIONARY
    },
)

# --- private codes (SR) ---------------------------------------------------------------------

#: Coding Scheme Designator of xvr-node's private codes.
CODING_SCHEME = "99XVRNODE"
CODING_SCHEME_NAME = "xvr-node private codes"


@dataclass(eq=False)
class RegistrationResult:
    """One registered pose of an X-ray (a whole image, or some frames of a cine run).

    Parameters
    ----------
    matrix
        4×4 rigid transform, image-plane mm → CT LPS mm (docs/geometry.md): becomes the
        ``RIGID`` Frame of Reference Transformation Matrix (3006,00C6) of the SRO.
    intrinsics
        The detector model used: SID, Imager Pixel Spacing, principal point, image size.
    similarity
        Final image similarity of the optimiser (unitless; higher is better).
    iterations
        Number of optimiser iterations.
    wall_time_s
        Wall-clock time of the registration, seconds.
    initializer
        How the pose search started: one of :data:`INITIALIZERS`.
    model_id
        Identifier of the pose-regression model (``None`` when no model was used).
    software_version
        xvr-node version: Software Versions (0018,1020).
    frame_numbers
        1-based frames the pose holds for (Referenced Frame Number); ``None``: whole image.
    mirrored
        Whether the X-ray stores its columns mirrored (seen from the source, or Field of View
        Horizontal Flip / Rotation 180).
    rows_reversed
        Whether the X-ray stores its rows reversed (Field of View Rotation 180).
    pixel_spacing_estimated
        Whether the intrinsics' pixel spacing is an estimate (from the field size), not stated.
    reliable, confidence, quality_reasons
        The quality gate's verdict: ``reliable`` is ``None`` for results from before the gate;
        ``confidence`` in [0, 1]; the reasons say why a result is not reliable.
    """

    matrix: np.ndarray
    intrinsics: Intrinsics
    similarity: float
    iterations: int
    wall_time_s: float
    initializer: str
    model_id: str | None
    software_version: str
    frame_numbers: list[int] | None = field(default=None)
    mirrored: bool = False
    reliable: bool | None = None
    confidence: float | None = None
    quality_reasons: list[str] = field(default_factory=list)

    @property
    def verdict_words(self) -> str:
        """The gate's verdict in words, for the overlay legend and the SR."""
        if self.reliable is None:
            return "not assessed"
        if self.reliable:
            return "reliable"
        return "NOT RELIABLE" + (
            ": " + "; ".join(self.quality_reasons) if self.quality_reasons else ""
        )

    rows_reversed: bool = False
    pixel_spacing_estimated: bool = False

    def __post_init__(self) -> None:
        matrix = np.array(self.matrix, dtype=np.float64)
        try:
            check_rigid(matrix, tolerance=1e-5)
        except ValueError as error:
            raise ValueError(f"matrix (image plane -> CT LPS): {error}") from None
        self.matrix = matrix
        if not isinstance(self.intrinsics, Intrinsics):
            raise TypeError("intrinsics must be an xvr_node.geometry.Intrinsics")
        if self.initializer not in INITIALIZERS:
            raise ValueError(
                f"initializer must be one of {', '.join(INITIALIZERS)}, not {self.initializer!r}"
            )
        if not np.isfinite(self.similarity):
            raise ValueError(f"similarity must be finite, got {self.similarity}")
        if int(self.iterations) != self.iterations or self.iterations < 0:
            raise ValueError(f"iterations must be a non-negative integer, got {self.iterations}")
        self.iterations = int(self.iterations)
        if not np.isfinite(self.wall_time_s) or self.wall_time_s < 0:
            raise ValueError(f"wall_time_s must be a non-negative number, got {self.wall_time_s}")
        if not self.software_version:
            raise ValueError("software_version (Software Versions 0018,1020) must not be empty")
        if self.model_id is not None and len(self.model_id) > 64:
            raise ValueError("model_id must fit a LO value (64 characters)")
        if self.frame_numbers is not None:
            frames = [int(f) for f in self.frame_numbers]
            if not frames or any(f < 1 for f in frames):
                raise ValueError(
                    "frame_numbers (Referenced Frame Number) must be 1-based and non-empty"
                )
            self.frame_numbers = frames
        self.mirrored = bool(self.mirrored)
        self.rows_reversed = bool(self.rows_reversed)
        self.pixel_spacing_estimated = bool(self.pixel_spacing_estimated)


# --- small shared helpers -------------------------------------------------------------------


def format_ds(value: float) -> str:
    """A Decimal String of at most 16 characters, as precise as fits."""
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"a DS value must be finite, got {value}")
    if value == 0:
        return "0"
    for digits in range(12, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    raise ValueError(f"{value} does not fit a 16-character DS")  # pragma: no cover


def series_and_instance_uids(
    series_instance_uid: str | None, instance_number: int
) -> tuple[str, str]:
    """(Series, SOP Instance UID) of a new result object.

    Given a series UID, the instance UID follows from it and the Instance Number: an export
    that runs again after a crash rebuilds the very objects a PACS may already hold, and the
    PACS sees the same object again, not a second result. Without one, both are new.
    """
    if series_instance_uid is None:
        return generate_uid(), generate_uid()
    entropy = [series_instance_uid, "instance", str(instance_number)]
    return series_instance_uid, generate_uid(entropy_srcs=entropy)


def now_date_time() -> tuple[str, str]:
    """Content Date and Time (DA, TM) for an object created now."""
    now = clock.now().astimezone()  # local time, as DICOM dates and times are
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")


def body_part_examined(*sources: Dataset) -> str | None:
    """Body Part Examined (0018,0015) of the first source that has one."""
    for source in sources:
        value = source.get("BodyPartExamined")
        if value:
            return str(value)
    return None


def set_body_part_or_laterality(target: Dataset, *sources: Dataset) -> None:
    """Body Part Examined from the first source that has one, else an empty Laterality.

    General Series Laterality (0020,0060) is Type 2C; without Body Part Examined dciodvfy
    requires it, and real X-rays often carry neither: empty means unknown.
    """
    body_part = body_part_examined(*sources)
    if body_part:
        target.BodyPartExamined = body_part
    elif "Laterality" not in target:
        target.Laterality = ""


def copy_patient_extras(target: Dataset, source: Dataset) -> None:
    """Patient attributes highdicom does not copy, so PACS files the object with its source."""
    for keyword in ("IssuerOfPatientID", "OtherPatientIDsSequence", "StudyDescription"):
        if keyword in source and keyword not in target:
            target[keyword] = source[keyword]


def check_xray(xray: Dataset, result: RegistrationResult) -> None:
    """Raise ``ValueError`` naming the attribute when ``xray`` does not fit ``result``."""
    for keyword, tag in (
        ("SOPClassUID", "(0008,0016)"),
        ("SOPInstanceUID", "(0008,0018)"),
        ("StudyInstanceUID", "(0020,000D)"),
        ("SeriesInstanceUID", "(0020,000E)"),
        ("PatientID", "(0010,0020)"),
    ):
        if not xray.get(keyword):
            raise ValueError(f"the X-ray has no {keyword} {tag}")
    rows, columns = int(xray.get("Rows", 0)), int(xray.get("Columns", 0))
    if (rows, columns) != (result.intrinsics.rows, result.intrinsics.columns):
        raise ValueError(
            f"Rows/Columns (0028,0010/0011) of the X-ray are {rows}x{columns}, the registration "
            f"used {result.intrinsics.rows}x{result.intrinsics.columns}"
        )
    if result.frame_numbers is not None:
        frames = int(xray.get("NumberOfFrames", 1) or 1)
        bad = [f for f in result.frame_numbers if f > frames]
        if bad:
            raise ValueError(
                f"Referenced Frame Number {bad} exceeds Number of Frames (0028,0008) = {frames}"
            )


def check_run(results: Sequence[RegistrationResult]) -> list[RegistrationResult]:
    """The frame poses of one multi-frame X-ray in frame order; ``ValueError`` if they clash.

    Every result must name its frames, no frame may appear twice, and the software version
    and the stored-image flags (mirrored, rows reversed, estimated spacing) belong to the
    X-ray, so all results must agree on them.
    """
    results = list(results)
    if not results:
        raise ValueError("results is empty: a run needs at least one frame pose")
    seen: set[int] = set()
    for result in results:
        if result.frame_numbers is None:
            raise ValueError(
                "a run's result has no frame_numbers (Referenced Frame Number): "
                "a whole-image pose is not a frame pose"
            )
        repeated = seen & set(result.frame_numbers)
        if repeated:
            raise ValueError(f"Referenced Frame Number {sorted(repeated)} is in two results")
        seen |= set(result.frame_numbers)
    for name in ("software_version", "mirrored", "rows_reversed", "pixel_spacing_estimated"):
        values = {getattr(result, name) for result in results}
        if len(values) > 1:
            raise ValueError(f"the run's results disagree on {name}: {sorted(map(str, values))}")
    return sorted(results, key=lambda result: min(result.frame_numbers or [0]))
