"""Workers: outcomes recorded, the worker outlives every failure, finetunes yield and resume."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from sqlalchemy import select

from tests.support.postgres import make_due
from tests.support.training import TINY_TRAINING, environment
from xvr_node import clock
from xvr_node.catalog.db import make_engine, session_factory
from xvr_node.catalog.models import Job, JobKind, JobStatus, ModelState, PoseModel, Registration
from xvr_node.cli import cli
from xvr_node.config import load_settings
from xvr_node.jobs import queue
from xvr_node.jobs.assemble import queue_stable_series
from xvr_node.jobs.pipeline import Pipeline
from xvr_node.jobs.worker import PermanentJobError, Worker
from xvr_node.monitor import collect_metrics
from xvr_node.node import make_receiver
from xvr_node.status import collect_status, format_status

NOON = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
NIGHT = datetime(2026, 11, 24, 23, 0, tzinfo=UTC)  # inside the default overnight window


@pytest.fixture(autouse=True)
def node_clock_at_noon():
    """What the node stamps (enqueue, receive) happens at NOON, on any day the test runs."""
    with clock.pinned(NOON):
        yield


def settings_for(tmp_path, **overrides: str):
    environ = {"XVR_NODE__STORAGE__ROOT": str(tmp_path / "store")}
    environ |= environment(overrides)
    return load_settings(None, environ=environ)


@pytest.fixture
def catalog(tmp_path, hold_catalog):
    settings = settings_for(tmp_path)
    engine = make_engine(hold_catalog(settings))
    yield settings, session_factory(engine)
    engine.dispose()


def test_every_outcome_is_recorded_and_the_worker_lives_on(catalog):
    settings, sessions = catalog

    def boom(context):
        raise RuntimeError("renderer exploded")

    def bad_input(context):
        raise PermanentJobError("instance 7 is not an X-ray")

    def out_of_memory(context):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    handlers = {
        "register": boom,
        "export": bad_input,
        "assemble": out_of_memory,
        "noop": lambda context: {"echo": context.payload["n"]},
    }
    with sessions() as session:
        ids = {
            kind: queue.enqueue(session, kind, {"n": 1}).id
            for kind in ("register", "export", "assemble", "noop")
        }
        session.commit()
    worker = Worker(settings, sessions, handlers, worker_id="w", clock=lambda: NOON, device="cpu")
    ran = [worker.run_one() for _ in range(5)]
    assert ran == [ids["register"], ids["export"], ids["assemble"], ids["noop"], None]
    with sessions() as session:
        jobs = {job.kind: job for job in session.scalars(select(Job))}
    retrying = jobs["register"]
    assert (retrying.status, retrying.attempts) == ("queued", 1)
    assert retrying.error == "RuntimeError: renderer exploded"
    assert retrying.next_attempt_at == NOON + timedelta(seconds=30)  # backing off
    assert (jobs["export"].status, jobs["export"].error) == ("failed", "instance 7 is not an X-ray")
    oom = jobs["assemble"]
    assert oom.status == "queued" and oom.error.startswith("GPU out of memory on cpu")
    assert "training.batch_size" in oom.error
    assert jobs["noop"].status == "succeeded" and jobs["noop"].result["echo"] == 1


def test_the_window_is_kept_in_the_hospital_time_zone(tmp_path, hold_catalog):
    settings = settings_for(
        tmp_path,
        scheduler__timezone="Europe/Berlin",
        scheduler__overnight_window='{start: "20:00", end: "06:00"}',
    )
    engine = make_engine(hold_catalog(settings))
    sessions = session_factory(engine)
    evening = datetime(2026, 11, 24, 18, 30, tzinfo=UTC)  # 19:30 in Berlin (CET)
    night = datetime(2026, 11, 24, 19, 30, tzinfo=UTC)  # 20:30 in Berlin
    now = [evening]
    worker = Worker(
        settings, sessions, {"finetune": lambda c: None}, clock=lambda: now[0], device="cpu"
    )
    assert not worker.window_open(evening) and worker.window_open(night)
    with sessions() as session:
        waits = queue.enqueue(session, JobKind.FINETUNE, {}).id
        session.commit()
    assert worker.run_one() is None  # outside the window a finetune waits ...
    with sessions() as session:
        urgent = queue.enqueue(session, JobKind.FINETUNE, {}, urgent=True).id
        session.commit()
    assert worker.run_one() == urgent  # ... unless urgent
    now[0] = night
    assert worker.run_one() is None  # the engine waits half an hour for 20:00 in Berlin
    make_due(sessions)
    assert worker.run_one() == waits
    engine.dispose()


# --- preemption and shutdown, on a real finetune ------------------------------------------

FINETUNE = {
    **TINY_TRAINING,
    "training__iterations": "8",
    "training__checkpoint_every": "1000",
    "worker__heartbeat_seconds": "1",
}


def assembled_ct(hold_catalog, tmp_path, small_phantom, clock, **overrides: str):
    """The phantom's CT received and assembled through a worker (its finetune is queued):
    settings, receiver, store, pipeline and that worker."""
    settings = settings_for(tmp_path, **{**FINETUNE, **overrides})
    hold_catalog(settings)
    receiver, store = make_receiver(settings)
    for file in sorted((small_phantom / "ct").glob("*.dcm")):
        assert receiver.receive(file.read_bytes(), calling_ae="PACS").ok
    with receiver.sessions() as session:
        queue_stable_series(session, NIGHT + timedelta(minutes=1), 30.0)
    pipeline = Pipeline(settings, store, "cpu")
    worker = Worker(settings, receiver.sessions, pipeline.handlers(), clock=clock, device="cpu")
    assert worker.run_one() is not None  # assemble
    return settings, receiver, store, pipeline, worker


@pytest.fixture
def finetune_ready(tmp_path, small_phantom, hold_catalog):
    """A catalog whose CT is assembled (through the worker) and whose finetune is queued."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    settings, receiver, store, pipeline, _ = assembled_ct(
        hold_catalog, tmp_path, small_phantom, lambda: NIGHT
    )
    with receiver.sessions() as session:
        finetune = session.scalars(select(Job).where(Job.kind == JobKind.FINETUNE)).one()
    yield settings, receiver.sessions, store, pipeline, finetune.id
    torch.set_num_threads(threads)


