"""The three result objects: Spatial Registration, measurement report SR, overlay SC."""

from __future__ import annotations

import copy
import json
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from scipy import ndimage

from tests.support.tools import dciodvfy_errors, require_tool
from xvr_node.dicom.results import (
    CODING_SCHEME,
    PRIVATE_CREATOR,
    RegistrationResult,
)
from xvr_node.dicom.sc import (
    MULTIFRAME_TRUE_COLOR_SC,
    build_overlay,
    build_run_overlay,
    compose_overlay,
    overlay_legend,
)
from xvr_node.dicom.sr import build_measurement_report, build_run_report
from xvr_node.dicom.sro import (
    build_run_registration,
    build_spatial_registration,
    read_registration,
    read_registration_result,
    read_registrations,
    validate_registration,
)
from xvr_node.geometry import (
    Intrinsics,
    invert_rigid,
    patient_orientation,
    project,
    stored_column,
)

pytestmark = pytest.mark.slow  # the phantom fixture renders DRRs

SRO_CLASS = "1.2.840.10008.5.1.4.1.1.66.1"
CASES = {
    "single-frame XA": lambda record: (
        record["modality"] == "XA" and record["number_of_frames"] == 1
    ),
    "single-frame RF": lambda record: record["modality"] == "RF",
    "cine frame 2": lambda record: record["number_of_frames"] > 1 and record["frame_number"] == 2,
}


# --- building blocks --------------------------------------------------------------------------


def load_truth(phantom_dir: Path) -> dict:
    return json.loads((phantom_dir / "truth.json").read_text())


def pick(truth: dict, case: str) -> dict:
    return next(record for record in truth["xrays"] if CASES[case](record))


def ct_datasets(phantom_dir: Path, truth: dict, pixels: bool = False) -> list[Dataset]:
    folder = phantom_dir / truth["ct"]["folder"]
    return [
        pydicom.dcmread(path, stop_before_pixels=not pixels)
        for path in sorted(folder.glob("*.dcm"))
    ]


def result_from_truth(record: dict, xray: Dataset) -> RegistrationResult:
    multiframe = int(xray.get("NumberOfFrames", 1) or 1) > 1
    return RegistrationResult(
        matrix=np.array(record["matrix"]),
        intrinsics=Intrinsics.from_json(record),
        similarity=0.8731,
        iterations=250,
        wall_time_s=4.25,
        initializer="model",
        model_id="xvr-phantom-chest-v1",
        software_version="0.1.0",
        frame_numbers=[record["frame_number"]] if multiframe else None,
        mirrored=record["mirrored"],
    )


def xray_frame(xray: Dataset, record: dict) -> np.ndarray:
    pixels = xray.pixel_array
    return pixels[record["frame_number"] - 1] if pixels.ndim == 3 else pixels


def projected_ct_edges(ct: list[Dataset], result: RegistrationResult) -> np.ndarray:
    """Edges of a crude numpy DRR of the CT through the pose: what the overlay should show.

    Every voxel is splatted, weighted by HU + 1000, onto the stored pixel it projects to; the
    strongest 15 % of the smoothed image's gradient, thinned to its outline, are the edges.
    """
    points, weights = [], []
    for slice_ in ct:
        hu = slice_.pixel_array * float(slice_.RescaleSlope) + float(slice_.RescaleIntercept)
        rows, columns = np.nonzero(hu > -1000)
        row_dir = np.array(slice_.ImageOrientationPatient[:3], dtype=float)
        column_dir = np.array(slice_.ImageOrientationPatient[3:], dtype=float)
        row_spacing, column_spacing = (float(x) for x in slice_.PixelSpacing)
        origin = np.array(slice_.ImagePositionPatient, dtype=float)
        points.append(
            origin
            + np.outer(columns * column_spacing, row_dir)
            + np.outer(rows * row_spacing, column_dir)
        )
        weights.append(np.minimum(hu[rows, columns], 3000.0) + 1000.0)
    intrinsics = result.intrinsics
    uv = project(result.matrix, intrinsics, np.concatenate(points))
    u = np.rint(stored_column(uv[:, 0], intrinsics.columns, result.mirrored)).astype(int)
    v = np.rint(uv[:, 1]).astype(int)
    inside = (u >= 0) & (u < intrinsics.columns) & (v >= 0) & (v < intrinsics.rows)
    drr = np.bincount(
        v[inside] * intrinsics.columns + u[inside],
        weights=np.concatenate(weights)[inside],
        minlength=intrinsics.rows * intrinsics.columns,
    ).reshape(intrinsics.rows, intrinsics.columns)
    # Smooth over the gaps between projected voxel centres (5 mm slices on a fine detector).
    positions = np.array([slice_.ImagePositionPatient for slice_ in ct], dtype=float)
    voxel_mm = max(
        float(np.median(np.linalg.norm(np.diff(positions, axis=0), axis=1))),
        *(float(x) for x in ct[0].PixelSpacing),
    )
    centre = positions.mean(axis=0)
    depth = intrinsics.sid_mm - (invert_rigid(result.matrix) @ np.r_[centre, 1.0])[2]
    magnification = intrinsics.sid_mm / depth
    pixel_mm = min(intrinsics.row_spacing_mm, intrinsics.column_spacing_mm)
    drr = ndimage.gaussian_filter(drr, max(1.5, 0.6 * voxel_mm * magnification / pixel_mm))
    gradient = np.hypot(ndimage.sobel(drr, 0), ndimage.sobel(drr, 1))
    strong = gradient > np.percentile(gradient, 85)
    return strong & ~ndimage.binary_erosion(strong)


