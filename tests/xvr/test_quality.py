"""Levels follow the image, multi-start judges after refining, the gate tells right from wrong."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from xvr_node.dicom.volume import assemble_volume, read_series_files
from xvr_node.geometry import Intrinsics, rigid
from xvr_node.xvr.metrics import mean_target_registration_error
from xvr_node.xvr.multistart import SearchSettings, choose_start
from xvr_node.xvr.quality import GateSettings, assess
from xvr_node.xvr.register import Outcome, RefineSettings, Registrar
from xvr_node.xvr.xray import read_xray_frames

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("rows", "columns", "factors"),
    [
        (512, 512, (16.0, 8.0, 4.0)),
        (128, 96, (3.0, 1.5, 1.0)),
        (64, 64, (2.0, 1.0)),
        (32, 32, (1.0,)),
    ],
)
def test_levels_follow_the_image_size(rows, columns, factors):
    intrinsics = Intrinsics(1000.0, rows, columns, 0.5, 0.5)
    assert RefineSettings().scales_for(intrinsics) == factors
    assert RefineSettings(levels_px=(32, 64, 128)).scales_for(
        Intrinsics(1000.0, 1024, 1024, 0.3, 0.3)
    ) == (32.0, 16.0, 8.0)
    assert RefineSettings(scales=(4, 2)).scales_for(intrinsics) == (4.0, 2.0)  # explicit wins


@pytest.fixture(scope="module")
def frame_and_truth(small_phantom):
    torch.set_num_threads(1)
    truth = json.loads((small_phantom / "truth.json").read_text())
    record = next(r for r in truth["xrays"] if r["file"] == "xray/IMG_000.dcm")
    volume = assemble_volume(read_series_files(sorted((small_phantom / "ct").glob("*.dcm"))))
    (frame,) = read_xray_frames(small_phantom / record["file"])
    registrar = Registrar(volume.volume, RefineSettings())
    return registrar, frame, record


def about_centre(registrar, degrees, shift) -> np.ndarray:
    centre = np.asarray(registrar.volume.center_lps)
    rotation = Rotation.from_euler("xyz", degrees, degrees=True).as_matrix()
    return rigid(rotation, centre - rotation @ centre + np.asarray(shift, dtype=float))


def test_a_near_start_beats_a_wrong_start_that_scores_higher_raw(frame_and_truth):
    registrar, frame, record = frame_and_truth
    truth = np.array(record["matrix"])
    points = np.array(record["fiducials_lps"])
    near = about_centre(registrar, (0, 0, 0), (20.0, 0.0, 0.0)) @ truth
    coarse = registrar.settings.scales_for(frame.intrinsics)[0]
    # Wrong poses far outside the capture range; keep the one that looks best before refining.
    wrong_poses = [
        about_centre(registrar, angles, shift) @ truth
        for angles in ((0, 0, 25), (25, 0, 0), (0, 30, 0), (0, 0, -30))
        for shift in ((0, 0, 60), (60, 0, 0), (0, 0, -60))
    ]
    raw = registrar.score_batch(frame, [near, *wrong_poses], coarse)
    wrong = wrong_poses[int(np.argmax(raw[1:]))]
    assert raw[1:].max() > raw[0], "the premise: a wrong start that scores higher raw"
    choice = choose_start(
        registrar, frame, {"wrong": wrong, "near": near}, SearchSettings(samples=0)
    )
    assert choice.name == "near"
    assert mean_target_registration_error(choice.matrix, truth, points) < 10.0


def test_the_gate_passes_a_converged_result_and_fails_a_wrong_one(frame_and_truth):
    registrar, frame, record = frame_and_truth
    truth = np.array(record["matrix"])
    converged = registrar.register(frame, truth)
    verdict = assess(registrar, frame, converged, margin=None, settings=GateSettings())
    assert verdict.reliable, verdict.reasons
    assert verdict.confidence >= 0.5

    wrong = about_centre(registrar, (0, 0, 30), (60.0, 0.0, 40.0)) @ truth
    finest = registrar.settings.scales_for(frame.intrinsics)[-1]
    outcome = Outcome(
        initial_matrix=wrong,
        final_matrix=wrong,
        similarity=registrar.score(frame, wrong, finest),
        iterations=1,
        wall_time_s=0.0,
        trajectory=[{"scale": finest, "iteration": 1, "similarity": 0.0}],
    )
    verdict = assess(registrar, frame, outcome, margin=0.001, settings=GateSettings())
    assert not verdict.reliable
    assert verdict.confidence < 0.5
    assert verdict.reasons and "NOT RELIABLE" in verdict.words()


def test_the_gate_distrusts_a_result_a_view_away_from_the_positioner(frame_and_truth):
    registrar, frame, record = frame_and_truth
    truth = np.array(record["matrix"])
    assert frame.carm is not None
    outcome = registrar.register(frame, truth)
    near = assess(registrar, frame, outcome, margin=None, settings=GateSettings())
    distance = near.figures["positioner_distance_mm"]
    assert near.reliable and 0 < distance < GateSettings().max_positioner_distance_mm
    # The same result, as it would look had the C-arm's angles described another view.
    strict = GateSettings(max_positioner_distance_mm=distance / 2)
    far = assess(registrar, frame, outcome, margin=None, settings=strict)
    assert not far.reliable
    assert any("C-arm's angles" in reason for reason in far.reasons)
    # Off (0), or a file without angles: not checked.
    off = assess(registrar, frame, outcome, None, GateSettings(max_positioner_distance_mm=0))
    assert off.reliable
