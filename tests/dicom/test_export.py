"""Result objects reach a real PACS (Orthanc) once each, survive outages, and park refusals."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from click.testing import CliRunner
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import text
from sqlalchemy.orm import Session

from tests.support.node import free_port
from tests.support.orthanc import OrthancServer, running_orthanc
from xvr_node.catalog.db import make_engine, session_factory
from xvr_node.catalog.models import Export, utcnow
from xvr_node.cli import cli
from xvr_node.config import Destination, Settings, load_settings
from xvr_node.dicom import scu
from xvr_node.dicom.results import RegistrationResult
from xvr_node.dicom.sc import build_overlay, compose_overlay, overlay_legend
from xvr_node.dicom.scu import SendOutcome, status_outcome
from xvr_node.dicom.sr import build_measurement_report
from xvr_node.dicom.sro import build_spatial_registration, read_registration
from xvr_node.dicom.storage import FileStore
from xvr_node.geometry import Intrinsics, project, stored_column
from xvr_node.jobs.export import (
    deliver,
    destination_lock,
    exponential_backoff,
    list_exports,
    queue_due_deliveries,
    resend,
    store_result_objects,
)

pytestmark = pytest.mark.slow  # builds the phantom and starts Orthanc

CALLING_AE = "XVRNODE"


# --- the result objects of one registered X-ray, and an empty outbox ------------------------


@pytest.fixture(scope="module")
def registered(phantom_dir) -> dict:
    """SRO, SR and SC of the mirrored single-frame XA at its true pose."""
    truth = json.loads((phantom_dir / "truth.json").read_text())
    record = next(r for r in truth["xrays"] if r["modality"] == "XA" and r["number_of_frames"] == 1)
    xray = pydicom.dcmread(phantom_dir / record["file"])
    ct = [
        pydicom.dcmread(path, stop_before_pixels=True)
        for path in sorted((phantom_dir / truth["ct"]["folder"]).glob("*.dcm"))
    ]
    result = RegistrationResult(
        matrix=np.array(record["matrix"]),
        intrinsics=Intrinsics.from_json(record),
        similarity=0.87,
        iterations=250,
        wall_time_s=4.25,
        initializer="model",
        model_id="xvr-phantom-chest-v1",
        software_version="0.1.0",
        mirrored=record["mirrored"],
    )
    sro = build_spatial_registration(xray, ct, result)
    sr = build_measurement_report(xray, sro, result)
    rows, columns = np.ogrid[: xray.Rows, : xray.Columns]
    u, v = record["bead_px"]
    ring = np.hypot(columns - u, rows - v)
    edges = (ring > 3) & (ring < 4.5)  # the projected bead, drawn as a ring
    sc = build_overlay(
        xray, compose_overlay(xray.pixel_array, edges, overlay_legend(result)), result
    )
    return {"record": record, "xray": xray, "objects": [("sro", sro), ("sr", sr), ("sc", sc)]}


@dataclass
class Outbox:
    store: FileStore
    url: str
    session: Session

    def rows(self) -> list[Export]:
        self.session.expire_all()
        return list_exports(self.session)


@pytest.fixture
def outbox(tmp_path, catalog_url):
    """A store under ``tmp_path/store`` and a migrated catalog."""
    url = catalog_url
    store = FileStore(tmp_path / "store")
    engine = make_engine(url)
    with session_factory(engine)() as session:
        yield Outbox(store, url, session)
    engine.dispose()


def pacs(orthanc: OrthancServer, ae_title: str | None = None) -> Destination:
    return Destination(
        name="pacs", ae_title=ae_title or orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port
    )


def settings_for(outbox: Outbox, *destinations: Destination) -> Settings:
    """The node's settings with these destinations, calling as ``CALLING_AE``."""
    return load_settings(
        None,
        environ={
            "XVR_NODE__STORAGE__ROOT": str(outbox.store.root),
            "XVR_NODE__DATABASE__URL": outbox.url,
            "XVR_NODE__NODE__AE_TITLE": CALLING_AE,
            "XVR_NODE__DESTINATIONS": json.dumps([d.model_dump(mode="json") for d in destinations]),
        },
    )


def deliver_to(outbox: Outbox, destination: Destination, now: datetime) -> dict:
    """One delivery run for ``destination``, as its engine job does it."""
    settings = settings_for(outbox, destination)
    return deliver(outbox.session, outbox.store, settings, destination.name, now)


