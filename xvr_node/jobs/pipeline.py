"""What each job kind does: assemble → finetune → register → export (DESIGN.md §2).

One :class:`Pipeline` per worker process holds what is costly to build (renderers per CT,
networks per model) and hands :class:`~xvr_node.jobs.worker.Worker` one handler per kind.
Each handler queues the next step in the same commit as its own result
(:mod:`xvr_node.jobs.triggers`).
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from xvr_node import __version__
from xvr_node.catalog.models import (
    Instance,
    Job,
    JobStatus,
    ModelState,
    PoseModel,
    Registration,
    Usability,
    Volume,
    VolumeState,
)
from xvr_node.config import Settings
from xvr_node.dicom.results import RegistrationResult
from xvr_node.dicom.sc import build_overlay, build_run_overlay, compose_overlay, overlay_legend
from xvr_node.dicom.sr import build_measurement_report, build_run_report
from xvr_node.dicom.sro import build_run_registration, build_spatial_registration
from xvr_node.dicom.storage import FileStore
from xvr_node.geometry import Intrinsics
from xvr_node.jobs.assemble import latest_versions, run_assemble
from xvr_node.jobs.export import store_result_objects
from xvr_node.jobs.register import Registrars, StartPolicy, register_instance
from xvr_node.jobs.retention import purge_originals
from xvr_node.jobs.triggers import (
    queue_export,
    queue_finetune,
    queue_reregistrations,
    ready_model,
)
from xvr_node.jobs.worker import Handler, JobContext, JobYielded, PermanentJobError, noop
from xvr_node.xvr.field import field_of_view
from xvr_node.xvr.register import RefineSettings

LOG = logging.getLogger(__name__)

#: Where finetuned models live in the store: models/patient-<id>/v<version>/.
MODELS_DIR = "models"


#: How often a running finetune writes its progress to the catalog.
PROGRESS_EVERY_S = 10.0


def record_progress(context: JobContext, update, budget_s: float | None) -> None:
    """A finetune's iteration, planned total, ETA and held-out error, on its job row."""
    with context.worker.sessions() as session:
        job = session.get(Job, context.job_id)
        if job is None:
            return
        job.progress = {
            "iteration": update.iteration,
            "total": update.total,
            "eta_s": None if not math.isfinite(update.eta_s) else round(update.eta_s, 1),
            "it_per_s": round(update.it_per_s, 4),
            "loss": round(update.loss, 5),
            "validation_mm": update.validation_mm,
            "budget_s": budget_s,
            "at": context.now().isoformat(),
        }
        session.commit()