def iterations_logged(store, sessions) -> list[int]:
    with sessions() as session:
        model = session.scalars(select(PoseModel)).first()
    if model is None:
        return []
    metrics = store.root / "models" / f"patient-{model.patient_id}" / "v1" / "metrics.jsonl"
    if not metrics.is_file():
        return []
    return [json.loads(line)["iteration"] for line in metrics.read_text().splitlines()]


def run_until(worker: Worker, done, timeout_s: float = 300.0) -> threading.Thread:
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return thread


@pytest.mark.trains
def test_a_register_job_preempts_a_finetune_within_one_step(finetune_ready):
    settings, sessions, store, pipeline, finetune_id = finetune_ready
    seen: dict[str, int] = {}

    def register(context):
        seen["steps_when_register_started"] = len(iterations_logged(store, sessions))
        return {}

    handlers = {**pipeline.handlers(), "register": register}
    worker = Worker(settings, sessions, handlers, clock=lambda: NIGHT, device="cpu")
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while len(iterations_logged(store, sessions)) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with sessions() as session:
        queue.enqueue(session, JobKind.REGISTER, {"instance_id": 0})
        session.commit()
    steps_at_enqueue = len(iterations_logged(store, sessions))

    def finished() -> bool:
        with sessions() as session:
            return session.get(Job, finetune_id).status == JobStatus.SUCCEEDED

    run_until(worker, finished)
    worker.stopping.set()
    thread.join(timeout=30)
    assert seen["steps_when_register_started"] - steps_at_enqueue <= 1
    # The finetune went on from its checkpoint: every step once, the same total.
    assert iterations_logged(store, sessions) == list(range(1, 9))
    with sessions() as session:
        job = session.get(Job, finetune_id)
        model = session.get(PoseModel, job.result["model_id"])
        assert (job.attempts, model.state) == (1, ModelState.READY)  # yielding is no failure
        assert model.path.endswith("checkpoints/iter_000008.pt")
        assert (store.root / model.path).is_file()


