"""Assembling CT volumes: correct geometry from any file order, and precise refusals."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    RLELossless,
)

from xvr_node.dicom.volume import (
    AssembledVolume,
    VolumeRefusedError,
    assemble_volume,
    read_series_files,
    write_volume_nifti,
)

ROWS, COLUMNS = 6, 8
PIXEL_SPACING = (0.5, 0.75)  # DICOM order: row spacing (between rows), column spacing
SERIES_UID = "1.2.826.0.1.3680043.8.498.100"
FRAME_UID = "1.2.826.0.1.3680043.8.498.200"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
AXIAL = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
ORIGIN = np.array([-10.0, 20.0, -100.0])


def rotation(degrees_xyz: tuple[float, float, float]) -> np.ndarray:
    """Rotation about x, then y, then z (extrinsic), for oblique test orientations."""
    ax, ay, az = np.radians(degrees_xyz)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def ct_slice(
    k: int,
    position: np.ndarray,
    orientation: tuple[tuple[float, ...], tuple[float, ...]] = AXIAL,
    pixels: np.ndarray | None = None,
    slope: float = 1.0,
    intercept: float = -1024.0,
) -> Dataset:
    """One CT Image slice of ROWS × COLUMNS int16 pixels, as a scanner writes it."""
    if pixels is None:
        pixels = pixel_values(k)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.300.{k + 1}"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.SeriesInstanceUID = SERIES_UID
    ds.FrameOfReferenceUID = FRAME_UID
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [f"{x:.6f}" for x in position]
    ds.ImageOrientationPatient = [f"{x:.6f}" for x in (*orientation[0], *orientation[1])]
    ds.PixelSpacing = [str(x) for x in PIXEL_SPACING]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleType = "HU"
    ds.PixelData = pixels.astype(np.int16).tobytes()
    return ds


def pixel_values(k: int) -> np.ndarray:
    """Stored values that differ by slice, row and column, so any transposition shows."""
    rows, columns = np.mgrid[0:ROWS, 0:COLUMNS]
    return (1000 + 100 * k + 10 * rows + columns).astype(np.int16)


def series(
    n: int = 5,
    orientation: tuple[tuple[float, ...], tuple[float, ...]] = AXIAL,
    spacing: float = 2.5,
) -> tuple[list[Dataset], np.ndarray]:
    """``n`` slices stacked along the normal, and the affine the assembly must produce."""
    row, column = np.array(orientation[0]), np.array(orientation[1])
    direction = np.cross(row, column)
    direction = direction if direction[np.argmax(np.abs(direction))] > 0 else -direction
    datasets = [ct_slice(k, ORIGIN + k * spacing * direction, orientation) for k in range(n)]
    affine = np.eye(4)
    affine[:3, 0] = row * PIXEL_SPACING[1]
    affine[:3, 1] = column * PIXEL_SPACING[0]
    affine[:3, 2] = direction * spacing
    affine[:3, 3] = ORIGIN
    return datasets, affine


def expected_hu(n: int, slope: float = 1.0, intercept: float = -1024.0) -> np.ndarray:
    """HU indexed [column, row, slice]: voxel (i, j, k) is pixel_array[k][j, i]."""
    return np.stack([pixel_values(k).T * slope + intercept for k in range(n)], axis=2)


def refusal(datasets: list[Dataset]) -> str:
    with pytest.raises(VolumeRefusedError) as caught:
        assemble_volume(datasets)
    assert str(caught.value) == caught.value.reason
    return caught.value.reason


def set_position(ds: Dataset, position: np.ndarray) -> None:
    ds.ImagePositionPatient = [f"{x:.6f}" for x in position]


# --- correct assembly ---------------------------------------------------------------------------


def test_shuffled_files_assemble_in_position_order():
    datasets, affine = series(7)
    shuffled = [datasets[i] for i in np.random.default_rng(1).permutation(7)]
    assembled = assemble_volume(shuffled)
    assert isinstance(assembled, AssembledVolume)
    assert assembled.volume.hu.dtype == np.float32
    assert assembled.volume.hu.shape == (COLUMNS, ROWS, 7)
    np.testing.assert_array_equal(assembled.volume.hu, expected_hu(7))
    np.testing.assert_allclose(assembled.volume.affine_lps, affine, atol=1e-6)
    assert assembled.sop_instance_uids == [ds.SOPInstanceUID for ds in datasets]
    assert assembled.series_instance_uid == SERIES_UID
    assert assembled.frame_of_reference_uid == FRAME_UID
    assert assembled.slice_spacing_mm == pytest.approx(2.5)


def test_oblique_series_affine_maps_voxels_to_each_slice_position():
    matrix = rotation((20.0, -35.0, 50.0))
    orientation = (tuple(matrix[:, 0]), tuple(matrix[:, 1]))
    datasets, affine = series(6, orientation, spacing=1.25)
    assembled = assemble_volume(datasets[::-1])
    np.testing.assert_allclose(assembled.volume.affine_lps, affine, atol=1e-5)
    by_uid = {ds.SOPInstanceUID: ds for ds in datasets}
    row, column = matrix[:, 0], matrix[:, 1]
    for k, uid in enumerate(assembled.sop_instance_uids):
        corner = np.array([float(x) for x in by_uid[uid].ImagePositionPatient])
        # DICOM's own pixel → patient equation (PS3.3 C.7.6.2.1.1) for pixel (column 3, row 2).
        pixel = corner + 3 * PIXEL_SPACING[1] * row + 2 * PIXEL_SPACING[0] * column
        np.testing.assert_allclose(assembled.volume.voxel_to_lps([0, 0, k])[0], corner, atol=1e-5)
        np.testing.assert_allclose(assembled.volume.voxel_to_lps([3, 2, k])[0], pixel, atol=1e-5)
    np.testing.assert_array_equal(assembled.volume.hu, expected_hu(6))


def test_slices_run_toward_superior_whatever_the_normal_sign():
    # Row × column points to the feet here (as in the phantom); k must still run feet → head.
    orientation = ((1.0, 0.0, 0.0), (0.0, -1.0, 0.0))
    datasets, affine = series(4, orientation)
    assembled = assemble_volume(datasets[::-1])
    np.testing.assert_allclose(assembled.volume.affine_lps, affine, atol=1e-6)
    assert assembled.volume.affine_lps[2, 2] == pytest.approx(2.5)


def test_each_slice_uses_its_own_rescale():
    datasets, _ = series(3)
    rescales = [(1.0, -1024.0), (2.0, -2048.0), (0.5, 10.0)]
    for ds, (slope, intercept) in zip(datasets, rescales, strict=True):
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
    hu = assemble_volume(datasets).volume.hu
    for k, (slope, intercept) in enumerate(rescales):
        np.testing.assert_array_equal(hu[:, :, k], pixel_values(k).T * slope + intercept)


def test_missing_rescale_means_identity_and_other_modalities_are_accepted():
    datasets, _ = series(3)
    for ds in datasets:
        del ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType
        ds.SOPClassUID = MRImageStorage
        ds.Modality = "MR"
    np.testing.assert_array_equal(
        assemble_volume(datasets).volume.hu, expected_hu(3, intercept=0.0)
    )


def test_compressed_slices_decode_through_pydicom():
    datasets, _ = series(3)
    for k, ds in enumerate(datasets):
        ds.compress(RLELossless, pixel_values(k))
    np.testing.assert_array_equal(assemble_volume(datasets).volume.hu, expected_hu(3))


def enhanced_ct(n: int, order: list[int]) -> Dataset:
    """One Enhanced CT instance whose frames (stored in ``order``) are the slices of series()."""
    singles, _ = series(n)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ENHANCED_CT
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.400"
    ds.Modality = "CT"
    ds.SeriesInstanceUID = SERIES_UID
    ds.FrameOfReferenceUID = FRAME_UID
    ds.InstanceNumber = 1
    ds.NumberOfFrames = n
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = ROWS, COLUMNS
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    shared = Dataset()
    orientation = Dataset()
    orientation.ImageOrientationPatient = singles[0].ImageOrientationPatient
    measures = Dataset()
    measures.PixelSpacing = singles[0].PixelSpacing
    measures.SliceThickness = "2.5"
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = "1", "-1024", "HU"
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for k in order:
        position = Dataset()
        position.ImagePositionPatient = singles[k].ImagePositionPatient
        groups = Dataset()
        groups.PlanePositionSequence = Sequence([position])
        per_frame.append(groups)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = np.stack([pixel_values(k) for k in order]).astype(np.int16).tobytes()
    return ds


def test_enhanced_ct_frames_assemble_from_functional_groups():
    _, affine = series(5)
    assembled = assemble_volume([enhanced_ct(5, [3, 0, 4, 1, 2])])
    np.testing.assert_array_equal(assembled.volume.hu, expected_hu(5))
    np.testing.assert_allclose(assembled.volume.affine_lps, affine, atol=1e-6)
    assert assembled.sop_instance_uids == ["1.2.826.0.1.3680043.8.498.400"] * 5


def test_enhanced_ct_refusals_name_the_frame():
    ds = enhanced_ct(4, [0, 1, 2, 3])
    del ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence
    assert refusal([ds]) == "frame 3 of instance 1 has no ImagePositionPatient (0020,0032)"
    ds = enhanced_ct(4, [0, 1, 2, 1])
    assert refusal([ds]) == (
        "frame 2 of instance 1 and frame 4 of instance 1 are both at z=-97.5; "
        "a volume needs one slice per position"
    )


@pytest.mark.slow
def test_phantom_series_matches_its_truth(phantom_dir):
    truth = json.loads((phantom_dir / "truth.json").read_text())["ct"]
    paths = sorted((phantom_dir / "ct").glob("*.dcm"))
    datasets = read_series_files(reversed(paths))
    assembled = assemble_volume(datasets)
    assert list(assembled.volume.hu.shape) == truth["shape"]
    np.testing.assert_allclose(assembled.volume.affine_lps, truth["affine_lps"], atol=1e-3)
    assert assembled.series_instance_uid == truth["series_instance_uid"]
    assert assembled.frame_of_reference_uid == truth["frame_of_reference_uid"]
    by_uid = {ds.SOPInstanceUID: ds for ds in datasets}
    for k, uid in enumerate(assembled.sop_instance_uids):
        ds = by_uid[uid]
        stored = ds.pixel_array.T * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(assembled.volume.hu[:, :, k], stored)


# --- refusals -----------------------------------------------------------------------------------


def test_too_few_slices():
    datasets, _ = series(2)
    assert refusal(datasets) == "a volume needs at least 3 slices; series has 2"
    assert refusal([]) == "a volume needs at least 3 slices; series has 0"


@pytest.mark.parametrize(
    ("keyword", "tag"),
    [
        ("ImagePositionPatient", "(0020,0032)"),
        ("ImageOrientationPatient", "(0020,0037)"),
        ("PixelSpacing", "(0028,0030)"),
    ],
)
def test_missing_geometry_names_attribute_and_instance(keyword, tag):
    datasets, _ = series(5)
    delattr(datasets[2], keyword)
    assert refusal(datasets) == f"instance 3 has no {keyword} {tag}"


def test_malformed_position_is_refused():
    datasets, _ = series(4)
    datasets[1].ImagePositionPatient = ["1", "2"]
    assert refusal(datasets) == (
        "instance 2 has an invalid ImagePositionPatient (0020,0032): expected 3 numbers, got '1\\2'"
    )


def test_mixed_series():
    datasets, _ = series(4)
    datasets[2].SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.999"
    assert refusal(datasets) == (
        f"instance 3 belongs to series 1.2.826.0.1.3680043.8.498.999, not {SERIES_UID} like "
        "instance 1; a volume is built from one series"
    )


def test_mixed_frame_of_reference():
    datasets, _ = series(4)
    datasets[3].FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.998"
    assert refusal(datasets) == (
        f"instance 4 has FrameOfReferenceUID 1.2.826.0.1.3680043.8.498.998 but instance 1 has "
        f"{FRAME_UID}; slice positions in different frames of reference cannot be combined"
    )


def test_different_orientation():
    datasets, _ = series(5)
    turned = rotation((0.0, 0.0, 5.0))
    datasets[3].ImageOrientationPatient = [f"{x:.6f}" for x in (*turned[:, 0], *turned[:, 1])]
    assert refusal(datasets) == (
        "instance 4 has a different orientation than instance 1 (rotated by 5.0°); "
        "a volume needs one orientation"
    )


def test_orientation_not_orthonormal():
    datasets, _ = series(3, ((1.0, 0.0, 0.0), (0.6, 0.8, 0.0)))
    assert refusal(datasets) == (
        "instance 1 has an ImageOrientationPatient (0020,0037) whose row and column directions "
        "are not orthonormal"
    )


def test_geometric_gantry_tilt():
    datasets, _ = series(5)
    tilt = math.radians(12.0)
    step = 2.5 * np.array([0.0, math.sin(tilt), math.cos(tilt)])
    for k, ds in enumerate(datasets):
        set_position(ds, ORIGIN + k * step)
    assert refusal(datasets) == "gantry tilt of 12.0° is not supported"


def test_gantry_tilt_attribute():
    datasets, _ = series(5)
    for ds in datasets:
        ds.GantryDetectorTilt = "-15"
    assert refusal(datasets) == "gantry tilt of 15.0° is not supported"


def test_sideways_jitter_beyond_half_a_pixel():
    datasets, _ = series(5)
    set_position(datasets[2], ORIGIN + np.array([0.3, 0.0, 5.0]))
    assert refusal(datasets) == (
        "slice positions do not line up along the slice normal: instance 3 lies 0.3 mm "
        "sideways of instance 1"
    )


def test_duplicate_positions_name_both_instances():
    datasets, _ = series(5)
    set_position(datasets[3], ORIGIN + np.array([0.0, 0.0, 2.5]))
    assert refusal(datasets) == (
        "instance 2 and instance 4 are both at z=-97.5; a volume needs one slice per position"
    )


def test_one_missing_slice():
    datasets, _ = series(8)
    del datasets[3]
    assert refusal(datasets) == "slice 4 missing between z=-95.0 and z=-90.0"


def test_several_missing_slices():
    datasets, _ = series(8)
    del datasets[3:5]
    assert refusal(datasets) == ("2 slices missing between z=-95.0 and z=-87.5 (slices 4 to 5)")


def test_missing_slices_in_two_places():
    datasets, _ = series(10)
    del datasets[5], datasets[2]
    assert refusal(datasets) == (
        "slice 3 missing between z=-97.5 and z=-92.5; slice 6 missing between z=-90.0 and z=-85.0"
    )


def test_uneven_spacing():
    datasets, _ = series(6)
    for k, z in enumerate([-100.0, -97.5, -95.0, -91.9, -89.4, -86.9]):
        set_position(datasets[k], np.array([ORIGIN[0], ORIGIN[1], z]))
    assert refusal(datasets) == "spacing varies from 2.5 to 3.1 mm"


def test_spacing_drifting_along_the_series():
    gaps = [2.46, 2.47, 2.48, 2.49, 2.51, 2.52, 2.53, 2.54]
    datasets, _ = series(len(gaps) + 1)
    for ds, z in zip(datasets, ORIGIN[2] + np.r_[0.0, np.cumsum(gaps)], strict=True):
        set_position(ds, np.array([ORIGIN[0], ORIGIN[1], z]))
    assert refusal(datasets) == (
        "slice 5 lies 0.1 mm off a uniform 2.5 mm spacing; spacing drifts along the series"
    )


def test_small_position_rounding_is_accepted():
    datasets, _ = series(6)
    for k, ds in enumerate(datasets):
        set_position(ds, ORIGIN + np.array([0.0, 0.0, round(2.5 * k + 0.01 * (-1) ** k, 2)]))
    assert assemble_volume(datasets).slice_spacing_mm == pytest.approx(2.5, abs=0.01)


def test_different_image_size():
    datasets, _ = series(4)
    datasets[2] = ct_slice(2, ORIGIN + np.array([0, 0, 5.0]), pixels=pixel_values(2)[:5])
    assert refusal(datasets) == (
        "instance 3 has 5 rows and 8 columns but instance 1 has 6 rows and 8 columns"
    )


def test_different_pixel_spacing():
    datasets, _ = series(4)
    datasets[2].PixelSpacing = ["0.6", "0.75"]
    assert refusal(datasets) == (
        "instance 3 has pixel spacing 0.6 × 0.75 mm but instance 1 has 0.5 × 0.75 mm"
    )


def test_rescale_type_differs():
    datasets, _ = series(4)
    datasets[1].RescaleType = "US"
    assert refusal(datasets) == "instance 2 has RescaleType 'US' but instance 1 has 'HU'"
    del datasets[1].RescaleType
    assert refusal(datasets) == "instance 2 has RescaleType none but instance 1 has 'HU'"


def test_ct_rescale_type_must_be_hu():
    datasets, _ = series(4)
    for ds in datasets:
        ds.RescaleType = "US"
    assert refusal(datasets) == (
        "instance 1 has RescaleType 'US'; a CT volume must be in Hounsfield units (HU)"
    )


def test_zero_rescale_slope():
    datasets, _ = series(4)
    datasets[1].RescaleSlope = "0"
    assert (
        refusal(datasets) == "instance 2 has RescaleSlope 0; its pixel values cannot be converted"
    )


def test_no_pixel_data():
    datasets, _ = series(4)
    del datasets[0].PixelData
    assert refusal(datasets) == "instance 1 has no pixel data"


def test_multiframe_without_per_frame_positions():
    datasets, _ = series(2)
    datasets[0].NumberOfFrames = 3
    assert refusal(datasets) == (
        "instance 1 holds 3 frames without per-frame positions; only single-frame images or "
        "Enhanced CT can be assembled"
    )


def test_undecodable_pixel_data():
    datasets, _ = series(3)
    datasets[1].file_meta.TransferSyntaxUID = JPEG2000Lossless
    datasets[1].PixelData = encapsulate([b"\x00" * 16])
    reason = refusal(datasets)
    assert reason.startswith(
        "the pixel data of instance 2 (JPEG 2000 Image Compression (Lossless Only)) "
        "cannot be decoded: "
    )


def test_non_dicom_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not an image")
    with pytest.raises(VolumeRefusedError, match="is not a DICOM file"):
        read_series_files([path])


def test_read_series_files_keeps_pixels(tmp_path):
    datasets, _ = series(3)
    paths = []
    for ds in datasets:
        paths.append(tmp_path / f"{ds.InstanceNumber}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    read = read_series_files(paths)
    np.testing.assert_array_equal(assemble_volume(read).volume.hu, expected_hu(3))


# --- NIfTI cache ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["volume.nii", "volume.nii.gz"])
def test_nifti_round_trip(tmp_path, name):
    matrix = rotation((10.0, 0.0, -30.0))
    datasets, _ = series(4, (tuple(matrix[:, 0]), tuple(matrix[:, 1])))
    assembled = assemble_volume(datasets)
    path = tmp_path / name
    path.write_bytes(b"an older cache file is replaced")
    write_volume_nifti(assembled, path)
    image = nib.load(path)
    np.testing.assert_array_equal(np.asarray(image.dataobj), assembled.volume.hu)
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ assembled.volume.affine_lps
    np.testing.assert_allclose(image.affine, ras, atol=1e-4)
    assert os.listdir(tmp_path) == [name]


def test_failed_nifti_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    datasets, _ = series(3)
    assembled = assemble_volume(datasets)

    def fail(source: str, target: Path) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk gone"):
        write_volume_nifti(assembled, tmp_path / "volume.nii.gz")
    assert os.listdir(tmp_path) == []


def test_nifti_needs_a_nifti_name(tmp_path):
    datasets, _ = series(3)
    with pytest.raises(ValueError, match=r"must end with \.nii or \.nii\.gz"):
        write_volume_nifti(assemble_volume(datasets), tmp_path / "volume.img")
