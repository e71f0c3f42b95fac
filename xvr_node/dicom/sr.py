"""The registration report: a TID 1500 Comprehensive SR with what the SRO cannot carry."""

from __future__ import annotations

from collections.abc import Sequence

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    ComprehensiveSR,
    DeviceObserverIdentifyingAttributes,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    SourceImageForMeasurement,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from xvr_node.dicom.results import (
    CODING_SCHEME,
    CODING_SCHEME_NAME,
    MANUFACTURER,
    SERIES_DESCRIPTION_REPORT,
    SERIES_NUMBER_REPORT,
    RegistrationResult,
    check_run,
    check_xray,
    copy_patient_extras,
    series_and_instance_uids,
)
from xvr_node.dicom.sro import SPATIAL_REGISTRATION_SOP_CLASS


def _private(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator=CODING_SCHEME, meaning=meaning)


def _ucum(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator="UCUM", meaning=meaning)


#: Concept names of the report (standard where one exists, else 99XVRNODE).
SOURCE_TO_DETECTOR = CodedConcept("113750", "DCM", "Distance Source to Detector")
HORIZONTAL_PIXEL_SPACING = CodedConcept("111026", "DCM", "Horizontal Pixel Spacing")
VERTICAL_PIXEL_SPACING = CodedConcept("111066", "DCM", "Vertical Pixel Spacing")
PRINCIPAL_POINT_COLUMN = _private("XVR001", "Principal point column")
PRINCIPAL_POINT_ROW = _private("XVR002", "Principal point row")
FINAL_SIMILARITY = _private("XVR003", "Final image similarity")
ITERATIONS = _private("XVR004", "Optimizer iterations")
WALL_TIME = _private("XVR005", "Registration wall time")
POSE_INITIALIZER = _private("XVR010", "Pose initializer")
REGISTRATION_QUALITY = _private("XVR011", "Registration quality")
CONFIDENCE = _private("XVR006", "Registration confidence")
PROCEDURE = _private("XVR100", "2D/3D registration of X-ray to CT")
FINDING = _private("XVR101", "X-ray pose in CT")

#: Coded values of the Pose initializer evaluation.
INITIALIZER_CODES = {
    "model": _private("XVR020", "Pose regression model"),
    "dicom": _private("XVR021", "C-arm positioner angles"),
    "fixed": _private("XVR022", "Fixed starting pose"),
    "multistart": _private("XVR023", "Multiple starting poses"),
    "tracking": _private("XVR024", "Pose of the previous frame"),
}

#: Coded values of the Registration quality evaluation (the quality gate's verdict).
QUALITY_CODES = {
    True: _private("XVR030", "Reliable"),
    False: _private("XVR031", "Not reliable"),
}

MM = _ucum("mm", "millimeter")
PIXELS = _ucum("{pixels}", "pixels")
NO_UNITS = _ucum("1", "no units")
ITERATION_UNIT = _ucum("{iterations}", "iterations")
SECONDS = _ucum("s", "second")

#: Device Observer UID (121012, DCM) of xvr-node: one UID for the software, stable.
DEVICE_OBSERVER_UID = generate_uid(entropy_srcs=["xvr-node device observer"])


def coding_scheme_identification() -> CodingSchemeIdentificationItem:
    """The Coding Scheme Identification Sequence item of the ``99XVRNODE`` private codes."""
    return CodingSchemeIdentificationItem(
        designator=CODING_SCHEME,
        name=CODING_SCHEME_NAME,
        version="1.0",
        responsible_organization=MANUFACTURER,
    )


def build_measurement_report(
    xray: Dataset,
    sro: Dataset | None,
    result: RegistrationResult,
    *,
    series_instance_uid: str | None = None,
    instance_number: int = 1,
    series_number: int = SERIES_NUMBER_REPORT,
) -> Dataset:
    """Build the Comprehensive SR (TID 1500 Measurement Report) of one registered X-ray pose.

    One measurement group holds Distance Source to Detector (mm), Vertical/Horizontal Pixel
    Spacing at the detector (mm), the principal point (pixels), the final similarity (no
    units), the iterations and the wall time (s), each with the X-ray as Source of
    Measurement; the initializer is a coded evaluation, software version and model id go
    in Algorithm Identification. The X-ray and the SRO are listed as evidence.

    Parameters
    ----------
    xray
        The registered XA/RF instance: patient, study, Source of Measurement.
    sro
        The Spatial Registration object of the same result
        (:func:`~xvr_node.dicom.sro.build_spatial_registration`): Current Requested
        Procedure Evidence. ``None`` when none is sent (a result the gate found unreliable).
    result
        The figures to report.
    series_instance_uid
        Series Instance UID (0020,000E) of the new series; a new UID when ``None``.
    instance_number
        Instance Number (0020,0013).
    series_number
        Series Number (0020,0011) of the new series.

    Returns
    -------
    pydicom.Dataset
        A highdicom ``ComprehensiveSR`` (Explicit VR Little Endian).
    """
    check_xray(xray, result)
    return _build(
        xray,
        sro,
        [_measurement_group(xray, result, "X-ray pose")],
        software_version=result.software_version,
        series_instance_uid=series_instance_uid,
        instance_number=instance_number,
        series_number=series_number,
    )


