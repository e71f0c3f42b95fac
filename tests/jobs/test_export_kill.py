"""kill -9 of the node while it delivers results: every object reaches Orthanc once.

A real ``xvr-node serve`` sends a few hundred result objects to a real Orthanc; the test
kills it with SIGKILL in the middle of an association, starts it again, and checks that
Orthanc holds each object exactly once (its change log shows no second copy) and that the
outbox calls every row sent.
"""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import func, select

from tests.support.node import running_node
from tests.support.orthanc import running_orthanc
from tests.support.outbox import noise_captures
from xvr_node.catalog.db import make_engine, session_factory
from xvr_node.catalog.models import Export
from xvr_node.config import Destination
from xvr_node.dicom.storage import FileStore
from xvr_node.jobs.export import store_result_objects

pytestmark = pytest.mark.slow  # two node start-ups and Orthanc

OBJECTS = 240


def wait_until(condition, what: str, timeout_s: float, node) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{node.log_text()[-4000:]}")
        time.sleep(0.01)


def test_kill_9_during_delivery_loses_nothing_and_sends_nothing_twice(tmp_path):
    objects = noise_captures(OBJECTS)  # 256 KiB each: sending them takes a few seconds
    expected = {str(ds.SOPInstanceUID) for _, ds in objects}
    with running_orthanc(tmp_path / "orthanc") as orthanc:
        pacs = Destination(
            name="pacs", ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port
        )
        destinations = json.dumps([pacs.model_dump(mode="json")])
        with running_node(tmp_path / "node", destinations=destinations) as node:
            wait_until(lambda: "event=workers_ready" in node.log_text(), "workers", 120, node)
            engine = make_engine(node.database_url)
            sessions = session_factory(engine)

            def sent() -> int:
                with sessions() as session:
                    query = select(func.count(Export.id)).where(Export.status == "sent")
                    return int(session.scalar(query) or 0)

            def in_orthanc() -> int:
                return int(orthanc.rest("/statistics")["CountInstances"])

            try:
                with sessions() as session:  # what the export job does: rows and a delivery
                    store_result_objects(session, FileStore(node.store), objects, [pacs])
                wait_until(lambda: in_orthanc() >= OBJECTS // 4, "a quarter in Orthanc", 120, node)
                node.kill()
                at_kill = in_orthanc()
                assert at_kill < OBJECTS, "the node finished before it was killed"
                with sessions() as session:
                    statuses = dict(
                        session.execute(
                            select(Export.status, func.count()).group_by(Export.status)
                        ).all()
                    )
                restarted = time.monotonic()
                node.start()
                wait_until(lambda: sent() == OBJECTS, "every row sent", 180, node)
                resumed_s = time.monotonic() - restarted
            finally:
                engine.dispose()
            log = node.log_text()

        assert set(orthanc.instances()) == expected
        assert in_orthanc() == OBJECTS
        assert not orthanc.received_twice()
    # The kill caught an association mid-way: the restarted node asked Orthanc about the
    # objects in flight (C-FIND) instead of sending them blind.
    assert statuses.get("sending", 0) > 0, statuses
    assert "event=export_interrupted" in log
    print(f"killed at {at_kill}/{OBJECTS} in Orthanc {statuses}; all sent {resumed_s:.1f} s later")
