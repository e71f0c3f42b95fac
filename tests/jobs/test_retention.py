"""Retention purges originals past their time, and nothing that work still needs."""

from __future__ import annotations

from datetime import timedelta

from click.testing import CliRunner
from sqlalchemy import select

from xvr_node.catalog.models import (
    Export,
    Instance,
    Job,
    JobKind,
    JobStatus,
    Registration,
    utcnow,
)
from xvr_node.cli import cli
from xvr_node.config import load_settings
from xvr_node.jobs.assemble import queue_stable_series, run_assemble
from xvr_node.jobs.retention import purge_originals
from xvr_node.node import make_receiver


def test_originals_go_only_when_nothing_needs_them(
    tmp_path, small_phantom, monkeypatch, hold_catalog
):
    settings = load_settings(None, environ={"XVR_NODE__STORAGE__ROOT": str(tmp_path / "store")})
    hold_catalog(settings)
    receiver, store = make_receiver(settings)
    xray_file = small_phantom / "xray" / "IMG_000.dcm"
    xray = receiver.receive(xray_file.read_bytes(), "CARM").instance_id
    later = utcnow() + timedelta(days=10)
    with receiver.sessions() as session:
        # An X-ray still waiting for its CT is kept, however old.
        assert purge_originals(session, store, later, 7)["purged"] == 0
    for file in sorted((small_phantom / "ct").glob("*.dcm")):
        assert receiver.receive(file.read_bytes(), calling_ae="PACS").ok
    with receiver.sessions() as session:
        (job,) = queue_stable_series(session, utcnow() + timedelta(minutes=1), 30.0)
        run_assemble(session, store, job.payload["series_id"])
        register = session.scalars(select(Job).where(Job.kind == JobKind.REGISTER)).one()
        # Its registration is queued: the X-ray and the CT behind it stay.
        counts = purge_originals(session, store, later, 7)
        assert counts["purged"] == 0 and counts["kept"] == 35
        # Registered, but the result is not delivered yet: still kept.
        instance = session.get(Instance, xray)
        register.status = JobStatus.SUCCEEDED
        row = Registration(
            instance_id=xray,
            volume_id=instance.linked_volume_id,
            initializer="dicom",
            final_matrix=[[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]],
            intrinsics={},
            conventions={},
        )
        session.add(row)
        session.flush()
        export = Export(
            registration_id=row.id,
            object_kind="sro",
            sop_instance_uid="1.2.3.4",
            path="results/x.dcm",
            destination="pacs",
        )
        session.add(export)
        session.commit()
        assert purge_originals(session, store, later, 7)["purged"] == 0
        # Delivered: now everything older than 7 days may go. A dry run deletes nothing.
        export.status = "sent"
        session.commit()
        dry = purge_originals(session, store, later, 7, dry_run=True)
        assert dry["purged"] == 35 and store.absolute(instance.path).is_file()
        # Not old enough yet: nothing goes.
        assert purge_originals(session, store, later, 30)["purged"] == 0
    monkeypatch.setenv("XVR_NODE__STORAGE__ROOT", str(tmp_path / "store"))
    result = CliRunner().invoke(cli, ["purge", "--days", "0"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("purged 35 original(s)")
    with receiver.sessions() as session:
        instances = session.scalars(select(Instance)).all()
        assert all(i.purged_at is not None for i in instances)  # the records stay
        assert not any(store.absolute(i.path).exists() for i in instances)