def build_run_report(
    xray: Dataset,
    sro: Dataset | None,
    results: Sequence[RegistrationResult],
    *,
    series_instance_uid: str | None = None,
    instance_number: int = 1,
    series_number: int = SERIES_NUMBER_REPORT,
) -> Dataset:
    """Build one Comprehensive SR (TID 1500) for every frame pose of a multi-frame X-ray.

    One Measurement Group (TID 1501) per frame pose, in frame order, each exactly as the
    single pose's group of :func:`build_measurement_report`, with Tracking Identifier
    ``X-ray pose, frame N`` and the X-ray's frame as Source of Measurement: a frame the
    quality gate rejected keeps its group and says so.

    Parameters
    ----------
    xray
        The registered multi-frame XA/RF instance.
    sro
        The run's Spatial Registration object
        (:func:`~xvr_node.dicom.sro.build_run_registration`), listed as evidence; ``None``
        when none is sent (every frame unreliable).
    results
        One result per frame pose, each with ``frame_numbers``.
    series_instance_uid, instance_number, series_number
        As for :func:`build_measurement_report`.
    """
    results = check_run(results)
    for result in results:
        check_xray(xray, result)
    groups = [
        _measurement_group(
            xray, result, "X-ray pose, frame " + ",".join(map(str, result.frame_numbers or []))
        )
        for result in results
    ]
    return _build(
        xray,
        sro,
        groups,
        software_version=results[0].software_version,
        series_instance_uid=series_instance_uid,
        instance_number=instance_number,
        series_number=series_number,
    )


def _measurement_group(
    xray: Dataset, result: RegistrationResult, tracking: str
) -> MeasurementsAndQualitativeEvaluations:
    """The TID 1501 group of one pose: figures, initializer and verdict, per X-ray frame."""
    intrinsics = result.intrinsics
    source = SourceImageForMeasurement(
        referenced_sop_class_uid=xray.SOPClassUID,
        referenced_sop_instance_uid=xray.SOPInstanceUID,
        referenced_frame_numbers=result.frame_numbers,
    )

    def measurement(name: CodedConcept, value: float, unit: CodedConcept) -> Measurement:
        return Measurement(name=name, value=value, unit=unit, referenced_images=[source])

    measurements = [
        measurement(SOURCE_TO_DETECTOR, intrinsics.sid_mm, MM),
        measurement(VERTICAL_PIXEL_SPACING, intrinsics.row_spacing_mm, MM),
        measurement(HORIZONTAL_PIXEL_SPACING, intrinsics.column_spacing_mm, MM),
        measurement(PRINCIPAL_POINT_COLUMN, intrinsics.u0, PIXELS),
        measurement(PRINCIPAL_POINT_ROW, intrinsics.v0, PIXELS),
        measurement(FINAL_SIMILARITY, result.similarity, NO_UNITS),
        measurement(ITERATIONS, result.iterations, ITERATION_UNIT),
        measurement(WALL_TIME, result.wall_time_s, SECONDS),
    ]
    if result.confidence is not None:
        measurements.append(measurement(CONFIDENCE, result.confidence, NO_UNITS))
    parameters = [
        f"initializer: {result.initializer}",
        f"model: {result.model_id or 'none'}",
        f"quality: {result.verdict_words}",
    ]
    evaluations = [QualitativeEvaluation(POSE_INITIALIZER, INITIALIZER_CODES[result.initializer])]
    if result.reliable is not None:
        evaluations.append(
            QualitativeEvaluation(REGISTRATION_QUALITY, QUALITY_CODES[result.reliable])
        )
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=generate_uid(), identifier=tracking),
        finding_type=FINDING,
        algorithm_id=AlgorithmIdentification(
            name=MANUFACTURER,
            version=result.software_version,
            parameters=parameters,
            manufacturer=MANUFACTURER,
        ),
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )


def _build(
    xray: Dataset,
    sro: Dataset | None,
    groups: list[MeasurementsAndQualitativeEvaluations],
    *,
    software_version: str,
    series_instance_uid: str | None,
    instance_number: int,
    series_number: int,
) -> Dataset:
    """The report around its measurement groups, with the X-ray (and SRO) as evidence."""
    if sro is not None and sro.get("SOPClassUID") != SPATIAL_REGISTRATION_SOP_CLASS:
        raise ValueError("sro: SOP Class UID (0008,0016) is not Spatial Registration Storage")
    if sro is not None and sro.get("StudyInstanceUID") != xray.StudyInstanceUID:
        raise ValueError("sro: Study Instance UID (0020,000D) is not the X-ray's study")
    if instance_number < 1:
        raise ValueError(f"Instance Number (0020,0013) must be positive, got {instance_number}")
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=DEVICE_OBSERVER_UID,
            name=MANUFACTURER,
            manufacturer_name=MANUFACTURER,
            model_name=MANUFACTURER,
        ),
    )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE,
        imaging_measurements=groups,
    )
    series_uid, sop_uid = series_and_instance_uids(series_instance_uid, instance_number)
    sr = ComprehensiveSR(
        evidence=[_with_patient_study_type2(xray)] + ([] if sro is None else [sro]),
        content=report,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=SERIES_DESCRIPTION_REPORT,
        manufacturer_model_name=MANUFACTURER,
        software_versions=software_version,
        coding_schemes=[coding_scheme_identification()],
    )
    # No Body Part Examined: the SR Document Series module has none (dciodvfy would call the
    # object Standard Extended).
    copy_patient_extras(sr, xray)
    return sr


#: Type 2 Patient and General Study attributes highdicom copies from the evidence; the node
#: accepts X-rays that omit them (they then become empty, i.e. unknown).
_TYPE_2_COPIED = (
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def _with_patient_study_type2(xray: Dataset) -> Dataset:
    """The X-ray's header (no pixel data copied) with absent Type 2 attributes present, empty."""
    missing = [keyword for keyword in _TYPE_2_COPIED if keyword not in xray]
    if not missing:
        return xray
    header = Dataset()
    for element in xray:
        if element.tag.group != 0x7FE0:
            header.add(element)
    if hasattr(xray, "file_meta"):
        header.file_meta = xray.file_meta
    for keyword in missing:
        setattr(header, keyword, "")
    return header
