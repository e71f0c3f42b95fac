"""Retention: delete received originals after N days, never what work still needs.

Results are never purged here: they stay until exported, and then in PACS. An original is
kept while anything may still read it:

* an X-ray while it waits for its CT, while a register or export job for it is queued or
  running, or while one of its results is not delivered (pending, retrying or parked);
* a CT slice while its series holds the patient's newest usable volume and the patient had
  an X-ray within the retention period, or has an X-ray kept for the reasons above (the SRO
  of a new result lists those slices).

The catalog keeps every record, marked ``purged_at``: the audit trail outlives the pixels.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from xvr_node.catalog.models import (
    Export,
    ExportStatus,
    Instance,
    Job,
    JobKind,
    JobStatus,
    Registration,
    Series,
    Study,
    Usability,
    Volume,
    VolumeState,
)
from xvr_node.dicom.receive import CT_SOP_CLASSES
from xvr_node.dicom.storage import FileStore

LOG = logging.getLogger(__name__)

UNDELIVERED = (
    ExportStatus.PENDING,
    ExportStatus.SENDING,
    ExportStatus.RETRYING,
    ExportStatus.PARKED,
)


def _busy_instances(session: Session) -> set[int]:
    """X-rays with a register or export job queued or running (read once per purge)."""
    payloads = session.scalars(
        select(Job.payload).where(
            Job.kind.in_([JobKind.REGISTER, JobKind.EXPORT]),
            Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
        )
    )
    return {payload.get("instance_id") for payload in payloads}


def _xray_still_needed(session: Session, instance: Instance, busy: set[int]) -> bool:
    if instance.usability == Usability.WAITING or instance.id in busy:
        return True
    undelivered = session.scalar(
        select(
            exists().where(
                Export.registration_id == Registration.id,
                Registration.instance_id == instance.id,
                Export.status.in_(UNDELIVERED),
            )
        )
    )
    return bool(undelivered)


def _ct_still_needed(
    session: Session, instance: Instance, cutoff: datetime, busy: set[int]
) -> bool:
    """Decided per series: every slice of a series gets the same answer."""
    patient_id = instance.series.study.patient_id
    newest = session.scalars(
        select(Volume)
        .where(Volume.patient_id == patient_id, Volume.state == VolumeState.USABLE)
        .order_by(Volume.created_at.desc(), Volume.id.desc())
    ).first()
    if newest is None or newest.series_id != instance.series_id:
        return False
    xrays = session.scalars(
        select(Instance)
        .join(Series)
        .join(Study)
        .where(
            Study.patient_id == patient_id,
            Instance.sop_class_uid.not_in(list(CT_SOP_CLASSES)),
        )
    ).all()
    return any(xray.received_at >= cutoff for xray in xrays) or any(
        _xray_still_needed(session, xray, busy) for xray in xrays if xray.purged_at is None
    )


def purge_originals(
    session: Session, store: FileStore, now: datetime, days: int, *, dry_run: bool = False
) -> dict[str, int]:
    """Delete originals received more than ``days`` ago that nothing needs; commit."""
    cutoff = now - timedelta(days=days)
    candidates = session.scalars(
        select(Instance)
        .where(Instance.received_at < cutoff, Instance.purged_at.is_(None))
        .order_by(Instance.id)
    ).all()
    counts = {"purged": 0, "kept": 0, "bytes": 0}
    busy = _busy_instances(session)
    series_needed: dict[int, bool] = {}
    for instance in candidates:
        if instance.sop_class_uid in CT_SOP_CLASSES:
            if instance.series_id not in series_needed:
                series_needed[instance.series_id] = _ct_still_needed(
                    session, instance, cutoff, busy
                )
            needed = series_needed[instance.series_id]
        else:
            needed = _xray_still_needed(session, instance, busy)
        if needed:
            counts["kept"] += 1
            continue
        counts["purged"] += 1
        counts["bytes"] += instance.size_bytes
        if not dry_run:
            store.absolute(instance.path).unlink(missing_ok=True)
            instance.purged_at = now
            session.commit()  # file and mark together, one instance at a time
    LOG.info(
        "retention",
        extra={"event": "retention", "days": days, "dry_run": dry_run, **counts},
    )
    return counts
