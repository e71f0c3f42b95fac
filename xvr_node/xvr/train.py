"""Train, finetune and restart a patient-specific pose regressor from synthetic X-rays (XVR)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffdrr.pose import RigidTransform
from timm.utils import adaptive_clip_grad

from xvr_node.config import TrainingSettings
from xvr_node.ct_volume import CtVolume
from xvr_node.geometry import Intrinsics
from xvr_node.xvr.augment import XrayAugmentation
from xvr_node.xvr.checkpoint import (
    Checkpoint,
    Conventions,
    load_checkpoint,
    save_checkpoint,
    training_intrinsics,
)
from xvr_node.xvr.losses import geodesic_distance, multiscale_ncc
from xvr_node.xvr.model import PoseRegressor
from xvr_node.xvr.renderer import Projector
from xvr_node.xvr.sampling import PoseBatch, nominal_pose, sample_poses
from xvr_node.xvr.schedule import warmup_cosine
from xvr_node.xvr.view_bank import Chunk, ViewBank, refresh_interval
from xvr_node.xvr.warp import template_center_ras, template_to_volume

log = logging.getLogger(__name__)

#: A pixel shows anatomy when its ray crosses this much water-equivalent tissue (mm).
FOREGROUND_MM = 5.0

#: Ray samples per chunk when rendering without gradient (about 200 MB of coordinates).
NO_GRAD_SAMPLES = 1 << 24

#: Seed of the held-out validation views (see ``_Run.validate``).
VALIDATION_SEED = 20_261_130

#: Iterations timed before a budgeted run plans how many it can afford.
PLAN_AFTER = 5

#: Share of the budget a plan may fill: checkpoints, validation and a slower machine.
PLAN_MARGIN = 0.9

#: Where a run records why it stopped (read by the finetune job and ``status``).
STOP_FILE = "stop.json"

#: Fresh pose batches to draw before concluding that the ranges miss the anatomy.
MAX_REDRAWS = 20

#: Where in the run folder things go.
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
VOLUME_DIR = "volumes"


@dataclass(frozen=True)
class TrainingProgress:
    """One iteration's numbers, for a progress bar, a job heartbeat or a stop decision."""

    iteration: int
    total: int
    loss: float
    mncc: float
    dgeo_mm: float
    lr: float
    kept: float
    it_per_s: float
    eta_s: float
    validation_mm: float | None = None  # last held-out median pose error


#: Called after every iteration; returning ``False`` stops training with a checkpoint.
ProgressCallback = Callable[[TrainingProgress], bool | None]


# --- volumes and rendering ------------------------------------------------------------------


def training_voxel_mm(settings: TrainingSettings) -> float:
    """The finest detail a training DRR resolves: a detector pixel at the nearest isocentre."""
    return settings.pixel_spacing_mm * settings.pose_ranges.source_isocenter_sdd_fraction[0]


