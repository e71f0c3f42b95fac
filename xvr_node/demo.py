"""``make demo``: the main job on embedded defaults (SQLite, local store, CPU unless a GPU)."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pynetdicom import AE
from sqlalchemy import select

from xvr_node.catalog.db import current_revision, upgrade
from xvr_node.catalog.models import Instance, Job, JobKind, JobStatus, Registration, utcnow
from xvr_node.config import load_settings
from xvr_node.dicom.receive import STORAGE_SOP_CLASSES
from xvr_node.jobs.assemble import run_assemble
from xvr_node.jobs.register import Registrars, register_instance
from xvr_node.node import Node
from xvr_node.phantom import PhantomSpec, build_phantom
from xvr_node.xvr.metrics import format_table, mean_target_registration_error
from xvr_node.xvr.register import RefineSettings

DEMO_PHANTOM = PhantomSpec(
    seed=1,
    frames=4,
    columns=192,
    rows=192,
    multiframe=5,
    motion="dynamic",
    modality="XA",
    flip=True,
    bead=True,
)
#: Detector scales for the demo's 192-pixel frames: 48 and 96 pixels.
DEMO_SCALES = (4.0, 2.0)


def run_demo(output: Path, config_path: Path | None, echo: Callable[[str], None]) -> None:
    """Phantom patient → C-STORE into a running node → assemble → register → table."""
    output = Path(output).resolve()
    started = time.monotonic()
    environ = dict(os.environ)
    # Everything the demo makes stays under its output folder, on a free loopback port.
    environ.setdefault("XVR_NODE__STORAGE__ROOT", str(output / "store"))
    environ.setdefault("XVR_NODE__NODE__PORT", str(_free_port()))
    environ.setdefault("XVR_NODE__SCHEDULER__STABLE_SERIES_SECONDS", "2")
    environ.setdefault("XVR_NODE__SCHEDULER__POLL_INTERVAL_S", "0.5")
    settings = load_settings(config_path, environ=environ)

    echo(f"[1/5] phantom patient -> {output / 'phantom'}")
    phantom = output / "phantom"
    summary = build_phantom(phantom, DEMO_PHANTOM, progress=lambda line: echo(f"      {line}"))
    echo(f"      {summary.describe()}")

    echo(f"[2/5] catalog -> {settings.database_url_redacted}")
    settings.ensure_storage_root()
    upgrade(settings.database_url)
    echo(f"      schema revision {current_revision(settings.database_url)}")

    node = Node(settings)
    node.start()
    try:
        echo(
            f"[3/5] xvr-node listening as {settings.node.ae_title} on port "
            f"{settings.node.port}; sending the CT, then the fluoroscopy, by C-STORE"
        )
        for folder in ("ct", "xray"):
            files = sorted((phantom / folder).glob("*.dcm"))
            statuses = _send(settings.node.port, settings.node.ae_title, files)
            failed = [f.name for f, s in zip(files, statuses, strict=True) if s != 0]
            echo(
                f"      {folder}: {len(files) - len(failed)} of {len(files)} stored"
                + (f"; failed: {', '.join(failed)}" if failed else "")
            )

        echo("[4/5] waiting for the CT series to be complete, then assembling it")
        with node.receiver.sessions() as session:
            job = _wait_for_assemble_job(session, timeout_s=60)
            job.status, job.started_at = JobStatus.RUNNING, utcnow()
            session.commit()
            volume = run_assemble(session, node.receiver.store, job.payload["series_id"])
            job.status, job.finished_at = JobStatus.SUCCEEDED, utcnow()
            job.result = {"volume_id": volume.id, "state": volume.state}
            session.commit()
            echo(
                f"      volume {volume.id}: {volume.state} "
                f"{'x'.join(map(str, volume.shape or []))} {volume.refusal_reason or ''}"
            )

            echo("[5/5] registering every frame (DICOM positioner angles, then refinement)")
            registrars = Registrars(
                node.receiver.store,
                RefineSettings(scales=DEMO_SCALES),
                settings.training.orientation,
            )
            xrays = session.scalars(
                select(Instance).where(Instance.usability == "usable").order_by(Instance.id)
            ).all()
            for instance in xrays:
                rows = register_instance(session, registrars, instance.id)
                echo(
                    f"      {Path(instance.path).name[:24]}…: {len(rows)} frame(s), "
                    f"{sum(r.wall_time_s for r in rows):.1f} s"
                )
            echo("")
            echo(_truth_table(session, phantom))
    finally:
        node.stop()
    echo("")
    echo(f"done in {time.monotonic() - started:.0f} s. Look at:")
    echo(f"  {phantom / 'xray'}   the fluoroscopy as the C-arm sent it (any DICOM viewer)")
    echo(f"  {phantom / 'truth.json'}   the true poses the table is measured against")
    echo(f"  {settings.storage_root}   the node's store and catalog (xvr-node status)")
    echo(
        "Overnight finetuning, results back to PACS and the job runner join this demo "
        "as the pipeline grows."
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _send(port: int, called: str, files: list[Path]) -> list[int]:
    """C-STORE the files in one association, as a C-arm or PACS would."""
    ae = AE(ae_title="DEMOCARM")
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        raise RuntimeError("the node refused the demo's association")
    try:
        return [int(assoc.send_c_store(dcmread(f)).Status) for f in files]
    finally:
        assoc.release()


def _wait_for_assemble_job(session, timeout_s: float) -> Job:
    """The scheduler queues assembly once the series is quiet; wait for that job."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = session.scalars(
            select(Job).where(Job.kind == JobKind.ASSEMBLE, Job.status == JobStatus.QUEUED)
        ).first()
        if job is not None:
            return job
        time.sleep(0.5)
        session.expire_all()
    raise TimeoutError("no assemble job was queued: is the CT series complete?")


def _truth_table(session, phantom: Path) -> str:
    """Per frame: initializer, initial and final mTRE against the phantom's truth, time."""
    truth = json.loads((phantom / "truth.json").read_text())
    records = {(r["sop_instance_uid"], r["frame_number"]): r for r in truth["xrays"]}
    rows = []
    for registration in session.scalars(select(Registration).order_by(Registration.id)):
        instance = registration.instance
        frame = (registration.frame_index or 0) + 1
        record = records[(instance.sop_instance_uid, frame)]
        true = np.array(record["matrix"])
        points = np.array(record["fiducials_lps"])
        name = Path(record["file"]).name + (f"#{frame}" if record["number_of_frames"] > 1 else "")
        rows.append(
            {
                "name": f"{name} ({registration.initializer})",
                "initial_mtre_mm": mean_target_registration_error(
                    np.array(registration.initial_matrix), true, points
                ),
                "final_mtre_mm": mean_target_registration_error(
                    np.array(registration.final_matrix), true, points
                ),
                "iterations": registration.iterations,
                "seconds": registration.wall_time_s,
            }
        )
    return format_table(rows)
