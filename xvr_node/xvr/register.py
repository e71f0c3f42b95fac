"""Register an X-ray frame to a CT: an initial pose, then multiscale differentiable refinement."""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from diffdrr.pose import RigidTransform, convert
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.spatial import ConvexHull

from xvr_node.ct_volume import CtVolume
from xvr_node.geometry import CarmPose, Intrinsics, pose_to_euler_zxy, project
from xvr_node.xvr.losses import MaskedTarget
from xvr_node.xvr.optimize import Pair, minimize
from xvr_node.xvr.renderer import MU_WATER_PER_MM, STEP_VOXELS, Projector
from xvr_node.xvr.xray import XrayFrame, line_integrals

LOG = logging.getLogger(__name__)

#: Start of the intensity model (log gain 0: water's μ; scatter softplus(−5) ≈ 0.7 % of the
#: unattenuated beam) and its Adam step, the same at every level.
INTENSITY_START = (0.0, -5.0)
INTENSITY_LR = 0.05

#: RMS change of the DRR, in its standard deviations, of one whitened L-BFGS unit: about
#: the first trial step (the similarity's patch and gradient terms are far more sensitive).
WHITE_STEP = 0.05

#: Least eigenvalue of the whitening metric, relative to its largest: caps how much longer
#: a step along the least visible direction (depth) can be than along the most visible.
EIGEN_FLOOR = 1e-1

#: HU above which a voxel of an end slice is body (not air): rays crossing there see anatomy
#: the CT does not hold.
BODY_HU = -500.0

#: Margin inside the CT's projected footprint, as a fraction of the level's shorter side.
FOOTPRINT_MARGIN = 0.03

#: Renderers kept (one per detector geometry and level, each with its own copy of the
#: resampled CT): enough for a cine run's levels and the gate's, while X-rays whose SID or
#: spacing differ do not each leave theirs behind.
KEEP_RENDERERS = 8


@dataclass(frozen=True)
class RefineSettings:
    """The refinement schedule (XVR.md "Refine"); every value comes from configuration."""

    # Coarse-to-fine levels by the size they reach: the image's shorter side in pixels.
    levels_px: Sequence[int] = (32, 64, 128)
    # Explicit detector downsampling factors instead (coarse to fine); None: from levels_px.
    scales: Sequence[float] | None = None
    similarity: str = "robust"  # see xvr_node.xvr.losses.SIMILARITIES
    beta: float = 0.5  # weight of mNCC against gradient-NCC
    lr_rotation: float = 1e-2  # rad
    lr_translation: float = 1.0  # mm
    lr_shrink: float = 0.5  # step sizes multiply by this at each finer scale
    patience: int = 10
    threshold: float = 1e-4
    plateau_factor: float = 0.1
    max_plateaus: int = 2
    max_iterations_per_scale: int = 500
    optimizer: str = "lbfgs"  # lbfgs (capped quasi-Newton) or adam (fixed steps, plateau rule)
    lbfgs_iterations: int = 30  # L-BFGS evaluations per scale
    lbfgs_tolerance: float = 1e-6  # a step gaining less similarity ends the level
    lbfgs_max_step: float = 10.0  # longest step, in whitened units (WHITE_STEP each)
    min_size_px: int = 16  # a scale never renders fewer pixels than this per side
    patch_ncc: int = 9
    patch_grad: int = 11
    # Distance between samples along each ray, in the level's smallest voxel side.
    step_voxels: float = STEP_VOXELS
    # CT voxel size per scale, as a fraction of that scale's pixel footprint at the isocentre:
    # finer CT detail than a pixel sees costs time and adds nothing.
    voxel_per_pixel: float = 1.0

    @classmethod
    def from_settings(cls, registration) -> RefineSettings:
        """From :class:`xvr_node.config.RegistrationSettings`."""
        names = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in registration.model_dump().items() if k in names}
        aliases = {
            "max_iterations_per_scale": "max_iterations_per_scale",
            "patch_size_ncc": "patch_ncc",
            "patch_size_gradncc": "patch_grad",
        }
        for source, target in aliases.items():
            if hasattr(registration, source):
                values[target] = getattr(registration, source)
        return cls(**values)

    def scales_for(self, intrinsics: Intrinsics) -> tuple[float, ...]:
        """Downsampling factors for this detector, coarse to fine.

        From ``levels_px`` each level's factor brings the shorter side to that many pixels;
        levels at or above the detector's own size collapse into full resolution, once.
        """
        if self.scales:
            return tuple(float(scale) for scale in self.scales)
        shorter = min(intrinsics.rows, intrinsics.columns)
        factors: list[float] = []
        for level in self.levels_px:
            factor = max(1.0, shorter / float(level))
            if not factors or factor < factors[-1]:
                factors.append(factor)
        return tuple(factors)


