"""Reading X-ray geometry: the phantom's truth, fallbacks, robustness and inconsistencies."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import CTImageStorage

from xvr_node.xray_geometry import (
    SID_NAME,
    SPACING_NAME,
    XRAY_SOP_CLASSES,
    FrameGeometry,
    XrayGeometry,
    XrayGeometryError,
    read_xray_geometry,
)

XA = "1.2.840.10008.5.1.4.1.1.12.1"
ENHANCED_XA = "1.2.840.10008.5.1.4.1.1.12.1.1"


def legacy_xa(**overrides: object) -> Dataset:
    """A minimal single-frame XA header, as a C-arm writes one (no pixel data needed)."""
    ds = Dataset()
    ds.SOPClassUID = XA
    ds.Modality = "XA"
    ds.Manufacturer = "Acme"
    ds.ManufacturerModelName = "Arc 9"
    ds.StationName = "OR3"
    ds.Rows = 100
    ds.Columns = 120
    ds.DistanceSourceToDetector = "1100"
    ds.DistanceSourceToPatient = "800"
    ds.ImagerPixelSpacing = ["0.3", "0.4"]
    ds.PositionerPrimaryAngle = "30"
    ds.PositionerSecondaryAngle = "-10"
    ds.PatientOrientation = ["L", "F"]
    for keyword, value in overrides.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def truth_records(phantom_dir: Path) -> list[dict]:
    return json.loads((phantom_dir / "truth.json").read_text())["xrays"]


# --- the phantom -------------------------------------------------------------------------------


def test_phantom_geometry_matches_truth_for_every_frame(phantom_dir: Path) -> None:
    records = truth_records(phantom_dir)
    assert {r["modality"] for r in records} >= {"XA", "RF"}
    assert any(r["mirrored"] for r in records) and not all(r["mirrored"] for r in records)
    for record in records:
        geometry = read_xray_geometry(dcmread(phantom_dir / record["file"]))
        where = f"{record['file']} frame {record['frame_number']}"
        assert (geometry.rows, geometry.columns) == (record["rows"], record["columns"]), where
        assert geometry.number_of_frames == record["number_of_frames"], where
        assert geometry.sid_mm == pytest.approx(record["sid_mm"]), where
        assert geometry.sid_source == "DistanceSourceToDetector"
        assert geometry.pixel_spacing_mm == pytest.approx(tuple(record["pixel_spacing_mm"]))
        assert geometry.pixel_spacing_source == "ImagerPixelSpacing"
        assert geometry.principal_point_px == pytest.approx(tuple(record["principal_point_px"]))
        assert geometry.mirrored is record["mirrored"], where
        positioner = record["positioner"]
        assert geometry.dsp_mm == pytest.approx(positioner["source_patient_mm"]), where
        assert geometry.motion == positioner["motion"], where
        frame = geometry.frames[record["frame_number"] - 1]
        assert frame.primary_deg == pytest.approx(positioner["primary_deg"], abs=1e-6), where
        assert frame.secondary_deg == pytest.approx(positioner["secondary_deg"], abs=1e-6), where
        assert geometry.usable(), where
        assert geometry.intrinsics().principal_point_px == pytest.approx(
            tuple(record["principal_point_px"])
        )


def test_phantom_dynamic_cine_has_distinct_frame_angles(phantom_dir: Path) -> None:
    cines = [r for r in truth_records(phantom_dir) if r["positioner"]["motion"] == "DYNAMIC"]
    assert cines, "the phantom fixture should hold a DYNAMIC cine"
    geometry = read_xray_geometry(dcmread(phantom_dir / cines[0]["file"]))
    assert geometry.number_of_frames == len(geometry.frames) > 1
    assert len({frame.primary_deg for frame in geometry.frames}) == geometry.number_of_frames


# --- legacy attributes -------------------------------------------------------------------------


def test_reads_a_legacy_xa_header() -> None:
    geometry = read_xray_geometry(legacy_xa())
    assert geometry.sid_mm == 1100.0
    assert geometry.dsp_mm == 800.0
    assert geometry.pixel_spacing_mm == (0.3, 0.4)
    assert geometry.principal_point_px == (59.5, 49.5)
    assert geometry.frames == (FrameGeometry(30.0, -10.0),)
    assert geometry.patient_orientation == ("L", "F")
    assert geometry.motion is None
    intrinsics = geometry.intrinsics()
    assert (intrinsics.row_spacing_mm, intrinsics.column_spacing_mm) == (0.3, 0.4)
    assert (intrinsics.rows, intrinsics.columns, intrinsics.sid_mm) == (100, 120, 1100.0)


def test_pixel_spacing_is_the_fallback_when_imager_pixel_spacing_is_absent() -> None:
    geometry = read_xray_geometry(legacy_xa(ImagerPixelSpacing=None, PixelSpacing=["0.2", "0.2"]))
    assert geometry.pixel_spacing_mm == (0.2, 0.2)
    assert geometry.pixel_spacing_source == "PixelSpacing"
    both = read_xray_geometry(legacy_xa(PixelSpacing=["0.2", "0.2"]))
    assert both.pixel_spacing_mm == (0.3, 0.4)
    assert both.pixel_spacing_source == "ImagerPixelSpacing"


def test_missing_sid_blocks_registration_and_says_so() -> None:
    geometry = read_xray_geometry(legacy_xa(DistanceSourceToDetector=None))
    assert geometry.sid_mm is None and geometry.sid_source is None
    assert geometry.missing() == [SID_NAME]
    assert "Distance Source to Detector (0018,1110)" in geometry.missing()
    assert not geometry.usable()
    with pytest.raises(ValueError, match=r"Distance Source to Detector \(0018,1110\)"):
        geometry.intrinsics()


def test_missing_everything_names_both() -> None:
    geometry = read_xray_geometry(legacy_xa(DistanceSourceToDetector=None, ImagerPixelSpacing=None))
    assert geometry.missing() == [SID_NAME, SPACING_NAME]
    assert geometry.pixel_spacing_source is None


@pytest.mark.parametrize("sid", ["0", "-1100", ""])
def test_zero_negative_or_empty_sid_is_missing(sid: str) -> None:
    geometry = read_xray_geometry(legacy_xa(DistanceSourceToDetector=sid))
    assert geometry.sid_mm is None
    assert geometry.missing() == [SID_NAME]


def test_unreadable_values_as_read_from_a_file_are_missing() -> None:
    # pydicom keeps an invalid DS read from a file as its string: it must not crash the reader.
    ds = legacy_xa()
    ds[0x00181110] = RawDataElement(Tag(0x00181110), "DS", 8, b"garbage ", 0, True, True)
    ds[0x00181164] = RawDataElement(Tag(0x00181164), "DS", 6, b"0.3\\x ", 0, True, True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        geometry = read_xray_geometry(ds)
    assert geometry.missing() == [SID_NAME, SPACING_NAME]


@pytest.mark.parametrize("spacing", [["0", "0.3"], ["0.3", "-0.3"], ["0.3"], ""])
def test_bad_imager_pixel_spacing_is_missing(spacing: object) -> None:
    geometry = read_xray_geometry(legacy_xa(ImagerPixelSpacing=spacing))
    assert geometry.pixel_spacing_mm is None
    assert geometry.missing() == [SPACING_NAME]


def test_empty_angles_and_orientation_are_none_and_not_mirrored() -> None:
    geometry = read_xray_geometry(
        legacy_xa(PositionerPrimaryAngle="", PositionerSecondaryAngle=None, PatientOrientation="")
    )
    assert geometry.frames == (FrameGeometry(None, None),)
    assert geometry.patient_orientation == ()
    assert geometry.mirrored is False
    assert geometry.usable()  # angles are an initial guess, not a requirement


def test_mirrored_rao_view_is_detected_from_patient_orientation() -> None:
    # At RAO 90 the image's +x points anterior (A); a C-arm storing it mirrored says P.
    plain = read_xray_geometry(
        legacy_xa(
            PositionerPrimaryAngle="-90",
            PositionerSecondaryAngle="0",
            PatientOrientation=["A", "F"],
        )
    )
    mirrored = read_xray_geometry(
        legacy_xa(
            PositionerPrimaryAngle="-90",
            PositionerSecondaryAngle="0",
            PatientOrientation=["P", "F"],
        )
    )
    assert plain.mirrored is False
    assert mirrored.mirrored is True


def test_dynamic_increments_accumulate_from_the_previous_frame() -> None:
    ds = legacy_xa(
        NumberOfFrames=4,
        PositionerMotion="DYNAMIC",
        PositionerPrimaryAngleIncrement=["0", "2", "2", "-1"],
        PositionerSecondaryAngleIncrement=["0", "0.5", "0", "0.5"],
    )
    geometry = read_xray_geometry(ds)
    assert geometry.motion == "DYNAMIC"
    primaries = [f.primary_deg for f in geometry.frames]
    secondaries = [f.secondary_deg for f in geometry.frames]
    assert primaries == pytest.approx([30, 32, 34, 33])
    assert secondaries == pytest.approx([-10, -9.5, -9.5, -9])


def test_static_multiframe_repeats_the_first_angles() -> None:
    geometry = read_xray_geometry(legacy_xa(NumberOfFrames=3, PositionerMotion="STATIC"))
    assert geometry.frames == (FrameGeometry(30.0, -10.0),) * 3


def test_dynamic_without_increments_knows_only_the_first_frame() -> None:
    geometry = read_xray_geometry(legacy_xa(NumberOfFrames=3, PositionerMotion="DYNAMIC"))
    assert geometry.frames == (FrameGeometry(30.0, -10.0),) + (FrameGeometry(None, None),) * 2


def test_inconsistent_increment_count_is_an_error() -> None:
    ds = legacy_xa(
        NumberOfFrames=5,
        PositionerMotion="DYNAMIC",
        PositionerPrimaryAngleIncrement=["0", "1", "1"],
        PositionerSecondaryAngleIncrement=["0", "0", "0", "0", "0"],
    )
    with pytest.raises(
        XrayGeometryError, match="Positioner Primary Angle Increment has 3 values for 5 frames"
    ):
        read_xray_geometry(ds)


def test_rf_and_dx_sop_classes_are_x_rays() -> None:
    for uid, name in XRAY_SOP_CLASSES.items():
        assert read_xray_geometry(legacy_xa(SOPClassUID=uid)).usable(), name


def test_a_ct_is_not_an_x_ray() -> None:
    with pytest.raises(XrayGeometryError, match="not an X-ray"):
        read_xray_geometry(legacy_xa(SOPClassUID=CTImageStorage, Modality="CT"))


def test_missing_rows_is_an_error() -> None:
    with pytest.raises(XrayGeometryError, match=r"Rows \(0028,0010\)"):
        read_xray_geometry(legacy_xa(Rows=None))


# --- Enhanced XA -------------------------------------------------------------------------------


def enhanced_xa(frame_angles: list[tuple[float, float]]) -> Dataset:
    """Enhanced XA: distances and spacing shared, positioner angles per frame."""
    ds = Dataset()
    ds.SOPClassUID = ENHANCED_XA
    ds.Rows = 64
    ds.Columns = 64
    ds.NumberOfFrames = len(frame_angles)
    ds.PositionerMotion = "DYNAMIC"
    geometry = Dataset()
    geometry.DistanceSourceToDetector = "1200"
    geometry.DistanceSourceToIsocenter = 780.0
    pixel_properties = Dataset()
    pixel_properties.ImagerPixelSpacing = ["0.6", "0.6"]
    shared = Dataset()
    shared.XRayGeometrySequence = Sequence([geometry])
    shared.FramePixelDataPropertiesSequence = Sequence([pixel_properties])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for primary, secondary in frame_angles:
        position = Dataset()
        position.PositionerPrimaryAngle = primary
        position.PositionerSecondaryAngle = secondary
        item = Dataset()
        item.PositionerPositionSequence = Sequence([position])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    return ds


def test_enhanced_xa_reads_functional_groups() -> None:
    geometry = read_xray_geometry(enhanced_xa([(10.0, 0.0), (12.5, 1.0)]))
    assert geometry.sid_mm == 1200.0
    assert geometry.dsp_mm == 780.0
    assert geometry.pixel_spacing_mm == (0.6, 0.6)
    assert geometry.pixel_spacing_source == "ImagerPixelSpacing"
    assert geometry.frames == (FrameGeometry(10.0, 0.0), FrameGeometry(12.5, 1.0))
    assert geometry.principal_point_px == (31.5, 31.5)


def test_enhanced_xa_with_wrong_per_frame_count_is_an_error() -> None:
    ds = enhanced_xa([(10.0, 0.0), (12.5, 1.0)])
    ds.NumberOfFrames = 3
    with pytest.raises(XrayGeometryError, match="2 items for 3 frames"):
        read_xray_geometry(ds)


# --- fallbacks and persistence -----------------------------------------------------------------


def test_with_profile_fills_only_what_is_missing() -> None:
    no_sid = read_xray_geometry(legacy_xa(DistanceSourceToDetector=None))
    filled = no_sid.with_profile(1000.0, (0.9, 0.9), "profile")
    assert filled.sid_mm == 1000.0 and filled.sid_source == "profile"
    assert filled.pixel_spacing_mm == (0.3, 0.4)
    assert filled.pixel_spacing_source == "ImagerPixelSpacing"
    assert filled.usable()

    no_spacing = read_xray_geometry(legacy_xa(ImagerPixelSpacing=None))
    filled = no_spacing.with_profile(1000.0, (0.9, 0.8), "config")
    assert filled.sid_mm == 1100.0 and filled.sid_source == "DistanceSourceToDetector"
    assert filled.pixel_spacing_mm == (0.9, 0.8) and filled.pixel_spacing_source == "config"

    complete = read_xray_geometry(legacy_xa())
    assert complete.with_profile(1.0, (1.0, 1.0), "profile") == complete
    assert no_sid.with_profile(None, None, "profile") == no_sid


def test_with_profile_rejects_bad_values() -> None:
    no_sid = read_xray_geometry(legacy_xa(DistanceSourceToDetector=None))
    with pytest.raises(ValueError, match="positive"):
        no_sid.with_profile(0.0, None, "profile")
    with pytest.raises(ValueError, match="source"):
        no_sid.with_profile(1000.0, None, "guess")


def test_json_round_trip_is_exact() -> None:
    cine = legacy_xa(
        NumberOfFrames=3,
        PositionerMotion="DYNAMIC",
        PositionerPrimaryAngleIncrement=["0", "0.1", "0.2"],
        PositionerSecondaryAngleIncrement=["0", "0", "0"],
        DistanceSourceToDetector=None,
    )
    for geometry in (
        read_xray_geometry(legacy_xa()),
        read_xray_geometry(cine),
        read_xray_geometry(cine).with_profile(1012.5, None, "profile"),
        read_xray_geometry(legacy_xa(PatientOrientation="", ImagerPixelSpacing=None)),
    ):
        data = json.loads(json.dumps(geometry.to_json()))
        assert XrayGeometry.from_json(data) == geometry


def test_device_key_identifies_the_c_arm_and_detector_format() -> None:
    geometry = read_xray_geometry(legacy_xa())
    assert geometry.device_key() == ("Acme", "Arc 9", "OR3", 100, 120)
    anonymous = read_xray_geometry(
        legacy_xa(Manufacturer=None, ManufacturerModelName=None, StationName=None)
    )
    assert anonymous.device_key() == ("", "", "", 100, 120)