def resample_volume(volume: CtVolume, voxel_mm: float) -> CtVolume:
    """Box-filter and resample the CT to about ``voxel_mm``, keeping the grid centre exactly.

    The diffdrr world is centred on the grid centre, so a shifted centre would shift every
    pose the network learns. Rays thinner than the voxels sample a finer CT for nothing;
    this is most of the speed of CPU training.
    """
    spacing = volume.spacing_mm
    factors = np.maximum(1, np.round(voxel_mm / spacing)).astype(int)
    if np.all(factors == 1):
        return volume
    shape = np.array(volume.hu.shape)
    new_shape = np.maximum(1, np.ceil(shape / factors)).astype(int)
    # Air below -1000 HU is density 0 either way; clipping keeps it out of the average.
    hu = torch.as_tensor(np.clip(volume.hu, -1000.0, None), dtype=torch.float32)[None, None]
    kernel = tuple(int(min(k, n)) for k, n in zip(factors, shape, strict=True))
    pooled = F.avg_pool3d(hu, kernel, stride=1)  # value at old index i + (k - 1) / 2
    pooled_shape = np.array(pooled.shape[-3:])
    # New voxel j sits at old index c + (j - (m - 1) / 2) * k, c = (n - 1) / 2.
    axes = []
    for n, m, k, size, kk in zip(shape, new_shape, factors, pooled_shape, kernel, strict=True):
        old = (n - 1) / 2 + (np.arange(m) - (m - 1) / 2) * k
        pooled_index = old - (kk - 1) / 2
        axes.append(torch.as_tensor(2 * pooled_index / max(size - 1, 1) - 1, dtype=torch.float32))
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij")[::-1], dim=-1)[None]
    resampled = F.grid_sample(
        pooled, grid, mode="bilinear", padding_mode="border", align_corners=True
    )[0, 0]
    # grid_sample's (x, y, z) index the (last, middle, first) dims, hence the [::-1] above.
    resampled = resampled.numpy()
    affine = volume.affine_lps.copy()
    centre = volume.center_lps
    affine[:3, :3] = volume.affine_lps[:3, :3] * factors
    affine[:3, 3] = 0.0
    affine[:3, 3] = centre - (affine @ np.r_[(new_shape - 1) / 2.0, 1.0])[:3]
    return CtVolume(np.ascontiguousarray(resampled, dtype=np.float32), affine)