def waiting_deliveries(outbox: Outbox) -> list[tuple[str, float]]:
    """The engine's waiting ``deliver`` jobs: (destination, seconds until due, by its clock)."""
    rows = outbox.session.execute(
        text(
            "SELECT args->>'destination', EXTRACT(EPOCH FROM COALESCE(scheduled_at, now()) - now())"
            " FROM procrastinate_jobs WHERE task_name = 'xvr_node.deliver' AND status = 'todo'"
        )
    ).all()
    outbox.session.rollback()
    return sorted((name, float(seconds)) for name, seconds in rows)


def uids(registered: dict) -> set[str]:
    return {str(ds.SOPInstanceUID) for _, ds in registered["objects"]}


# --- (1) delivered, in the X-ray's study, and never twice ----------------------------------


def test_results_reach_the_pacs_in_the_xray_study_once(registered, outbox, tmp_path, caplog):
    caplog.set_level("INFO", logger="xvr_node.jobs.export")
    with running_orthanc(tmp_path / "orthanc") as orthanc:
        destination = pacs(orthanc)
        rows = store_result_objects(
            outbox.session, outbox.store, registered["objects"], [destination]
        )
        assert [row.status for row in rows] == ["pending"] * 3
        assert all(outbox.store.absolute(row.path).is_file() for row in rows)
        # The same commit queued the destination's delivery, due now.
        ((name, wait_s),) = waiting_deliveries(outbox)
        assert name == "pacs" and wait_s <= 0

        now = utcnow()
        summary = deliver_to(outbox, destination, now)
        assert summary["sent"] == 3, outbox.rows()
        for row in outbox.rows():
            assert (row.status, row.attempts, row.sent_at) == ("sent", 1, now)
        # The audit trail: one structured line per object and destination.
        audit = [r for r in caplog.records if getattr(r, "event", "") == "export_sent"]
        assert sorted(r.sop for r in audit) == sorted(uids(registered))
        assert {(r.destination, r.attempt) for r in audit} == {("pacs", 1)}
        stored = orthanc.instances()
        assert set(stored) == uids(registered)
        study = str(registered["xray"].StudyInstanceUID)
        assert {item["study_instance_uid"] for item in stored.values()} == {study}
        assert len(orthanc.rest("/studies")) == 1

        # Sent rows are never picked up again, however late it gets.
        again = deliver_to(outbox, destination, now + timedelta(days=1))
        assert again["due"] == again["sent"] == 0
        assert [(row.status, row.attempts) for row in outbox.rows()] == [("sent", 1)] * 3
        assert len(orthanc.rest("/instances")) == 3
        assert not orthanc.received_twice()

        # A deliberate re-send does send again, and Orthanc notices the second copy.
        sro_row = next(row for row in outbox.rows() if row.object_kind == "sro")
        assert [row.id for row in resend(outbox.session, [sro_row.id])] == [sro_row.id]
        later = now + timedelta(days=2)
        summary = deliver_to(outbox, destination, later)
        assert (summary["due"], summary["sent"]) == (1, 1)
        assert orthanc.received_twice()
        assert len(orthanc.rest("/instances")) == 3


# --- (2) a PACS that is down: back off, then deliver each object exactly once --------------


def test_a_pacs_that_is_down_gets_everything_once_it_is_back(registered, outbox, tmp_path):
    with running_orthanc(tmp_path / "orthanc", start=False) as orthanc:
        destination = pacs(orthanc)
        store_result_objects(outbox.session, outbox.store, registered["objects"], [destination])

        t0 = utcnow()
        outbox.session.execute(text("DELETE FROM procrastinate_jobs"))  # deliver by hand
        outbox.session.commit()
        summary = deliver_to(outbox, destination, t0)
        assert summary["retrying"] == 3
        for row in outbox.rows():
            assert (row.status, row.attempts) == ("retrying", 1)
            assert row.next_attempt_at == t0 + exponential_backoff(1) > t0
            assert "connect" in row.last_error and "refused" in row.last_error.lower()
        # The next delivery waits out the back-off (by the engine's clock).
        ((name, wait_s),) = waiting_deliveries(outbox)
        assert name == "pacs" and 25 < wait_s <= 30

        early = t0 + exponential_backoff(1) - timedelta(seconds=1)
        summary = deliver_to(outbox, destination, early)
        assert summary["due"] == 0
        assert [row.attempts for row in outbox.rows()] == [1, 1, 1]

        orthanc.start()
        late = t0 + exponential_backoff(1)
        summary = deliver_to(outbox, destination, late)
        assert summary["sent"] == 3
        assert [(row.status, row.attempts) for row in outbox.rows()] == [("sent", 2)] * 3
        assert all(row.last_error is None for row in outbox.rows())
        assert set(orthanc.instances()) == uids(registered)
        assert len(orthanc.rest("/instances")) == 3 and not orthanc.received_twice()


