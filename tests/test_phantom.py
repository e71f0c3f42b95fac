"""The phantom patient: valid DICOM, complete truth, and the bead round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from scipy import ndimage

from tests.support.tools import dciodvfy_errors
from xvr_node.cli import cli
from xvr_node.geometry import Intrinsics, check_rigid, is_mirrored, project
from xvr_node.phantom import PhantomSpec, build_phantom

pytestmark = pytest.mark.slow


def load_truth(folder: Path) -> dict:
    return json.loads((folder / "truth.json").read_text())


def test_every_file_passes_dciodvfy(phantom_dir):
    files = sorted((phantom_dir / "ct").glob("*.dcm")) + sorted(
        (phantom_dir / "xray").glob("*.dcm")
    )
    assert len(files) > 10
    failures = {f.name: errors for f in files if (errors := dciodvfy_errors(f))}
    assert failures == {}


def test_ct_series_geometry(phantom_dir):
    truth = load_truth(phantom_dir)
    slices = [pydicom.dcmread(f) for f in sorted((phantom_dir / "ct").glob("*.dcm"))]
    assert len(slices) == truth["ct"]["shape"][2]
    assert {s.SeriesInstanceUID for s in slices} == {truth["ct"]["series_instance_uid"]}
    assert {s.FrameOfReferenceUID for s in slices} == {truth["ct"]["frame_of_reference_uid"]}
    z = [float(s.ImagePositionPatient[2]) for s in slices]
    steps = np.diff(z)
    np.testing.assert_allclose(steps, steps[0], atol=1e-4)
    assert abs(steps[0]) == pytest.approx(float(slices[0].SliceThickness), abs=1e-3)
    hu = slices[10].pixel_array * float(slices[10].RescaleSlope) + float(
        slices[10].RescaleIntercept
    )
    assert hu.min() >= -1024 and hu.max() > 300  # air and bone, in HU
    assert slices[0].PatientID == truth["patient_id"]


def test_truth_is_complete_and_consistent(phantom_dir):
    truth = load_truth(phantom_dir)
    records = truth["xrays"]
    assert len(records) == 4 + 3  # four single frames and a three-frame cine run
    assert len(truth["fiducials_lps"]) >= 20
    for record in records:
        ds = pydicom.dcmread(phantom_dir / record["file"], stop_before_pixels=True)
        assert ds.SOPInstanceUID == record["sop_instance_uid"]
        assert (ds.Rows, ds.Columns) == (record["rows"], record["columns"]) == (112, 128)
        assert float(ds.DistanceSourceToDetector) == pytest.approx(record["sid_mm"])
        assert [float(x) for x in ds.ImagerPixelSpacing] == pytest.approx(
            record["pixel_spacing_mm"]
        )
        matrix = np.array(record["matrix"])
        check_rigid(matrix)
        # The positioner angles are a start, not the answer: they differ from the truth.
        error = record["positioning_error"]
        assert max(map(abs, error["rotation_deg"] + error["translation_mm"])) > 0.5
        assert ds.Modality == record["modality"]
    cine = [r for r in records if r["number_of_frames"] > 1]
    assert [r["frame_number"] for r in cine] == [1, 2, 3]
    angles = [r["positioner"]["primary_deg"] for r in cine]
    assert np.all(np.diff(angles) > 0)  # a rotating C-arm
    assert any(r["mirrored"] for r in records) and not all(r["mirrored"] for r in records)
    assert {r["modality"] for r in records} == {"XA", "RF"}


def test_mirrored_images_are_detectable_from_their_header(phantom_dir):
    for record in load_truth(phantom_dir)["xrays"]:
        ds = pydicom.dcmread(phantom_dir / record["file"], stop_before_pixels=True)
        row_direction = np.array(record["matrix"])[:3, 0]
        assert is_mirrored(list(ds.PatientOrientation), row_direction) == record["mirrored"]


def bead_pixel(frame: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Where the bead shows: the strongest small dense blob inside the collimated field."""
    attenuation = -np.log((frame.astype(float) + 1.0) / (frame.max() + 1.0))
    # Determinant of the Hessian: large where both curvatures are strong (a blob), small along
    # lines and edges, which a Laplacian alone would also pick.
    sigma = 1.2
    lxx = ndimage.gaussian_filter(attenuation, sigma, order=(0, 2))
    lyy = ndimage.gaussian_filter(attenuation, sigma, order=(2, 0))
    lxy = ndimage.gaussian_filter(attenuation, sigma, order=(1, 1))
    blob = np.where((lxx < 0) & (lyy < 0), lxx * lyy - lxy**2, 0.0)
    margin = 6  # stay clear of the shutter edges
    field = np.zeros_like(blob, dtype=bool)
    field[
        ds.CollimatorUpperHorizontalEdge + margin : ds.CollimatorLowerHorizontalEdge - margin,
        ds.CollimatorLeftVerticalEdge + margin : ds.CollimatorRightVerticalEdge - margin,
    ] = True
    blob = np.where(field, blob, -np.inf)
    v, u = np.unravel_index(np.argmax(blob), blob.shape)
    window = np.clip(blob[v - 2 : v + 3, u - 2 : u + 3], 0, None)
    dv, du = np.indices(window.shape) - 2
    return np.array(
        [u + (window * du).sum() / window.sum(), v + (window * dv).sum() / window.sum()]
    )


