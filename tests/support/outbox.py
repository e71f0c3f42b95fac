"""Result-like objects for outbox tests and benchmarks: many, cheap, and each its own UID."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def noise_captures(count: int, seed: int = 9) -> list[tuple[str, Dataset]]:
    """``count`` 512 x 512 Secondary Captures of noise (256 KiB each) in one new series, as
    ``("sc", dataset)`` pairs for :func:`xvr_node.jobs.export.store_result_objects`."""
    rng = np.random.default_rng(seed)
    study, series = generate_uid(), generate_uid()
    objects = []
    for number in range(1, count + 1):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = SecondaryCaptureImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.PatientName, ds.Modality = "OUTBOX", "Test^Outbox", "OT"
        ds.InstanceNumber, ds.ConversionType = number, "WSD"
        ds.Rows = ds.Columns = 512
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = rng.integers(0, 256, (512, 512), dtype=np.uint8).tobytes()
        objects.append(("sc", ds))
    return objects