class PoseRenderer:
    """Differentiable DRRs of one CT on the training detector, for diffdrr poses.

    The registration's :class:`~xvr_node.xvr.renderer.Projector` (one ray marcher in the
    node), fed the exported matrix of each pose. Samples fall every ``step_voxels`` voxels
    between each ray's entry into the volume and its exit; the volume is already
    box-filtered to the rays' resolution. Values are density·mm.
    """

    def __init__(
        self,
        volume: CtVolume,
        intrinsics: Intrinsics,
        orientation: str,
        device: str | torch.device = "cpu",
        step_voxels: float = 2.0,
    ) -> None:
        self.volume = volume
        self.intrinsics = intrinsics
        self.projector = Projector(volume, intrinsics, device=device, step_voxels=step_voxels)
        left, right = volume.frame(orientation).pose_factors(intrinsics)
        self._left = torch.as_tensor(left, dtype=torch.float32, device=device)
        self._right = torch.as_tensor(right, dtype=torch.float32, device=device)

    def density(self, bone_contrast: float) -> torch.Tensor:
        """This CT's density with ``bone_contrast`` (see ``renderer.hu_to_density``)."""
        return self.projector.density(bone_contrast)

    def render(self, pose: RigidTransform, density: torch.Tensor) -> torch.Tensor:
        """Line integrals (B, 1, H, W) through ``density`` for diffdrr poses."""
        matrices = self._left @ pose.matrix @ self._right
        per_view = self.intrinsics.rows * self.intrinsics.columns * self.projector.samples
        chunk = max(1, NO_GRAD_SAMPLES // per_view)
        if torch.is_grad_enabled() or len(matrices) <= chunk:
            return self.projector(matrices, density=density)
        # Without gradient nothing needs to be kept: bound the memory of large batches.
        return torch.cat(
            [
                self.projector(matrices[i : i + chunk], density=density)
                for i in range(0, len(matrices), chunk)
            ]
        )


def foreground_fraction(image: torch.Tensor) -> torch.Tensor:
    """Fraction of each image's pixels whose ray crosses anatomy: (B,)."""
    return (image > FOREGROUND_MM).flatten(1).float().mean(dim=1)


# --- the run --------------------------------------------------------------------------------


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save_volume(volume: CtVolume, path: Path) -> dict[str, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        np.savez(handle, hu=volume.hu.astype(np.float32), affine_lps=volume.affine_lps)
    return {"path": str(path.resolve()), "sha256": _file_digest(path)}


def _load_volume(entry: dict[str, str]) -> CtVolume:
    path = Path(entry["path"])
    if not path.is_file():
        raise FileNotFoundError(f"training volume {path} is gone: pass volumes= to restart")
    if _file_digest(path) != entry["sha256"]:
        raise ValueError(f"training volume {path} changed since the checkpoint was written")
    with np.load(path) as data:
        return CtVolume(data["hu"], data["affine_lps"])


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.as_tensor(keys.astype(np.int64)), position, has_gauss, cached],
        "python": _python_state_to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _python_state_to_lists(state: Any) -> Any:
    return [_python_state_to_lists(x) for x in state] if isinstance(state, tuple) else state


def _lists_to_python_state(state: Any) -> Any:
    return tuple(_lists_to_python_state(x) for x in state) if isinstance(state, list) else state


def _restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    random.setstate(_lists_to_python_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _Run:
    """One training run's state: the pieces a checkpoint must hold to resume exactly."""

    def __init__(
        self,
        volumes: list[CtVolume],
        settings: TrainingSettings,
        model: PoseRegressor,
        *,
        total: int,
        lr: float,
        warmup: int,
        device: str | torch.device,
        generator: torch.Generator,
        reframes: list[np.ndarray | None],
        seed: int = 0,
    ) -> None:
        if settings.bank_views and settings.w_ncc > 0:
            raise ValueError(
                "training.bank_views needs a pose loss alone (w_ncc: 0): the image loss "
                "renders each prediction, which a bank of stored views cannot"
            )
        self.settings = settings
        self.conventions = Conventions.from_settings(settings)
        self.intrinsics = training_intrinsics(settings)
        self.device = torch.device(device)
        self.volumes = volumes
        self.projectors = [
            PoseRenderer(v, self.intrinsics, settings.orientation, self.device) for v in volumes
        ]
        self.reframes = [
            None
            if r is None
            else RigidTransform(torch.as_tensor(r, dtype=torch.float32, device=self.device))
            for r in reframes
        ]
        self.model = model.to(self.device)
        self.model.train()
        self.total = total
        self.lr = lr
        self.warmup = warmup
        accumulation = settings.gradient_accumulation
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.scheduler = warmup_cosine(
            self.optimizer, math.ceil(warmup / accumulation), math.ceil(total / accumulation)
        )
        self.generator = generator
        self.augment = XrayAugmentation(settings.augmentation_probability)
        self.iteration = 0
        self.bank = (
            ViewBank(self._render_chunk, settings.bank_views, seed, self.device)
            if settings.bank_views
            else None
        )
        self.refresh_every = refresh_interval(settings.batch_size, settings.bank_reuse)
        self._reframe_stack = torch.stack(
            [torch.eye(4, device=self.device) if r is None else r.matrix[0] for r in self.reframes]
        )

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=self.generator))

    def _sample_views(
        self,
        index: int,
        density: torch.Tensor,
        count: int | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[PoseBatch, torch.Tensor, float]:
        """Views with enough anatomy, redrawing whole batches when none qualifies."""
        settings = self.settings
        projector = self.projectors[index]
        for _ in range(MAX_REDRAWS):
            batch = sample_poses(
                self.volumes[index],
                settings.pose_ranges,
                self.intrinsics,
                settings.orientation,
                count or settings.batch_size,
                generator or self.generator,
                settings.parameterization,
                settings.convention,
                self.device,
            )
            with torch.no_grad():
                images = projector.render(batch.pose, density)
            keep = foreground_fraction(images) >= settings.min_foreground_fraction
            if keep.any():
                kept = float(keep.float().mean())
                return batch.subset(keep), images[keep], kept
        raise RuntimeError(
            f"no view in {MAX_REDRAWS} batches showed {settings.min_foreground_fraction:.0%} "
            "anatomy: are training.pose_ranges (offsets, distances) right for this CT?"
        )

    def _render_chunk(self, count: int, generator: torch.Generator) -> Chunk:
        """``count`` views of one volume at one bone contrast, for the view bank."""
        index = int(torch.randint(len(self.projectors), (), generator=generator))
        low, high = self.settings.contrast_range
        contrast = low + (high - low) * float(torch.rand((), generator=generator))
        density = self.projectors[index].density(contrast)
        poses, images, have = [], [], 0
        while have < count:
            batch, rendered, _ = self._sample_views(index, density, count, generator)
            poses.append(batch.pose.matrix)
            images.append(rendered)
            have += len(rendered)
        return Chunk(torch.cat(images)[:count], torch.cat(poses)[:count], index)

    def step(self) -> dict[str, Any]:
        """One iteration: views (rendered or from the bank), augment, predict, back-propagate."""
        settings = self.settings
        if self.bank is not None:
            fixed, true, predicted = self._bank_prediction()
            mncc = torch.ones(len(fixed), device=fixed.device)
            kept, contrast, index = 1.0, None, None  # each view has its own, in the bank
        else:
            index = int(torch.randint(len(self.projectors), (), generator=self.generator))
            contrast = self._uniform(*settings.contrast_range)
            projector = self.projectors[index]
            density = projector.density(contrast)
            batch, fixed, kept = self._sample_views(index, density)
            true = batch.pose
            predicted = self.model(self.augment(fixed, self.generator))
            reframe = self.reframes[index]
            if reframe is not None:
                predicted = predicted.compose(reframe)  # template world → this CT's world
            if settings.w_ncc > 0:
                moving = projector.render(predicted, density)
                mncc = multiscale_ncc(fixed, moving, 9)
            else:  # a pose loss alone needs no second render: half the work per iteration
                mncc = torch.ones(len(fixed), device=fixed.device)
        rgeo, tgeo, dgeo = geodesic_distance(predicted, true, settings.sdd_mm)
        per_view = settings.w_ncc * (1.0 - mncc) + settings.w_geo * dgeo
        loss = per_view.mean()
        (loss / settings.gradient_accumulation).backward()
        lr = self.optimizer.param_groups[0]["lr"]
        self.iteration += 1
        if self.iteration % settings.gradient_accumulation == 0 or self.iteration == self.total:
            adaptive_clip_grad(self.model.parameters(), clip_factor=settings.gradient_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return {
            "iteration": self.iteration,
            "loss": loss.item(),
            "mncc": mncc.detach().mean().item(),
            "dgeo_mm": dgeo.detach().mean().item(),
            "rgeo_mm": rgeo.detach().mean().item(),
            "tgeo_mm": tgeo.detach().mean().item(),
            "lr": lr,
            "kept": kept,
            "contrast": contrast,
            "volume": index,
        }

    def _bank_prediction(self) -> tuple[torch.Tensor, RigidTransform, RigidTransform]:
        """Views from the bank (filled on first use, refreshed on schedule), and predictions."""
        bank = self.bank
        assert bank is not None
        if bank.drawn == 0:
            bank.fill()
        elif self.iteration % self.refresh_every == 0:
            bank.refresh()
        views = bank.sample(self.settings.batch_size, self.generator)
        predicted = self.model(self.augment(views.images, self.generator))
        if any(r is not None for r in self.reframes):  # template world → each view's CT world
            predicted = predicted.compose(RigidTransform(self._reframe_stack[views.volumes]))
        return views.images, RigidTransform(views.poses), predicted

    def set_total(self, total: int) -> None:
        """Plan a different number of iterations; the cosine schedule ends at the new total.

        A run cut short keeps its warm-up to at most a tenth of the new total: a budget that
        affords 300 iterations must not spend them all warming up to the learning rate.
        """
        self.total = total
        accumulation = self.settings.gradient_accumulation
        schedule = self.scheduler.lr_lambdas[0]
        schedule.total_steps = math.ceil(total / accumulation)
        schedule.warmup_steps = min(schedule.warmup_steps, max(1, schedule.total_steps // 10))

    def validate(self, views: int) -> float:
        """Median pose error (double geodesic, mm) on ``views`` fixed held-out views.

        The views come from their own seeded generator, the same at every call and never
        drawn by training, so successive figures compare like with like and the training
        random stream (and with it an exact restart) is untouched.
        """
        generator = torch.Generator().manual_seed(VALIDATION_SEED)
        settings = self.settings
        errors = []
        self.model.eval()
        try:
            with torch.no_grad():
                for index, projector in enumerate(self.projectors):
                    batch = sample_poses(
                        self.volumes[index],
                        settings.pose_ranges,
                        self.intrinsics,
                        settings.orientation,
                        max(1, views // len(self.projectors)),
                        generator,
                        settings.parameterization,
                        settings.convention,
                        self.device,
                    )
                    images = projector.render(batch.pose, projector.density(1.0))
                    predicted = self.model(images)
                    if self.reframes[index] is not None:
                        predicted = predicted.compose(self.reframes[index])
                    errors.append(geodesic_distance(predicted, batch.pose, settings.sdd_mm)[2])
        finally:
            self.model.train()
        return float(torch.cat(errors).median())

    def checkpoint(self, run_info: dict[str, Any]) -> Checkpoint:
        gradients = [
            None if p.grad is None else p.grad.detach().cpu() for p in self.model.parameters()
        ]
        return Checkpoint(
            model={k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            model_config=self.model.config,
            conventions=self.conventions,
            settings=self.settings,
            iteration=self.iteration,
            total_iterations=self.total,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            gradients=gradients,
            rng=_rng_state(self.generator),
            run={
                **run_info,
                "lr": self.lr,
                "warmup_iterations": self.warmup,
                "bank_chunks_drawn": None if self.bank is None else self.bank.drawn,
            },
        )

    def restore(self, checkpoint: Checkpoint) -> None:
        self.model.load_state_dict(checkpoint.model)
        if checkpoint.optimizer is not None:
            self.optimizer.load_state_dict(checkpoint.optimizer)
        if checkpoint.scheduler is not None:
            self.scheduler.load_state_dict(checkpoint.scheduler)
        if checkpoint.gradients is not None:
            for parameter, gradient in zip(
                self.model.parameters(), checkpoint.gradients, strict=True
            ):
                parameter.grad = None if gradient is None else gradient.to(parameter.device)
        if checkpoint.rng is not None:
            _restore_rng(checkpoint.rng, self.generator)
        self.iteration = checkpoint.iteration
        drawn = checkpoint.run.get("bank_chunks_drawn")
        if self.bank is not None and drawn:
            self.bank.restore(drawn)


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}"


def _loop(
    run: _Run,
    out_dir: Path,
    run_info: dict[str, Any],
    progress: ProgressCallback | None,
    log_every: int,
    budget_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Path:
    """Iterate to ``run.total``, within ``budget_s`` seconds and while validation improves.

    With a budget, the iterations after the first (which may fill a view bank) are timed and
    the run re-planned to the number of iterations the rest of the budget affords (the
    learning-rate schedule ends there), and it stops at the budget regardless. Every
    ``validate_every`` iterations the median pose error on held-out views is measured;
    ``validation_patience`` checks without a 1 % improvement stop it in its second half
    (a CPU run's held-out figure swings by ±20 % early on). Checkpoints come
    periodically, at the end and when told to stop; why it stopped goes to ``stop.json``.
    """
    settings = run.settings
    checkpoints = out_dir / CHECKPOINT_DIR
    metrics_path = out_dir / METRICS_FILE
    start_iteration, started = run.iteration, clock()
    first_done = started
    window_iteration, window_start = run.iteration, started
    last: Path | None = None
    reason = "completed"
    best, stale, validation_mm = math.inf, 0, None
    with metrics_path.open("a") as metrics:
        while run.iteration < run.total:
            record = run.step()
            now = clock()
            elapsed = now - started
            done = run.iteration
            record["elapsed_s"] = round(elapsed, 4)
            if done == start_iteration + 1:
                first_done = now  # the first iteration carries one-off costs (a view bank)
            if budget_s is not None and done == start_iteration + 1 + PLAN_AFTER:
                rate = PLAN_AFTER / max(now - first_done, 1e-9)
                affordable = done + int(rate * (budget_s * PLAN_MARGIN - elapsed))
                if affordable < run.total:
                    log.info(
                        "training planned to %d iterations (of %d) to fit %s at %.2f it/s",
                        max(affordable, done),
                        run.total,
                        _format_eta(budget_s),
                        rate,
                    )
                    run.set_total(max(affordable, done))
            if settings.validate_every and done % settings.validate_every == 0:
                validation_mm = run.validate(settings.validation_views)
                record["validation_mm"] = round(validation_mm, 3)
                if validation_mm < 0.99 * best:
                    best, stale = validation_mm, 0
                else:
                    stale += 1
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            rate = (done - start_iteration) / max(elapsed, 1e-9)
            eta = (run.total - done) / rate if rate > 0 else math.inf
            if budget_s is not None:
                eta = min(eta, max(budget_s - elapsed, 0.0))
            update = TrainingProgress(
                iteration=done,
                total=run.total,
                loss=record["loss"],
                mncc=record["mncc"],
                dgeo_mm=record["dgeo_mm"],
                lr=record["lr"],
                kept=record["kept"],
                it_per_s=rate,
                eta_s=eta,
                validation_mm=validation_mm,
            )
            if done % log_every == 0 or done == run.total or done == start_iteration + 1:
                window_rate = (done - window_iteration) / max(now - window_start, 1e-9)
                log.info(
                    "training %d/%d loss %.4f mNCC %.3f dgeo %.1f mm lr %.2e %.2f it/s ETA %s%s",
                    done,
                    run.total,
                    update.loss,
                    update.mncc,
                    update.dgeo_mm,
                    update.lr,
                    window_rate,
                    _format_eta(update.eta_s),
                    "" if validation_mm is None else f" validation {validation_mm:.1f} mm",
                )
                window_iteration, window_start = done, now
            stop = progress is not None and progress(update) is False
            if stop:
                reason = "yielded"
            elif budget_s is not None and elapsed >= budget_s and done < run.total:
                stop, reason = True, "budget"
            elif (
                settings.validate_every
                and stale >= settings.validation_patience
                and done >= run.total // 2  # early on, a noisy figure is no verdict
            ):
                stop, reason = True, "converged"
            if done % settings.checkpoint_every == 0 or done == run.total or stop:
                last = save_checkpoint(
                    run.checkpoint(run_info), checkpoints / f"iter_{done:06d}.pt"
                )
                log.info("checkpoint %s", last)
            if stop:
                log.info("training stopped at iteration %d of %d: %s", done, run.total, reason)
                break
    if last is None:  # nothing left to do: the checkpoint we resumed from is final
        last = save_checkpoint(
            run.checkpoint(run_info), checkpoints / f"iter_{run.iteration:06d}.pt"
        )
    stopped = {
        "reason": reason,
        "iteration": run.iteration,
        "total": run.total,
        "seconds": round(clock() - started, 1),
        "budget_s": budget_s,
        "validation_mm": validation_mm,
        "best_validation_mm": None if math.isinf(best) else best,
        "checkpoint": last.name,
    }
    (out_dir / STOP_FILE).write_text(json.dumps(stopped, indent=1))
    return last


def stop_record(out_dir: Path) -> dict[str, Any] | None:
    """Why the run in ``out_dir`` last stopped (see :func:`_loop`), or None."""
    path = Path(out_dir) / STOP_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _build_model(settings: TrainingSettings) -> PoseRegressor:
    return PoseRegressor(
        backbone=settings.backbone,
        parameterization=settings.parameterization,
        norm=settings.norm,
        in_chans=1,
        image_size=settings.detector_size_px,
        convention=settings.convention,
    )


def _reframes(
    volumes: list[CtVolume], warps: list[np.ndarray | None] | None
) -> tuple[list[np.ndarray | None], list[float] | None]:
    """Per volume, template world → volume world (None without warps) and the template centre."""
    if warps is None or all(w is None for w in warps):
        return [None] * len(volumes), None
    if len(warps) != len(volumes):
        raise ValueError(f"got {len(warps)} warps for {len(volumes)} volumes")
    matrices = [np.eye(4) if w is None else np.asarray(w, dtype=float) for w in warps]
    centre = template_center_ras(volumes, matrices)
    return [template_to_volume(v, m, centre) for v, m in zip(volumes, matrices, strict=True)], list(
        centre
    )


def train(
    volumes: list[CtVolume],
    settings: TrainingSettings,
    out_dir: Path,
    *,
    iterations: int | None = None,
    base_checkpoint: Path | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: ProgressCallback | None = None,
    warps: list[np.ndarray | None] | None = None,
    start_at_nominal_view: bool = True,
    log_every: int = 50,
    budget_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Path:
    """Train a pose regressor on DRRs of ``volumes``; returns the final checkpoint's path.

    With ``base_checkpoint`` this is a finetune: the base weights (whose conventions must
    match ``settings``), ``finetune_lr``, ``finetune_warmup_iterations`` and by default
    ``finetune_iterations``. ``warps`` optionally give, per volume, the rigid 4×4 mapping
    template LPS → that CT's LPS (see :mod:`xvr_node.xvr.warp`); the network then learns
    poses in the template's frame. A de novo network starts out predicting the nominal view
    (see :meth:`PoseRegressor.start_at`) unless ``start_at_nominal_view`` is false.

    Progress: a log line every ``log_every`` iterations, ``progress`` after every one (it
    may return ``False`` to stop with a checkpoint). ``budget_s`` bounds the run's time (it
    re-plans its iterations to fit, see :func:`_loop`), and held-out validation may stop it
    early; ``stop.json`` says why it stopped. Metrics go to ``out_dir/metrics.jsonl``,
    checkpoints to ``out_dir/checkpoints/`` every ``checkpoint_every`` iterations and at the
    end.
    """
    if not volumes:
        raise ValueError("train needs at least one CT volume")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    generator = torch.Generator().manual_seed(seed)

    conventions = Conventions.from_settings(settings)
    model = _build_model(settings)
    finetune = base_checkpoint is not None
    if finetune:
        base = load_checkpoint(Path(base_checkpoint))
        problems = base.conventions.mismatches(conventions)
        differing = [
            f"{key}: {base.model_config.get(key)!r} vs {value!r}"
            for key, value in model.config.items()
            if base.model_config.get(key) != value
        ]
        if problems or differing:
            raise ValueError(
                f"base model {base_checkpoint} does not fit these settings: "
                + "; ".join(problems + differing)
            )
        model.load_state_dict(base.model)
        total = iterations or settings.finetune_iterations
        lr, warmup = settings.finetune_lr, settings.finetune_warmup_iterations
    else:
        total = iterations or settings.iterations
        lr, warmup = settings.lr, settings.warmup_iterations

    voxel_mm = training_voxel_mm(settings)
    training_volumes = [resample_volume(v, voxel_mm) for v in volumes]
    if not finetune and start_at_nominal_view:
        start = nominal_pose(
            training_volumes[0],
            settings.pose_ranges,
            training_intrinsics(settings),
            settings.orientation,
            settings.parameterization,
            settings.convention,
        )
        model.start_at(start.pose)
    reframes, template_centre = _reframes(training_volumes, warps)
    run = _Run(
        training_volumes,
        settings,
        model,
        total=total,
        lr=lr,
        warmup=warmup,
        device=device,
        generator=generator,
        reframes=reframes,
        seed=seed,
    )
    saved = [
        _save_volume(v, out_dir / VOLUME_DIR / f"volume_{i:03d}.npz")
        for i, v in enumerate(training_volumes)
    ]
    run_info = {
        "seed": seed,
        "volumes": saved,
        "voxel_mm": voxel_mm,
        "reframes": [None if r is None else r.tolist() for r in reframes],
        "template_center_ras": template_centre,
        "base_checkpoint": str(base_checkpoint) if base_checkpoint else None,
    }
    (out_dir / "run.json").write_text(
        json.dumps(
            {
                **run_info,
                "iterations": total,
                "lr": lr,
                "warmup_iterations": warmup,
                "conventions": conventions.to_json(),
                "settings": settings.model_dump(mode="json"),
            },
            indent=1,
        )
    )
    log.info(
        "training %s for %d iterations on %d volume(s) (batch %d, %d px, lr %.1e, device %s)",
        "finetune" if finetune else "de novo",
        total,
        len(volumes),
        settings.batch_size,
        settings.detector_size_px,
        lr,
        device,
    )
    return _loop(run, out_dir, run_info, progress, log_every, budget_s, clock)


def finetune(
    volumes: list[CtVolume],
    settings: TrainingSettings,
    out_dir: Path,
    base_checkpoint: Path,
    **options: Any,
) -> Path:
    """Finetune a base model on one patient's CT (``train`` with ``base_checkpoint``)."""
    return train(volumes, settings, out_dir, base_checkpoint=base_checkpoint, **options)


def restart(
    checkpoint: Path,
    out_dir: Path,
    *,
    iterations: int | None = None,
    device: str | torch.device = "cpu",
    progress: ProgressCallback | None = None,
    volumes: list[CtVolume] | None = None,
    log_every: int = 50,
    budget_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Path:
    """Resume a run from ``checkpoint`` exactly where it stopped; returns the final checkpoint.

    Weights, optimiser, scheduler, pending accumulated gradients and every random-number
    state are restored, so the continued run matches an uninterrupted one. ``iterations``
    changes the total (and so the cosine schedule); by default the original total is kept.
    The training volumes are read from the run folder the checkpoint names, unless given.
    """
    state = load_checkpoint(Path(checkpoint))
    info = state.run
    if volumes is None:
        volumes = [_load_volume(entry) for entry in info["volumes"]]
    elif len(volumes) != len(info["volumes"]):
        raise ValueError(f"the run trained on {len(info['volumes'])} volumes, got {len(volumes)}")
    total = iterations or state.total_iterations
    if total < state.iteration:
        raise ValueError(f"checkpoint is already at iteration {state.iteration} > {total}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator()
    reframes = [None if r is None else np.asarray(r) for r in info.get("reframes", [])]
    run = _Run(
        volumes,
        state.settings,
        PoseRegressor(**state.model_config),
        total=total,
        lr=info["lr"],
        warmup=info["warmup_iterations"],
        device=device,
        generator=generator,
        reframes=reframes or [None] * len(volumes),
        seed=info.get("seed", 0),
    )
    run.restore(state)
    if total != state.total_iterations:
        run.set_total(total)
    log.info("restarting at iteration %d of %d from %s", state.iteration, total, checkpoint)
    return _loop(run, out_dir, info, progress, log_every, budget_s, clock)


def measure_throughput(
    volume: CtVolume,
    settings: TrainingSettings,
    iterations: int = 5,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Training speed on this machine: iterations and training DRRs per second.

    One warm-up iteration is not counted. A training DRR is one sampled view: rendered
    without gradient, augmented, regressed, re-rendered with gradient and back-propagated.
    """
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    training_volume = resample_volume(volume, training_voxel_mm(settings))
    model = _build_model(settings)
    model.start_at(
        nominal_pose(
            training_volume,
            settings.pose_ranges,
            training_intrinsics(settings),
            settings.orientation,
            settings.parameterization,
            settings.convention,
        ).pose
    )
    run = _Run(
        [training_volume],
        settings,
        model,
        total=iterations + 1,
        lr=settings.lr,
        warmup=settings.warmup_iterations,
        device=device,
        generator=generator,
        reframes=[None],
    )
    run.step()
    views = 0.0
    started = time.perf_counter()
    for _ in range(iterations):
        views += run.step()["kept"] * settings.batch_size
    elapsed = time.perf_counter() - started
    return {
        "it_per_s": iterations / elapsed,
        "drr_per_s": views / elapsed,
        "batch_size": settings.batch_size,
        "image_size": settings.detector_size_px,
        "seconds": elapsed,
    }
