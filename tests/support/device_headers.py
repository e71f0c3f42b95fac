"""X-ray data sets shaped attribute by attribute like real devices' headers.

Each builder reproduces the geometry-relevant attributes of one real-device file described in
the project's real-X-ray manifest (values, VRs, empty-but-present attributes), with fresh UIDs
and blank pixels: the tests never need the real files. ``matrix`` shrinks the pixel grid
where a test does not depend on it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

XA = "1.2.840.10008.5.1.4.1.1.12.1"
XRF = "1.2.840.10008.5.1.4.1.1.12.2"
CT = "1.2.840.10008.5.1.4.1.1.2"


def _base(
    sop_class: str, modality: str, rows: int, columns: int, frames: int, bits: int
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientName = ""
    ds.PatientID = "DEVICE-TEST"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyDate = "20250904"
    ds.StudyTime = "113657"
    ds.ReferringPhysicianName = ""
    ds.AccessionNumber = ""
    ds.StudyID = ""
    ds.SeriesNumber = "1"
    ds.InstanceNumber = "1"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    if frames > 1:
        ds.NumberOfFrames = str(frames)
        ds.FrameIncrementPointer = 0x00181063
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    dtype = np.uint16 if bits == 16 else np.uint8
    ds.PixelData = np.zeros((frames, rows, columns), dtype=dtype).tobytes()
    return ds


def oec9900_rf(matrix: int = 1024) -> Dataset:
    """GE OEC 9900 Elite mobile C-arm, XRF: SID and Intensifier Size, no pixel spacing."""
    ds = _base(XRF, "RF", matrix, matrix, 1, 16)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "SINGLE PLANE"]
    ds.Manufacturer = "GE_HEALTHCARE"
    ds.ManufacturerModelName = "990001VAS 8"
    ds.SoftwareVersions = "7.0.60_PN883783-01"
    ds.KVP = "75"
    ds.DistanceSourceToDetector = "1000"
    ds.RadiationSetting = "GR"
    ds.IntensifierSize = "229"
    ds.PatientOrientation = ""
    ds.PixelIntensityRelationship = "DISP"
    return ds


def innova_xa(frames: int = 8, matrix: int = 512, patient_id: str = "") -> Dataset:
    """GE Innova (DL platform) XA cine: complete geometry, often with an empty Patient ID."""
    ds = _base(XA, "XA", matrix, matrix, frames, 8)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "SINGLE PLANE"]
    ds.Manufacturer = "GE MEDICAL SYSTEMS"
    ds.ManufacturerModelName = "DL"
    ds.StationName = "TERRA2"
    ds.PatientID = patient_id
    ds.IssuerOfPatientID = "WWSS"
    ds.BodyPartExamined = "HEART"
    ds.FrameTime = "66.6667"
    ds.DistanceSourceToDetector = "1193"
    ds.DistanceSourceToPatient = "720"
    ds.EstimatedRadiographicMagnificationFactor = "1.65694"
    ds.FieldOfViewShape = "RECTANGLE"
    ds.FieldOfViewDimensions = [200, 200]
    ds.IntensifierSize = "307.2"
    ds.ImagerPixelSpacing = ["0.390625", "0.390625"]
    ds.PositionerMotion = "STATIC"
    ds.PositionerPrimaryAngle = "-28.5"
    ds.PositionerSecondaryAngle = "21.90"
    ds.ShutterShape = "RECTANGULAR"
    ds.ShutterLeftVerticalEdge = "6"
    ds.ShutterRightVerticalEdge = "512"
    ds.ShutterUpperHorizontalEdge = "3"
    ds.ShutterLowerHorizontalEdge = "510"
    ds.CollimatorShape = "RECTANGULAR"
    ds.CollimatorLeftVerticalEdge = "6"
    ds.CollimatorRightVerticalEdge = "511"
    ds.CollimatorUpperHorizontalEdge = "2"
    ds.CollimatorLowerHorizontalEdge = "509"
    ds.DetectorType = "SCINTILLATOR"
    ds.FieldOfViewOrigin = ["7", "7"]
    ds.FieldOfViewRotation = "0"
    ds.FieldOfViewHorizontalFlip = "NO"
    ds.PatientOrientation = ["LA", "FAR"]
    ds.PixelIntensityRelationship = "DRM"
    return ds


def siemens_xa_96f(matrix: int = 512) -> Dataset:
    """Siemens angiography XA, 96 frames: angles, Positioner Motion present but empty."""
    ds = _base(XA, "XA", matrix, matrix, 96, 8)
    ds.ImageType = ["DERIVED", "PRIMARY", "SINGLE PLANE", "SINGLE A"]
    ds.Manufacturer = ""
    ds.PatientID = "556342B"
    ds.FrameTime = "33"
    ds.RadiationSetting = "GR"
    ds.PositionerMotion = ""
    ds.PositionerPrimaryAngle = "-32"
    ds.PositionerSecondaryAngle = "2"
    ds.PatientOrientation = ""
    ds.PixelIntensityRelationship = "LIN"
    return ds


def ge_drs_rf() -> Dataset:
    """GE DRS XRF: no geometry, a CIRCULAR\\RECTANGULAR display shutter."""
    ds = _base(XRF, "RF", 1024, 1024, 1, 16)
    ds.Manufacturer = "GE MEDICAL SYSTEMS"
    ds.ManufacturerModelName = "DRS"
    ds.PatientOrientation = ""
    ds.ShutterShape = ["CIRCULAR", "RECTANGULAR"]
    ds.ShutterLeftVerticalEdge = "10"
    ds.ShutterRightVerticalEdge = "950"
    ds.ShutterUpperHorizontalEdge = "10"
    ds.ShutterLowerHorizontalEdge = "950"
    ds.CenterOfCircularShutter = ["480", "480"]
    ds.RadiusOfCircularShutter = "470"
    return ds


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def part10(ds: Dataset, tmp_path: Path) -> bytes:
    """The data set as DICOM file bytes, as a C-STORE handler hands them on."""
    return save(ds, tmp_path / f"{ds.SOPInstanceUID}.dcm").read_bytes()
