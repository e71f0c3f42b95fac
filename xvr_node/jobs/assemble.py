"""From a quiet CT series to a usable volume: queue the assemble job, run it, link X-rays."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from pathlib import Path, PurePosixPath

from sqlalchemy import select
from sqlalchemy.orm import Session

from xvr_node.catalog.models import (
    Instance,
    Job,
    JobKind,
    Series,
    SeriesState,
    Volume,
    VolumeState,
)
from xvr_node.dicom.receive import CT_SOP_CLASSES, link_waiting_xrays
from xvr_node.dicom.storage import FileStore
from xvr_node.dicom.volume import (
    VolumeRefusedError,
    assemble_volume,
    read_series_files,
    write_volume_nifti,
)
from xvr_node.jobs.queue import enqueue
from xvr_node.jobs.triggers import queue_finetune, queue_register, xrays_waiting

LOG = logging.getLogger(__name__)


def queue_stable_series(session: Session, now: datetime, stable_seconds: float) -> list[Job]:
    """Queue an assemble job for every CT series that received nothing for a while."""
    cutoff = now - timedelta(seconds=stable_seconds)
    quiet = session.scalars(
        select(Series).where(
            Series.state == SeriesState.RECEIVING,
            Series.sop_class_uid.in_(list(CT_SOP_CLASSES)),
            Series.last_received_at < cutoff,
        )
    ).all()
    jobs = []
    for series in quiet:
        series.state = SeriesState.STABLE
        # One job per series content: new slices later make a new key, hence a new job.
        key = f"assemble:series:{series.id}:{series.instance_count}"
        if session.scalar(select(Job.id).where(Job.dedupe_key == key)) is not None:
            continue
        jobs.append(enqueue(session, JobKind.ASSEMBLE, {"series_id": series.id}, dedupe_key=key))
    session.commit()
    for job in jobs:
        LOG.info(
            "assemble queued",
            extra={"event": "assemble_queued", "job": job.id, "series": job.payload["series_id"]},
        )
    return jobs


def latest_versions(instances: Iterable[Instance]) -> list[Instance]:
    """Each SOP instance once: its newest version (a resent slice replaces the old one)."""
    latest: dict[str, Instance] = {}
    for instance in instances:
        current = latest.get(instance.sop_instance_uid)
        if current is None or instance.version > current.version:
            latest[instance.sop_instance_uid] = instance
    return list(latest.values())


def run_assemble(
    session: Session,
    store: FileStore,
    series_id: int,
    finetune_urgent: Callable[[bool], bool] = lambda xrays_waiting: xrays_waiting,
) -> Volume:
    """Assemble a series into a volume (usable or refused with a reason) and link X-rays.

    A usable volume queues, in the same commit, a register job per X-ray it links and a
    finetune job for the patient; ``finetune_urgent(xrays_waiting)`` says whether that
    finetune may start outside the overnight window.
    """
    series = session.get(Series, series_id)
    if series is None:
        raise LookupError(f"series {series_id} is not in the catalog")
    latest = latest_versions(series.instances)
    patient_id = series.study.patient_id
    number = len(series.volumes) + 1
    volume = Volume(series=series, patient_id=patient_id, state=VolumeState.REFUSED)
    session.add(volume)
    try:
        datasets = read_series_files(store.absolute(i.path) for i in latest)
        assembled = assemble_volume(datasets)
    except VolumeRefusedError as refused:
        volume.refusal_reason = refused.reason
        series.state = SeriesState.FAILED
        session.commit()
        LOG.warning(
            "volume refused",
            extra={"event": "volume_refused", "series": series_id, "reason": refused.reason},
        )
        return volume
    relative = PurePosixPath("volumes", series.series_instance_uid, f"{number}.nii.gz")
    with tempfile.TemporaryDirectory(dir=store.incoming) as scratch:
        local = Path(scratch) / "volume.nii.gz"
        write_volume_nifti(assembled, local)
        store.write_file(relative, local)
    ct = assembled.volume
    volume.path = str(relative)
    volume.shape = list(ct.hu.shape)
    volume.spacing = [float(x) for x in ct.spacing_mm]
    volume.affine = ct.affine_lps.tolist()
    volume.state = VolumeState.USABLE
    series.state = SeriesState.ASSEMBLED
    session.flush()
    waiting = xrays_waiting(session, patient_id)
    linked = link_waiting_xrays(session, patient_id, volume)
    for instance in linked:
        queue_register(session, instance.id)
    queue_finetune(session, volume, urgent=finetune_urgent(waiting))
    session.commit()
    LOG.info(
        "volume assembled",
        extra={
            "event": "volume_ok",
            "series": series_id,
            "volume": volume.id,
            "linked_xrays": len(linked),
        },
    )
    return volume