# --- (3) a refusal parks the rows; the operator retries them -------------------------------


def test_a_refusing_pacs_parks_the_rows_until_an_operator_retries(registered, outbox, tmp_path):
    with running_orthanc(tmp_path / "orthanc") as orthanc:
        wrong = pacs(orthanc, ae_title="NOT-ORTHANC")
        store_result_objects(outbox.session, outbox.store, registered["objects"], [wrong])
        now = utcnow()
        summary = deliver_to(outbox, wrong, now)
        assert summary["parked"] == 3
        for row in outbox.rows():
            assert row.status == "parked"
            assert "rejected" in row.last_error.lower() and "Permanent" in row.last_error
        later = now + timedelta(days=1)
        assert deliver_to(outbox, wrong, later)["due"] == 0

        right = pacs(orthanc).model_dump(mode="json")
        env = {
            "XVR_NODE__STORAGE__ROOT": str(outbox.store.root),
            "XVR_NODE__STORAGE__MIN_FREE_BYTES": "0",
            "XVR_NODE__DATABASE__URL": outbox.url,
            "XVR_NODE__DESTINATIONS": yaml.safe_dump([right], default_flow_style=True),
        }
        runner = CliRunner()
        listed = runner.invoke(cli, ["export", "list", "--status", "parked", "--json"], env=env)
        assert listed.exit_code == 0, listed.output
        assert sorted(r["object_kind"] for r in json.loads(listed.output)) == ["sc", "sr", "sro"]

        retried = runner.invoke(cli, ["export", "retry", "--all"], env=env)
        assert retried.exit_code == 0, retried.output
        assert "3 export(s) pending again" in retried.output
        assert [(row.status, row.attempts) for row in outbox.rows()] == [("pending", 0)] * 3

        delivered = runner.invoke(cli, ["export", "deliver"], env=env)
        assert delivered.exit_code == 0, delivered.output
        assert "sent 3" in delivered.output
        assert [row.status for row in outbox.rows()] == ["sent"] * 3
        assert set(orthanc.instances()) == uids(registered)

        sent_again = runner.invoke(cli, ["export", "retry", str(outbox.rows()[0].id)], env=env)
        assert sent_again.exit_code == 1 and "export resend" in sent_again.output


# --- (3b) a deliverer killed mid-send: what arrived is not sent again ----------------------


def _interrupted(outbox: Outbox) -> None:
    """Leave every row as a deliverer killed mid-association leaves it: ``sending``."""
    for row in outbox.rows():
        row.status, row.attempts = "sending", 1
    outbox.session.commit()


def test_an_interrupted_send_asks_the_pacs_before_sending_again(registered, outbox, tmp_path):
    with running_orthanc(tmp_path / "orthanc") as orthanc:
        destination = pacs(orthanc)
        rows = store_result_objects(
            outbox.session, outbox.store, registered["objects"], [destination]
        )
        # The dead deliverer got the SRO across before it died.
        sro = next(row for row in rows if row.object_kind == "sro")
        scu.send_datasets(destination, [outbox.store.absolute(sro.path)], CALLING_AE, 30.0)
        _interrupted(outbox)

        summary = deliver_to(outbox, destination, utcnow())
        assert (summary["confirmed"], summary["due"], summary["sent"]) == (1, 2, 2)
        by_kind = {row.object_kind: row for row in outbox.rows()}
        assert by_kind["sro"].status == "sent" and "C-FIND" in by_kind["sro"].last_error
        assert [by_kind[kind].status for kind in ("sr", "sc")] == ["sent", "sent"]
        assert [by_kind[kind].attempts for kind in ("sro", "sr", "sc")] == [1, 2, 2]
        assert set(orthanc.instances()) == uids(registered)
        assert not orthanc.received_twice()


