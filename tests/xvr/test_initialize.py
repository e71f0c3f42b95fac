"""Model initializer, multi-start, overlay PNG and animation, and their CLI commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffdrr.pose import RigidTransform
from PIL import Image

from xvr_node.cli import cli
from xvr_node.config import TrainingSettings
from xvr_node.dicom.volume import assemble_volume, read_series_files
from xvr_node.geometry import Intrinsics, check_rigid, rigid, source_position
from xvr_node.xvr.initialize import (
    ModelInitializer,
    coverage,
    reexpress,
    resample_to_detector,
)
from xvr_node.xvr.losses import image_similarity
from xvr_node.xvr.metrics import mean_target_registration_error
from xvr_node.xvr.multistart import SearchSettings, choose_start
from xvr_node.xvr.register import RefineSettings, Registrar
from xvr_node.xvr.renderer import Projector
from xvr_node.xvr.train import train
from xvr_node.xvr.visualize import animate, overlay_png
from xvr_node.xvr.xray import read_xray_frames

pytestmark = pytest.mark.slow

BOUND_MM = 2.5  # as in test_register: below a pixel at the isocentre


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads spin-wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_settings(**changes) -> TrainingSettings:
    """A 32-pixel detector at SID 1020 (the X-rays have ~985): resampling is exercised."""
    values = {
        "backbone": "resnet10t",
        "detector_size_px": 32,
        "pixel_spacing_mm": 2.1764375 * 4,
        "batch_size": 4,
        "lr": 3e-3,
        "warmup_iterations": 2,
        "gradient_accumulation": 1,
        "checkpoint_every": 1000,
    }
    return TrainingSettings(**{**values, **changes})


@pytest.fixture(scope="module")
def phantom(small_phantom):
    truth = json.loads((small_phantom / "truth.json").read_text())
    volume = assemble_volume(read_series_files(sorted((small_phantom / "ct").glob("*.dcm"))))
    record = next(r for r in truth["xrays"] if r["file"] == "xray/IMG_000.dcm")
    (frame,) = read_xray_frames(small_phantom / record["file"])
    return volume.volume, frame, record


@pytest.fixture(scope="module")
def checkpoint(phantom, tmp_path_factory) -> Path:
    volume, _, _ = phantom
    torch.set_num_threads(1)
    return train([volume], tiny_settings(), tmp_path_factory.mktemp("tiny-model"), iterations=8)


def _edited(checkpoint: Path, folder: Path, **conventions) -> Path:
    payload = torch.load(checkpoint, weights_only=True)
    payload["conventions"].update(conventions)
    payload["conventions"].pop("reverse_x_axis")
    path = folder / "edited.pt"
    torch.save(payload, path)
    return path


# --- the model initializer -----------------------------------------------------------------


def test_resampling_follows_the_rays_across_sid_pixel_size_and_principal_point(phantom):
    """An X-ray's DRR resampled to the model's detector is the model detector's own DRR."""
    volume, _, record = phantom
    matrix = np.array(record["matrix"])
    xray = Intrinsics(800.0, 64, 64, 4.0, 4.0, (29.0, 34.0))  # shorter SID, off-centre
    model = tiny_settings()
    spacing = model.pixel_spacing_mm
    model_detector = Intrinsics(model.sdd_mm, 32, 32, spacing, spacing)
    seen = Projector(volume, xray).render_numpy(matrix)[0, 0].numpy()
    expected = Projector(volume, model_detector).render_numpy(
        reexpress(matrix, xray, model_detector)
    )

    def similarity(source: Intrinsics) -> float:
        resampled = resample_to_detector(seen, source, model_detector, fill=0.0)
        return float(image_similarity(torch.as_tensor(resampled)[None, None], expected))

    assert similarity(xray) > 0.95
    # Same detector mm instead of the same rays, or the principal point ignored: worse.
    assert similarity(Intrinsics(model.sdd_mm, 64, 64, 4.0, 4.0, (29.0, 34.0))) < 0.9
    assert similarity(Intrinsics(800.0, 64, 64, 4.0, 4.0)) < 0.9
    assert coverage(xray, model_detector) == pytest.approx(1.0)