def write_reference_overlay(phantom_dir: Path, out_png: Path, case: str = "single-frame RF"):
    """The docs picture: an X-ray with its true pose's projected CT edges, as the SC shows it.

    Regenerate docs/images/overlay-example.png with the test session's phantom spec, e.g.
    ``write_reference_overlay(phantom_dir, Path("docs/images/overlay-example.png"))``.
    """
    truth = load_truth(phantom_dir)
    record = pick(truth, case)
    xray = pydicom.dcmread(phantom_dir / record["file"])
    result = result_from_truth(record, xray)
    edges = projected_ct_edges(ct_datasets(phantom_dir, truth, pixels=True), result)
    rgb = compose_overlay(xray_frame(xray, record), edges, overlay_legend(result))
    sc = build_overlay(xray, rgb, result)
    shown = sc.pixel_array
    Image.fromarray(shown).save(out_png)
    return sc


@pytest.fixture(scope="module")
def truth(phantom_dir) -> dict:
    return load_truth(phantom_dir)


@pytest.fixture(scope="module")
def ct(phantom_dir, truth) -> list[Dataset]:
    return ct_datasets(phantom_dir, truth)


@pytest.fixture(scope="module", params=list(CASES))
def built(request, phantom_dir, truth, ct) -> dict:
    """The three objects for one registered X-ray (or frame), from the phantom's truth."""
    record = pick(truth, request.param)
    xray = pydicom.dcmread(phantom_dir / record["file"])
    result = result_from_truth(record, xray)
    sro = build_spatial_registration(xray, ct, result, content_creator="")
    sr = build_measurement_report(xray, sro, result)
    edges = np.zeros((xray.Rows, xray.Columns), dtype=bool)
    u, v = record["bead_px"]
    rows, columns = np.ogrid[: xray.Rows, : xray.Columns]
    ring = np.hypot(columns - u, rows - v)
    edges |= (ring > 3) & (ring < 4.5)  # the projected bead, drawn as a ring
    rgb = compose_overlay(xray_frame(xray, record), edges, overlay_legend(result))
    sc = build_overlay(xray, rgb, result)
    return {"record": record, "xray": xray, "result": result, "sro": sro, "sr": sr, "sc": sc}


def write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


# --- (1) every object passes dciodvfy ------------------------------------------------------


@pytest.mark.parametrize("name", ["sro", "sr", "sc"])
def test_objects_pass_dciodvfy(built, name, tmp_path):
    path = write(built[name], tmp_path / f"{name}.dcm")
    assert dciodvfy_errors(path) == []


#: Type 3 attributes real X-rays often lack, and Type 2 ones they often leave empty.
OPTIONAL_ABSENT = (
    "BodyPartExamined",
    "Laterality",
    "ImageLaterality",
    "StudyDescription",
    "SeriesDescription",
    "InstitutionName",
    "StationName",
    "ManufacturerModelName",
    "IssuerOfPatientID",
)
TYPE_2_EMPTY = (
    "PatientOrientation",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
    "Manufacturer",
)


def without_optional_attributes(ds: Dataset) -> Dataset:
    bare = copy.deepcopy(ds)
    for keyword in OPTIONAL_ABSENT:
        if keyword in bare:
            delattr(bare, keyword)
    for keyword in TYPE_2_EMPTY:
        setattr(bare, keyword, "")
    return bare