def test_without_c_find_an_interrupted_send_is_sent_again_and_says_so(registered, outbox):
    with storage_scp(_classes(registered)) as destination:
        store_result_objects(outbox.session, outbox.store, registered["objects"], [destination])
        _interrupted(outbox)
        summary = deliver_to(outbox, destination, utcnow())
    assert (summary["confirmed"], summary["sent"]) == (0, 3)
    assert [row.status for row in outbox.rows()] == ["sent"] * 3


def test_the_sweep_queues_deliveries_but_leaves_a_live_sender_alone(registered, outbox):
    destinations = [
        Destination(name=name, ae_title="PACS", host="127.0.0.1", port=104) for name in "ab"
    ]
    store_result_objects(outbox.session, outbox.store, registered["objects"], destinations)
    outbox.session.execute(text("DELETE FROM procrastinate_jobs"))  # e.g. lost with a crash
    outbox.session.commit()
    for row in outbox.rows():
        if row.destination == "b":
            row.status = "sending"
    outbox.session.commit()
    engine = make_engine(outbox.url)
    try:
        with session_factory(engine)() as sender, destination_lock(sender, "b") as held:
            assert held  # a live deliverer is sending to "b"
            assert queue_due_deliveries(outbox.session, utcnow()) == 1
            assert [name for name, _ in waiting_deliveries(outbox)] == ["a"]
        # Once it is gone, its rows are due again: the next delivery asks about them.
        assert queue_due_deliveries(outbox.session, utcnow()) == 2
        assert [name for name, _ in waiting_deliveries(outbox)] == ["a", "b"]
    finally:
        engine.dispose()


# --- (4) the geometry survives the trip through the PACS -----------------------------------


def test_the_sro_from_the_pacs_projects_the_bead_onto_its_pixel(registered, outbox, tmp_path):
    with running_orthanc(tmp_path / "orthanc") as orthanc:
        destination = pacs(orthanc)
        store_result_objects(outbox.session, outbox.store, registered["objects"], [destination])
        deliver_to(outbox, destination, utcnow())
        sro_uid = str(registered["objects"][0][1].SOPInstanceUID)
        orthanc_id = orthanc.instances()[sro_uid]["id"]
        sro = pydicom.dcmread(io.BytesIO(orthanc.fetch(f"/instances/{orthanc_id}/file")))

    record = registered["record"]
    matrix, intrinsics, _ = read_registration(sro)
    u, v = project(matrix, intrinsics, np.array(record["bead_lps"]))[0]
    stored_u = stored_column(u, intrinsics.columns, record["mirrored"])
    assert record["mirrored"]  # the case that catches a mirrored round trip
    assert np.hypot(stored_u - record["bead_px"][0], v - record["bead_px"][1]) < 1.0


# --- what a destination answers, from a pynetdicom SCP that answers as told -------------


@contextmanager
def storage_scp(sop_classes: list[str], status: int = 0x0000) -> Iterator[Destination]:
    """A C-STORE SCP on a free loopback port taking ``sop_classes`` and answering ``status``."""
    ae = AE(ae_title="TESTSCP")
    for sop_class in sop_classes:
        ae.add_supported_context(sop_class, ExplicitVRLittleEndian)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, lambda _event: status)],
    )
    try:
        yield Destination(name="scp", ae_title="TESTSCP", host="127.0.0.1", port=port)
    finally:
        server.shutdown()


def _classes(registered: dict) -> list[str]:
    return [str(ds.SOPClassUID) for _, ds in registered["objects"]]


@pytest.mark.parametrize(
    ("status", "expected", "words"),
    [
        (0xB000, "sent", "warning 0xB000"),
        (0xA700, "retrying", "out of resources"),
        (0xA900, "parked", "does not match"),
        (0xC123, "parked", "cannot understand"),
    ],
    ids=["0xB000", "0xA700", "0xA900", "0xC123"],
)
def test_store_statuses_decide_sent_retrying_or_parked(registered, outbox, status, expected, words):
    with storage_scp(_classes(registered), status) as destination:
        store_result_objects(outbox.session, outbox.store, registered["objects"], [destination])
        deliver_to(outbox, destination, utcnow())
    for row in outbox.rows():
        assert row.status == expected and words in row.last_error, row.last_error