@pytest.mark.trains
def test_a_stopping_worker_requeues_its_finetune_and_another_finishes_it(finetune_ready):
    settings, sessions, store, pipeline, finetune_id = finetune_ready
    first = Worker(settings, sessions, pipeline.handlers(), clock=lambda: NIGHT, device="cpu")
    thread = run_until(first, lambda: len(iterations_logged(store, sessions)) >= 2)
    first.stopping.set()  # what SIGTERM does
    thread.join(timeout=60)
    assert not thread.is_alive()
    with sessions() as session:
        job = session.get(Job, finetune_id)
        assert job.status == JobStatus.QUEUED and job.worker is None
        assert job.error.startswith("worker stopping; checkpoint at iteration")
    stopped_at = len(iterations_logged(store, sessions))
    assert stopped_at < 8
    second = Worker(settings, sessions, pipeline.handlers(), clock=lambda: NIGHT, device="cpu")
    assert second.run_one() == finetune_id
    assert iterations_logged(store, sessions) == list(range(1, 9))
    with sessions() as session:
        assert session.get(Job, finetune_id).status == JobStatus.SUCCEEDED


@pytest.mark.trains
def test_a_finetune_that_cannot_fit_the_window_waits_for_the_next_night(finetune_ready):
    settings, sessions, _store, pipeline, finetune_id = finetune_ready
    dawn = datetime(2026, 11, 25, 5, 55, tzinfo=UTC)  # 5 minutes before the window closes
    now = [dawn]
    worker = Worker(settings, sessions, pipeline.handlers(), clock=lambda: now[0], device="cpu")
    assert worker.run_one() == finetune_id
    with sessions() as session:
        job = session.get(Job, finetune_id)
        assert job.status == JobStatus.QUEUED and job.attempts == 0
        assert "min_budget_minutes" in job.error
        assert job.next_attempt_at.replace(tzinfo=UTC) == datetime(2026, 11, 25, 20, 0, tzinfo=UTC)
        assert session.scalars(select(PoseModel)).first() is None  # nothing started
    now[0] = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    assert worker.run_one() is None  # not in the day
    now[0] = datetime(2026, 11, 25, 20, 1, tzinfo=UTC)
    make_due(sessions)  # what fourteen hours of waiting do
    assert worker.run_one() == finetune_id
    with sessions() as session:
        job = session.get(Job, finetune_id)
        assert job.status == JobStatus.SUCCEEDED
        # It trained within what was left of the night (20:01 → 06:00), and says why it stopped.
        assert job.result["stopped"]["budget_s"] == pytest.approx(9 * 3600 + 59 * 60)
        assert job.result["stopped"]["reason"] == "completed"
        assert job.result["stopped"]["iteration"] == 8


@pytest.mark.trains
def test_an_urgent_finetune_trains_within_its_own_budget(finetune_ready):
    settings, sessions, _store, pipeline, finetune_id = finetune_ready
    noon = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    with sessions() as session:
        session.get(Job, finetune_id).urgent = True
        session.commit()
    worker = Worker(settings, sessions, pipeline.handlers(), clock=lambda: noon, device="cpu")
    assert worker.run_one() == finetune_id
    with sessions() as session:
        stopped = session.get(Job, finetune_id).result["stopped"]
    assert stopped["budget_s"] == settings.training.urgent_budget_minutes * 60