def test_model_start_is_rigid_and_on_the_posterior_side(phantom, checkpoint):
    volume, frame, _ = phantom
    initializer = ModelInitializer(checkpoint)
    matrix = initializer.matrix_for(frame, volume)
    check_rigid(matrix)
    offset = source_position(matrix, frame.intrinsics) - volume.center_lps
    ranges = tiny_settings().pose_ranges
    low, high = (f * tiny_settings().sdd_mm for f in ranges.source_isocenter_sdd_fraction)
    slack = float(np.linalg.norm(ranges.offsets_mm))
    assert offset[1] > 0.5 * np.linalg.norm(offset)  # PA: the source behind the patient (+y)
    assert low - slack < np.linalg.norm(offset) < high + slack
    # The X-ray's detector differs from the model's, and the initializer says how.
    fields = {line.split(":")[0] for line in initializer.mismatches(frame)}
    assert {"sid_mm", "pixel_spacing_mm", "image_size"} <= fields


@pytest.mark.parametrize("orientation", ["PA", "AP"])
def test_an_exact_prediction_gives_back_the_true_matrix(
    phantom, checkpoint, tmp_path, monkeypatch, orientation
):
    """Pose → matrix for the model's detector → the X-ray's detector loses nothing."""
    volume, frame, record = phantom
    truth = np.array(record["matrix"])
    initializer = ModelInitializer(_edited(checkpoint, tmp_path, orientation=orientation))
    pose = volume.frame(orientation).pose_from_matrix(truth, frame.intrinsics)
    exact = RigidTransform(torch.as_tensor(pose, dtype=torch.float32)[None])
    monkeypatch.setattr(initializer.model, "predict_pose", lambda image: exact)
    np.testing.assert_allclose(initializer.matrix_for(frame, volume), truth, atol=1e-3)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("parameterization", "euler_angles"),  # the network regresses quaternion_adjugate
        ("hu_to_density", "someone-elses-v3"),
        ("image_size", [64, 64]),
        ("orientation", "LATERAL"),
    ],
)
def test_irreconcilable_conventions_are_refused_by_name(checkpoint, tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        ModelInitializer(_edited(checkpoint, tmp_path, **{field: value}))


def test_an_xray_that_barely_fills_the_model_detector_is_refused(phantom, checkpoint):
    volume, frame, _ = phantom
    intrinsics = frame.intrinsics
    tiny = Intrinsics(intrinsics.sid_mm, 64, 64, 1.0, 1.0)  # 64 mm across instead of 300
    small = type(frame)(**{**frame.__dict__, "intrinsics": tiny})
    with pytest.raises(ValueError, match="fills"):
        ModelInitializer(checkpoint).matrix_for(small, volume)


# --- multi-start and pictures --------------------------------------------------------------


@pytest.fixture(scope="module")
def from_best_start(phantom):
    volume, frame, record = phantom
    registrar = Registrar(volume, RefineSettings(scales=(2, 1)))
    truth = np.array(record["matrix"])
    perturbed = rigid(np.eye(3), [30.0, 0.0, 0.0]) @ truth
    choice = choose_start(
        registrar,
        frame,
        {"perturbed": perturbed, "truth": truth},
        SearchSettings(samples=0, iterations=10),
    )
    outcome = registrar.register(frame, choice.matrix, keep_poses=True)
    return choice, outcome


def test_multistart_refines_the_starts_and_converges(phantom, from_best_start):
    _, _, record = phantom
    choice, outcome = from_best_start
    by_name = {c["name"]: c for c in choice.candidates}
    assert set(by_name) == {"perturbed", "truth"}
    # The truth barely moves in its short refinement; the 30 mm start moves toward it.
    assert by_name["truth"]["moved_mm"] < by_name["perturbed"]["moved_mm"]
    error = mean_target_registration_error(
        outcome.final_matrix, np.array(record["matrix"]), np.array(record["fiducials_lps"])
    )
    assert error < BOUND_MM


def test_overlay_png_is_rgb_at_the_xray_size_with_coloured_edges(
    phantom, from_best_start, tmp_path
):
    volume, frame, _ = phantom
    path = overlay_png(frame, volume, from_best_start[1].final_matrix, tmp_path / "o.png")
    with Image.open(path) as image:
        assert image.mode == "RGB" and image.size == (
            frame.intrinsics.columns,
            frame.intrinsics.rows,
        )
        pixels = np.asarray(image).astype(int)
    coloured = (np.abs(pixels[..., 0] - pixels[..., 1]) > 60).mean()
    assert 0.01 < coloured < 0.5


def test_animation_has_a_frame_per_kept_pose(phantom, from_best_start, tmp_path):
    volume, frame, _ = phantom
    poses = from_best_start[1].poses
    assert len(poses) == from_best_start[1].iterations
    path = animate(frame, volume, poses, tmp_path / "a.gif", every=10)
    with Image.open(path) as image:
        frames = image.n_frames
    shown = len(range(0, len(poses), 10)) + (1 if (len(poses) - 1) % 10 else 0)
    assert frames == shown > 1  # every 10th pose, and the last


# --- CLI ------------------------------------------------------------------------------------


def test_cli_register_model_then_animate(small_phantom, checkpoint, tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        cli,
        [
            "register",
            "model",
            str(small_phantom / "xray/IMG_000.dcm"),
            "--volume",
            str(small_phantom / "ct"),
            "--output",
            str(tmp_path / "out"),
            "--scales",
            "4",
            "--checkpoint",
            str(checkpoint),
            "--overlay",
        ],
    )
    assert result.exit_code == 0, result.output
    written = tmp_path / "out" / "IMG_000.json"
    data = json.loads(written.read_text())
    assert data["initializer"] == "model"
    check_rigid(np.array(data["initial_matrix"]))
    assert (tmp_path / "out" / "IMG_000.png").is_file()
    # The tiny model's start shows none of the CT (similarity 0: L-BFGS stops at once), so
    # the animation is of a registration that travels: from the positioner's angles.
    moving = runner.invoke(
        cli,
        [
            "register",
            "dicom",
            str(small_phantom / "xray/IMG_000.dcm"),
            "--volume",
            str(small_phantom / "ct"),
            "--output",
            str(tmp_path / "dicom"),
            "--scales",
            "4",
        ],
    )
    assert moving.exit_code == 0, moving.output
    gif = tmp_path / "run.gif"
    animated = runner.invoke(
        cli,
        [
            "animate",
            str(tmp_path / "dicom" / "IMG_000.json"),
            "--volume",
            str(small_phantom / "ct"),
            "--output",
            str(gif),
        ],
    )
    assert animated.exit_code == 0, animated.output
    with Image.open(gif) as image:
        assert image.n_frames > 1, animated.output


def test_cli_register_multistart_records_the_chosen_start(small_phantom, tmp_path):
    record = json.loads((small_phantom / "truth.json").read_text())["xrays"][0]
    start = tmp_path / "start.json"
    start.write_text(json.dumps(record["matrix"]))
    result = CliRunner().invoke(
        cli,
        [
            "register",
            "multistart",
            str(small_phantom / record["file"]),
            "--volume",
            str(small_phantom / "ct"),
            "--output",
            str(tmp_path / "out"),
            "--scales",
            "2,1",
            "--init-matrix",
            str(start),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / f"{Path(record['file']).stem}.json").read_text())
    choice = data["multistart_scores"]
    # Every start was tried (the positioner's with its local search); the true matrix, or a
    # searched start that reached the same pose, won.
    tried = {candidate["name"].split("~")[0] for candidate in choice["candidates"]}
    assert tried == {"dicom", "fixed"}
    assert data["initializer"] == f"multistart:{choice['chosen']}"
    winner = next(c for c in choice["candidates"] if c["from_winner_mm"] == 0.0)
    fixed = next(c for c in choice["candidates"] if c["name"] == "fixed")
    assert fixed["from_winner_mm"] < BOUND_MM or winner["name"] == "fixed"
    error = mean_target_registration_error(
        np.array(data["final_matrix"]),
        np.array(record["matrix"]),
        np.array(record["fiducials_lps"]),
    )
    assert error < BOUND_MM