def test_bead_lands_on_its_pixel_in_every_frame(phantom_dir):
    truth = load_truth(phantom_dir)
    assert truth["bead_lps"] is not None
    for record in truth["xrays"]:
        ds = pydicom.dcmread(phantom_dir / record["file"])
        pixels = ds.pixel_array
        frame = pixels[record["frame_number"] - 1] if pixels.ndim == 3 else pixels
        intrinsics = Intrinsics(
            record["sid_mm"],
            record["rows"],
            record["columns"],
            *record["pixel_spacing_mm"],
            tuple(record["principal_point_px"]),
        )
        u, v = project(np.array(record["matrix"]), intrinsics, np.array(truth["bead_lps"]))[0]
        if record["mirrored"]:
            u = record["columns"] - 1 - u
        np.testing.assert_allclose([u, v], record["bead_px"], atol=1e-6)
        found = bead_pixel(frame, ds)
        assert np.linalg.norm(found - [u, v]) <= 1.0, (record["file"], found, (u, v))


def test_same_seed_same_files(tmp_path):
    spec = PhantomSpec(seed=11, frames=1, columns=32, rows=32, ct_downsample=4)
    first = build_phantom(tmp_path / "a", spec)
    build_phantom(tmp_path / "b", spec)
    assert (tmp_path / "a/truth.json").read_text() == (tmp_path / "b/truth.json").read_text()
    for name in [*first.xray_files, "ct/CT_0001.dcm"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    other = build_phantom(
        tmp_path / "c", PhantomSpec(seed=12, frames=1, columns=32, rows=32, ct_downsample=4)
    )
    assert other.patient_id != first.patient_id


def test_cli_builds_a_phantom(tmp_path):
    result = CliRunner().invoke(
        cli,
        [
            "phantom",
            str(tmp_path / "p"),
            "--frames",
            "1",
            "--size",
            "40x32",
            "--ct-downsample",
            "4",
            "--seed",
            "5",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "PHANTOM0005" in result.output
    record = load_truth(tmp_path / "p")["xrays"][0]
    assert (record["columns"], record["rows"]) == (40, 32)


def test_bad_phantom_options_are_refused():
    with pytest.raises(ValueError, match="COLSxROWS"):
        PhantomSpec.from_cli(size="big")
    with pytest.raises(ValueError, match="at least 2 frames"):
        PhantomSpec(multiframe=1)
    result = CliRunner().invoke(cli, ["phantom", "/tmp/never", "--frames", "0"])
    assert result.exit_code != 0