@pytest.mark.trains
def test_only_a_model_that_passes_its_held_out_check_starts_registrations(finetune_ready):
    settings, sessions, _store, pipeline, finetune_id = finetune_ready
    worker = Worker(settings, sessions, pipeline.handlers(), clock=lambda: NIGHT, device="cpu")
    assert worker.run_one() == finetune_id
    with sessions() as session:
        job = session.get(Job, finetune_id)
        model = session.get(PoseModel, job.result["model_id"])
        figures = model.validation
        # Eight iterations on a tiny network: far from the bar, and so recorded.
        assert figures["views"] == 2 and figures["passes"] is False
        assert figures["initial_mtre_median_mm"] > settings.training.model_check.max_initial_mtre_mm
        assert model.validated is False and model.state == ModelState.READY
        assert job.progress["iteration"] == job.progress["total"] == 8  # its last report
        status = format_status(collect_status(session))
        assert "model v1: ready; held-out X-rays: first pose" in status
        assert "NOT used (below the bar)" in status
        metrics = collect_metrics(session)
        assert 'xvr_node_models{state="ready",validated="false"} 1' in metrics
        context = SimpleNamespace(session=session, device="cpu")
        assert pipeline._start_model(context, model.volume) == (None, None)
        model.validated = True  # as if it had passed
        session.commit()
        initializer, model_id = pipeline._start_model(context, model.volume)
        assert model_id == model.id and initializer is not None


@pytest.mark.trains
def test_a_usable_new_model_registers_earlier_xrays_again(tmp_path, small_phantom, hold_catalog):
    """X-rays registered before the model was ready are registered again with it: the new
    result supersedes the old one and is exported once."""
    _, receiver, _, _, worker = assembled_ct(
        hold_catalog,
        tmp_path,
        small_phantom,
        lambda: NIGHT,
        training__model_check__required="false",  # the tiny model is used as it is
        training__finetune_immediately_when_xray_waiting="false",
    )
    xray = small_phantom / "xray" / "IMG_000.dcm"
    assert receiver.receive(xray.read_bytes(), calling_ae="CARM").ok
    with receiver.sessions() as session:
        register = session.scalars(select(Job).where(Job.kind == JobKind.REGISTER)).one()
    assert worker.run_one() == register.id  # a clinician waits: before the finetune
    with receiver.sessions() as session:
        (first,) = session.scalars(select(Registration)).all()
        assert first.model_id is None
    done = 0
    while worker.run_one() is not None and done < 10:  # finetune, export, register, export
        done += 1
    with receiver.sessions() as session:
        rows = session.scalars(select(Registration).order_by(Registration.id)).all()
        model = session.scalars(select(PoseModel)).one()
        assert len(rows) == 2
        old, new = rows
        assert old.superseded_by_id == new.id and new.superseded_by_id is None
        assert new.model_id == model.id or new.metrics["start_scores"]
        again = session.scalars(
            select(Job).where(
                Job.dedupe_key == f"register:instance:{old.instance_id}:model:{model.id}"
            )
        ).one()
        assert again.status == JobStatus.SUCCEEDED
        exports = session.scalars(select(Job).where(Job.kind == JobKind.EXPORT)).all()
        covered = [job.payload["registration_ids"] for job in exports]
        assert sorted(covered) == [[old.id], [new.id]]  # each result exported once
        assert all(job.status == JobStatus.SUCCEEDED for job in exports)


