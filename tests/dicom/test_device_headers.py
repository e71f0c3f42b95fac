"""Receiving X-rays shaped like real devices' headers: estimates, missing IDs, zoom, linking.

Also the C-STORE refusal of a data set whose SOP Class differs from the one it was sent as.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from tests.support.device_headers import CT, XA, innova_xa, oec9900_rf, part10
from xvr_node.catalog.models import (
    CarmProfile,
    IngestEvent,
    Instance,
    Job,
    JobKind,
    Patient,
    Series,
    SeriesState,
    Study,
    Usability,
    Volume,
    VolumeState,
)
from xvr_node.cli import cli
from xvr_node.dicom.receive import DATASET_DOES_NOT_MATCH_SOP_CLASS, Receiver
from xvr_node.status import collect_status, format_status


@pytest.fixture()
def env(tmp_path: Path) -> dict[str, str]:
    return {"XVR_NODE__STORAGE__ROOT": str(tmp_path / "store")}


@pytest.fixture()
def receiver(env: dict[str, str], hold_catalog) -> Receiver:
    from xvr_node.config import load_settings
    from xvr_node.node import make_receiver

    settings = load_settings(None, environ=env)
    hold_catalog(settings)
    return make_receiver(settings)[0]


def instances(receiver: Receiver) -> dict[int, Instance]:
    with receiver.sessions() as session:
        return {i.id: i for i in session.scalars(select(Instance))}


def test_image_intensifier_c_arm_is_usable_with_a_labelled_estimate(receiver, tmp_path):
    outcome = receiver.receive(part10(oec9900_rf(), tmp_path), calling_ae="OEC")
    assert outcome.ok
    stored = instances(receiver)[outcome.instance_id]
    assert stored.usability == Usability.WAITING  # registrable once its CT is there
    assert stored.geometry["pixel_spacing_source"] == "IntensifierSize"
    assert stored.geometry["pixel_spacing_estimated"] is True
    assert stored.geometry["pixel_spacing_mm"] == pytest.approx([229 / 1024] * 2)
    assert "ESTIMATED from Intensifier Size (0018,1162)" in stored.unusable_reason
    with receiver.sessions() as session:
        assert session.scalars(select(CarmProfile)).all() == []  # estimates are not learned
        shown = format_status(collect_status(session))
    assert "ESTIMATED from Intensifier Size" in shown


def test_without_intensifier_size_the_reason_names_it(receiver, tmp_path):
    ds = oec9900_rf()
    del ds.IntensifierSize
    outcome = receiver.receive(part10(ds, tmp_path), calling_ae="OEC")
    stored = instances(receiver)[outcome.instance_id]
    assert stored.usability == Usability.UNUSABLE
    assert "Imager Pixel Spacing (0018,1164)" in stored.unusable_reason
    assert "Intensifier Size (0018,1162)" in stored.unusable_reason


def test_empty_patient_id_keeps_the_geometry_and_teaches_the_profile(receiver, tmp_path):
    outcome = receiver.receive(part10(innova_xa(patient_id=""), tmp_path), calling_ae="CATH")
    stored = instances(receiver)[outcome.instance_id]
    assert stored.usability == Usability.UNUSABLE
    assert stored.unusable_reason.startswith("Patient ID is empty")
    assert stored.geometry["sid_mm"] == 1193.0
    assert stored.geometry["pixel_spacing_mm"] == [0.390625, 0.390625]
    with receiver.sessions() as session:
        (profile,) = session.scalars(select(CarmProfile)).all()
    assert (profile.manufacturer, profile.station_name, profile.zoom) == (
        "GE MEDICAL SYSTEMS",
        "TERRA2",
        "FOV 200x200 II 307.2",
    )
    assert profile.pixel_spacing_row_mm == 0.390625


def test_empty_patient_id_and_missing_geometry_are_both_named(receiver, tmp_path):
    ds = oec9900_rf()
    ds.PatientID = ""
    del ds.DistanceSourceToDetector
    outcome = receiver.receive(part10(ds, tmp_path), calling_ae="OEC")
    reason = instances(receiver)[outcome.instance_id].unusable_reason
    assert reason.startswith("Patient ID is empty")
    assert "Distance Source to Detector (0018,1110)" in reason
    assert "ESTIMATED from Intensifier Size" in reason  # the spacing part is known


def test_a_learned_spacing_fills_only_the_same_zoom(receiver, tmp_path):
    assert receiver.receive(part10(innova_xa(patient_id="P1"), tmp_path), calling_ae="C").ok
    same = innova_xa(patient_id="P1")
    del same.ImagerPixelSpacing
    zoomed = innova_xa(patient_id="P1")
    del zoomed.ImagerPixelSpacing
    zoomed.FieldOfViewDimensions = [160, 160]
    same_id = receiver.receive(part10(same, tmp_path), calling_ae="C").instance_id
    zoomed_id = receiver.receive(part10(zoomed, tmp_path), calling_ae="C").instance_id
    rows = instances(receiver)
    assert rows[same_id].geometry["pixel_spacing_source"] == "profile"
    assert rows[same_id].geometry["pixel_spacing_mm"] == [0.390625, 0.390625]
    # Another zoom: not the 200 mm mode's spacing, but this mode's own field size, labelled.
    assert rows[zoomed_id].geometry["pixel_spacing_source"] == "FieldOfViewDimensions"
    assert rows[zoomed_id].geometry["pixel_spacing_mm"] == pytest.approx([160 / 512] * 2)


def add_usable_volume(receiver: Receiver, patient_id: str) -> int:
    with receiver.sessions() as session:
        patient = Patient(patient_id=patient_id, issuer_of_patient_id="")
        study = Study(patient=patient, study_instance_uid="1.2.3.4.1")
        series = Series(
            study=study,
            series_instance_uid="1.2.3.4.1.1",
            modality="CT",
            sop_class_uid=CT,
            state=SeriesState.ASSEMBLED,
            instance_count=1,
        )
        volume = Volume(
            series=series, patient=patient, path="volumes/1.nii.gz", state=VolumeState.USABLE
        )
        session.add(volume)
        session.commit()
        return volume.id


def test_link_assigns_an_unlinked_xray_and_queues_its_register_job(receiver, env, tmp_path):
    ds = innova_xa(patient_id="")
    outcome = receiver.receive(part10(ds, tmp_path), calling_ae="CATH")
    volume_id = add_usable_volume(receiver, "PAT-7")
    runner = CliRunner()

    missing = runner.invoke(cli, ["link", ds.SOPInstanceUID, "--patient-id", "NOBODY"], env=env)
    assert missing.exit_code == 1
    assert "no patient 'NOBODY' in the catalog" in missing.output
    assert "Traceback" not in missing.output

    result = runner.invoke(cli, ["link", ds.SOPInstanceUID, "--patient-id", "PAT-7"], env=env)
    assert result.exit_code == 0, result.output
    assert f"to volume {volume_id}; register job" in result.output
    assert "was: Patient ID is empty" in result.output
    with receiver.sessions() as session:
        linked = session.get(Instance, outcome.instance_id)
        assert linked.usability == Usability.USABLE
        assert linked.linked_volume_id == volume_id
        assert linked.unusable_reason is None
        (job,) = session.scalars(select(Job).where(Job.kind == JobKind.REGISTER)).all()
        assert job.payload == {"instance_id": outcome.instance_id}
        assert job.dedupe_key == f"register:instance:{outcome.instance_id}"


def test_link_refuses_an_xray_without_usable_geometry(receiver, env, tmp_path):
    ds = oec9900_rf()
    del ds.IntensifierSize
    ds.PatientID = ""
    receiver.receive(part10(ds, tmp_path), calling_ae="OEC")
    volume_id = add_usable_volume(receiver, "PAT-8")
    result = CliRunner().invoke(
        cli, ["link", ds.SOPInstanceUID, "--volume", str(volume_id)], env=env
    )
    assert result.exit_code == 1
    assert "cannot be registered: missing Imager Pixel Spacing (0018,1164)" in result.output
    with receiver.sessions() as session:
        assert session.scalars(select(Job)).all() == []


@pytest.mark.parametrize("claimed_by", ["context", "request"])
def test_data_set_of_another_sop_class_is_refused_and_recorded(receiver, tmp_path, claimed_by):
    ct = innova_xa(patient_id="P1")
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = CT
    ct.Modality = "CT"
    claim = {"context_sop_class" if claimed_by == "context" else "affected_sop_class": XA}
    outcome = receiver.receive(part10(ct, tmp_path), calling_ae="PACS", **claim)
    assert outcome.status == DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert "data set is CT (1.2.840.10008.5.1.4.1.1.2)" in outcome.reason
    assert "XA (1.2.840.10008.5.1.4.1.1.12.1)" in outcome.reason
    assert instances(receiver) == {}
    with receiver.sessions() as session:
        (event,) = session.scalars(select(IngestEvent)).all()
    assert (event.event, event.status_code, event.calling_ae) == (
        "store_failed",
        DATASET_DOES_NOT_MATCH_SOP_CLASS,
        "PACS",
    )
    assert event.sop_instance_uid == ct.SOPInstanceUID
