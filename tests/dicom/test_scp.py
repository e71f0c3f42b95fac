"""The node as a C-arm or PACS sees it: real DCMTK clients against a real ``xvr-node serve``."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from tests.support.node import acknowledged_files, echoscu, running_node, storescu
from tests.support.training import TINY_TRAINING
from xvr_node.catalog.db import make_engine, session_factory
from xvr_node.catalog.models import (
    IngestEvent,
    Instance,
    Series,
    Usability,
    VolumeState,
    utcnow,
)
from xvr_node.dicom.storage import FileStore
from xvr_node.jobs.assemble import queue_stable_series, run_assemble

pytestmark = pytest.mark.slow


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set after the file meta information: what travels on the wire."""
    raw = path.read_bytes()
    with pydicom.dcmread(path, stop_before_pixels=True) as ds:
        meta_end = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    return raw[meta_end:]


#: This module is about receiving: the jobs its files start are kept short, so that they do
#: not load the machine under its tests and the node stops at once at the end.
QUICK_JOBS = {
    **TINY_TRAINING,
    "registration__levels_px": "[16]",
    "registration__max_iterations_per_scale": "20",
}


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with running_node(tmp_path_factory.mktemp("node"), **QUICK_JOBS) as node:
        yield node


@pytest.fixture()
def sessions(node):
    engine = make_engine(node.database_url)
    yield session_factory(engine)
    engine.dispose()


def test_echo(node):
    result = echoscu(node.port)
    assert result.returncode == 0, result.stderr


def test_phantom_is_received_assembled_and_linked(node, phantom_dir, sessions):
    xrays = sorted((phantom_dir / "xray").glob("*.dcm"))
    ct = sorted((phantom_dir / "ct").glob("*.dcm"))
    # The C-arm sends its fluoroscopy before the CT is ready: the X-rays must wait.
    sent_xrays = storescu(node.port, xrays)
    assert sent_xrays.returncode == 0, sent_xrays.stdout + sent_xrays.stderr
    sent_ct = storescu(node.port, ct, calling="PACS")
    assert sent_ct.returncode == 0, sent_ct.stdout + sent_ct.stderr
    assert len(acknowledged_files(sent_ct.stdout + sent_ct.stderr)) == len(ct)

    with sessions() as session:
        for file in xrays + ct:
            uid = pydicom.dcmread(file, stop_before_pixels=True).SOPInstanceUID
            instance = session.scalars(
                select(Instance).where(Instance.sop_instance_uid == uid)
            ).one()
            stored = node.store / instance.path
            assert dataset_bytes(stored) == dataset_bytes(file), file.name
            assert instance.calling_ae in ("CARM1", "PACS")
        waiting = session.scalars(
            select(Instance).where(Instance.usability == Usability.WAITING)
        ).all()
        assert len(waiting) == len(xrays)

        # Series completion: nothing new for stable_series_seconds → one assemble job.
        jobs = queue_stable_series(session, utcnow() + timedelta(hours=1), 30.0)
        assert [job.kind for job in jobs] == ["assemble"]
        volume = run_assemble(session, FileStore(node.store), jobs[0].payload["series_id"])
        assert volume.state == VolumeState.USABLE, volume.refusal_reason
        truth = json.loads((phantom_dir / "truth.json").read_text())
        assert volume.shape == truth["ct"]["shape"]
        assert (node.store / volume.path).is_file()

    with sessions() as session:
        linked = session.scalars(
            select(Instance).where(Instance.usability == Usability.USABLE)
        ).all()
        assert len(linked) == len(xrays)
        assert {x.linked_volume_id for x in linked} == {volume.id}
        cine = next(x for x in linked if x.number_of_frames > 1)
        assert len(cine.geometry["frames"]) == cine.number_of_frames


def test_xray_after_the_ct_is_linked_at_once_and_duplicates_are_success(
    node, phantom_dir, sessions
):
    # Runs after the test above: the volume exists now. Re-sending identical bytes is a
    # success and stores nothing new.
    xray = sorted((phantom_dir / "xray").glob("*.dcm"))[0]
    with sessions() as session:
        before = session.scalars(select(Instance)).all()
    result = storescu(node.port, [xray])
    assert result.returncode == 0
    assert len(acknowledged_files(result.stdout + result.stderr)) == 1
    with sessions() as session:
        assert len(session.scalars(select(Instance)).all()) == len(before)


def test_status_reports_the_patient(node, phantom_dir):
    report = json.loads(node.cli("status", "--json").stdout)
    patient = next(p for p in report["patients"] if p["patient_id"].startswith("PHANTOM"))
    assert patient["volumes"][0]["state"] == "usable"
    assert patient["xrays"]["usable"] >= 1
    assert report["totals"]["instances"] >= 1


def test_unknown_caller_is_rejected_and_recorded(tmp_path):
    with running_node(tmp_path, NODE__ALLOWED_CALLERS='[{"ae_title": "CARM1"}]') as node:
        assert echoscu(node.port, calling="CARM1").returncode == 0
        refused = echoscu(node.port, calling="INTRUDER")
        assert refused.returncode != 0
        assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
        # The rejection is recorded right after it is sent: allow the node a moment.
        engine = make_engine(node.database_url)
        deadline = time.monotonic() + 10
        while True:
            with session_factory(engine)() as session:
                events = session.scalars(select(IngestEvent)).all()
            if events or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        engine.dispose()
        assert [(e.event, e.calling_ae) for e in events] == [("association_rejected", "INTRUDER")]
        assert "allowed_callers" in events[0].reason
        # The audit trail in the log: who came, who was turned away, and how each ended.
        log = node.log_text()
        assert "event=association_accepted calling_ae=CARM1 peer=127.0.0.1" in log
        assert "event=association_released calling_ae=CARM1" in log
        assert "event=association_rejected calling_ae=INTRUDER" in log


def test_series_rows_for_every_series(node, phantom_dir, sessions):
    with sessions() as session:
        modalities = {s.modality for s in session.scalars(select(Series))}
    assert {"CT", "XA", "RF"} <= modalities