@dataclass
class Outcome:
    """What a registration produced, with everything needed to reproduce and judge it."""

    initial_matrix: np.ndarray
    final_matrix: np.ndarray
    similarity: float
    iterations: int
    wall_time_s: float
    trajectory: list[dict] = field(default_factory=list)  # per iteration: scale, similarity
    poses: list[np.ndarray] = field(default_factory=list)  # matrices, for animations
    intensity: list[float] | None = None  # fitted X-ray intensity model: log gain, scatter logit
    whitening: torch.Tensor | None = None  # the L-BFGS metric it used (see Registrar._whitening)
    # L-BFGS's curvature pairs at the end, in similarity units (see Registrar._lbfgs_level)
    curvature: list[Pair] | None = None


class Registrar:
    """One CT, ready to register X-ray frames against: the renderer is built once."""

    def __init__(
        self,
        volume: CtVolume,
        settings: RefineSettings | None = None,
        orientation: str = "PA",
        device: str | torch.device = "cpu",
        labels: list[int] | None = None,
    ) -> None:
        self.volume = volume
        self.settings = settings or RefineSettings()
        self.orientation = orientation
        self.frame = volume.frame(orientation)
        self.device = torch.device(device)
        self.labels = labels
        self._renderers: OrderedDict[tuple, tuple] = OrderedDict()
        self._volumes: dict[tuple[int, int, int], CtVolume] = {}
        self._end_slices: list[np.ndarray] | None = None
        self._fixed_cache: dict[tuple[int, float], tuple[XrayFrame, tuple]] = {}

    # --- initial poses -----------------------------------------------------------------

    def dicom_pose(self, frame: XrayFrame) -> np.ndarray:
        """The C-arm's own reading: positioner angles about the CT centre at DSP."""
        if frame.carm is None:
            raise ValueError(f"{frame.name}: no positioner angles or Distance Source to Patient")
        carm = CarmPose(
            frame.carm.primary_deg,
            frame.carm.secondary_deg,
            frame.carm.source_isocenter_mm,
            tuple(self.volume.center_lps),
        )
        return carm.to_matrix(frame.intrinsics)

    def tracked_pose(
        self, frame: XrayFrame, previous_frame: XrayFrame, previous_matrix: np.ndarray
    ) -> np.ndarray:
        """A cine frame's start: the previous frame's result, moved as the C-arm moved.

        The positioner's readings are off by the patient's positioning error ``E``, but
        ``E`` is the same for both frames: with ``D`` the pose the angles give, the previous
        result is ``E @ D_prev``, so this frame is near ``E @ D = result @ D_prev⁻¹ @ D``.
        Without angles on both frames the previous result is the start as it is.
        """
        matrix = np.asarray(previous_matrix, dtype=float)
        if previous_frame.carm is None or frame.carm is None:
            return matrix
        return matrix @ np.linalg.inv(self.dicom_pose(previous_frame)) @ self.dicom_pose(frame)

    def fixed_pose(
        self,
        frame: XrayFrame,
        primary_deg: float,
        secondary_deg: float,
        source_isocenter_mm: float,
        offsets_mm: Sequence[float] = (0.0, 0.0, 0.0),
        inplane_deg: float = 0.0,
    ) -> np.ndarray:
        """A pose given by the user: angles about the CT centre moved by ``offsets_mm`` (LPS)."""
        isocenter = tuple(np.asarray(self.volume.center_lps) + np.asarray(offsets_mm))
        return CarmPose(
            primary_deg, secondary_deg, source_isocenter_mm, isocenter, inplane_deg
        ).to_matrix(frame.intrinsics)

    # --- refinement --------------------------------------------------------------------

    def score(
        self,
        frame: XrayFrame,
        matrix: np.ndarray,
        scale: float | None = None,
        intensity: Sequence[float] | None = None,
    ) -> float:
        """Similarity of a pose at one scale (coarsest by default).

        ``intensity`` is the X-ray's fitted intensity model (see :meth:`_apparent`); without
        it the DRR is compared as rendered.
        """
        scale = scale or self.settings.scales_for(frame.intrinsics)[0]
        fixed, mask, crop = self._fixed_image(frame, scale)
        render = self._renderer(frame.intrinsics, scale)
        mask = mask * self._footprint(frame, [matrix], scale)
        crop = _box(mask, crop, self._patch_reach)
        with torch.no_grad():
            moving = render(self._pose_tensor(matrix, frame.intrinsics), crop, _rays(mask, crop))
            if intensity is not None:
                moving = self._apparent(moving, torch.tensor(intensity, device=self.device))
            return float(self._target(fixed, mask, crop).score(moving).mean())

    def score_batch(
        self, frame: XrayFrame, matrices: Sequence[np.ndarray], scale: float
    ) -> np.ndarray:
        """Similarity of several poses at one scale, rendered as one batch: (N,)."""
        fixed, mask, crop = self._fixed_image(frame, scale)
        render = self._renderer(frame.intrinsics, scale)
        mask = mask * self._footprint(frame, matrices, scale)
        crop = _box(mask, crop, self._patch_reach)
        rays = _rays(mask, crop)
        with torch.no_grad():
            moving = render(self._pose_tensor(np.stack(matrices), frame.intrinsics), crop, rays)
            scores = self._target(fixed, mask, crop).score(moving)
        return scores.cpu().double().numpy()

    def short_refine(
        self, frame: XrayFrame, matrices: Sequence[np.ndarray], scale: float, iterations: int
    ) -> list[np.ndarray]:
        """A few Adam steps of several starts at once, at one scale: multi-start's judge.

        Adam's update is elementwise, so optimising the batch's summed similarity moves each
        start exactly as it would move alone; one batched render serves them all.
        """
        s = self.settings
        poses = [self.frame.pose_from_matrix(m, frame.intrinsics) for m in matrices]
        eulers = [pose_to_euler_zxy(pose) for pose in poses]
        rotation = torch.nn.Parameter(
            torch.tensor(
                np.deg2rad([a for a, _ in eulers]), dtype=torch.float32, device=self.device
            )
        )
        shift = torch.nn.Parameter(
            torch.tensor(np.array([t for _, t in eulers]), dtype=torch.float32, device=self.device)
        )
        fixed, mask, crop = self._fixed_image(frame, scale)
        mask = mask * self._footprint(frame, matrices, scale)
        crop = _box(mask, crop, self._patch_reach)
        rays = _rays(mask, crop)
        render = self._renderer(frame.intrinsics, scale)
        target = self._target(fixed, mask, crop)
        optimizer = torch.optim.Adam(
            [
                {"params": [rotation], "lr": s.lr_rotation},
                {"params": [shift], "lr": s.lr_translation},
            ],
            maximize=True,
        )
        for _ in range(iterations):
            optimizer.zero_grad()
            pose = convert(rotation, shift, parameterization="euler_angles", convention="ZXY")
            moving = render(pose, crop, rays)
            target.score(moving).sum().backward()
            optimizer.step()
        with torch.no_grad():
            pose = convert(rotation, shift, parameterization="euler_angles", convention="ZXY")
            matrices_out = pose.matrix.detach().double().cpu().numpy()
        return [self.frame.matrix_from_pose(m, frame.intrinsics) for m in matrices_out]

    def register(
        self,
        frame: XrayFrame,
        initial_matrix: np.ndarray,
        progress: Callable[[dict], None] | None = None,
        keep_poses: bool = False,
        first_level: int = 0,
        warm: Outcome | None = None,
    ) -> Outcome:
        """Refine ``initial_matrix`` (image plane → CT LPS) against ``frame``, coarse to fine.

        ``first_level`` skips the coarsest levels, for a start multi-start already refined there.
        ``warm``, the previous frame's outcome of a cine run, lends its intensity model, its
        whitening and its curvature: the same beam and nearly the same view, so none is
        learned again.
        """
        started = time.perf_counter()
        s = self.settings
        angles, translation = pose_to_euler_zxy(
            self.frame.pose_from_matrix(initial_matrix, frame.intrinsics)
        )
        rotation = torch.tensor(np.deg2rad(angles), dtype=torch.float32, device=self.device)
        shift = torch.tensor(translation, dtype=torch.float32, device=self.device)
        rotation = torch.nn.Parameter(rotation[None])
        shift = torch.nn.Parameter(shift[None])
        # log gain and scatter logit of the X-ray's intensity model (robust similarity only).
        intensity_start = INTENSITY_START
        if warm is not None and warm.intensity is not None:
            intensity_start = tuple(warm.intensity)
        intensity = torch.nn.Parameter(torch.tensor(intensity_start, device=self.device))
        fit_intensity = s.similarity == "robust"
        trajectory: list[dict] = []
        poses: list[np.ndarray] = []
        iterations = 0
        best = -math.inf
        scales = s.scales_for(frame.intrinsics)
        whitening = None if warm is None else warm.whitening
        curvature = None if warm is None else warm.curvature
        first_level = min(first_level, len(scales) - 1)
        step = s.lr_shrink**first_level
        for scale_index, scale in enumerate(scales[first_level:], start=first_level):
            fixed, mask, crop = self._fixed_image(frame, scale)
            with torch.no_grad():
                level_start = convert(
                    rotation, shift, parameterization="euler_angles", convention="ZXY"
                )
            mask = mask * self._footprint(
                frame, [self._matrix(level_start, frame.intrinsics)], scale
            )
            crop = _box(mask, crop, self._patch_reach)
            render = self._renderer(frame.intrinsics, scale)
            scale_started = time.perf_counter()
            level = _Level(
                float(scale),
                frame.intrinsics,
                render,
                mask,
                crop,
                _rays(mask, crop),
                self._target(fixed, mask, crop),
            )
            parameters = (rotation, shift, intensity if fit_intensity else None)
            record_poses = poses if keep_poses else None
            if s.optimizer == "lbfgs":
                if whitening is None:
                    whitening = self._whitening(level, rotation, shift, step)
                curvature = self._lbfgs_level(
                    level, parameters, whitening, curvature, trajectory, record_poses, progress
                )
            else:
                self._adam_level(level, parameters, step, trajectory, record_poses, progress)
            iterations = len(trajectory)
            best = trajectory[-1]["similarity"]
            step *= s.lr_shrink
            LOG.debug(
                "scale done",
                extra={
                    "event": "scale_done",
                    "scale": scale,
                    "index": scale_index,
                    "similarity": best,
                    "seconds": round(time.perf_counter() - scale_started, 2),
                    "iterations": sum(1 for r in trajectory if r["scale"] == float(scale)),
                },
            )
        with torch.no_grad():
            pose = convert(rotation, shift, parameterization="euler_angles", convention="ZXY")
            final = self._matrix(pose, frame.intrinsics)
            fitted = intensity.detach().cpu().tolist() if fit_intensity else None
            final_similarity = self.score(frame, final, scales[-1], fitted)
        return Outcome(
            initial_matrix=np.asarray(initial_matrix, dtype=float),
            final_matrix=final,
            similarity=final_similarity,
            iterations=iterations,
            wall_time_s=time.perf_counter() - started,
            trajectory=trajectory,
            poses=poses,
            intensity=fitted,
            whitening=whitening,
            curvature=curvature,
        )

    def _adam_level(
        self,
        level: _Level,
        parameters: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
        step: float,
        trajectory: list[dict],
        poses: list[np.ndarray] | None,
        progress: Callable[[dict], None] | None,
    ) -> None:
        """One level by Adam at fixed step sizes, ended by the plateau rule (XVR's schedule).

        Each ``patience`` iterations without a gain of ``threshold`` cut the steps by
        ``plateau_factor``; the level ends after ``max_plateaus`` cuts or its iteration cap.
        """
        s = self.settings
        rotation, shift, intensity = parameters
        groups = [
            {"params": [rotation], "lr": s.lr_rotation * step},
            {"params": [shift], "lr": s.lr_translation * step},
        ]
        if intensity is not None:
            groups.append({"params": [intensity], "lr": INTENSITY_LR})
        optimizer = torch.optim.Adam(groups, maximize=True)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer,
            mode="max",
            factor=s.plateau_factor,
            patience=s.patience,
            threshold=s.threshold,
        )
        plateaus = 0
        for _ in range(s.max_iterations_per_scale):
            optimizer.zero_grad()
            pose = convert(rotation, shift, parameterization="euler_angles", convention="ZXY")
            similarity = level.similarity(self, pose, intensity)
            similarity.backward()
            optimizer.step()
            lr_before = optimizer.param_groups[0]["lr"]
            scheduler.step(similarity.item())
            self._record(level, pose, similarity, trajectory, poses, progress)
            if optimizer.param_groups[0]["lr"] < lr_before:
                plateaus += 1
                if plateaus >= s.max_plateaus:
                    break

    def _lbfgs_level(
        self,
        level: _Level,
        parameters: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
        whitening: torch.Tensor,
        curvature: list[Pair] | None,
        trajectory: list[dict],
        poses: list[np.ndarray] | None,
        progress: Callable[[dict], None] | None,
    ) -> list[Pair]:
        """One level by L-BFGS with capped, backtracked steps, in whitened unknowns.

        ``whitening`` (from :meth:`_whitening`) makes every pose direction change the DRR
        alike, so a quasi-Newton method travels in a few steps what Adam covers in tens of
        fixed-size ones, depth included. ``curvature``, the pairs a coarser level (or the
        previous cine frame) ended with, starts it with quasi-Newton steps instead of a
        gradient step that overshoots near the optimum. Every evaluation (backtracking trials
        too) is one iteration. The parameters are updated in place; the curvature pairs this
        level ended with are returned, in similarity units.
        """
        s = self.settings
        rotation, shift, intensity = parameters
        start = [rotation.detach().clone(), shift.detach().clone()]
        if intensity is not None:
            start.append(intensity.detach().clone())
        gradient_scale: list[float] = []

        def unpack(values: torch.Tensor):
            moved = whitening @ values[:6]
            fitted = start[2] + values[6:] * INTENSITY_LR if intensity is not None else None
            return start[0] + moved[None, :3], start[1] + moved[None, 3:], fitted

        def evaluate(values: torch.Tensor) -> tuple[float, torch.Tensor]:
            z = values.detach().clone().requires_grad_(True)
            rot, sh, fitted = unpack(z)
            pose = convert(rot, sh, parameterization="euler_angles", convention="ZXY")
            similarity = level.similarity(self, pose, fitted)
            (-similarity).backward()
            # The first gradient sets the loss's scale (its largest component becomes 1), so
            # the first step is about one whitened unit whatever the similarity's slope.
            if not gradient_scale:
                gradient_scale.append(float(z.grad.abs().max()) or 1.0)
            value = self._record(level, pose, similarity, trajectory, poses, progress)
            return -value / gradient_scale[0], z.grad / gradient_scale[0]

        unknowns = 6 + (2 if intensity is not None else 0)
        first = torch.zeros(unknowns, device=self.device)
        # The minimised value is scaled by the first gradient, known only after the first
        # evaluation; the tolerance (a gain in similarity) and the carried curvature pairs (in
        # similarity units, as the slope differs between levels) are scaled to match.
        carried = [pair for pair in curvature or [] if pair[0].numel() == unknowns]
        best, pairs = minimize(
            evaluate,
            first,
            evaluations=s.lbfgs_iterations,
            tolerance=lambda: s.lbfgs_tolerance / gradient_scale[0],
            max_step=s.lbfgs_max_step,
            curvature=lambda: [(step, change / gradient_scale[0]) for step, change in carried],
        )
        with torch.no_grad():
            rot, sh, fitted = unpack(best)
            rotation.copy_(rot)
            shift.copy_(sh)
            if intensity is not None:
                intensity.copy_(fitted)
        return [(step, change * gradient_scale[0]) for step, change in pairs]

    def _record(
        self,
        level: _Level,
        pose: RigidTransform,
        similarity: torch.Tensor,
        trajectory: list[dict],
        poses: list[np.ndarray] | None,
        progress: Callable[[dict], None] | None,
    ) -> float:
        """One evaluation into the trajectory (and poses, and progress); its similarity."""
        record = {
            "scale": level.scale,
            "iteration": len(trajectory) + 1,
            "similarity": float(similarity.detach()),
        }
        trajectory.append(record)
        if poses is not None:
            poses.append(self._matrix(pose, level.intrinsics))
        if progress is not None:
            progress(record)
        return record["similarity"]

    def _whitening(
        self, level: _Level, rotation: torch.Tensor, shift: torch.Tensor, step: float
    ) -> torch.Tensor:
        """Pose change (radians, mm) per whitened unit: a 6×6 matrix.

        Finite differences of one Adam step per pose parameter (one batched render) give the
        DRR's Jacobian J over the open field, in image standard deviations; with
        ``J^T J = L L^T``, steps ``L^-T z`` change the DRR by ``|z|`` in RMS. Depth, which
        barely changes a projection, gets long steps; rotations and the shifts that mimic
        them stop fighting each other. Scaled so that one unit changes the DRR by
        ``WHITE_STEP`` standard deviations.
        """
        s = self.settings
        units = torch.tensor(
            [s.lr_rotation * step] * 3 + [s.lr_translation * step] * 3, device=self.device
        )
        with torch.no_grad():
            deltas = torch.cat([torch.zeros(1, 6, device=self.device), torch.diag(units)])
            pose = convert(
                rotation.detach() + deltas[:, :3],
                shift.detach() + deltas[:, 3:],
                parameterization="euler_angles",
                convention="ZXY",
            )
            images = level.render(pose, level.crop, level.rays).flatten(1)
            top, bottom, left, right = level.crop
            keep = level.mask[..., top:bottom, left:right].flatten() > 0
            if keep.sum() > 1:
                images = images[:, keep]
            jacobian = (images[1:] - images[:1]).double() / (images[0].double().std() + 1e-9)
            metric = jacobian @ jacobian.T / images.shape[1]
            # A floor on the eigenvalues keeps a direction the DRR does not see from
            # getting unbounded steps.
            floor = EIGEN_FLOOR * float(torch.linalg.eigvalsh(metric).max()) + 1e-12
            metric += floor * torch.eye(6, dtype=metric.dtype, device=self.device)
            inverse = torch.linalg.inv(torch.linalg.cholesky(metric)).T
        return (torch.diag(units.double()) @ inverse * WHITE_STEP).float()

    # --- internals ---------------------------------------------------------------------

    def _size_at(self, intrinsics: Intrinsics, scale: float) -> tuple[int, int]:
        rows, columns = intrinsics.rows, intrinsics.columns
        factor = max(float(scale), 1.0)
        smallest = min(rows, columns) / factor
        if smallest < self.settings.min_size_px:
            factor = min(rows, columns) / self.settings.min_size_px
        return max(1, round(rows / factor)), max(1, round(columns / factor))

    def _renderer(self, full: Intrinsics, scale: float):
        """A render function for this scale: detector resized, CT resampled to match.

        It takes diffdrr poses (the optimiser's parameters: camera → the full-resolution
        volume's diffdrr world) and an optional crop of the level's grid; the projector works
        on exported matrices, so the resampled CT needs no shift of its own.
        """
        key = (full, scale)
        if key in self._renderers:
            self._renderers.move_to_end(key)
        else:
            factors = self._volume_factors(full, scale)
            volume = self._volumes.get(factors) or downsample_volume(self.volume, factors)
            self._volumes[factors] = volume
            projector = Projector(
                volume,
                full,
                self._size_at(full, scale),
                labels=self.labels,
                device=self.device,
                step_voxels=self.settings.step_voxels,
            )
            lps_from_world, camera_from_plane = self.frame.pose_factors(full)
            factors_t = [
                torch.as_tensor(m, dtype=torch.float32, device=self.device)
                for m in (lps_from_world, camera_from_plane)
            ]
            self._renderers[key] = (projector, *factors_t)
            while len(self._renderers) > KEEP_RENDERERS:
                self._renderers.popitem(last=False)
        projector, left, right = self._renderers[key]

        def render(pose: RigidTransform, box=None, rays=None) -> torch.Tensor:
            return projector(left @ pose.matrix @ right, box, rays=rays)

        return render

    def _volume_factors(self, full: Intrinsics, scale: float) -> tuple[int, int, int]:
        """Integer block sizes per CT axis so voxels approach the pixel footprint."""
        rows, columns = self._size_at(full, scale)
        pixel_mm = max(
            full.row_spacing_mm * full.rows / rows, full.column_spacing_mm * full.columns / columns
        )
        # Footprint at a typical isocentre (magnification ~1.4 on C-arms).
        target = pixel_mm / 1.4 * self.settings.voxel_per_pixel
        spacing = self.volume.spacing_mm
        return tuple(int(max(1, np.floor(target / s))) for s in spacing)

    def _fixed_image(self, frame: XrayFrame, scale: float):
        """The X-ray's line integrals and open-field mask at this scale, and the mask's box.

        Both are area-resampled; a coarse pixel counts as open only if all of it was.
        """
        key = (id(frame), scale)
        cached = self._fixed_cache.get(key)
        if cached is not None and cached[0] is frame:
            return cached[1]
        rows, columns = self._size_at(frame.intrinsics, scale)
        image = torch.as_tensor(line_integrals(frame), dtype=torch.float32, device=self.device)
        image = F.interpolate(image[None, None], size=(rows, columns), mode="area")
        open_field = torch.as_tensor(
            np.ascontiguousarray(frame.open_field()), dtype=torch.float32, device=self.device
        )
        mask = F.interpolate(open_field[None, None], size=(rows, columns), mode="area") > 0.999
        mask = mask.to(torch.float32)
        rows_open = torch.nonzero(mask[0, 0].any(dim=1)).flatten()
        columns_open = torch.nonzero(mask[0, 0].any(dim=0)).flatten()
        if rows_open.numel() == 0:
            raise ValueError(f"{frame.name}: no open field left at {rows}x{columns} pixels")
        crop = (
            int(rows_open[0]),
            int(rows_open[-1]) + 1,
            int(columns_open[0]),
            int(columns_open[-1]) + 1,
        )
        # One frame at a time: the cache holds the current frame's pyramid only.
        self._fixed_cache = {k: v for k, v in self._fixed_cache.items() if v[0] is frame}
        self._fixed_cache[key] = (frame, (image, mask, crop))
        return image, mask, crop

    def _footprint(
        self, frame: XrayFrame, matrices: Sequence[np.ndarray], scale: float
    ) -> torch.Tensor:
        """Pixels whose rays see only anatomy the CT holds, shrunk by a margin: (N, 1, H, W).

        Two kinds of ray are left out, because no pose can explain what they show: rays
        that miss the CT's box, and rays that cross one of its end slices inside the body (a
        CT shorter than the X-ray's field: with a cranial tilt such a ray sees anatomy beyond
        the scanned slab over much of its path). Counting either biases the optimum.
        """
        rows, columns = self._size_at(frame.intrinsics, scale)
        full = frame.intrinsics
        n = np.asarray(self.volume.hu.shape) - 0.5
        corners = self.volume.voxel_to_lps(
            np.array([[i, j, k] for i in (-0.5, n[0]) for j in (-0.5, n[1]) for k in (-0.5, n[2])])
        )
        margin = max(1, round(FOOTPRINT_MARGIN * min(rows, columns)))
        masks = []
        for matrix in matrices:
            try:
                uv = project(np.asarray(matrix, dtype=float), full, corners)
            except ValueError:  # a corner behind the source: no meaningful footprint
                masks.append(np.ones((rows, columns), dtype=bool))
                continue
            points = np.c_[
                (uv[:, 0] + 0.5) * columns / full.columns - 0.5,
                (uv[:, 1] + 0.5) * rows / full.rows - 0.5,
            ]
            hull = points[ConvexHull(points).vertices]
            canvas = Image.new("1", (columns, rows), 0)
            ImageDraw.Draw(canvas).polygon([tuple(p) for p in hull], fill=1)
            inside = np.asarray(canvas, dtype=bool) & ~self._crosses_cut_body(
                np.asarray(matrix, dtype=float), full, rows, columns
            )
            masks.append(ndimage.binary_erosion(inside, iterations=margin, border_value=1))
        stacked = torch.as_tensor(np.stack(masks), dtype=torch.float32, device=self.device)
        return stacked[:, None]

    def _crosses_cut_body(
        self, matrix: np.ndarray, full: Intrinsics, rows: int, columns: int
    ) -> np.ndarray:
        """Pixels (rows × columns) whose ray crosses an end slice's plane inside the body."""
        if self._end_slices is None:
            hu = self.volume.hu
            body = [hu[:, :, 0] > BODY_HU, hu[:, :, -1] > BODY_HU]
            self._end_slices = [ndimage.binary_dilation(b, iterations=2) for b in body]
        u = (np.arange(columns) + 0.5) * full.columns / columns - 0.5
        v = (np.arange(rows) + 0.5) * full.rows / rows - 0.5
        uu, vv = np.meshgrid(u, v)
        plane = np.c_[
            uu.ravel() * full.column_spacing_mm,
            vv.ravel() * full.row_spacing_mm,
            np.zeros(uu.size),
            np.ones(uu.size),
        ]
        to_voxel = np.linalg.inv(self.volume.affine_lps) @ matrix
        detector = (to_voxel @ plane.T).T[:, :3]
        source = (to_voxel @ np.r_[full.source_in_image_plane, 1.0])[:3]
        direction = detector - source
        crossed = np.zeros(uu.size, dtype=bool)
        last = self.volume.hu.shape[2] - 1
        with np.errstate(divide="ignore", invalid="ignore"):
            for k, body in ((-0.5, self._end_slices[0]), (last + 0.5, self._end_slices[1])):
                t = (k - source[2]) / direction[:, 2]
                point = source[None, :2] + t[:, None] * direction[:, :2]
                i, j = np.rint(point[:, 0]).astype(int), np.rint(point[:, 1]).astype(int)
                valid = (t > 0) & (t < 1) & (i >= 0) & (j >= 0)
                valid &= (i < body.shape[0]) & (j < body.shape[1])
                hit = np.zeros(uu.size, dtype=bool)
                hit[valid] = body[i[valid], j[valid]]
                crossed |= hit
        return crossed.reshape(rows, columns)

    @staticmethod
    def _apparent(drr: torch.Tensor, intensity: torch.Tensor) -> torch.Tensor:
        """What the X-ray would store, as line integrals, if the DRR were its primary beam.

        ``−log(exp(−g·μ·DRR) + c)``: a gain ``g`` (an effective spectrum's attenuation) and a
        scatter floor ``c`` added to the primary before the log. Fitted with the pose, it
        explains the monotonic, nonlinear relation scatter and beam hardening put between a
        DRR and a real X-ray (dense regions lose contrast), which otherwise biases the optimum
        (mostly in depth, through magnification).
        """
        gain = MU_WATER_PER_MM * torch.exp(intensity[0])
        scatter = F.softplus(intensity[1])
        return -torch.log(torch.exp(-gain * drr) + scatter)

    def _target(self, fixed: torch.Tensor, mask: torch.Tensor, crop) -> MaskedTarget:
        """The X-ray over ``crop`` (where DRRs are rendered), ready to score them."""
        top, bottom, left, right = crop
        s = self.settings
        return MaskedTarget(
            fixed[..., top:bottom, left:right],
            mask[..., top:bottom, left:right],
            method=s.similarity,
            beta=s.beta,
            patch_ncc=s.patch_ncc,
            patch_grad=s.patch_grad,
        )

    @property
    def _patch_reach(self) -> int:
        """How far the similarity's patches reach: a render box is widened by this."""
        return max(self.settings.patch_ncc, self.settings.patch_grad)

    def _pose_tensor(self, matrix: np.ndarray, intrinsics: Intrinsics) -> RigidTransform:
        """The full-resolution volume's diffdrr pose of an exported matrix."""
        matrices = np.asarray(matrix, dtype=float).reshape(-1, 4, 4)
        poses = np.stack([self.frame.pose_from_matrix(m, intrinsics) for m in matrices])
        return RigidTransform(torch.as_tensor(poses, dtype=torch.float32, device=self.device))

    def _matrix(self, pose: RigidTransform, intrinsics: Intrinsics) -> np.ndarray:
        matrix = pose.matrix[0].detach().double().cpu().numpy()
        return self.frame.matrix_from_pose(matrix, intrinsics)


