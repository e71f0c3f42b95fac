"""The durable outbox: store result objects, then deliver them to each PACS until it has them."""

from __future__ import annotations

import io
import logging
import ssl
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from pathlib import PurePosixPath
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from xvr_node.catalog.models import Export, ExportKind, ExportStatus, utcnow
from xvr_node.config import Destination, Settings
from xvr_node.dicom import scu
from xvr_node.dicom.storage import FileStore, is_valid_uid
from xvr_node.jobs.engine import backoff_seconds

LOG = logging.getLogger(__name__)

#: Rows a deliverer picks up: never ``sent`` (no duplicates) nor ``parked`` (needs a person).
DUE_STATUSES = (ExportStatus.PENDING, ExportStatus.RETRYING)

#: Files sent per association; keeps each claim (and each lost association) small.
BATCH_SIZE = 64

Backoff = Callable[[int], timedelta]


def exponential_backoff(attempts: int) -> timedelta:
    """Wait after the ``attempts``-th failure: the job engine's back-off."""
    return timedelta(seconds=backoff_seconds(attempts))


def result_path(ds: Dataset) -> PurePosixPath:
    """Where a result object lives in the store, built from its validated UIDs."""
    uids = {
        "Study Instance UID": ds.get("StudyInstanceUID"),
        "Series Instance UID": ds.get("SeriesInstanceUID"),
        "SOP Instance UID": ds.get("SOPInstanceUID"),
    }
    for name, uid in uids.items():
        if not is_valid_uid(uid):
            raise ValueError(f"{name} {uid!r} of a result object is not a valid UID")
    study, series, sop = uids.values()
    return PurePosixPath("results", study, series, f"{sop}.dcm")


def encode(ds: Dataset) -> bytes:
    """The Part 10 file of a result object (its file meta says Explicit VR Little Endian)."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def store_result_objects(
    session: Session,
    store: FileStore,
    datasets: Sequence[tuple[str, Dataset]],
    destinations: Sequence[Destination],
    registration_id: int | None = None,
    *,
    now: datetime | None = None,
) -> list[Export]:
    """Write each ``(kind, dataset)`` durably, then queue it for every destination; commit.

    Files first, rows second: after the commit both are on disk, so a restart loses nothing,
    and a crash before it leaves only files that the next call overwrites. An object already
    queued for a destination (same SOP Instance UID) keeps its row, whatever its status.
    """
    now = now or utcnow()
    kinds = {str(kind) for kind in ExportKind}
    written: list[tuple[str, str, PurePosixPath]] = []
    for kind, ds in datasets:
        if kind not in kinds:
            raise ValueError(f"object kind must be one of {', '.join(sorted(kinds))}, not {kind!r}")
        relative = result_path(ds)
        store.write(relative, encode(ds))
        written.append((kind, str(ds.SOPInstanceUID), relative))
    if not destinations:
        LOG.warning("no destinations configured: %d result object(s) stored only", len(written))
    rows: list[Export] = []
    for kind, sop_uid, relative in written:
        for destination in destinations:
            row = session.scalar(
                select(Export).where(
                    Export.sop_instance_uid == sop_uid, Export.destination == destination.name
                )
            )
            if row is None:
                row = Export(
                    registration_id=registration_id,
                    object_kind=kind,
                    sop_instance_uid=sop_uid,
                    path=str(relative),
                    destination=destination.name,
                    status=ExportStatus.PENDING,
                    attempts=0,
                    next_attempt_at=now,
                )
                session.add(row)
            rows.append(row)
    session.commit()
    return rows


def deliver_due(
    session: Session,
    store: FileStore,
    destinations: Sequence[Destination],
    now: datetime,
    calling_ae: str,
    backoff: Backoff = exponential_backoff,
    *,
    timeout_s: float = 30.0,
    tls_context: ssl.SSLContext | None = None,
) -> dict[str, Any]:
    """Send every due row (pending or retrying, ``next_attempt_at <= now``) once; commit.

    Delivered rows become ``sent`` and are never selected again. A transient failure (PACS
    down, busy, timed out) is retried after ``backoff(attempts)``; a permanent one (refused
    AE title, SOP class not supported, object rejected) is ``parked`` until a person acts.
    """
    due = session.scalars(
        select(Export)
        .where(Export.status.in_(DUE_STATUSES), Export.next_attempt_at <= now)
        .order_by(Export.id)
    ).all()
    configured = {destination.name: destination for destination in destinations}
    summary: dict[str, Any] = {"due": len(due), "sent": 0, "retrying": 0, "parked": 0}
    summary["destinations"] = {}
    groups: dict[str, list[int]] = {}
    for row in due:
        groups.setdefault(row.destination, []).append(row.id)
    for name, ids in groups.items():
        counts = {"sent": 0, "retrying": 0, "parked": 0}
        destination = configured.get(name)
        for start in range(0, len(ids), BATCH_SIZE):
            batch = ids[start : start + BATCH_SIZE]
            if destination is None:
                _park_unconfigured(session, batch, name, now, counts)
            else:
                _deliver_batch(
                    session,
                    store,
                    destination,
                    batch,
                    now,
                    calling_ae,
                    backoff,
                    timeout_s,
                    tls_context,
                    counts,
                )
            session.commit()
        summary["destinations"][name] = counts
        for key, value in counts.items():
            summary[key] += value
    return summary


def deliver_configured(
    session: Session, store: FileStore, settings: Settings, now: datetime
) -> dict[str, Any]:
    """:func:`deliver_due` to the configured destinations, as the node's AE, with its TLS."""
    tls = None
    if any(destination.tls for destination in settings.destinations):
        tls = scu.client_tls_context(settings.node.tls)
    return deliver_due(
        session,
        store,
        settings.destinations,
        now,
        settings.node.ae_title,
        timeout_s=settings.node.dimse_timeout_s,
        tls_context=tls,
    )


