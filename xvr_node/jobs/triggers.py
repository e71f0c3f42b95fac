"""What queues which job: the pipeline's rules, written in the caller's transaction.

A job is queued in the same commit as the fact that calls for it (an X-ray catalogued and
linked, a volume assembled, a registration stored), so a crash never leaves one without
the other.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from xvr_node.catalog.models import (
    Instance,
    Job,
    JobKind,
    ModelState,
    PoseModel,
    Registration,
    Series,
    Study,
    Usability,
    Volume,
    VolumeState,
)
from xvr_node.jobs.queue import enqueue, make_urgent

LOG = logging.getLogger(__name__)


def queue_register(session: Session, instance_id: int) -> Job:
    """A usable, linked X-ray is registered at once."""
    return enqueue(
        session,
        JobKind.REGISTER,
        {"instance_id": instance_id},
        dedupe_key=f"register:instance:{instance_id}",
    )


def queue_reregistrations(session: Session, model: PoseModel, since: datetime) -> list[Job]:
    """A patient's model became usable: X-rays registered since ``since`` whose current
    result was unreliable or did not start from a model are registered again with it.

    One job per X-ray and model (a second model queues them again); the new results
    supersede the old ones in the catalog and are exported as new objects.
    """
    rows = session.scalars(
        select(Registration)
        .join(Instance, Registration.instance_id == Instance.id)
        .where(
            Instance.linked_volume_id == model.volume_id,
            Instance.usability == Usability.USABLE,
            Registration.superseded_by_id.is_(None),
            Registration.created_at >= since,
            or_(Registration.reliable.is_not(True), Registration.model_id.is_(None)),
        )
    ).all()
    jobs = []
    for instance_id in sorted({row.instance_id for row in rows}):
        jobs.append(
            enqueue(
                session,
                JobKind.REGISTER,
                {"instance_id": instance_id, "reason": f"model {model.id} ready"},
                dedupe_key=f"register:instance:{instance_id}:model:{model.id}",
            )
        )
    if jobs:
        LOG.info(
            "registering again with the new model",
            extra={"event": "reregister", "model": model.id, "instances": len(jobs)},
        )
    return jobs


def queue_export(session: Session, instance_id: int, registration_ids: Sequence[int]) -> Job:
    """Results become DICOM objects in the outbox and go to every destination."""
    ids = sorted(registration_ids)
    return enqueue(
        session,
        JobKind.EXPORT,
        {"instance_id": instance_id, "registration_ids": ids},
        dedupe_key=f"export:registrations:{ids[0]}-{ids[-1]}" if ids else None,
    )


def xrays_waiting(session: Session, patient_id: int) -> bool:
    """Has the patient X-rays that wait for a CT or are linked to one?"""
    return (
        session.scalar(
            select(Instance.id)
            .join(Series)
            .join(Study)
            .where(
                Study.patient_id == patient_id,
                Instance.usability.in_([Usability.USABLE, Usability.WAITING]),
            )
            .limit(1)
        )
        is not None
    )


def queue_finetune(session: Session, volume: Volume, urgent: bool) -> Job:
    """A usable CT volume gets its patient's model; urgent ones ignore the overnight window.

    Queued again for the same volume, the job is reused; ``urgent`` can only be raised.
    """
    job = enqueue(
        session,
        JobKind.FINETUNE,
        {"volume_id": volume.id, "patient_id": volume.patient_id},
        dedupe_key=f"finetune:volume:{volume.id}",
        urgent=urgent,
    )
    if urgent and make_urgent(session, job):
        LOG.info(
            "finetune made urgent",
            extra={"event": "finetune_urgent", "job": job.id, "volume": volume.id},
        )
    return job


def ready_model(session: Session, volume_id: int) -> PoseModel | None:
    """The newest validated ready model of this volume, else the newest ready one.

    A newer model below the bar stays ready (its figures are shown) next to the validated
    one it did not replace.
    """
    return session.scalars(
        select(PoseModel)
        .where(PoseModel.volume_id == volume_id, PoseModel.state == ModelState.READY)
        .order_by(PoseModel.validated.desc(), PoseModel.version.desc())
    ).first()


def queue_missing_finetunes(session: Session) -> list[Job]:
    """A finetune for each patient's newest usable volume that has neither model nor job."""
    newest: dict[int, Volume] = {}
    for volume in session.scalars(
        select(Volume).where(Volume.state == VolumeState.USABLE).order_by(Volume.id)
    ):
        newest[volume.patient_id] = volume
    queued = []
    for volume in newest.values():
        has_model = session.scalar(
            select(PoseModel.id).where(
                PoseModel.volume_id == volume.id,
                PoseModel.state.in_([ModelState.READY, ModelState.TRAINING]),
            )
        )
        has_job = session.scalar(
            select(Job.id).where(Job.dedupe_key == f"finetune:volume:{volume.id}")
        )
        if has_model is None and has_job is None:
            queued.append(queue_finetune(session, volume, urgent=False))
    session.commit()
    return queued
