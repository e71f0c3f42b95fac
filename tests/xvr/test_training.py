"""Training the pose regressor: losses, sampling, network, checkpoints, exact restart."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffdrr.pose import RigidTransform, convert

from xvr_node.config import PoseRanges, TrainingSettings
from xvr_node.ct_volume import CtVolume
from xvr_node.geometry import CarmPose, check_rigid, euler_zxy_pose, rigid, rotation_about
from xvr_node.phantom import example_ct
from xvr_node.xvr.augment import XrayAugmentation
from xvr_node.xvr.checkpoint import (
    Conventions,
    inference_checkpoint,
    load_checkpoint,
    load_model,
    training_intrinsics,
)
from xvr_node.xvr.losses import geodesic_loss, image_similarity
from xvr_node.xvr.model import PoseRegressor
from xvr_node.xvr.sampling import ROTATION_SIZE, sample_poses
from xvr_node.xvr.schedule import WarmupCosine
from xvr_node.xvr.train import (
    PLAN_AFTER,
    PoseRenderer,
    resample_volume,
    restart,
    stop_record,
    train,
)
from xvr_node.xvr.view_bank import CHUNK_VIEWS
from xvr_node.xvr.warp import read_itk_transform, template_center_ras, template_to_volume


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads spin-wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_ct() -> CtVolume:
    """diffdrr's chest CT at 5.6 × 5.6 × 10 mm: renders in milliseconds."""
    volume = example_ct()
    step = (8, 8, 4)
    hu = np.ascontiguousarray(volume.hu[:: step[0], :: step[1], :: step[2]])
    return CtVolume(hu, volume.affine_lps @ np.diag([*step, 1.0]))


def tiny_settings(**changes) -> TrainingSettings:
    """A 32-pixel detector with the default field of view, a small network, small batches."""
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


def metrics_lines(run_dir: Path) -> list[str]:
    return (run_dir / "metrics.jsonl").read_text().splitlines()


def losses_of(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


# --- losses -----------------------------------------------------------------------------------


def test_image_similarity_is_one_for_identical_images_and_ignores_intensity_scaling():
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(2, 1, 48, 40, generator=generator)
    image = torch.nn.functional.avg_pool2d(image, 5, 1, 2)  # some structure to correlate
    noisy = image + 0.05 * torch.randn(image.shape, generator=generator)

    same = image_similarity(image, image)
    worse = image_similarity(image, noisy)

    assert same.shape == (2,)
    assert torch.allclose(same, torch.ones(2), atol=1e-3)
    assert torch.all(worse < same - 0.05)
    assert torch.allclose(image_similarity(image, 7.0 * noisy + 300.0), worse, atol=1e-4)
    assert torch.all((worse >= -1) & (worse <= 1))


def test_geodesic_loss_is_zero_for_identical_poses_and_grows_with_rotation():
    pose = RigidTransform(torch.as_tensor(euler_zxy_pose([10, 5, 0], [0, -700, 0]))[None].float())
    turned = RigidTransform(torch.as_tensor(euler_zxy_pose([12, 5, 0], [0, -700, 0]))[None].float())

    assert geodesic_loss(pose, pose, 1020.0).item() == pytest.approx(0.0, abs=1e-2)
    # 2 degrees at SDD/2 = 510 mm: about 17.8 mm.
    assert geodesic_loss(turned, pose, 1020.0).item() == pytest.approx(17.8, abs=0.5)


# --- sampling and the network ------------------------------------------------------------------


def test_sampled_views_are_rigid_and_inside_the_ranges(tiny_ct):
    ranges = PoseRanges(primary_deg=30, secondary_deg=20, inplane_deg=10, offsets_mm=(50, 0, 40))
    settings = tiny_settings(pose_ranges=ranges)
    intrinsics = training_intrinsics(settings)
    batch = sample_poses(
        tiny_ct, ranges, intrinsics, "PA", 16, torch.Generator().manual_seed(1), "euler_angles"
    )

    for view, matrix in zip(batch.carm, batch.matrices, strict=True):
        check_rigid(matrix)
        assert abs(view.primary_deg) <= 30 and abs(view.secondary_deg) <= 20
        assert abs(view.inplane_deg) <= 10
        assert 0.45 * 1020 <= view.source_isocenter_mm <= 1020
        offset = np.asarray(view.isocenter_lps) - tiny_ct.center_lps
        assert np.all(np.abs(offset) <= np.array([50, 0, 40]) + 1e-9)
        recovered = CarmPose.from_matrix(matrix, intrinsics, view.source_isocenter_mm)
        assert recovered.primary_deg == pytest.approx(view.primary_deg, abs=1e-6)
    # The regression target converts back to the same diffdrr pose (translation first).
    again = convert(
        batch.rotation, batch.translation, parameterization="euler_angles", convention="ZXY"
    )
    assert torch.allclose(again.matrix, batch.pose.matrix, atol=1e-3)
    assert batch.parameters.shape == (16, 6)


@pytest.mark.parametrize("parameterization", sorted(ROTATION_SIZE))
def test_network_output_is_a_valid_pose(parameterization):
    model = PoseRegressor("resnet10t", parameterization, image_size=32)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())

    pose = model.predict_pose(torch.rand(3, 1, 32, 32))

    assert model.rotation_head.out_features == ROTATION_SIZE[parameterization]
    for matrix in pose.matrix.double().numpy():
        check_rigid(matrix, tolerance=1e-4)
    with pytest.raises(ValueError, match="resample"):
        model.predict_pose(torch.rand(1, 1, 40, 40))


