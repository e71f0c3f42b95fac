"""Write a CT volume as a DICOM CT Image Storage series, one file per slice."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

from xvr_node import __version__
from xvr_node.ct_volume import CtVolume

HU_MIN = -1024
#: Stored as signed 16-bit: the extended CT scale that shows metal (a bead) above 3071 HU.
HU_MAX = 32767


@dataclass(frozen=True)
class PatientInfo:
    """Synthetic patient and study identifiers shared by the phantom's objects."""

    patient_id: str
    issuer: str
    patient_name: str
    birth_date: str
    sex: str
    study_date: str
    study_time: str


@dataclass(frozen=True)
class CtSeriesInfo:
    """What the rest of the phantom needs to reference the written CT."""

    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: list[str]
    folder: Path


def add_file_meta(ds: Dataset, sop_class_uid: str, sop_instance_uid: str) -> None:
    """Part 10 file meta information for an Explicit VR Little Endian file."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"XVRNODE_{__version__}"[:16]
    ds.file_meta = meta
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid


def add_patient_and_study(ds: Dataset, patient: PatientInfo, study_uid: str, study_id: str) -> None:
    ds.PatientName = patient.patient_name
    ds.PatientID = patient.patient_id
    ds.IssuerOfPatientID = patient.issuer
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = patient.study_date
    ds.StudyTime = patient.study_time
    ds.StudyID = study_id
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "xvr-node phantom"


def _axis_aligned_slices(volume: CtVolume) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row direction, column direction and slice step (LPS) of a volume written as axial slices.

    DICOM column index runs along voxel axis 0, row index along axis 1, slices along axis 2.
    """
    affine = volume.affine_lps
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    row_direction = affine[:3, 0] / spacing[0]
    column_direction = affine[:3, 1] / spacing[1]
    normal = np.cross(row_direction, column_direction)
    step = affine[:3, 2]
    if not np.allclose(step / np.linalg.norm(step), normal, atol=1e-4) and not np.allclose(
        step / np.linalg.norm(step), -normal, atol=1e-4
    ):
        raise ValueError("slices are not perpendicular to the image plane (gantry tilt)")
    return row_direction, column_direction, step


def flip_axis(volume: CtVolume, axis: int) -> CtVolume:
    """The same anatomy in LPS with voxel ``axis`` stored in the opposite order."""
    affine = volume.affine_lps.copy()
    affine[:3, 3] += affine[:3, axis] * (volume.hu.shape[axis] - 1)
    affine[:3, axis] *= -1.0
    labels = None if volume.labels is None else np.flip(volume.labels, axis)
    return CtVolume(np.flip(volume.hu, axis), affine, labels)


def tilt(volume: CtVolume, about_x_deg: float, about_y_deg: float) -> CtVolume:
    """The volume turned about its centre (LPS x, then y): an oblique scan of a tilted patient.

    Only the affine changes, so no voxel is interpolated; everything later (bead, fiducials,
    X-rays, truth) lives in the tilted LPS frame and stays consistent.
    """
    from xvr_node.geometry import rigid, rotation_about

    rotation = rotation_about("y", about_y_deg) @ rotation_about("x", about_x_deg)
    centre = volume.center_lps
    turn = rigid(rotation, centre - rotation @ centre)
    return CtVolume(volume.hu, turn @ volume.affine_lps, volume.labels)


def prone_storage(volume: CtVolume) -> CtVolume:
    """Store the slices as a prone (HFP) scan does; the anatomy in LPS is unchanged.

    Rows run toward the patient's right and columns anteriorly: Image Orientation Patient
    close to (-1, 0, 0, 0, -1, 0), the supine one turned over.
    """
    spacing = volume.spacing_mm
    if volume.affine_lps[0, 0] / spacing[0] > 0:
        volume = flip_axis(volume, 0)
    if volume.affine_lps[1, 1] / spacing[1] > 0:
        volume = flip_axis(volume, 1)
    return volume


def in_assembled_order(volume: CtVolume) -> CtVolume:
    """Slices ordered as :func:`xvr_node.dicom.volume.assemble_volume` orders them.

    The node runs k along the slice normal signed toward +L, +P or +S (whichever dominates),
    whatever the file order; the truth's affine must be that one.
    """
    spacing = volume.spacing_mm
    normal = np.cross(volume.affine_lps[:3, 0] / spacing[0], volume.affine_lps[:3, 1] / spacing[1])
    if normal[np.argmax(np.abs(normal))] < 0:
        normal = -normal
    return flip_axis(volume, 2) if volume.affine_lps[:3, 2] @ normal < 0 else volume


def crop_slices(volume: CtVolume, fraction: float) -> tuple[CtVolume, tuple[int, int]]:
    """The central ``fraction`` of the slices, and which slices ``[first, end)`` they were."""
    count = volume.hu.shape[2]
    kept = max(3, min(count, round(count * fraction)))
    first = (count - kept) // 2
    end = first + kept
    affine = volume.affine_lps.copy()
    affine[:3, 3] += affine[:3, 2] * first
    labels = None if volume.labels is None else volume.labels[:, :, first:end]
    return CtVolume(volume.hu[:, :, first:end], affine, labels), (first, end)


def write_ct_series(
    volume: CtVolume,
    folder: Path,
    patient: PatientInfo,
    uid_for,
    study_uid: str,
    patient_position: str = "HFS",
    descending: bool = False,
) -> CtSeriesInfo:
    """Write ``volume`` (HU) as CT slices; returns the UIDs a registration will reference.

    ``descending`` numbers instances (and files) from the last slice back to the first, as
    scanners that scan head to foot do; ``patient_position`` is written as Patient Position.
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = uid_for("ct-series")
    frame_uid = uid_for("ct-frame-of-reference")
    row_direction, column_direction, step = _axis_aligned_slices(volume)
    spacing = volume.spacing_mm
    stored = np.clip(np.rint(volume.hu), HU_MIN, HU_MAX).astype(np.int16)
    sop_uids = []
    count = volume.hu.shape[2]
    for k in range(count):
        number = count - k if descending else k + 1
        sop_uid = uid_for(f"ct-slice-{number - 1}")
        sop_uids.append(sop_uid)
        ds = Dataset()
        add_file_meta(ds, CTImageStorage, sop_uid)
        add_patient_and_study(ds, patient, study_uid, "CT1")
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 1
        ds.SeriesDescription = "Phantom chest CT"
        ds.BodyPartExamined = "CHEST"
        ds.PatientPosition = patient_position
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.Manufacturer = "xvr-node"
        ds.ManufacturerModelName = "phantom"
        ds.SoftwareVersions = __version__
        ds.InstanceNumber = number
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.AcquisitionNumber = 1
        ds.ContentDate = patient.study_date
        ds.ContentTime = patient.study_time
        ds.KVP = 120
        ds.SliceThickness = f"{np.linalg.norm(step):.6g}"
        position = volume.affine_lps[:3, 3] + k * step
        ds.ImagePositionPatient = [f"{x:.6f}" for x in position]
        ds.ImageOrientationPatient = [f"{x:.6f}" for x in (*row_direction, *column_direction)]
        ds.SliceLocation = f"{position[2]:.6f}"
        ds.PixelSpacing = [f"{spacing[1]:.6g}", f"{spacing[0]:.6g}"]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = volume.hu.shape[1]
        ds.Columns = volume.hu.shape[0]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        ds.save_as(folder / f"CT_{number:04d}.dcm", enforce_file_format=True)
    return CtSeriesInfo(study_uid, series_uid, frame_uid, sop_uids, folder)
