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

from tests.support.device_headers import ge_drs_rf, innova_xa, oec9900_rf, siemens_xa_96f
from xvr_node.xray_geometry import (
    SID_NAME,
    SPACING_NAME,
    XRAY_SOP_CLASSES,
    FrameGeometry,
    ShutterOutline,
    UnsupportedGeometryError,
    XrayGeometry,
    XrayGeometryError,
    read_collimator,
    read_display_shutter,
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
    assert geometry.device_key() == ("Acme", "Arc 9", "OR3", 100, 120, "")
    anonymous = read_xray_geometry(
        legacy_xa(Manufacturer=None, ManufacturerModelName=None, StationName=None)
    )
    assert anonymous.device_key() == ("", "", "", 100, 120, "")


# --- real devices' header shapes ---------------------------------------------------------------


def test_image_intensifier_c_arm_gets_a_spacing_estimated_from_intensifier_size() -> None:
    stated = read_xray_geometry(oec9900_rf())
    assert stated.missing() == [SPACING_NAME]  # what the C-arm said is kept apart
    estimated = stated.with_field_size_estimate()
    assert estimated.usable()
    assert estimated.pixel_spacing_mm == pytest.approx((229 / 1024, 229 / 1024))
    assert estimated.pixel_spacing_source == "IntensifierSize"
    assert estimated.pixel_spacing_estimated
    assert "ESTIMATED from Intensifier Size (0018,1162) 229 mm" in estimated.describe_spacing()
    assert estimated.to_json()["pixel_spacing_estimated"] is True
    assert XrayGeometry.from_json(estimated.to_json()) == estimated


def test_a_stated_or_profile_spacing_is_never_replaced_by_an_estimate() -> None:
    stated = read_xray_geometry(innova_xa())
    assert stated.with_field_size_estimate() == stated
    profiled = read_xray_geometry(oec9900_rf()).with_profile(None, (0.3, 0.3), "profile")
    assert profiled.with_field_size_estimate().pixel_spacing_mm == (0.3, 0.3)


def test_field_of_view_dimensions_estimate_before_intensifier_size() -> None:
    # The Innova's 200 mm field on 512 pixels is exactly its stated Imager Pixel Spacing.
    geometry = read_xray_geometry(innova(ImagerPixelSpacing=None))
    estimated = geometry.with_field_size_estimate()
    assert estimated.pixel_spacing_source == "FieldOfViewDimensions"
    assert estimated.pixel_spacing_mm == pytest.approx((0.390625, 0.390625))


def test_without_any_field_size_the_reason_names_intensifier_size() -> None:
    geometry = read_xray_geometry(ge_drs_rf())
    assert geometry.with_field_size_estimate() == geometry
    assert "Intensifier Size (0018,1162)" in geometry.explain_missing()
    assert geometry.explain_missing().startswith(f"{SID_NAME}, {SPACING_NAME}")


def test_empty_positioner_motion_knows_only_the_first_frame() -> None:
    geometry = read_xray_geometry(siemens_xa_96f())
    assert geometry.motion is None
    assert geometry.number_of_frames == 96
    assert geometry.frames[0] == FrameGeometry(-32.0, 2.0)
    assert set(geometry.frames[1:]) == {FrameGeometry(None, None)}
    absent = siemens_xa_96f()
    del absent.PositionerMotion
    assert read_xray_geometry(absent).frames[1] == FrameGeometry(None, None)


def test_collimator_and_shutter_edges_are_one_based() -> None:
    ds = innova_xa()
    # Right edge 512 on a 512-column image: the last column (index 511) is open.
    assert read_display_shutter(ds) == ShutterOutline(
        shapes=("RECTANGULAR",), rectangle=(2, 510, 5, 512)
    )
    assert read_collimator(ds).rectangle == (1, 509, 5, 511)
    circular = read_display_shutter(ge_drs_rf())
    assert circular.shapes == ("CIRCULAR", "RECTANGULAR")
    assert circular.circle == (479.0, 479.0, 470.0)
    assert circular.rectangle == (9, 950, 9, 950)
    assert read_collimator(oec9900_rf()) is None


def test_polygonal_shutter_and_presentation_value() -> None:
    ds = innova_xa()
    ds.ShutterShape = "POLYGONAL"
    ds.VerticesOfThePolygonalShutter = [1, 1, 1, 512, 512, 256]
    ds.ShutterPresentationValue = 0
    shutter = read_display_shutter(ds)
    assert shutter.polygon == ((0.0, 0.0), (0.0, 511.0), (511.0, 255.0))
    assert shutter.rectangle is None and shutter.presentation_value == 0


def innova(**overrides: object) -> Dataset:
    """The Innova-shaped header with attributes changed (None deletes)."""
    ds = innova_xa()
    for keyword, value in overrides.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


# --- Field of View Rotation and Horizontal Flip ------------------------------------------------


@pytest.mark.parametrize(
    ("rotation", "flip", "rows_reversed", "mirrored"),
    [
        ("0", "NO", False, False),
        ("0", "YES", False, True),
        ("180", "NO", True, True),
        ("180", "YES", True, False),
        ("-180", "NO", True, True),
        ("360", "NO", False, False),
    ],
)
def test_field_of_view_rotation_and_flip_map_stored_pixels_to_the_image_plane(
    rotation: str, flip: str, rows_reversed: bool, mirrored: bool
) -> None:
    plain = legacy_xa(PatientOrientation="")
    plain.FieldOfViewRotation = rotation
    plain.FieldOfViewHorizontalFlip = flip
    geometry = read_xray_geometry(plain)
    assert (geometry.rows_reversed, geometry.mirrored) == (rows_reversed, mirrored)


def test_patient_orientation_of_a_rotated_image_is_not_taken_for_an_extra_mirror() -> None:
    # LAO 30 / CAU 10: the detector grid's row direction is L(-ish); rotated 180 the stored
    # rows run R and the columns H. That is the rotation, not an undeclared mirror.
    rotated = legacy_xa(PatientOrientation=["R", "H"])
    rotated.FieldOfViewRotation = "180"
    geometry = read_xray_geometry(rotated)
    assert (geometry.rows_reversed, geometry.mirrored) == (True, True)
    # The same stored orientation without a stated rotation is a mirrored view.
    assert read_xray_geometry(legacy_xa(PatientOrientation=["R", "F"])).mirrored is True


@pytest.mark.parametrize(
    ("rotation", "message"),
    [
        ("90", "Field of View Rotation \\(0018,7032\\) 90: quarter-turn"),
        ("270", "Field of View Rotation \\(0018,7032\\) 270: quarter-turn"),
        ("45", "45 is not 0, 90, 180 or 270 degrees"),
    ],
)
def test_rotations_that_cannot_be_applied_are_refused_precisely(rotation: str, message: str):
    ds = legacy_xa()
    ds.FieldOfViewRotation = rotation
    with pytest.raises(UnsupportedGeometryError, match=message):
        read_xray_geometry(ds)


def test_zoom_mode_is_part_of_the_device_key() -> None:
    wide = read_xray_geometry(innova_xa())
    zoomed = read_xray_geometry(innova(FieldOfViewDimensions=[160, 160]))
    assert wide.device_key()[:5] == zoomed.device_key()[:5]
    assert wide.device_key()[5] == "FOV 200x200 II 307.2"
    assert zoomed.device_key() != wide.device_key()
    assert read_xray_geometry(oec9900_rf()).zoom_key() == "II 229"