def test_augmentations_keep_shape_and_normalise(tiny_ct):
    images = torch.rand(8, 1, 32, 32) * 100
    out = XrayAugmentation(p=1.0)(images, torch.Generator().manual_seed(0))

    assert out.shape == images.shape and torch.isfinite(out).all()
    assert torch.allclose(out.mean(dim=(1, 2, 3)), torch.zeros(8), atol=1e-4)
    assert torch.allclose(out.std(dim=(1, 2, 3), correction=0), torch.ones(8), atol=1e-3)


def test_schedule_warms_up_then_decays_to_zero():
    schedule = WarmupCosine(warmup_steps=4, total_steps=20)
    values = [schedule(step) for step in range(21)]
    assert values[0] < values[1] < values[3] <= 1.0
    assert values[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(values[4:]))
    assert values[20] == pytest.approx(0.0, abs=1e-9)


def diffdrr_reference(volume: CtVolume, intrinsics):
    """diffdrr's DRR module for ``volume`` in PA, with the node's HU → density mapping."""
    from diffdrr.data import read
    from diffdrr.drr import DRR
    from torchio import ScalarImage

    from xvr_node.xvr.renderer import hu_to_density

    frame = volume.frame("PA")
    image = ScalarImage(
        tensor=torch.as_tensor(volume.hu, dtype=torch.float32)[None], affine=volume.affine_ras
    )
    subject = read(image, None, orientation="PA")
    subject.density.set_data(hu_to_density(subject.volume.data))
    x0, y0 = intrinsics.diffdrr_offsets(frame.reverse_x_axis)
    return DRR(
        subject,
        sdd=intrinsics.sid_mm,
        height=intrinsics.rows,
        width=intrinsics.columns,
        delx=intrinsics.column_spacing_mm,
        dely=intrinsics.row_spacing_mm,
        x0=x0,
        y0=y0,
        reverse_x_axis=frame.reverse_x_axis,
        renderer="trilinear",
    )


def test_training_renderer_matches_diffdrr_and_keeps_the_ct_centre(tiny_ct):
    settings = tiny_settings()
    intrinsics = training_intrinsics(settings)
    coarse = resample_volume(tiny_ct, 12.0)
    assert coarse.hu.shape[0] < tiny_ct.hu.shape[0]
    assert np.allclose(coarse.center_lps, tiny_ct.center_lps, atol=1e-6)

    batch = sample_poses(
        tiny_ct, settings.pose_ranges, intrinsics, "PA", 4, torch.Generator().manual_seed(2)
    )
    projector = PoseRenderer(tiny_ct, intrinsics, "PA", step_voxels=0.5)
    with torch.no_grad():
        ours = projector.render(batch.pose, projector.density(1.0))[:, 0].numpy()
    # diffdrr's own trilinear renderer, finely sampled, as the reference (no shared code).
    with torch.no_grad():
        drr = diffdrr_reference(tiny_ct, intrinsics)
        reference = drr(batch.pose, n_points=2000)[:, 0].numpy()
    error = np.abs(ours - reference).mean() / np.abs(reference).mean()
    assert error < 0.015


# --- budgets, validation, device profiles ----------------------------------------------------


