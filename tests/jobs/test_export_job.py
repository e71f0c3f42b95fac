"""The export job: a cine run leaves as three objects, a whole image as three; Orthanc takes them.

The catalog is real (receive, assemble through the worker); the registrations are the
phantom's true poses written as catalog rows, so the test needs no training and no
optimisation, and each frame's bead tells whether the run's SRO kept that frame's pose.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from tests.support.orthanc import running_orthanc
from tests.support.tools import dciodvfy_errors
from xvr_node import clock
from xvr_node.catalog.models import Export, Instance, Registration, Volume
from xvr_node.config import load_settings
from xvr_node.dicom.sc import MULTIFRAME_TRUE_COLOR_SC
from xvr_node.dicom.sro import read_registration, read_registrations, validate_registration
from xvr_node.geometry import Intrinsics, project, stored_column
from xvr_node.jobs.assemble import queue_stable_series
from xvr_node.jobs.pipeline import Pipeline
from xvr_node.jobs.worker import JobContext, Worker
from xvr_node.node import make_receiver

pytestmark = pytest.mark.slow  # the phantom, a volume, DRR contours, Orthanc

NIGHT = datetime(2026, 11, 24, 23, 0, tzinfo=UTC)
SRO_CLASS = "1.2.840.10008.5.1.4.1.1.66.1"


@pytest.fixture
def exported(tmp_path, phantom_dir, request, hold_catalog):
    """Export the phantom's X-rays at their true poses to a real Orthanc.

    ``request.param``: the 1-based cine frames the quality gate calls unreliable, and
    whether ``registration.send_unreliable`` is on.
    """
    unreliable, send_unreliable = request.param
    truth = json.loads((phantom_dir / "truth.json").read_text())
    with running_orthanc(tmp_path / "orthanc") as orthanc, clock.pinned(NIGHT):
        destination = {
            "name": "pacs",
            "ae_title": orthanc.aet,
            "host": "127.0.0.1",
            "port": orthanc.dicom_port,
        }
        settings = load_settings(
            None,
            environ={
                "XVR_NODE__STORAGE__ROOT": str(tmp_path / "store"),
                "XVR_NODE__STORAGE__MIN_FREE_BYTES": "0",
                "XVR_NODE__DESTINATIONS": json.dumps([destination]),
                "XVR_NODE__REGISTRATION__SEND_UNRELIABLE": str(send_unreliable).lower(),
            },
        )
        hold_catalog(settings)
        receiver, store = make_receiver(settings)
        cine = next(r for r in truth["xrays"] if r["number_of_frames"] > 1)
        single = next(r for r in truth["xrays"] if r["number_of_frames"] == 1)
        files = sorted((phantom_dir / truth["ct"]["folder"]).glob("*.dcm"))
        for file in [*files, phantom_dir / cine["file"], phantom_dir / single["file"]]:
            assert receiver.receive(file.read_bytes(), calling_ae="CARM").ok
        with receiver.sessions() as session:
            queue_stable_series(session, NIGHT + timedelta(minutes=1), 30.0)
        pipeline = Pipeline(settings, store, "cpu")
        worker = Worker(
            settings, receiver.sessions, pipeline.handlers(), clock=lambda: NIGHT, device="cpu"
        )
        assert worker.run_one() is not None  # assemble: the volume, the X-rays linked
        summaries = {}
        with receiver.sessions() as session:
            volume = session.scalars(select(Volume)).one()
            for record in (cine, single):
                instance = session.scalars(
                    select(Instance).where(Instance.sop_instance_uid == record["sop_instance_uid"])
                ).one()
                assert instance.linked_volume_id == volume.id
                frames = [
                    r for r in truth["xrays"] if r["sop_instance_uid"] == record["sop_instance_uid"]
                ]
                rows = [true_pose_row(instance, volume, r, unreliable) for r in frames]
                session.add_all(rows)
                session.commit()
                context = JobContext(
                    job_id=0,
                    kind="export",
                    payload={"instance_id": instance.id, "registration_ids": [r.id for r in rows]},
                    priority=0,
                    attempts=1,
                    max_attempts=3,
                    session=session,
                    worker=SimpleNamespace(clock=lambda: NIGHT, device="cpu"),
                )
                summaries[record["file"]] = pipeline.export(context)
            # The export job queued one delivery for the PACS; a worker of that queue sends.
            deliverer = Worker(
                settings, receiver.sessions, {}, clock=lambda: NIGHT, device="cpu", kinds=["export"]
            )
            assert deliverer.drain() == []  # deliveries have no ledger row
            session.expire_all()
            exports = session.scalars(select(Export).order_by(Export.id)).all()
            first = {}
            for row in session.scalars(select(Registration).order_by(Registration.id)):
                first.setdefault(row.instance.sop_instance_uid, row.id)
            # Per export row: its X-ray, its kind, its object, and whether it is linked to
            # that X-ray's first result.
            written = [
                {
                    "xray": row.registration.instance.sop_instance_uid,
                    "kind": row.object_kind,
                    "ds": pydicom.dcmread(store.absolute(row.path)),
                    "to_first": row.registration_id
                    == first[row.registration.instance.sop_instance_uid],
                    "status": row.status,
                }
                for row in exports
            ]
        in_pacs = set(orthanc.instances())
    yield {
        "cine": cine,
        "truth_frames": [r for r in truth["xrays"] if r["file"] == cine["file"]],
        "single": single,
        "summaries": summaries,
        "written": written,
        "in_pacs": in_pacs,
        "unreliable": unreliable,
        "send_unreliable": send_unreliable,
    }


def true_pose_row(
    instance: Instance, volume: Volume, record: dict, unreliable: set[int]
) -> Registration:
    """A catalog result at the phantom's true pose, with the gate's verdict as told."""
    multiframe = record["number_of_frames"] > 1
    reliable = not (multiframe and record["frame_number"] in unreliable)
    return Registration(
        instance_id=instance.id,
        frame_index=record["frame_number"] - 1 if multiframe else None,
        volume_id=volume.id,
        initializer="tracking" if record["frame_number"] > 1 else "dicom",
        final_matrix=record["matrix"],
        intrinsics=Intrinsics.from_json(record).to_json(),
        conventions={"matrix": "image-plane mm -> CT LPS mm"},
        similarity=0.9 if reliable else 0.1,
        iterations=10,
        wall_time_s=1.0,
        metrics={"quality": {"reasons": [] if reliable else ["similarity 0.100 < 0.350"]}},
        reliable=reliable,
        confidence=0.9 if reliable else 0.1,
    )


def objects(exported: dict, key: str) -> dict[str, pydicom.Dataset]:
    """The objects written for one X-ray (``cine`` or ``single``), by kind; one per kind."""
    uid = exported[key]["sop_instance_uid"]
    mine = [item for item in exported["written"] if item["xray"] == uid]
    kinds = [item["kind"] for item in mine]
    assert len(kinds) == len(set(kinds)), kinds  # one destination: one row per object
    return {item["kind"]: item["ds"] for item in mine}


def bead_miss_px(matrix: np.ndarray, intrinsics: Intrinsics, mirrored: bool, record: dict) -> float:
    """How far the phantom's bead, projected through a pose read back, lands from its pixel."""
    u, v = project(matrix, intrinsics, np.array(record["bead_lps"]))[0]
    stored_u = stored_column(u, intrinsics.columns, mirrored)
    return float(np.hypot(stored_u - record["bead_px"][0], v - record["bead_px"][1]))