@pytest.fixture(scope="module", params=list(CASES))
def bare_built(request, phantom_dir, truth, ct) -> dict:
    """The three objects for an X-ray and CT that carry none of the optional attributes."""
    record = pick(truth, request.param)
    xray = without_optional_attributes(pydicom.dcmread(phantom_dir / record["file"]))
    bare_ct = [without_optional_attributes(slice_) for slice_ in ct]
    result = result_from_truth(record, xray)
    result.rows_reversed = True  # the flags of a half-turned, estimated image travel along
    result.pixel_spacing_estimated = True
    sro = build_spatial_registration(xray, bare_ct, result, content_creator="")
    sr = build_measurement_report(xray, sro, result)
    edges = np.zeros((xray.Rows, xray.Columns), dtype=bool)
    rgb = compose_overlay(xray_frame(xray, record), edges, overlay_legend(result))
    sc = build_overlay(xray, rgb, result)
    return {"xray": xray, "result": result, "sro": sro, "sr": sr, "sc": sc}


@pytest.mark.parametrize("name", ["sro", "sr", "sc"])
def test_objects_pass_dciodvfy_when_the_inputs_lack_optional_attributes(bare_built, name, tmp_path):
    assert "BodyPartExamined" not in bare_built["xray"]
    path = write(bare_built[name], tmp_path / f"{name}.dcm")
    assert dciodvfy_errors(path) == []


def test_sro_keeps_the_half_turn_and_estimate_flags(bare_built, tmp_path):
    back = read_registration_result(pydicom.dcmread(write(bare_built["sro"], tmp_path / "sro.dcm")))
    assert back.rows_reversed is True
    assert back.pixel_spacing_estimated is True
    # Without the X-ray's Patient Orientation the SC states the stored grid's: a half-turned
    # image's rows run the other way, so its column direction is the opposite one.
    result = bare_built["result"]
    row, column = patient_orientation(result.matrix, result.mirrored)
    opposite = {"L": "R", "R": "L", "A": "P", "P": "A", "H": "F", "F": "H"}
    assert list(bare_built["sc"].PatientOrientation) == [
        row,
        "".join(opposite[c] for c in column),
    ]


@pytest.mark.parametrize("device", ["OEC 9900 RF", "Innova XA cine"])
def test_objects_from_device_shaped_xrays_pass_dciodvfy(device, truth, ct, tmp_path):
    """Real devices' header shapes: 16-bit DISP RF without orientation, 8-bit XA cine."""
    from tests.support.device_headers import innova_xa, oec9900_rf
    from xvr_node.xray_geometry import read_xray_geometry

    xray = oec9900_rf(matrix=64) if device.startswith("OEC") else innova_xa(3, 64)
    xray.PatientID = ct[0].PatientID  # registered to this patient's CT
    del xray.PatientBirthDate, xray.PatientSex  # Type 2, yet the node accepts X-rays without
    geometry = read_xray_geometry(xray).with_field_size_estimate()
    record = pick(truth, "single-frame XA")
    result = RegistrationResult(
        matrix=np.array(record["matrix"]),
        intrinsics=geometry.intrinsics(),
        similarity=0.5,
        iterations=10,
        wall_time_s=1.0,
        initializer="dicom",
        model_id=None,
        software_version="0.1.0",
        frame_numbers=[2] if geometry.number_of_frames > 1 else None,
        pixel_spacing_estimated=geometry.pixel_spacing_estimated,
    )
    sro = build_spatial_registration(xray, ct, result, content_creator="")
    sr = build_measurement_report(xray, sro, result)
    frame = np.frombuffer(xray.PixelData, dtype=np.uint16 if xray.BitsAllocated == 16 else np.uint8)
    frame = frame.reshape(-1, xray.Rows, xray.Columns)[0]
    edges = np.zeros((xray.Rows, xray.Columns), dtype=bool)
    sc = build_overlay(xray, compose_overlay(frame, edges, overlay_legend(result)), result)
    for name, ds in {"sro": sro, "sr": sr, "sc": sc}.items():
        assert dciodvfy_errors(write(ds, tmp_path / f"{name}.dcm")) == [], (device, name)