def test_a_sop_class_the_destination_refuses_is_parked_the_rest_sent(registered, outbox):
    sc_class = _classes(registered)[2]
    with storage_scp([sc_class]) as destination:
        store_result_objects(outbox.session, outbox.store, registered["objects"], [destination])
        deliver_to(outbox, destination, utcnow())
    by_kind = {row.object_kind: row for row in outbox.rows()}
    assert by_kind["sc"].status == "sent"
    for kind in ("sro", "sr"):
        assert by_kind[kind].status == "parked"
        assert "no presentation context" in by_kind[kind].last_error


def test_a_destination_that_takes_none_of_our_classes_parks_everything(registered, outbox):
    with storage_scp([CTImageStorage]) as destination:
        store_result_objects(outbox.session, outbox.store, registered["objects"], [destination])
        summary = deliver_to(outbox, destination, utcnow())
    assert summary["parked"] == 3
    assert all("accepts none" in row.last_error for row in outbox.rows())


# --- the parts that need no PACS --------------------------------------------------------


def test_a_destination_removed_from_the_config_parks_its_rows(registered, outbox):
    gone = Destination(name="old-pacs", ae_title="OLD", host="127.0.0.1", port=104)
    store_result_objects(outbox.session, outbox.store, registered["objects"][:1], [gone])
    summary = deliver(outbox.session, outbox.store, settings_for(outbox), "old-pacs", utcnow())
    assert summary["parked"] == 1
    (row,) = outbox.rows()
    assert (row.status, row.last_error) == ("parked", "destination old-pacs not configured")


def test_a_second_deliverer_never_sends_rows_being_sent(registered, outbox, monkeypatch):
    destination = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=104)
    store_result_objects(outbox.session, outbox.store, registered["objects"], [destination])
    outbox.session.execute(text("DELETE FROM procrastinate_jobs"))
    outbox.session.commit()
    now = utcnow()
    engine = make_engine(outbox.url)
    calls: list[list[Path]] = []
    inner: dict = {}

    def send(destination, paths, calling_ae, timeout_s, tls_context=None, on_outcome=None):
        calls.append(list(paths))
        if len(calls) == 1:  # a second deliverer runs while the first one is sending
            with session_factory(engine)() as other:
                settings = settings_for(outbox, destination)
                inner.update(deliver(other, outbox.store, settings, destination.name, now))
        outcomes = [SendOutcome(path, None, True, False, 0x0000, "stored") for path in paths]
        for index, outcome in enumerate(outcomes):
            on_outcome(index, outcome)
        return outcomes

    monkeypatch.setattr(scu, "send_datasets", send)
    try:
        summary = deliver_to(outbox, destination, now)
    finally:
        engine.dispose()
    assert summary["sent"] == 3 and len(calls) == 1 and len(calls[0]) == 3
    # The second one found the destination busy, sent nothing, and looks again shortly.
    assert inner["busy"] and (inner["due"], inner["sent"]) == (0, 0)
    ((name, wait_s),) = waiting_deliveries(outbox)
    assert name == "pacs" and 0 < wait_s <= 2


def test_storing_twice_keeps_one_row_per_object_and_destination(registered, outbox):
    destinations = [
        Destination(name=name, ae_title="PACS", host="127.0.0.1", port=104) for name in "ab"
    ]
    first = store_result_objects(outbox.session, outbox.store, registered["objects"], destinations)
    second = store_result_objects(outbox.session, outbox.store, registered["objects"], destinations)
    assert len(first) == 6 and [row.id for row in second] == [row.id for row in first]
    assert len(outbox.rows()) == 6
    stored = pydicom.dcmread(outbox.store.absolute(first[0].path))
    assert stored.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert first[0].path.startswith(f"results/{registered['xray'].StudyInstanceUID}/")


def test_backoff_doubles_from_30_seconds_up_to_an_hour():
    waits = [exponential_backoff(n).total_seconds() for n in range(1, 10)]
    assert waits == [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]
    assert exponential_backoff(10_000) == timedelta(hours=1)


@pytest.mark.parametrize(
    ("status", "delivered", "transient"),
    [
        (0x0000, True, False),
        (0xB000, True, False),
        (0xB007, True, False),
        (0xA700, False, True),
        (0x0110, False, True),
        (0xA900, False, False),
        (0xC000, False, False),
        (0x0122, False, False),
    ],
)
def test_store_statuses_are_classified(status, delivered, transient):
    assert status_outcome(status)[:2] == (delivered, transient)