RELIABLE = (frozenset(), False)
FRAME_2_UNRELIABLE = (frozenset({2}), False)
ALL_UNRELIABLE = (frozenset({1, 2, 3}), False)
SENT_ANYWAY = (frozenset({2}), True)


@pytest.mark.parametrize(
    "exported",
    [RELIABLE, FRAME_2_UNRELIABLE, ALL_UNRELIABLE, SENT_ANYWAY],
    ids=["reliable", "frame-2-unreliable", "all-unreliable", "send-unreliable"],
    indirect=True,
)
def test_a_cine_run_leaves_as_one_sro_one_sr_and_one_multiframe_overlay(exported, tmp_path):
    cine, truth_frames = exported["cine"], exported["cine"]["number_of_frames"]
    unreliable, send_unreliable = exported["unreliable"], exported["send_unreliable"]
    in_sro = [f for f in range(1, truth_frames + 1) if f not in unreliable or send_unreliable]
    found = objects(exported, "cine")
    assert sorted(found) == (["sc", "sr", "sro"] if in_sro else ["sc", "sr"])
    summary = exported["summaries"][cine["file"]]
    assert summary["registrations"] == truth_frames
    assert summary["objects"] == summary["queued"] == len(found)
    assert summary["withheld_from_sro"] == truth_frames - len(in_sro)
    # Every object is valid, delivered, and linked to the run's first frame.
    for item in exported["written"]:
        if item["xray"] == cine["sop_instance_uid"]:
            assert item["to_first"] and item["status"] == "sent", item["kind"]
            assert item["ds"].SOPInstanceUID in exported["in_pacs"]
    for kind, ds in found.items():
        path = tmp_path / f"{kind}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], kind
        assert ds.InstanceNumber == 1

    # The SRO: the frames the gate let through, each one's pose putting the bead on its pixel.
    if in_sro:
        sro = found["sro"]
        assert validate_registration(sro) == []
        poses = read_registrations(sro)
        assert [pose.frame_numbers for pose in poses] == [[f] for f in in_sro]
        records = {r["frame_number"]: r for r in exported["truth_frames"]}
        for pose in poses:
            record = records[pose.frame_numbers[0]]
            np.testing.assert_allclose(pose.matrix, record["matrix"], atol=1e-6)
            assert bead_miss_px(pose.matrix, pose.intrinsics, pose.mirrored, record) < 1.0
        matrix, _, frames = read_registration(sro, in_sro[-1])
        assert frames == [in_sro[-1]]
        np.testing.assert_allclose(matrix, records[in_sro[-1]]["matrix"], atol=1e-6)
        if len(in_sro) > 1:
            with pytest.raises(ValueError, match="name the frame"):
                read_registration(sro)

    # The SR: one measurement group per frame, each with the frame's verdict.
    sr = found["sr"]
    groups = next(
        item
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "126010"  # Imaging Measurements
    ).ContentSequence
    assert len(groups) == truth_frames
    verdicts = [
        item.ConceptCodeSequence[0].CodeValue
        for group in groups
        for item in group.ContentSequence
        if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeValue == "XVR011"
    ]
    assert verdicts == [
        "XVR031" if f in unreliable else "XVR030" for f in range(1, truth_frames + 1)
    ]
    evidence = {
        instance.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }
    assert cine["sop_instance_uid"] in evidence
    if in_sro:
        assert found["sro"].SOPInstanceUID in evidence
    assert len(evidence) == 1 + bool(in_sro)

    # The overlay: one frame per registered frame, each framed red exactly when unreliable.
    sc = found["sc"]
    assert sc.SOPClassUID == MULTIFRAME_TRUE_COLOR_SC
    pictures = sc.pixel_array
    assert pictures.shape == (truth_frames, sc.Rows, sc.Columns, 3)
    source = sc.SourceImageSequence[0]
    assert source.ReferencedSOPInstanceUID == cine["sop_instance_uid"]
    assert [int(f) for f in source.ReferencedFrameNumber] == list(range(1, truth_frames + 1))
    red = [
        bool(np.all(picture[0, :, 0] > 200) and np.all(picture[0, :, 1] < 30))
        for picture in pictures
    ]
    assert red == [f in unreliable for f in range(1, truth_frames + 1)]


@pytest.mark.parametrize("exported", [FRAME_2_UNRELIABLE], ids=["single"], indirect=True)
def test_a_whole_image_still_gets_its_own_three_objects(exported):
    single = exported["single"]
    found = objects(exported, "single")
    assert sorted(found) == ["sc", "sr", "sro"]
    summary = exported["summaries"][single["file"]]
    assert (summary["registrations"], summary["objects"], summary["withheld_from_sro"]) == (1, 3, 0)
    matrix, intrinsics, frames = read_registration(found["sro"])
    assert frames is None and len(found["sro"].RegistrationSequence) == 2
    mirrored = read_registrations(found["sro"])[0].mirrored
    assert bead_miss_px(matrix, intrinsics, mirrored, single) < 1.0
    assert found["sc"].SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert "NumberOfFrames" not in found["sc"]