def _claim(session: Session, ids: list[int], now: datetime, until: datetime) -> list[Export]:
    """Take the rows still due out of other deliverers' reach while we send (not committed)."""
    claimed = session.scalars(
        update(Export)
        .where(
            Export.id.in_(ids),
            Export.status.in_(DUE_STATUSES),
            Export.next_attempt_at <= now,
        )
        .values(next_attempt_at=until)
        .returning(Export),
        execution_options={"synchronize_session": "fetch"},
    ).all()
    return sorted(claimed, key=lambda row: row.id)


def _deliver_batch(
    session: Session,
    store: FileStore,
    destination: Destination,
    ids: list[int],
    now: datetime,
    calling_ae: str,
    backoff: Backoff,
    timeout_s: float,
    tls_context: ssl.SSLContext | None,
    counts: dict[str, int],
) -> None:
    # A deliverer that dies mid-send leaves its rows to be picked up once the claim lapses:
    # at-least-once delivery, but never two deliverers sending the same row at once.
    lease = timedelta(seconds=timeout_s * (len(ids) + 3) + 60)
    rows = _claim(session, ids, now, now + lease)
    paths = [store.absolute(row.path) for row in rows]
    # Commit the claim before the network: no transaction stays open while we send.
    session.commit()
    if not rows:
        return
    try:
        outcomes = scu.send_datasets(destination, paths, calling_ae, timeout_s, tls_context)
    except Exception as error:  # whatever went wrong, the rows must not stay claimed
        LOG.exception("export to %s failed unexpectedly", destination.name)
        outcomes = [
            scu.SendOutcome(path, row.sop_instance_uid, False, True, None, f"send failed: {error}")
            for path, row in zip(paths, rows, strict=True)
        ]
    for row, outcome in zip(rows, outcomes, strict=True):
        row.attempts += 1
        if outcome.delivered:
            row.status = ExportStatus.SENT
            row.sent_at = now
            row.last_error = None if outcome.status == 0x0000 else outcome.reason
            counts["sent"] += 1
        elif outcome.transient:
            row.status = ExportStatus.RETRYING
            row.next_attempt_at = now + backoff(row.attempts)
            row.last_error = outcome.reason
            counts["retrying"] += 1
        else:
            row.status = ExportStatus.PARKED
            row.next_attempt_at = now
            row.last_error = outcome.reason
            counts["parked"] += 1
        LOG.log(
            logging.INFO if row.status == ExportStatus.SENT else logging.WARNING,
            "export %s",
            row.status,
            extra={
                "event": f"export_{row.status}",
                "export": row.id,
                "kind": row.object_kind,
                "sop": row.sop_instance_uid,
                "destination": destination.name,
                "attempt": row.attempts,
                "reason": outcome.reason,
            },
        )


def _park_unconfigured(
    session: Session, ids: list[int], name: str, now: datetime, counts: dict[str, int]
) -> None:
    for row in session.scalars(select(Export).where(Export.id.in_(ids))):
        row.status = ExportStatus.PARKED
        row.last_error = f"destination {name} not configured"
        row.next_attempt_at = now
        counts["parked"] += 1
    LOG.warning("exports %s parked: destination %s is not configured", ids, name)


def retry(
    session: Session,
    export_ids: Iterable[int] = (),
    *,
    all_parked: bool = False,
    now: datetime | None = None,
) -> list[Export]:
    """Put parked or waiting rows back to ``pending``, due now, with a fresh back-off; commit.

    Rows already ``sent`` are left alone (a deliberate second copy is :func:`resend`).
    """
    now = now or utcnow()
    ids = set(export_ids)
    conditions = []
    if ids:
        conditions.append(Export.id.in_(ids))
    if all_parked:
        conditions.append(Export.status == ExportStatus.PARKED)
    if not conditions:
        return []
    rows = session.scalars(
        select(Export)
        .where(or_(*conditions), Export.status != ExportStatus.SENT)
        .order_by(Export.id)
    ).all()
    for row in rows:
        row.status = ExportStatus.PENDING
        row.attempts = 0
        row.next_attempt_at = now
    session.commit()
    return list(rows)


def resend(
    session: Session, export_ids: Iterable[int], *, now: datetime | None = None
) -> list[Export]:
    """Queue ``sent`` rows once more, e.g. after the PACS lost them; commit."""
    now = now or utcnow()
    rows = session.scalars(
        select(Export)
        .where(Export.id.in_(set(export_ids)), Export.status == ExportStatus.SENT)
        .order_by(Export.id)
    ).all()
    for row in rows:
        row.status = ExportStatus.PENDING
        row.attempts = 0
        row.next_attempt_at = now
        row.sent_at = None
        row.last_error = None
    session.commit()
    return list(rows)


def list_exports(session: Session, status: str | None = None) -> list[Export]:
    """Outbox rows, oldest first; only those with ``status`` when given."""
    query = select(Export).order_by(Export.id)
    if status is not None:
        query = query.where(Export.status == status)
    return list(session.scalars(query).all())


def export_record(row: Export) -> dict[str, Any]:
    """One row as plain JSON-ready values (for ``xvr-node export list --json``)."""
    return {
        "id": row.id,
        "registration_id": row.registration_id,
        "object_kind": row.object_kind,
        "sop_instance_uid": row.sop_instance_uid,
        "path": row.path,
        "destination": row.destination,
        "status": row.status,
        "attempts": row.attempts,
        "next_attempt_at": row.next_attempt_at.isoformat() if row.next_attempt_at else None,
        "last_error": row.last_error,
        "sent_at": row.sent_at.isoformat() if row.sent_at else None,
    }