def test_objects_belong_to_the_xray_study_in_new_series(built):
    xray = built["xray"]
    descriptions = {
        "sro": "xvr-node registration",
        "sr": "xvr-node registration report",
        "sc": "xvr-node overlay",
    }
    series = set()
    for name, description in descriptions.items():
        ds = built[name]
        assert ds.StudyInstanceUID == xray.StudyInstanceUID
        assert ds.PatientID == xray.PatientID
        assert ds.IssuerOfPatientID == xray.IssuerOfPatientID
        assert ds.SeriesDescription == description
        assert ds.Manufacturer == "xvr-node"
        assert ds.SeriesInstanceUID != xray.SeriesInstanceUID
        series.add(ds.SeriesInstanceUID)
    assert len(series) == 3
    assert built["sro"].BodyPartExamined == built["sc"].BodyPartExamined == "CHEST"


def test_rebuilding_in_a_given_series_gives_the_same_instance_uids(built, ct):
    """An export that runs again after a crash must not make a second result in the PACS."""
    xray, result = built["xray"], built["result"]
    rgb = np.zeros((xray.Rows, xray.Columns, 3), dtype=np.uint8)
    builders = {
        "sro": lambda series, n: build_spatial_registration(
            xray, ct, result, series_instance_uid=series, instance_number=n
        ),
        "sr": lambda series, n: build_measurement_report(
            xray, None, result, series_instance_uid=series, instance_number=n
        ),
        "sc": lambda series, n: build_overlay(
            xray, rgb, result, series_instance_uid=series, instance_number=n
        ),
    }
    for name, build in builders.items():
        series = generate_uid()
        first, again, second = build(series, 1), build(series, 1), build(series, 2)
        assert first.SeriesInstanceUID == again.SeriesInstanceUID == series, name
        assert first.SOPInstanceUID == again.SOPInstanceUID, name
        assert first.file_meta.MediaStorageSOPInstanceUID == first.SOPInstanceUID, name
        assert second.SOPInstanceUID != first.SOPInstanceUID, name
        # Without a series, every object is new (the builders' default).
        assert build(None, 1).SOPInstanceUID != build(None, 1).SOPInstanceUID, name


# --- (2) the SRO: structure and our own checks -------------------------------------------


