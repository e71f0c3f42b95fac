"""Set up diffdrr renderers from a CT volume in the node's geometry conventions."""

from __future__ import annotations

import numpy as np
import torch
from diffdrr.data import read as read_subject
from diffdrr.drr import DRR
from diffdrr.pose import RigidTransform
from torchio import LabelMap, ScalarImage

from xvr_node.ct_volume import CtVolume
from xvr_node.geometry import Intrinsics

#: Linear attenuation of water at a typical fluoroscopy effective energy (~60 keV), per mm.
MU_WATER_PER_MM = 0.0206

#: HU above which voxels count as bone for the bone-contrast factor.
BONE_THRESHOLD_HU = 350.0


def hu_to_density(hu: torch.Tensor | np.ndarray, bone_contrast: float = 1.0) -> torch.Tensor:
    """Attenuation relative to water (air 0, water 1), with bone scaled by ``bone_contrast``.

    Linear in HU and continuous at the bone threshold, so a bone-contrast factor of 1 is
    physical and larger factors only steepen the bone part. Unlike diffdrr's default
    mapping it is not normalised by the volume's maximum, so a dense bead does not dim
    the rest of the anatomy.
    """
    hu = torch.as_tensor(hu, dtype=torch.float32)
    density = torch.clamp(1.0 + hu / 1000.0, min=0.0)
    bone = torch.clamp(hu - BONE_THRESHOLD_HU, min=0.0) / 1000.0
    return density + (bone_contrast - 1.0) * bone


def make_drr(
    volume: CtVolume,
    intrinsics: Intrinsics,
    orientation: str = "PA",
    bone_contrast: float = 1.0,
    renderer: str = "siddon",
    device: str | torch.device = "cpu",
    labels: list[int] | None = None,
) -> DRR:
    """A diffdrr renderer whose pixel grid is the X-ray's image-plane grid.

    ``orientation`` picks diffdrr's re-orientation; the detector x-flip follows from it (see
    :mod:`xvr_node.geometry`), so poses converted with ``volume.frame(orientation)`` render
    the view the exported matrix describes.
    """
    frame = volume.frame(orientation)
    image = ScalarImage(
        tensor=torch.as_tensor(volume.hu, dtype=torch.float32)[None], affine=volume.affine_ras
    )
    labelmap = None
    if volume.labels is not None:
        labelmap = LabelMap(tensor=torch.as_tensor(volume.labels)[None], affine=volume.affine_ras)
    subject = read_subject(image, labelmap, orientation=orientation)
    subject.density.set_data(hu_to_density(subject.volume.data, bone_contrast))
    if labels is not None:
        mask = torch.zeros_like(subject.density.data, dtype=torch.bool)
        for label in labels:
            mask |= subject.mask.data == label
        subject.density.set_data(subject.density.data * mask)
    x0, y0 = intrinsics.diffdrr_offsets(frame.reverse_x_axis)
    drr = DRR(
        subject,
        sdd=intrinsics.sid_mm,
        height=intrinsics.rows,
        width=intrinsics.columns,
        delx=intrinsics.column_spacing_mm,
        dely=intrinsics.row_spacing_mm,
        x0=x0,
        y0=y0,
        reverse_x_axis=frame.reverse_x_axis,
        renderer=renderer,
    )
    return drr.to(device)


def render_matrices(
    drr: DRR, volume: CtVolume, orientation: str, intrinsics: Intrinsics, matrices: np.ndarray
) -> torch.Tensor:
    """Render line integrals (density·mm) for exported matrices (image plane → CT LPS)."""
    frame = volume.frame(orientation)
    poses = np.stack(
        [frame.pose_from_matrix(m, intrinsics) for m in np.asarray(matrices).reshape(-1, 4, 4)]
    )
    pose = RigidTransform(torch.as_tensor(poses, dtype=torch.float32, device=drr.device))
    with torch.no_grad():
        return drr(pose)