@dataclass(frozen=True)
class _Level:
    """What one level of a registration compares: a render function and the X-ray there."""

    scale: float
    intrinsics: Intrinsics
    render: Callable
    mask: torch.Tensor
    crop: tuple[int, int, int, int]
    rays: torch.Tensor | None  # the crop's pixels worth marching (see _rays)
    target: MaskedTarget  # the X-ray over the crop

    def similarity(
        self, registrar: Registrar, pose: RigidTransform, intensity: torch.Tensor | None
    ) -> torch.Tensor:
        """Similarity of the DRR at ``pose`` (through ``intensity`` when fitted)."""
        moving = self.render(pose, self.crop, self.rays)
        if intensity is not None:
            moving = registrar._apparent(moving, intensity)
        return self.target.score(moving).mean()


def _box(
    mask: torch.Tensor, field: tuple[int, int, int, int], pad: int
) -> tuple[int, int, int, int]:
    """The rows and columns (top, bottom, left, right) worth rendering: where any of ``mask``
    is set, widened by ``pad`` (the similarity's patches reach that far), inside ``field``
    (the open field's box). The whole field when the mask is nearly empty."""
    top, bottom, left, right = field
    rows = torch.nonzero(mask.flatten(0, -3).any(dim=0).any(dim=1)).flatten()
    columns = torch.nonzero(mask.flatten(0, -3).any(dim=0).any(dim=0)).flatten()
    if rows.numel() == 0:
        return field
    box = (
        max(top, int(rows[0]) - pad),
        min(bottom, int(rows[-1]) + 1 + pad),
        max(left, int(columns[0]) - pad),
        min(right, int(columns[-1]) + 1 + pad),
    )
    if min(box[1] - box[0], box[3] - box[2]) < 2 * pad:
        return field
    return box


