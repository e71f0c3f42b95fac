"""Set up diffdrr renderers from a CT volume in the node's geometry conventions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from diffdrr.data import read as read_subject
from diffdrr.drr import DRR
from diffdrr.pose import RigidTransform
from torchio import LabelMap, ScalarImage

from xvr_node.geometry import LPS_FROM_RAS, Intrinsics, VolumeFrame

#: Linear attenuation of water at a typical fluoroscopy effective energy (~60 keV), per mm.
MU_WATER_PER_MM = 0.0206

#: HU above which voxels count as bone for the bone-contrast factor.
BONE_THRESHOLD_HU = 350.0


@dataclass
class CtVolume:
    """A CT in Hounsfield units on a voxel grid, with its voxel → CT LPS affine."""

    hu: np.ndarray
    affine_lps: np.ndarray
    labels: np.ndarray | None = None

    @classmethod
    def from_nifti(cls, path: str | Path, labels_path: str | Path | None = None) -> CtVolume:
        image = nib.load(str(path))
        hu = np.asarray(image.dataobj, dtype=np.float32)
        labels = None
        if labels_path is not None:
            labels = np.asarray(nib.load(str(labels_path)).dataobj).astype(np.int16)
        return cls(hu, LPS_FROM_RAS @ image.affine, labels)

    @property
    def affine_ras(self) -> np.ndarray:
        return LPS_FROM_RAS @ self.affine_lps

    @property
    def center_ras(self) -> tuple[float, float, float]:
        """Centre of the voxel grid in RAS, as torchio (and so diffdrr) computes it."""
        centre = self.affine_ras @ np.r_[(np.array(self.hu.shape) - 1) / 2.0, 1.0]
        return tuple(float(x) for x in centre[:3])

    @property
    def center_lps(self) -> np.ndarray:
        return (LPS_FROM_RAS @ np.r_[self.center_ras, 1.0])[:3]

    @property
    def spacing_mm(self) -> np.ndarray:
        return np.linalg.norm(self.affine_lps[:3, :3], axis=0)

    def frame(self, orientation: str) -> VolumeFrame:
        return VolumeFrame(self.center_ras, orientation)

    def voxel_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        ijk = np.atleast_2d(np.asarray(ijk, dtype=float))
        return (self.affine_lps @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]

    def lps_to_voxel(self, points: np.ndarray) -> np.ndarray:
        points = np.atleast_2d(np.asarray(points, dtype=float))
        inverse = np.linalg.inv(self.affine_lps)
        return (inverse @ np.c_[points, np.ones(len(points))].T).T[:, :3]

    def save_nifti(self, path: str | Path) -> None:
        nib.save(nib.Nifti1Image(self.hu.astype(np.float32), self.affine_ras), str(path))


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