class SteppingClock:
    """A monotonic clock that advances ``step`` seconds each time it is read."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_a_budget_replans_the_run_and_stops_it_on_time(tiny_ct, tmp_path):
    # The loop reads the clock once per iteration: 1 s each, so after timing the first
    # iterations a 30 s budget affords 27 (90 % of it), not the 10,000 asked for.
    final = train(
        [tiny_ct],
        tiny_settings(validate_every=0, warmup_iterations=1000),
        tmp_path,
        iterations=10_000,
        budget_s=30.0,
        clock=SteppingClock(1.0),
    )
    stopped = stop_record(tmp_path)
    assert stopped["reason"] == "completed"
    assert stopped["iteration"] == stopped["total"] <= 27
    assert stopped["budget_s"] == 30.0 and final.name == stopped["checkpoint"]
    assert load_checkpoint(final).iteration == stopped["iteration"]
    # The warm-up shrank with the plan: at most a tenth of it.
    schedule = load_checkpoint(final).scheduler["lr_lambdas"][0]
    assert schedule["total_steps"] == stopped["total"]
    assert schedule["warmup_steps"] <= stopped["total"] // 10


def test_the_budget_is_a_hard_stop_even_when_the_plan_was_too_hopeful(tiny_ct, tmp_path):
    clock = SteppingClock(0.01)  # fast while the plan is made ...

    def slow_down(update) -> None:
        if update.iteration == PLAN_AFTER + 1:
            clock.step = 10.0  # ... then ten times slower than planned

    train(
        [tiny_ct],
        tiny_settings(validate_every=0),
        tmp_path,
        iterations=200,
        budget_s=30.0,
        clock=clock,
        progress=slow_down,
    )
    stopped = stop_record(tmp_path)
    assert stopped["reason"] == "budget"
    assert stopped["iteration"] < stopped["total"]


def test_a_slow_first_iteration_does_not_shrink_the_plan(tiny_ct, tmp_path):
    # The first iteration fills a view bank (here: 100 s), the others take 1 s each: the
    # plan is made from the others, so a 200 s budget affords about 80 iterations, not 10.
    clock = SteppingClock(100.0)

    def bank_filled(update) -> None:
        clock.step = 1.0

    train(
        [tiny_ct],
        tiny_settings(validate_every=0),
        tmp_path,
        iterations=10_000,
        budget_s=200.0,
        clock=clock,
        progress=bank_filled,
    )
    stopped = stop_record(tmp_path)
    assert 75 <= stopped["total"] <= 85 and stopped["reason"] == "completed"


def test_validation_that_stops_improving_stops_the_run(tiny_ct, tmp_path):
    # A learning rate this small leaves the network as it is: validation cannot improve.
    train(
        [tiny_ct],
        tiny_settings(lr=1e-12, validate_every=2, validation_views=4, validation_patience=2),
        tmp_path,
        iterations=12,  # from iteration 6 on, the second half, validation may stop it
        start_at_nominal_view=False,
    )
    stopped = stop_record(tmp_path)
    assert stopped["reason"] == "converged"
    assert stopped["iteration"] == 6  # best at 2, no gain at 4 and 6
    figures = [json.loads(line).get("validation_mm") for line in metrics_lines(tmp_path)]
    assert [f is not None for f in figures] == [(i + 1) % 2 == 0 for i in range(6)]
    assert stopped["validation_mm"] == pytest.approx(figures[-1], abs=1e-3)


def test_a_pose_loss_alone_skips_the_second_render(tiny_ct, tmp_path):
    train([tiny_ct], tiny_settings(w_ncc=0.0, validate_every=0), tmp_path, iterations=2)
    records = [json.loads(line) for line in metrics_lines(tmp_path)]
    assert all(r["mncc"] == 1.0 and r["dgeo_mm"] > 0 for r in records)


def test_device_profiles_apply_by_device_type():
    settings = TrainingSettings()
    cpu = settings.for_device("cpu")
    assert (cpu.detector_size_px, cpu.backbone) == (64, "resnet10t")
    # Same field of view with a quarter of the pixels.
    assert cpu.detector_size_px * cpu.pixel_spacing_mm == pytest.approx(
        settings.detector_size_px * settings.pixel_spacing_mm
    )
    # A pose loss over a bank of reused views, on the narrower ranges a CPU can learn.
    assert (cpu.w_ncc, cpu.bank_views) == (0.0, 8192)
    assert cpu.pose_ranges.offsets_mm[0] < settings.pose_ranges.offsets_mm[0]
    assert isinstance(cpu.pose_ranges, type(settings.pose_ranges))
    # A GPU keeps the full detector, batch and network, with the same loss and C-arm views.
    cuda = settings.for_device("cuda:1")
    assert (cuda.detector_size_px, cuda.batch_size, cuda.backbone) == (
        settings.detector_size_px,
        settings.batch_size,
        settings.backbone,
    )
    assert (cuda.w_ncc, cuda.bank_views, cuda.pose_ranges) == (0.0, 0, cpu.pose_ranges)
    finetune = settings.for_device("cpu", finetune=True)
    assert (finetune.batch_size, finetune.bank_views) == (cpu.batch_size, cpu.bank_views)
    assert (finetune.detector_size_px, finetune.backbone) == (128, settings.backbone)
    assert finetune.pose_ranges == settings.pose_ranges and finetune.lr == settings.lr
    assert TrainingSettings(profiles={}).for_device("cpu") == TrainingSettings(profiles={})


def bank_settings(**changes) -> TrainingSettings:
    """A bank of two chunks, refreshed every 4 iterations (16 views x 1 use / 4 per batch)."""
    values = {"w_ncc": 0.0, "bank_views": 32, "bank_reuse": 1.0, "validate_every": 0}
    return tiny_settings(**{**values, **changes})


def test_a_view_bank_is_filled_once_then_refreshed_a_chunk_at_a_time(
    tiny_ct, tmp_path, monkeypatch
):
    calls: list[int] = []
    original = PoseRenderer.render

    def counting(self, pose, density):
        calls.append(len(pose.matrix))
        return original(self, pose, density)

    monkeypatch.setattr(PoseRenderer, "render", counting)
    final = train([tiny_ct], bank_settings(), tmp_path, iterations=9)
    # Two chunks to fill, then one at iterations 4 and 8; nothing rendered from predictions.
    assert len(calls) >= 4 and all(count == CHUNK_VIEWS for count in calls)
    assert load_checkpoint(final).run["bank_chunks_drawn"] == 4
    records = [json.loads(line) for line in metrics_lines(tmp_path)]
    assert all(r["mncc"] == 1.0 and r["dgeo_mm"] > 0 for r in records)


def test_a_view_bank_needs_a_pose_loss_alone(tiny_ct, tmp_path):
    with pytest.raises(ValueError, match="w_ncc: 0"):
        train([tiny_ct], bank_settings(w_ncc=1.0), tmp_path, iterations=1)


def test_a_restarted_run_renders_the_same_bank_again(tiny_ct, tmp_path):
    settings = bank_settings()
    straight = train([tiny_ct], settings, tmp_path / "straight", iterations=7, seed=4)
    stopped = train(
        [tiny_ct],
        settings,
        tmp_path / "a",
        iterations=7,
        seed=4,
        progress=lambda update: update.iteration < 5,  # after the first refresh
    )
    resumed = restart(stopped, tmp_path / "b")
    assert np.allclose(losses_of(tmp_path / "b"), losses_of(tmp_path / "straight")[5:], atol=1e-5)
    ours, theirs = load_checkpoint(resumed).model, load_checkpoint(straight).model
    assert all(torch.allclose(ours[key], theirs[key], atol=1e-6) for key in theirs)


# --- training, checkpoints, restart -------------------------------------------------------------


def test_training_lowers_the_loss(tiny_ct, tmp_path):
    # From a random network: predictions start far off and must move toward the views.
    final = train(
        [tiny_ct], tiny_settings(), tmp_path, iterations=20, seed=0, start_at_nominal_view=False
    )

    losses = losses_of(tmp_path)
    assert final.is_file() and len(losses) == 20
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_restart_continues_exactly_like_an_uninterrupted_run(tiny_ct, tmp_path):
    settings = tiny_settings(gradient_accumulation=2)  # stop between two accumulated batches
    straight = train([tiny_ct], settings, tmp_path / "straight", iterations=6, seed=3)

    seen: list[int] = []

    def stop_after_three(update) -> bool:
        seen.append(update.iteration)
        return update.iteration < 3

    stopped = train(
        [tiny_ct], settings, tmp_path / "a", iterations=6, seed=3, progress=stop_after_three
    )
    assert seen == [1, 2, 3] and stopped.name == "iter_000003.pt"
    resumed = restart(stopped, tmp_path / "b")

    first, second = losses_of(tmp_path / "straight"), losses_of(tmp_path / "b")
    assert len(second) == 3
    assert second[0] == pytest.approx(first[3], abs=1e-5)
    assert np.allclose(second, first[3:], atol=1e-5)
    ours, theirs = load_checkpoint(resumed).model, load_checkpoint(straight).model
    assert all(torch.allclose(ours[key], theirs[key], atol=1e-6) for key in theirs)


def test_an_inference_checkpoint_keeps_the_predictions_and_drops_the_rest(tiny_ct, tmp_path):
    final = train([tiny_ct], tiny_settings(), tmp_path / "run", iterations=2)
    slim = inference_checkpoint(final, tmp_path / "slim.pt", {"summary": "two iterations"})
    state = load_checkpoint(slim)
    assert state.optimizer is None and state.rng is None and state.gradients is None
    assert state.run["provenance"] == {"summary": "two iterations"}
    assert slim.stat().st_size < 0.5 * final.stat().st_size
    image = torch.rand(3, 1, 32, 32)
    ours = state.build_model().predict_pose(image).matrix
    theirs = load_checkpoint(final).build_model().predict_pose(image).matrix
    assert torch.allclose(ours, theirs, atol=0.05 * float(theirs.abs().max()))


def test_checkpoint_records_conventions_and_refuses_mismatched_base(tiny_ct, tmp_path):
    settings = tiny_settings()
    final = train([tiny_ct], settings, tmp_path / "run", iterations=1)

    model, conventions = load_model(final)
    assert conventions == Conventions.from_settings(settings)
    assert conventions.reverse_x_axis is True and conventions.orientation == "PA"
    assert conventions.hu_to_density == "xvr-node-linear-v1"
    assert conventions.image_size == (32, 32) and model.image_size == 32
    assert Conventions.from_json(conventions.to_json()) == conventions

    other = Conventions.from_settings(tiny_settings(orientation="AP", sdd_mm=1200.0))
    problems = conventions.mismatches(other)
    named = {line.split(":")[0] for line in problems}
    assert named == {"orientation", "reverse_x_axis", "sid_mm"}
    assert conventions.mismatches(conventions) == []

    with pytest.raises(ValueError, match="sid_mm"):
        train([tiny_ct], tiny_settings(sdd_mm=1200.0), tmp_path / "ft", base_checkpoint=final)


def test_finetune_starts_from_the_base_weights(tiny_ct, tmp_path):
    settings = tiny_settings(finetune_iterations=2, finetune_warmup_iterations=1)
    base = train([tiny_ct], settings, tmp_path / "base", iterations=1)
    tuned = train([tiny_ct], settings, tmp_path / "ft", base_checkpoint=base)

    state = load_checkpoint(tuned)
    assert state.iteration == 2 and state.run["lr"] == settings.finetune_lr
    assert state.run["base_checkpoint"] == str(base)


def test_itk_rigid_transform_with_centre(tmp_path, tiny_ct):
    path = tmp_path / "warp.tfm"
    path.write_text(
        "#Insight Transform File V1.0\n#Transform 0\n"
        "Transform: Euler3DTransform_double_3_3\n"
        f"Parameters: 0 0 {np.pi / 2} 1 2 3\n"
        "FixedParameters: 10 0 0 0\n"
    )
    matrix = read_itk_transform(path)

    # 90 degrees about z through (10, 0, 0), then (1, 2, 3): (11, 0, 0) -> (10, 1, 0) + t.
    assert np.allclose(matrix @ [11, 0, 0, 1], [11, 3, 3, 1])
    assert np.allclose(read_itk_transform(path, invert=True) @ matrix, np.eye(4))
    identity = template_to_volume(tiny_ct, np.eye(4), tiny_ct.center_ras)
    assert np.allclose(identity, np.eye(4))


def test_template_warp_maps_template_poses_onto_a_moved_ct(tiny_ct, tmp_path):
    # The same anatomy scanned with the patient turned 20 degrees and shifted.
    moved_from_template = rigid(rotation_about("z", 20.0) @ rotation_about("x", 5.0), [30, -10, 5])
    moved = CtVolume(tiny_ct.hu, moved_from_template @ tiny_ct.affine_lps)
    settings = tiny_settings()
    intrinsics = training_intrinsics(settings)
    centre = template_center_ras([tiny_ct, moved], [np.eye(4), moved_from_template])
    assert np.allclose(centre, tiny_ct.center_ras)

    batch = sample_poses(
        tiny_ct, settings.pose_ranges, intrinsics, "PA", 2, torch.Generator().manual_seed(4)
    )
    reframe = torch.as_tensor(template_to_volume(moved, moved_from_template, centre)).float()
    in_moved = batch.pose.compose(RigidTransform(reframe))
    with torch.no_grad():
        a = PoseRenderer(tiny_ct, intrinsics, "PA")
        b = PoseRenderer(moved, intrinsics, "PA")
        assert torch.allclose(
            a.render(batch.pose, a.density(2.0)), b.render(in_moved, b.density(2.0)), atol=1e-2
        )

    final = train(
        [tiny_ct, moved],
        settings,
        tmp_path,
        iterations=2,
        warps=[None, moved_from_template],
    )
    assert np.allclose(load_checkpoint(final).run["template_center_ras"], centre)