def _rays(mask: torch.Tensor, crop: tuple[int, int, int, int]) -> torch.Tensor | None:
    """Flat indices of the crop's pixels inside ``mask`` (any of a batch's): the only rays
    worth marching, since the similarity weighs every pixel by the mask before it looks at
    it (the rest are 0 in every term). None when the mask leaves nothing there."""
    top, bottom, left, right = crop
    inside = mask[..., top:bottom, left:right].flatten(0, -3).any(dim=0).flatten()
    rays = torch.nonzero(inside).flatten()
    return rays if rays.numel() else None


def downsample_volume(volume: CtVolume, factors: tuple[int, int, int]) -> CtVolume:
    """Block-average HU over ``factors`` voxels per axis (the mean keeps line integrals)."""
    if factors == (1, 1, 1):
        return volume
    fx, fy, fz = factors
    nx, ny, nz = (n // f for n, f in zip(volume.hu.shape, factors, strict=True))
    hu = volume.hu[: nx * fx, : ny * fy, : nz * fz]
    hu = hu.reshape(nx, fx, ny, fy, nz, fz).mean(axis=(1, 3, 5), dtype=np.float32)
    scale = np.diag([fx, fy, fz, 1.0])
    scale[:3, 3] = (np.array(factors) - 1) / 2.0  # new voxel centre in old voxel indices
    labels = None
    if volume.labels is not None:
        labels = volume.labels[: nx * fx : fx, : ny * fy : fy, : nz * fz : fz]
    return CtVolume(hu, volume.affine_lps @ scale, labels)