def test_sro_structure(built, truth, ct):
    sro, xray, result = built["sro"], built["xray"], built["result"]
    assert sro.SOPClassUID == SRO_CLASS and sro.Modality == "REG"
    assert sro.FrameOfReferenceUID == truth["ct"]["frame_of_reference_uid"]
    ct_item, xray_item = sro.RegistrationSequence
    assert ct_item.FrameOfReferenceUID == sro.FrameOfReferenceUID
    ct_matrix = ct_item.MatrixRegistrationSequence[0]
    assert ct_matrix.RegistrationTypeCodeSequence[0].CodeValue == "125021"
    assert [float(v) for v in ct_matrix.MatrixSequence[0].FrameOfReferenceTransformationMatrix] == (
        np.eye(4).ravel().tolist()
    )
    assert "FrameOfReferenceUID" not in xray_item
    reference = xray_item.ReferencedImageSequence[0]
    assert reference.ReferencedSOPInstanceUID == xray.SOPInstanceUID
    if result.frame_numbers is None:
        assert "ReferencedFrameNumber" not in reference
    else:
        assert int(reference.ReferencedFrameNumber) == result.frame_numbers[0]
    registration = xray_item.MatrixRegistrationSequence[0]
    assert registration.RegistrationTypeCodeSequence[0].CodeValue == "125024"
    values = registration.MatrixSequence[0].FrameOfReferenceTransformationMatrix
    assert len(values) == 16 and all(len(str(v)) <= 16 for v in values)
    assert registration.MatrixSequence[0].FrameOfReferenceTransformationMatrixType == "RIGID"
    assert sro.ContentLabel == sro.ContentLabel.upper() and sro.ContentDate and sro.ContentTime
    other = sro.StudiesContainingOtherReferencedInstancesSequence[0]
    assert other.StudyInstanceUID == truth["ct"]["study_instance_uid"]
    assert other.ReferencedSeriesSequence[0].SeriesInstanceUID == truth["ct"]["series_instance_uid"]
    assert len(other.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == len(ct)
    assert sro.ReferencedSeriesSequence[0].SeriesInstanceUID == xray.SeriesInstanceUID


def test_validate_registration_accepts_what_we_build(built, ct):
    sro = built["sro"]
    assert validate_registration(sro) == []
    assert validate_registration(sro, xray=built["xray"], ct_slices=ct) == []


def _xray_matrix_item(ds: Dataset) -> Dataset:
    return ds.RegistrationSequence[1].MatrixRegistrationSequence[0]


def _set_quietly(item: Dataset, keyword: str, value) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the values we break on purpose
        setattr(item, keyword, value)


def test_validate_registration_catches_a_mirrored_matrix(built):
    sro = copy.deepcopy(built["sro"])
    matrix_item = _xray_matrix_item(sro).MatrixSequence[0]
    values = [str(v) for v in matrix_item.FrameOfReferenceTransformationMatrix]
    for index in (0, 4, 8):  # flip the image-plane x axis: det -1
        values[index] = values[index][1:] if values[index].startswith("-") else "-" + values[index]
    values = [v if len(v) <= 16 else f"{float(v):.9g}" for v in values]
    _set_quietly(matrix_item, "FrameOfReferenceTransformationMatrix", values)
    problems = validate_registration(sro)
    assert any("det -1" in problem for problem in problems), problems


def test_validate_registration_catches_a_17_character_value(built):
    sro = copy.deepcopy(built["sro"])
    matrix_item = _xray_matrix_item(sro).MatrixSequence[0]
    values = [str(v) for v in matrix_item.FrameOfReferenceTransformationMatrix]
    values[15] = "1.000000000000000"  # still 1, but 17 characters
    _set_quietly(matrix_item, "FrameOfReferenceTransformationMatrix", values)
    problems = validate_registration(sro)
    assert any("longer than 16" in problem for problem in problems), problems


def test_validate_registration_catches_a_long_comment(built):
    sro = copy.deepcopy(built["sro"])
    _set_quietly(_xray_matrix_item(sro), "FrameOfReferenceTransformationComment", "x" * 65)
    problems = validate_registration(sro)
    assert any("Transformation Comment" in problem for problem in problems), problems


def test_validate_registration_catches_a_missing_ct_reference(built, ct):
    sro = copy.deepcopy(built["sro"])
    del sro.StudiesContainingOtherReferencedInstancesSequence
    problems = validate_registration(sro)
    assert any("CT study" in problem for problem in problems), problems
    assert any("CT instance" in p for p in validate_registration(sro, ct_slices=ct))


def test_validate_registration_catches_a_missing_xray_series(built):
    sro = copy.deepcopy(built["sro"])
    del sro.ReferencedSeriesSequence
    problems = validate_registration(sro)
    assert any("Referenced Series Sequence" in problem for problem in problems), problems


def test_validate_registration_catches_a_missing_private_block(built):
    sro = copy.deepcopy(built["sro"])
    for tag in [element.tag for element in sro if element.tag.group == 0x0071]:
        del sro[tag]
    problems = validate_registration(sro)
    assert any(PRIVATE_CREATOR in problem for problem in problems), problems


# --- (3) the geometric round trip ---------------------------------------------------------


def test_round_trip_projects_the_bead_onto_its_pixel(built, tmp_path):
    record, result = built["record"], built["result"]
    back = pydicom.dcmread(write(built["sro"], tmp_path / "sro.dcm"))
    matrix, intrinsics, frames = read_registration(back)
    np.testing.assert_allclose(matrix, result.matrix, atol=1e-6)
    assert intrinsics == result.intrinsics
    assert frames == result.frame_numbers
    u, v = project(matrix, intrinsics, np.array(record["bead_lps"]))[0]
    mirrored = read_registration_result(back).mirrored
    assert mirrored == record["mirrored"]
    stored_u = stored_column(u, intrinsics.columns, mirrored)
    assert np.hypot(stored_u - record["bead_px"][0], v - record["bead_px"][1]) < 1.0


def test_round_trip_keeps_every_figure(built, tmp_path):
    back = pydicom.dcmread(write(built["sro"], tmp_path / "sro.dcm"))
    read, original = read_registration_result(back), built["result"]
    for name in ("similarity", "iterations", "wall_time_s", "initializer", "model_id"):
        assert getattr(read, name) == getattr(original, name), name
    assert read.software_version == original.software_version


# --- (4) the measurement report ------------------------------------------------------------


def _content_items(items):
    for item in items:
        yield item
        yield from _content_items(item.get("ContentSequence", []))


def test_report_carries_the_figures_and_references(built, tmp_path):
    xray, sro, result = built["xray"], built["sro"], built["result"]
    sr = pydicom.dcmread(write(built["sr"], tmp_path / "sr.dcm"))
    assert sr.StudyInstanceUID == xray.StudyInstanceUID
    items = list(_content_items(sr.ContentSequence))
    numbers = {
        item.ConceptNameCodeSequence[0].CodeValue: item.MeasuredValueSequence[0]
        for item in items
        if item.ValueType == "NUM"
    }
    sid = numbers["113750"]
    assert float(sid.NumericValue) == pytest.approx(result.intrinsics.sid_mm)
    assert sid.MeasurementUnitsCodeSequence[0].CodeValue == "mm"
    assert float(numbers["XVR004"].NumericValue) == result.iterations
    assert numbers["XVR005"].MeasurementUnitsCodeSequence[0].CodeValue == "s"
    images = [item.ReferencedSOPSequence[0] for item in items if item.ValueType == "IMAGE"]
    assert images and all(i.ReferencedSOPInstanceUID == xray.SOPInstanceUID for i in images)
    if result.frame_numbers is not None:
        assert all(int(i.ReferencedFrameNumber) == result.frame_numbers[0] for i in images)
    texts = {item.TextValue for item in items if item.ValueType == "TEXT"}
    assert result.software_version in texts and f"model: {result.model_id}" in texts
    codes = {item.ConceptCodeSequence[0].CodeMeaning for item in items if item.ValueType == "CODE"}
    assert "Pose regression model" in codes
    evidence = {
        instance.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }
    assert {xray.SOPInstanceUID, sro.SOPInstanceUID} <= evidence
    schemes = {item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence}
    assert CODING_SCHEME in schemes


# --- (5) the overlay -----------------------------------------------------------------------


def test_overlay_is_an_rgb_picture_of_the_xray(built, tmp_path):
    xray, sc = built["xray"], built["sc"]
    back = pydicom.dcmread(write(sc, tmp_path / "sc.dcm"))
    assert back.SamplesPerPixel == 3 and back.PhotometricInterpretation == "RGB"
    pixels = back.pixel_array
    assert pixels.dtype == np.uint8 and pixels.shape == (xray.Rows, xray.Columns, 3)
    assert back.StudyInstanceUID == xray.StudyInstanceUID
    source = back.SourceImageSequence[0]
    assert source.ReferencedSOPInstanceUID == xray.SOPInstanceUID
    assert source.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
    assert back.DerivationDescription
    assert list(back.PatientOrientation) == list(xray.PatientOrientation)
    # The bead ring is drawn in green where the bead projects.
    u, v = built["record"]["bead_px"]
    row, column = round(v), round(u)
    ring = pixels[row - 5 : row + 6, column - 5 : column + 6]
    assert np.any((ring[..., 1] == 255) & (ring[..., 0] == 0))


def test_dcmtk_renders_the_overlay(built, tmp_path):
    dcmj2pnm = require_tool("dcmj2pnm", "/usr/bin/dcmj2pnm", "/usr/local/bin/dcmj2pnm")
    path = write(built["sc"], tmp_path / "sc.dcm")
    png = tmp_path / "sc.png"
    completed = subprocess.run(
        [dcmj2pnm, "--write-png", str(path), str(png)], capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stderr
    with Image.open(png) as image:
        assert image.size == (built["xray"].Columns, built["xray"].Rows)


def test_reference_overlay_picture(phantom_dir, tmp_path):
    out = tmp_path / "overlay-example.png"
    sc = write_reference_overlay(phantom_dir, out)
    with Image.open(out) as image:
        picture = np.asarray(image.convert("RGB"))
    assert picture.shape == (sc.Rows, sc.Columns, 3)
    edge = (picture[..., 1] == 255) & (picture[..., 0] == 0) & (picture[..., 2] == 0)
    assert edge.mean() > 0.01  # the projected CT edges are drawn
    docs_picture = Path(__file__).resolve().parents[2] / "docs" / "images" / "overlay-example.png"
    if docs_picture.exists():
        with Image.open(docs_picture) as image:
            assert image.mode == "RGB"


def test_compose_overlay_windows_colours_and_labels():
    pixels = np.tile(np.arange(200, dtype=np.uint16), (120, 1))
    edges = np.zeros(pixels.shape, dtype=bool)
    edges[100, 50:150] = True
    rgb = compose_overlay(pixels, edges, ["pose: fixed", "similarity 0.500"])
    assert rgb.shape == (120, 200, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[100, 60]) == (0, 255, 0)
    assert rgb[110, 0, 0] == 0 and rgb[110, 199, 0] == 255  # windowed to the full range
    legend = rgb[:25, :60]
    assert np.any(legend > 200) and np.any(legend == 0)  # white text on black
    with pytest.raises(ValueError, match="edges"):
        compose_overlay(pixels, edges[:10], [])


# --- builders refuse what they cannot write correctly --------------------------------------


def test_result_refuses_a_reflection_and_unknown_initializer(built):
    result = built["result"]
    mirrored = result.matrix @ np.diag([-1.0, 1.0, 1.0, 1.0])
    fields = dict(vars(result))
    with pytest.raises(ValueError, match="matrix"):
        RegistrationResult(**{**fields, "matrix": mirrored})
    with pytest.raises(ValueError, match="initializer"):
        RegistrationResult(**{**fields, "initializer": "guess"})
    with pytest.raises(ValueError, match="frame_numbers"):
        RegistrationResult(**{**fields, "frame_numbers": [0]})


def test_builders_name_the_attribute_they_refuse(built, ct):
    xray, result, sro = built["xray"], built["result"], built["sro"]
    other_patient = [copy.deepcopy(ct[0])]
    other_patient[0].PatientID = "SOMEONE-ELSE"
    with pytest.raises(ValueError, match=r"Patient ID \(0010,0020\)"):
        build_spatial_registration(xray, other_patient, result)
    two_frames = [copy.deepcopy(ct[0]), copy.deepcopy(ct[1])]
    two_frames[1].FrameOfReferenceUID = "1.2.3.4"
    with pytest.raises(ValueError, match="Frame of Reference"):
        build_spatial_registration(xray, two_frames, result)
    with pytest.raises(ValueError, match="ct_slices"):
        build_spatial_registration(xray, [], result)
    too_far = RegistrationResult(**{**vars(result), "frame_numbers": [99]})
    with pytest.raises(ValueError, match=r"Number of Frames \(0028,0008\)"):
        build_spatial_registration(xray, ct, too_far)
    with pytest.raises(ValueError, match=r"Rows/Columns"):
        build_overlay(xray, np.zeros((10, 10, 3), dtype=np.uint8), result)
    with pytest.raises(ValueError, match="Spatial Registration"):
        build_measurement_report(xray, xray, result)
    assert sro.SOPClassUID == SRO_CLASS


# --- a cine run: one object of each kind for all its frames --------------------------------


@pytest.fixture(scope="module")
def run(phantom_dir, truth, ct) -> dict:
    """The run objects of the phantom's cine X-ray at its true poses, frames given backwards."""
    records = [r for r in truth["xrays"] if r["number_of_frames"] > 1]
    xray = pydicom.dcmread(phantom_dir / records[0]["file"])
    results = [result_from_truth(record, xray) for record in reversed(records)]
    sro = build_run_registration(xray, ct, results)
    edges = np.zeros((xray.Rows, xray.Columns), dtype=bool)
    pictures = np.stack(
        [
            compose_overlay(xray_frame(xray, record), edges, overlay_legend(result))
            for record, result in zip(records, reversed(results), strict=True)
        ]
    )
    return {
        "records": records,
        "xray": xray,
        "results": results,
        "sro": sro,
        "sr": build_run_report(xray, sro, results),
        "pictures": pictures,
        "sc": build_run_overlay(xray, pictures, list(reversed(results))),
    }


@pytest.mark.parametrize("name", ["sro", "sr", "sc"])
def test_run_objects_pass_dciodvfy(run, name, tmp_path):
    assert dciodvfy_errors(write(run[name], tmp_path / f"{name}.dcm")) == []


def test_run_sro_keeps_the_single_pose_layout_per_frame(run, ct, tmp_path):
    sro = pydicom.dcmread(write(run["sro"], tmp_path / "sro.dcm"))
    assert validate_registration(sro, xray=run["xray"], ct_slices=ct) == []
    ct_item, *frame_items = sro.RegistrationSequence
    assert ct_item.FrameOfReferenceUID == sro.FrameOfReferenceUID
    assert [int(i.ReferencedImageSequence[0].ReferencedFrameNumber) for i in frame_items] == [
        r["frame_number"] for r in run["records"]
    ]  # frame order, whatever order the results came in
    for item in frame_items:
        assert "FrameOfReferenceUID" not in item
        registration = item.MatrixRegistrationSequence[0]
        assert registration.RegistrationTypeCodeSequence[0].CodeValue == "125024"
    # Each frame's pose puts the bead on that frame's pixel.
    for pose, record in zip(read_registrations(sro), run["records"], strict=True):
        assert pose.frame_numbers == [record["frame_number"]]
        assert pose.mirrored == record["mirrored"]
        u, v = project(pose.matrix, pose.intrinsics, np.array(record["bead_lps"]))[0]
        stored_u = stored_column(u, pose.intrinsics.columns, pose.mirrored)
        assert np.hypot(stored_u - record["bead_px"][0], v - record["bead_px"][1]) < 1.0
    with pytest.raises(ValueError, match="name the frame"):
        read_registration(sro)
    assert read_registration(sro, 2)[2] == [2]
    with pytest.raises(ValueError, match="frame 9"):
        read_registration(sro, 9)


def test_run_sro_needs_each_frame_items_private_block(run):
    sro = copy.deepcopy(run["sro"])
    item = sro.RegistrationSequence[2]
    for tag in [element.tag for element in item if element.tag.group == 0x0071]:
        del item[tag]
    problems = validate_registration(sro)
    assert any("Registration Sequence item" in problem for problem in problems), problems


def test_run_report_has_one_group_per_frame(run):
    root = run["sr"].ContentSequence
    container = next(i for i in root if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    groups = container.ContentSequence
    assert len(groups) == len(run["records"])
    for group, record in zip(groups, run["records"], strict=True):
        items = list(_content_items(group.ContentSequence))
        tracking = [i.TextValue for i in items if i.ValueType == "TEXT" and "pose" in i.TextValue]
        assert tracking == [f"X-ray pose, frame {record['frame_number']}"]
        frames = {
            int(i.ReferencedSOPSequence[0].ReferencedFrameNumber)
            for i in items
            if i.ValueType == "IMAGE"
        }
        assert frames == {record["frame_number"]}


def test_run_overlay_is_one_multiframe_rgb_object(run, tmp_path):
    xray, records = run["xray"], run["records"]
    back = pydicom.dcmread(write(run["sc"], tmp_path / "sc.dcm"))
    assert back.SOPClassUID == back.file_meta.MediaStorageSOPClassUID == MULTIFRAME_TRUE_COLOR_SC
    assert back.pixel_array.shape == (len(records), xray.Rows, xray.Columns, 3)
    # Each frame is its own picture, in frame order (the legends alone tell them apart).
    np.testing.assert_array_equal(back.pixel_array, run["pictures"])
    assert not np.array_equal(back.pixel_array[0], back.pixel_array[1])
    assert list(back.FrameLabelVector) == [f"XA frame {r['frame_number']}" for r in records]
    assert back.FrameIncrementPointer == 0x00182002
    source = back.SourceImageSequence[0]
    assert [int(f) for f in source.ReferencedFrameNumber] == [r["frame_number"] for r in records]
    dcmj2pnm = require_tool("dcmj2pnm", "/usr/bin/dcmj2pnm", "/usr/local/bin/dcmj2pnm")
    for frame in range(len(records)):
        png = tmp_path / f"sc-{frame}.png"
        completed = subprocess.run(
            [
                dcmj2pnm,
                "--write-png",
                "--frame",
                str(frame + 1),
                str(tmp_path / "sc.dcm"),
                str(png),
            ],
            capture_output=True,
            text=True,
        )
        assert completed.returncode == 0, completed.stderr


def test_run_builders_refuse_what_is_not_a_run(run, ct):
    xray, results = run["xray"], run["results"]
    whole = RegistrationResult(**{**vars(results[0]), "frame_numbers": None})
    with pytest.raises(ValueError, match="frame_numbers"):
        build_run_registration(xray, ct, [whole])
    with pytest.raises(ValueError, match=r"Referenced Frame Number \[2\] is in two results"):
        build_run_report(xray, None, [results[1], results[1]])
    flipped = RegistrationResult(**{**vars(results[0]), "mirrored": not results[0].mirrored})
    with pytest.raises(ValueError, match="mirrored"):
        build_run_registration(xray, ct, [flipped, results[1]])
    with pytest.raises(ValueError, match="empty"):
        build_run_registration(xray, ct, [])
    with pytest.raises(ValueError, match="frames_rgb"):
        build_run_overlay(xray, np.zeros((1, xray.Rows, xray.Columns, 3), np.uint8), results)
