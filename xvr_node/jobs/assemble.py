"""From a quiet CT series to a usable volume: queue the assemble job, run it, link X-rays."""

from __future__ import annotations

import logging
import tempfile
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

LOG = logging.getLogger(__name__)

#: Register > export > assemble > finetune (DESIGN.md §2).
ASSEMBLE_PRIORITY = 50


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
        job = Job(
            kind=JobKind.ASSEMBLE,
            payload={"series_id": series.id},
            priority=ASSEMBLE_PRIORITY,
            dedupe_key=key,
        )
        session.add(job)
        jobs.append(job)
    session.commit()
    for job in jobs:
        LOG.info(
            "assemble queued",
            extra={"event": "assemble_queued", "job": job.id, "series": job.payload["series_id"]},
        )
    return jobs


def run_assemble(session: Session, store: FileStore, series_id: int) -> Volume:
    """Assemble a series into a volume (usable or refused with a reason) and link X-rays."""
    series = session.get(Series, series_id)
    if series is None:
        raise LookupError(f"series {series_id} is not in the catalog")
    latest: dict[str, Instance] = {}
    for instance in series.instances:
        current = latest.get(instance.sop_instance_uid)
        if current is None or instance.version > current.version:
            latest[instance.sop_instance_uid] = instance
    patient_id = series.study.patient_id
    number = len(series.volumes) + 1
    volume = Volume(series=series, patient_id=patient_id, state=VolumeState.REFUSED)
    session.add(volume)
    try:
        datasets = read_series_files(store.absolute(i.path) for i in latest.values())
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
    linked = link_waiting_xrays(session, patient_id, volume)
    session.commit()
    LOG.info(
        "volume assembled",
        extra={
            "event": "volume_ok",
            "series": series_id,
            "volume": volume.id,
            "linked_xrays": linked,
        },
    )
    return volume