def test_an_adopted_model_is_checked_and_replaces_the_queued_finetune(finetune_ready, tmp_path):
    """A model trained elsewhere for this CT goes through the same check as a finetuned one,
    and the night's training for that CT is no longer needed."""
    from xvr_node.catalog.models import Volume
    from xvr_node.ct_volume import CtVolume
    from xvr_node.xvr.train import train

    settings, sessions, store, pipeline, finetune_id = finetune_ready
    with sessions() as session:
        volume = session.scalars(select(Volume)).one()
        ct = CtVolume.from_nifti(store.absolute(volume.path))
        elsewhere = train([ct], settings.training, tmp_path / "elsewhere", iterations=1)
        not_a_model = tmp_path / "notes.pt"
        not_a_model.write_text("not a checkpoint")
        with pytest.raises(ValueError, match="not an xvr-node checkpoint"):
            pipeline.adopt_model(session, volume, not_a_model, NOON, note="a typo")
        assert session.scalars(select(PoseModel)).all() == []

        model = pipeline.adopt_model(session, volume, elsewhere, NOON, note="trained on a GPU")
        assert model.state == ModelState.READY and model.patient_id == volume.patient_id
        assert (store.root / model.path).is_file() and model.path.endswith("v1/adopted.pt")
        assert model.validation["adopted"] == "trained on a GPU"
        assert model.validation["views"] == 2 and "initial_mtre_median_mm" in model.validation
        assert model.validated is model.validation["passes"]
        finetune = session.get(Job, finetune_id)
        assert finetune.status == JobStatus.CANCELLED
        assert f"model {model.id} was adopted" in finetune.error
        # A newer model below the bar does not take a validated one out of service.
        model.validated = True  # as if it had passed
        session.commit()
        worse = pipeline.adopt_model(session, volume, elsewhere, NOON, note="a worse one")
        assert worse.version == 2 and worse.validated is False
        session.refresh(model)
        assert model.state == ModelState.READY  # not superseded
        context = SimpleNamespace(session=session, device="cpu")
        assert pipeline._start_model(context, volume)[1] == model.id
        assert "NOT used (below the bar)" in format_status(collect_status(session))
        volume_id = volume.id

    # The same from the command line, with its refusals in one line each.
    environ = {"XVR_NODE__STORAGE__ROOT": str(tmp_path / "store")} | environment(FINETUNE)
    runner = CliRunner()
    adopted = runner.invoke(
        cli, ["adopt", str(elsewhere), "--volume", str(volume_id), "--note", "GPU box"], env=environ
    )
    assert adopted.exit_code == 0, adopted.output
    assert "model 3 v3 (models/patient-1/v3/adopted.pt): ready; held-out X-rays" in adopted.output
    missing = runner.invoke(cli, ["adopt", str(elsewhere), "--volume", "999"], env=environ)
    assert missing.exit_code == 1 and "adopt: no volume 999" in missing.output
    wrong = runner.invoke(cli, ["adopt", str(not_a_model), "--volume", "1"], env=environ)
    assert wrong.exit_code == 1 and "not an xvr-node checkpoint" in wrong.output
    assert "Traceback" not in missing.output + wrong.output


def test_a_worker_outlives_a_catalog_outage(tmp_path, hold_catalog):
    """The engine stops when the catalog goes away; the worker starts it again after."""
    from xvr_node.catalog.embedded import EmbeddedCluster

    settings = settings_for(
        tmp_path, scheduler__poll_interval_s="0.2", worker__heartbeat_seconds="0.5"
    )
    engine = make_engine(hold_catalog(settings))
    sessions = session_factory(engine)
    ran = threading.Event()
    worker = Worker(settings, sessions, {"noop": lambda c: ran.set()}, device="cpu")
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    time.sleep(1.0)
    cluster = EmbeddedCluster(settings.storage_root)
    cluster._stop()  # the catalog's server goes down under the running worker
    time.sleep(2.0)
    cluster._start()
    engine.dispose()  # the test's own connections died with the server
    with sessions() as session:
        queue.enqueue(session, JobKind.NOOP, {})
        session.commit()
    assert ran.wait(60), "the worker did not come back after the outage"
    assert thread.is_alive()
    worker.stopping.set()
    thread.join(timeout=30)
    assert not thread.is_alive()
    engine.dispose()