class Pipeline:
    """The handlers of one worker process, sharing its caches."""

    def __init__(self, settings: Settings, store: FileStore, device: str) -> None:
        self.settings = settings
        self.store = store
        self.device = device
        self.registrars = Registrars(
            store,
            RefineSettings.from_settings(settings.registration),
            settings.training.orientation,
            device,
            labels=settings.registration.mask_labels,
        )
        self._initializers: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._volume_locks: dict[int, threading.Lock] = {}
        self._ct_header_cache: dict[int, list[Dataset]] = {}

    def handlers(self) -> dict[str, Handler]:
        return {
            "assemble": self.assemble,
            "finetune": self.finetune,
            "register": self.register,
            "export": self.export,
            "retention": self.retention,
            "noop": noop,
        }

    def retention(self, context: JobContext) -> dict[str, Any]:
        days = self.settings.scheduler.retention.purge_originals_after_days
        if days is None:
            return {"purged": 0, "reason": "retention is off (purge_originals_after_days: null)"}
        return purge_originals(context.session, self.store, context.now(), days)

    # --- assemble ------------------------------------------------------------------------

    def assemble(self, context: JobContext) -> dict[str, Any]:
        training = self.settings.training

        def urgent(xrays_waiting: bool) -> bool:
            return training.finetune_immediately or (
                xrays_waiting and training.finetune_immediately_when_xray_waiting
            )

        try:
            volume = run_assemble(context.session, self.store, context.payload["series_id"], urgent)
        except LookupError as missing:
            raise PermanentJobError(str(missing)) from None
        return {"volume_id": volume.id, "state": volume.state, "reason": volume.refusal_reason}

    # --- finetune ------------------------------------------------------------------------

    def finetune(self, context: JobContext) -> dict[str, Any]:
        """Train the patient's model on their CT; yields between steps to urgent work."""
        from xvr_node.ct_volume import CtVolume
        from xvr_node.xvr.train import restart, stop_record, train

        session = context.session
        volume = session.get(Volume, context.payload["volume_id"])
        if volume is None or volume.state != VolumeState.USABLE:
            raise PermanentJobError(f"volume {context.payload['volume_id']} is not usable")
        budget_s = self._training_budget(context)
        model = self._model_row(context, volume)
        run_dir = self.store.root / model.path
        checkpoints = sorted((run_dir / "checkpoints").glob("iter_*.pt"))
        base = model.base_model.path if model.base_model is not None else None
        training = self.settings.training.for_device(context.device, finetune=base is not None)
        volume_path = self.store.absolute(volume.path)
        session.commit()  # no transaction stays open for the length of the training
        stopped_at: list[int] = []

        reported = [-math.inf]

        def progress(update) -> bool:
            now = time.monotonic()
            if now - reported[0] >= PROGRESS_EVERY_S or update.iteration == update.total:
                reported[0] = now
                record_progress(context, update, budget_s)
            if update.iteration < update.total and context.should_yield():
                stopped_at.append(update.iteration)
                return False
            return True

        options = {"device": context.device, "progress": progress, "budget_s": budget_s}
        try:
            if checkpoints:  # preempted or interrupted earlier: go on where it stopped
                final = restart(checkpoints[-1], run_dir, **options)
            else:
                ct = CtVolume.from_nifti(volume_path)
                if base is None:
                    LOG.warning(
                        "no base model configured (training.base_model): training de novo",
                        extra={"event": "finetune_de_novo", "volume": volume.id},
                    )
                final = train(
                    [ct], training, run_dir, base_checkpoint=base, seed=volume.id, **options
                )
        except Exception:
            if context.attempts >= context.max_attempts:
                model.state = ModelState.FAILED
                session.commit()
            raise
        if stopped_at:
            reason = "worker stopping" if context.worker.stopping.is_set() else "more urgent job"
            raise JobYielded(f"{reason}; checkpoint at iteration {stopped_at[-1]}")
        stopped = stop_record(run_dir) or {}
        model.path = str(PurePosixPath(final.relative_to(self.store.root)))
        validation = self._put_in_service(
            session, model, volume_path, context.device, context.now(), stopped=stopped
        )
        return {
            "model_id": model.id,
            "version": model.version,
            "checkpoint": model.path,
            "stopped": stopped,
            "validation": validation,
        }

    def adopt_model(
        self, session: Session, volume: Volume, checkpoint: Path, now: datetime, note: str
    ) -> PoseModel:
        """Take into service a model trained elsewhere for this CT (another machine, the demo).

        It is copied into the store as the patient's next version and checked on held-out
        X-rays exactly like a finetuned model: it starts registrations only if it passes.
        The CT's queued finetune is cancelled (a running one goes on and supersedes it).
        ``note`` says where the model comes from; it is kept with its figures.
        """
        from xvr_node.xvr.checkpoint import load_checkpoint

        if volume.state != VolumeState.USABLE:
            raise ValueError(f"volume {volume.id} is {volume.state}, not usable")
        state = load_checkpoint(Path(checkpoint))  # refuses what is not a checkpoint
        version = 1 + max(
            session.scalars(
                select(PoseModel.version).where(PoseModel.patient_id == volume.patient_id)
            ).all(),
            default=0,
        )
        relative = PurePosixPath(MODELS_DIR, f"patient-{volume.patient_id}", f"v{version}")
        target = self.store.root / relative / "adopted.pt"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(checkpoint, target)
        model = PoseModel(
            patient_id=volume.patient_id,
            volume_id=volume.id,
            version=version,
            path=str(relative / "adopted.pt"),
            config=state.settings.model_dump(mode="json"),
            conventions=state.conventions.to_json(),
            state=ModelState.TRAINING,
        )
        session.add(model)
        session.flush()
        for job in session.scalars(
            select(Job).where(
                Job.dedupe_key == f"finetune:volume:{volume.id}", Job.status == JobStatus.QUEUED
            )
        ):
            job.status, job.finished_at = JobStatus.CANCELLED, now
            job.error = f"not needed: model {model.id} was adopted for this CT ({note})"
        session.commit()
        volume_path = self.store.absolute(volume.path)
        self._put_in_service(session, model, volume_path, self.device, now, adopted=note)
        return model

    def _put_in_service(
        self,
        session: Session,
        model: PoseModel,
        volume_path: Path,
        device: str,
        now: datetime,
        *,
        stopped: dict | None = None,
        adopted: str | None = None,
    ) -> dict:
        """Check a new model on held-out X-rays, make it the patient's current one, and
        register again what it may improve if it passes; returns its figures."""
        validation = self._check_model(
            self.store.root / model.path, volume_path, model.volume_id or 0, device
        )
        model.state = ModelState.READY
        model.validation = validation if adopted is None else {**validation, "adopted": adopted}
        model.validated = bool(validation.get("passes"))
        if model.validated or not self.settings.training.model_check.required:
            # Only a model that may be used replaces the patient's earlier ones: one below
            # the bar leaves a validated predecessor in service (see ready_model).
            session.execute(
                update(PoseModel)
                .where(
                    PoseModel.patient_id == model.patient_id,
                    PoseModel.state == ModelState.READY,
                    PoseModel.id != model.id,
                )
                .values(state=ModelState.SUPERSEDED)
            )
            hours = self.settings.registration.reregister_hours
            queue_reregistrations(session, model, now - timedelta(hours=hours))
        session.commit()
        stopped = stopped or {}
        LOG.info(
            "model ready",
            extra={
                "event": "model_ready",
                "model": model.id,
                "version": model.version,
                "adopted": adopted,
                "stopped": stopped.get("reason"),
                "iteration": stopped.get("iteration"),
                "validation_mm": stopped.get("validation_mm"),
                "validated": model.validated,
                "initial_mtre_median_mm": validation.get("initial_mtre_median_mm"),
                "refined_under_2mm": validation.get("refined_under_2mm"),
            },
        )
        return validation

    def _check_model(self, checkpoint: Path, volume_path: Path, seed: int, device: str) -> dict:
        """The model's figures on held-out realistic X-rays of its CT (see model_check)."""
        from xvr_node.ct_volume import CtVolume
        from xvr_node.jobs.model_check import check_model
        from xvr_node.xvr.initialize import ModelInitializer

        settings = self.settings.training.model_check
        try:
            initializer = ModelInitializer(checkpoint, device)
            return check_model(
                initializer, CtVolume.from_nifti(volume_path), settings, seed, device
            )
        except (OSError, ValueError) as error:  # recorded: such a model is never used
            LOG.warning("model check failed: %s", error, extra={"event": "model_check_failed"})
            return {"passes": False, "error": str(error)}

    def _training_budget(self, context: JobContext) -> float | None:
        """Seconds this finetune may train: ``urgent_budget_minutes`` for an urgent job, else
        what is left of the overnight window (None: it never closes).

        A job with less than ``min_budget_minutes`` left is not started: it is given back to
        resume when the window next opens.
        """
        training, scheduler = self.settings.training, self.settings.scheduler
        job = context.session.get(Job, context.job_id)
        if job is not None and job.urgent:
            return training.urgent_budget_minutes * 60.0
        now = context.now().astimezone(scheduler.zone)
        left = scheduler.overnight_window.seconds_left(now)
        if left is not None and left < training.min_budget_minutes * 60.0:
            resume = scheduler.overnight_window.next_start(now)
            raise JobYielded(
                f"{left / 60:.0f} min left in the overnight window, under "
                f"training.min_budget_minutes ({training.min_budget_minutes:g}); "
                f"resumes when it opens",
                resume_at=resume.astimezone(UTC),
            )
        return left

    def _model_row(self, context: JobContext, volume: Volume) -> PoseModel:
        """The model this job trains: made on the first attempt, reused when resuming."""
        session = context.session
        model_id = context.payload.get("model_id")
        if model_id is not None and (model := session.get(PoseModel, model_id)) is not None:
            return model
        from xvr_node.xvr.checkpoint import Conventions

        base = self._base_model(context)
        training = self.settings.training.for_device(context.device, finetune=base is not None)
        version = 1 + max(
            session.scalars(
                select(PoseModel.version).where(PoseModel.patient_id == volume.patient_id)
            ).all(),
            default=0,
        )
        model = PoseModel(
            patient_id=volume.patient_id,
            volume_id=volume.id,
            base_model_id=None if base is None else base.id,
            version=version,
            path=str(PurePosixPath(MODELS_DIR, f"patient-{volume.patient_id}", f"v{version}")),
            config=training.model_dump(mode="json"),
            conventions=Conventions.from_settings(training).to_json(),
            state=ModelState.TRAINING,
        )
        session.add(model)
        session.flush()
        job = session.get(Job, context.job_id)
        job.payload = {**job.payload, "model_id": model.id}
        context.payload["model_id"] = model.id
        session.commit()
        return model

    def _base_model(self, context: JobContext) -> PoseModel | None:
        """The configured base model as a catalog row (made once per path)."""
        configured = self.settings.training.base_model
        if configured is None:
            return None
        path = Path(configured).resolve()
        if not path.is_file():
            raise PermanentJobError(f"training.base_model {path} does not exist")
        session = context.session
        row = session.scalars(
            select(PoseModel).where(PoseModel.patient_id.is_(None), PoseModel.path == str(path))
        ).first()
        if row is None:
            from xvr_node.xvr.checkpoint import load_checkpoint

            state = load_checkpoint(path)
            row = PoseModel(
                path=str(path),
                config=state.settings.model_dump(mode="json"),
                conventions=state.conventions.to_json(),
                state=ModelState.READY,
            )
            session.add(row)
            session.flush()
        return row

    # --- register ------------------------------------------------------------------------

    def register(self, context: JobContext) -> dict[str, Any]:
        session = context.session
        instance_id = context.payload["instance_id"]
        instance = session.get(Instance, instance_id)
        if instance is None:
            raise PermanentJobError(f"instance {instance_id} is not in the catalog")
        if instance.usability != Usability.USABLE or instance.linked_volume is None:
            raise PermanentJobError(
                f"instance {instance_id} is {instance.usability}"
                + (f": {instance.unusable_reason}" if instance.unusable_reason else "")
            )
        volume = instance.linked_volume
        model, model_id = self._start_model(context, volume)
        policy = StartPolicy.from_settings(self.settings.registration, model, model_id)
        with self._volume_lock(volume.id):
            rows = register_instance(
                session, self.registrars, instance_id, policy, job_id=context.job_id
            )
        queue_export(session, instance_id, [row.id for row in rows])
        session.commit()
        timings = [row.metrics["timings"] for row in rows]
        return {
            "registrations": [row.id for row in rows],
            "initializers": sorted({str(row.initializer) for row in rows}),
            "model_id": model_id,
            "timings": {key: round(sum(t[key] for t in timings), 4) for key in timings[0]},
        }

    def _start_model(self, context: JobContext, volume: Volume) -> tuple[Any, int | None]:
        """The patient's finetuned model for this CT, else the base model, else none.

        An X-ray for a patient without a model also makes that patient's finetune urgent.
        """
        if "model" not in self.settings.registration.initializers:
            return None, None
        session = context.session
        row = ready_model(session, volume.id)
        if row is not None and not self._usable(row):
            row = None
        if row is None:
            training = self.settings.training
            if training.finetune_immediately_when_xray_waiting:
                queue_finetune(session, volume, urgent=True)
                session.commit()
            row = self._base_model(context) if training.base_model is not None else None
            if row is not None and not self._usable(row):
                row = None
        if row is None:
            return None, None
        path = Path(row.path) if row.patient_id is None else self.store.root / row.path
        with self._lock:
            if row.id not in self._initializers:
                from xvr_node.xvr.initialize import ModelInitializer

                try:
                    self._initializers[row.id] = ModelInitializer(path, context.device)
                except (OSError, ValueError) as error:
                    LOG.warning(
                        "model unusable as initializer: %s",
                        error,
                        extra={"event": "model_unusable", "model": row.id},
                    )
                    self._initializers[row.id] = None
            initializer = self._initializers[row.id]
        return (initializer, row.id) if initializer is not None else (None, None)

    def _usable(self, row: PoseModel) -> bool:
        """A model starts registrations only when its held-out figures pass the bar (unless
        ``training.model_check.required`` is off)."""
        if row.validated or not self.settings.training.model_check.required:
            return True
        LOG.info(
            "model not used as initializer: %s",
            "not validated" if row.validation is None else "held-out figures below the bar",
            extra={"event": "model_not_validated", "model": row.id},
        )
        return False

    def _volume_lock(self, volume_id: int) -> threading.Lock:
        with self._lock:
            return self._volume_locks.setdefault(volume_id, threading.Lock())

    # --- export --------------------------------------------------------------------------

    def export(self, context: JobContext) -> dict[str, Any]:
        """Build the results and queue them for every PACS (``deliver`` jobs send them).

        A whole image gets SRO, SR and SC of its pose; a cine run gets one SRO, one SR and one
        multi-frame SC for all its frames (issue 14 item 11: not three objects per frame).
        Per-frame results stay in the catalog; a run's objects are linked to its first frame.
        """
        session = context.session
        instance = session.get(Instance, context.payload["instance_id"])
        if instance is None:
            raise PermanentJobError(f"instance {context.payload['instance_id']} is gone")
        rows = session.scalars(
            select(Registration)
            .where(Registration.id.in_(context.payload["registration_ids"]))
            .order_by(Registration.id)
        ).all()
        xray = pydicom.dcmread(self.store.absolute(instance.path))
        volume = instance.linked_volume
        ct_headers = self._ct_headers(volume)
        geometry = instance.geometry or {}
        xray_flags = {
            "mirrored": bool(geometry.get("mirrored", False)),
            "rows_reversed": bool(geometry.get("rows_reversed", False)),
            "pixel_spacing_estimated": bool(geometry.get("pixel_spacing_estimated", False)),
        }
        series = {
            kind: generate_uid(entropy_srcs=[instance.sop_instance_uid, kind, str(rows[0].id)])
            for kind in ("sro", "sr", "sc")
        }
        frames = sorted((row for row in rows if row.frame_index is not None), key=_frame_number)
        batches = [([row], self._result_objects) for row in rows if row.frame_index is None]
        if frames:
            batches.append((frames, self._run_objects))
        built = withheld = 0
        exports: list[Any] = []
        for batch, build in batches:
            objects, left_out = build(xray, ct_headers, batch, volume, xray_flags, series)
            built += len(objects)
            withheld += left_out
            exports += store_result_objects(
                session, self.store, objects, self.settings.destinations, batch[0].id
            )
        return {
            "registrations": len(rows),
            "objects": built,
            "kinds": sorted({row.object_kind for row in exports}),
            "withheld_from_sro": withheld,
            "queued": len(exports),
        }

    def _ct_headers(self, volume: Volume) -> list[Dataset]:
        """The CT slices' headers, read once per volume (every X-ray's SRO lists them)."""
        with self._lock:
            if volume.id not in self._ct_header_cache:
                self._ct_header_cache[volume.id] = [
                    pydicom.dcmread(self.store.absolute(ct.path), stop_before_pixels=True)
                    for ct in latest_versions(volume.series.instances)
                ]
            return self._ct_header_cache[volume.id]

    def _result_objects(
        self,
        xray: Dataset,
        ct_headers: list[Dataset],
        rows: list[Registration],
        volume: Volume,
        xray_flags: dict[str, bool],
        series: dict[str, str],
    ) -> tuple[list[tuple[str, Dataset]], int]:
        """SR and overlay SC of a whole image's pose, and its SRO unless the gate found it
        unreliable; with the number of poses left out of an SRO (0 or 1).

        An unreliable result's SRO is withheld (``registration.send_unreliable`` sends it
        anyway): a viewer would apply it silently, where SR and overlay say what it is worth.
        """
        (row,) = rows
        result = self._result(row, xray_flags)
        objects: list[tuple[str, Dataset]] = []
        sro = None
        if self._sro_may_hold(row):
            sro = build_spatial_registration(
                xray, ct_headers, result, series_instance_uid=series["sro"], instance_number=1
            )
            objects.append(("sro", sro))
        else:
            self._log_withheld(row)
        sr = build_measurement_report(
            xray, sro, result, series_instance_uid=series["sr"], instance_number=1
        )
        rgb = self._overlay_picture(xray, xray.pixel_array, result, volume)
        sc = build_overlay(xray, rgb, result, series_instance_uid=series["sc"], instance_number=1)
        return [*objects, ("sr", sr), ("sc", sc)], 0 if sro is not None else 1

    def _run_objects(
        self,
        xray: Dataset,
        ct_headers: list[Dataset],
        rows: list[Registration],
        volume: Volume,
        xray_flags: dict[str, bool],
        series: dict[str, str],
    ) -> tuple[list[tuple[str, Dataset]], int]:
        """One SRO, SR and multi-frame SC for a cine run's frame poses, in frame order.

        The SRO holds only the frames the gate did not find unreliable (all of them with
        ``registration.send_unreliable``) and is not written when none remain; the SR and
        the overlay cover every frame, each frame with its own verdict.
        """
        results = [self._result(row, xray_flags) for row in rows]
        kept = [
            result for row, result in zip(rows, results, strict=True) if self._sro_may_hold(row)
        ]
        for row in rows:
            if not self._sro_may_hold(row):
                self._log_withheld(row)
        objects: list[tuple[str, Dataset]] = []
        sro = None
        if kept:
            sro = build_run_registration(
                xray, ct_headers, kept, series_instance_uid=series["sro"], instance_number=1
            )
            objects.append(("sro", sro))
        sr = build_run_report(xray, sro, results, series_instance_uid=series["sr"])
        stack = xray.pixel_array
        pictures = np.stack(
            [
                self._overlay_picture(xray, stack[_frame_number(row) - 1], result, volume)
                for row, result in zip(rows, results, strict=True)
            ]
        )
        sc = build_run_overlay(xray, pictures, results, series_instance_uid=series["sc"])
        return [*objects, ("sr", sr), ("sc", sc)], len(rows) - len(kept)

    def _sro_may_hold(self, row: Registration) -> bool:
        """The quality gate's word on the SRO: not for a result found unreliable."""
        return row.reliable is not False or self.settings.registration.send_unreliable

    @staticmethod
    def _log_withheld(row: Registration) -> None:
        LOG.warning(
            "unreliable result: no SRO sent",
            extra={
                "event": "sro_withheld",
                "registration": row.id,
                "frame_index": row.frame_index,
                "reasons": (row.metrics or {}).get("quality", {}).get("reasons"),
            },
        )

    def _result(self, row: Registration, xray_flags: dict[str, bool]) -> RegistrationResult:
        """The catalog row as the builders' :class:`RegistrationResult`."""
        model_label = None
        if row.model is not None:
            model_label = f"model {row.model.id} v{row.model.version}"
        quality = (row.metrics or {}).get("quality", {})
        return RegistrationResult(
            matrix=np.asarray(row.final_matrix),
            intrinsics=Intrinsics.from_json(row.intrinsics),
            similarity=float(row.similarity or 0.0),
            iterations=int(row.iterations or 0),
            wall_time_s=float(row.wall_time_s or 0.0),
            initializer=str(row.initializer),
            model_id=model_label,
            software_version=__version__,
            frame_numbers=None if row.frame_index is None else [_frame_number(row)],
            **xray_flags,
            reliable=row.reliable,
            confidence=row.confidence,
            quality_reasons=list(quality.get("reasons", [])),
        )

    def _overlay_picture(
        self, xray: Dataset, pixels: np.ndarray, result: RegistrationResult, volume: Volume
    ) -> np.ndarray:
        """One frame's RGB overlay: its pixels, the CT's contours at its pose, its verdict."""
        from xvr_node.xvr.visualize import anatomy_contours

        registrar = self.registrars.for_volume(volume)
        contours = anatomy_contours(
            result.intrinsics, registrar.volume, result.matrix, device=self.device
        )
        view = field_of_view(xray, pixels)
        field = view.outline()
        if result.mirrored:  # the image plane's columns run the other way in the stored pixels
            contours = {name: mask[:, ::-1] for name, mask in contours.items()}
        if result.rows_reversed:  # Field of View Rotation 180: rows too
            contours = {name: mask[::-1, :] for name, mask in contours.items()}
        # Contours only where the X-ray shows anything: lines over a shutter only confuse.
        contours = {name: mask & view.mask for name, mask in contours.items()}
        return compose_overlay(
            pixels, contours, overlay_legend(result), field_outline=field, reliable=result.reliable
        )


def _frame_number(row: Registration) -> int:
    """The 1-based frame of a run's result (Referenced Frame Number)."""
    return (row.frame_index or 0) + 1
