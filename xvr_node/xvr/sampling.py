"""Random C-arm views for training: physical angles and distances → diffdrr poses and targets."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffdrr.pose import RigidTransform

from xvr_node.config import PoseRanges
from xvr_node.ct_volume import CtVolume
from xvr_node.geometry import CarmPose, Intrinsics

#: Rotation components the network regresses per parameterisation.
ROTATION_SIZE = {"quaternion_adjugate": 10, "euler_angles": 3, "rotation_6d": 6, "quaternion": 4}


@dataclass
class PoseBatch:
    """A batch of sampled views, in every form the training step needs."""

    pose: RigidTransform  # diffdrr poses (camera → world of this volume)
    rotation: torch.Tensor  # (B, R) in the chosen parameterisation
    translation: torch.Tensor  # (B, 3) mm, given before the rotation (diffdrr's convention)
    matrices: np.ndarray  # (B, 4, 4) exported matrices, image-plane mm → CT LPS
    carm: list[CarmPose]  # the physical views

    def __len__(self) -> int:
        return len(self.carm)

    @property
    def parameters(self) -> torch.Tensor:
        """What the network regresses: rotation components, then translation (mm)."""
        return torch.cat([self.rotation, self.translation], dim=1)

    def subset(self, keep: torch.Tensor) -> PoseBatch:
        """The views where ``keep`` (bool, B) is true."""
        index = torch.nonzero(keep.cpu()).flatten()
        return PoseBatch(
            RigidTransform(self.pose.matrix[index.to(self.pose.matrix.device)]),
            self.rotation[index.to(self.rotation.device)],
            self.translation[index.to(self.translation.device)],
            self.matrices[index.numpy()],
            [self.carm[i] for i in index.tolist()],
        )


def pose_parameters(
    pose: RigidTransform, parameterization: str, convention: str = "ZXY"
) -> tuple[torch.Tensor, torch.Tensor]:
    """diffdrr's ``RigidTransform.convert``: (rotation components, translation before rotation)."""
    if parameterization not in ROTATION_SIZE:
        raise ValueError(f"parameterization must be one of {sorted(ROTATION_SIZE)}")
    return pose.convert(
        parameterization, convention if parameterization == "euler_angles" else None
    )


def _uniform(
    low: float, high: float, shape: tuple[int, ...], generator: torch.Generator
) -> np.ndarray:
    values = torch.rand(shape, generator=generator, dtype=torch.float64)
    return (low + (high - low) * values).numpy()


def sample_carm_poses(
    volume: CtVolume, ranges: PoseRanges, sdd_mm: float, count: int, generator: torch.Generator
) -> list[CarmPose]:
    """Views uniform in the configured ranges around the nominal view of the CT centre.

    Angles are C-arm positioner angles (primary ± ``primary_deg`` …), the source–isocentre
    distance is a fraction of the SDD, and the isocentre moves by up to ``offsets_mm`` along
    the patient's LPS axes from the centre of the CT grid.
    """
    angles = _uniform(-1.0, 1.0, (count, 3), generator) * np.array(
        [ranges.primary_deg, ranges.secondary_deg, ranges.inplane_deg]
    )
    low, high = ranges.source_isocenter_sdd_fraction
    distances = _uniform(low, high, (count,), generator) * sdd_mm
    offsets = _uniform(-1.0, 1.0, (count, 3), generator) * np.asarray(ranges.offsets_mm)
    centre = volume.center_lps
    return [
        CarmPose(
            primary_deg=float(angles[i, 0]),
            secondary_deg=float(angles[i, 1]),
            source_isocenter_mm=float(distances[i]),
            isocenter_lps=tuple(float(v) for v in centre + offsets[i]),
            inplane_deg=float(angles[i, 2]),
        )
        for i in range(count)
    ]


def carm_to_batch(
    views: list[CarmPose],
    volume: CtVolume,
    intrinsics: Intrinsics,
    orientation: str,
    parameterization: str,
    convention: str = "ZXY",
    device: str | torch.device = "cpu",
) -> PoseBatch:
    """Physical views → exported matrices → diffdrr poses of ``volume`` and their parameters."""
    frame = volume.frame(orientation)
    matrices = np.stack([view.to_matrix(intrinsics) for view in views])
    poses = np.stack([frame.pose_from_matrix(matrix, intrinsics) for matrix in matrices])
    pose = RigidTransform(torch.as_tensor(poses, dtype=torch.float32, device=device))
    rotation, translation = pose_parameters(pose, parameterization, convention)
    return PoseBatch(pose, rotation, translation, matrices, list(views))


def sample_poses(
    volume: CtVolume,
    ranges: PoseRanges,
    intrinsics: Intrinsics,
    orientation: str,
    count: int,
    generator: torch.Generator,
    parameterization: str = "quaternion_adjugate",
    convention: str = "ZXY",
    device: str | torch.device = "cpu",
) -> PoseBatch:
    """A batch of random training views of ``volume`` (see :func:`sample_carm_poses`)."""
    views = sample_carm_poses(volume, ranges, intrinsics.sid_mm, count, generator)
    return carm_to_batch(
        views, volume, intrinsics, orientation, parameterization, convention, device
    )


def nominal_pose(
    volume: CtVolume,
    ranges: PoseRanges,
    intrinsics: Intrinsics,
    orientation: str,
    parameterization: str = "quaternion_adjugate",
    convention: str = "ZXY",
) -> PoseBatch:
    """The centre of the sampling ranges: 0°/0°/0° at the mean distance, on the CT centre."""
    low, high = ranges.source_isocenter_sdd_fraction
    view = CarmPose(0.0, 0.0, 0.5 * (low + high) * intrinsics.sid_mm, tuple(volume.center_lps))
    return carm_to_batch([view], volume, intrinsics, orientation, parameterization, convention)
