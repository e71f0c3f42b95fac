"""Job benchmarks: X-ray latency through the pipeline, and queue throughput on PostgreSQL.

    .venv/bin/python bench/jobs.py latency [--xrays 8] [--out bench/results]
    .venv/bin/python bench/jobs.py latency --phantom DIR [--set SECTION__KEY=VALUE ...]
    .venv/bin/python bench/jobs.py latency --xrays 10 --size 128 --repeat 20   # memory
    .venv/bin/python bench/jobs.py queue [--jobs 400] [--workers 1,2,4]
    .venv/bin/python bench/jobs.py startup [--repeat 5]
    .venv/bin/python bench/jobs.py pickup [--jobs 40]
    .venv/bin/python bench/jobs.py deliver [--jobs 240] [--repeat 3]

``latency``: a node (embedded PostgreSQL, in-process worker, defaults but for 192-pixel
scales) holds an assembled phantom CT; each X-ray is sent by C-STORE on its own association,
and the time from the C-STORE response (the last byte acknowledged) to the committed
registration is split into queue wait, read, initialise (multi-start scoring) and refine,
from the job and registration rows. ``--phantom`` sends the X-rays of a phantom built elsewhere (say
``bench/robustness.py``'s realistic 512-pixel patients) with the default levels instead.

``startup``: ``xvr-node serve`` on the embedded default catalog: the first ``db upgrade``
(initialises the cluster), then the time from launch to listening, and from SIGTERM to exit
(the node stops its catalog server; checked), ``--repeat`` times.

``pickup``: an idle ``xvr-node worker`` process with the default settings; one no-op job at
a time is committed (as the receiver commits a register job with its X-ray), and the time
from that commit to the job's start is read from the job row (one clock, one machine).

``deliver``: N result-sized objects (512 x 512 Secondary Captures, 256 KiB) stored in the
outbox for a real Orthanc on loopback; objects/s of one delivery run (one sender, answers
committed one by one), ``--repeat`` times, each into a fresh Orthanc.

``queue``: N no-op jobs, drained by 1, 2 and 4 ``xvr-node worker`` processes sharing a
throw-away PostgreSQL; jobs/s from the first claim to the last completion.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE
from scratch import scratch_folder  # bench/, beside this script
from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xvr_node.catalog.db import make_engine, session_factory, upgrade  # noqa: E402
from xvr_node.catalog.embedded import catalog_server  # noqa: E402
from xvr_node.catalog.models import Job, JobKind, JobStatus, Registration  # noqa: E402
from xvr_node.config import load_settings  # noqa: E402
from xvr_node.dicom.receive import STORAGE_SOP_CLASSES  # noqa: E402
from xvr_node.jobs import queue  # noqa: E402
from xvr_node.local_pacs import free_port  # noqa: E402
from xvr_node.node import Node  # noqa: E402
from xvr_node.phantom import PhantomSpec, build_phantom  # noqa: E402


def send(port: int, files: list[Path] | list[Dataset]) -> float:
    """C-STORE on one association; the monotonic time the last response arrived."""
    ae = AE(ae_title="BENCHCARM")
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", port, ae_title="XVRNODE")
    try:
        for file in files:
            dataset = file if isinstance(file, Dataset) else dcmread(file)
            status = assoc.send_c_store(dataset).Status
            if status != 0:
                raise RuntimeError(f"{file}: status 0x{status:04X}")
        return time.monotonic()
    finally:
        assoc.release()


def latency(args: argparse.Namespace) -> dict:
    work = scratch_folder("xvr-bench-jobs-")
    phantom = args.phantom or work / "phantom"
    if args.phantom is None:
        spec = PhantomSpec(
            seed=4, frames=args.xrays, columns=args.size, rows=args.size, multiframe=0, bead=True
        )
        build_phantom(phantom, spec)
    environ = {
        "XVR_NODE__STORAGE__ROOT": str(work / "store"),
        "XVR_NODE__NODE__PORT": str(free_port()),
        "XVR_NODE__MONITORING__ENABLED": "false",
        "XVR_NODE__SCHEDULER__STABLE_SERIES_SECONDS": "1",
        "XVR_NODE__SCHEDULER__POLL_INTERVAL_S": "0.05",
        "XVR_NODE__REGISTRATION__SCALES": "[4, 2]",
        # No finetune in the way: the window never opens during the run.
        "XVR_NODE__SCHEDULER__OVERNIGHT_WINDOW": "{start: '00:00', end: '00:01'}",
        "XVR_NODE__TRAINING__FINETUNE_IMMEDIATELY_WHEN_XRAY_WAITING": "false",
    }
    if args.phantom is not None:
        del environ["XVR_NODE__REGISTRATION__SCALES"]  # the default levels
    for item in args.set:
        key, _, value = item.partition("=")
        environ[f"XVR_NODE__{key.upper()}"] = value
    settings = load_settings(None, environ=environ)
    settings.ensure_storage_root()
    holds = ExitStack()  # the catalog stays up after the node stops, for the last reads
    upgrade(holds.enter_context(catalog_server(settings.database.url, settings.storage_root)))
    node = Node(settings)
    node.start()
    sessions = node.receiver.sessions
    rows = []
    try:
        send(settings.node.port, sorted((phantom / "ct").glob("*.dcm")))
        while True:
            with sessions() as session:
                done = session.scalar(
                    select(func.count(Job.id)).where(
                        Job.kind == JobKind.ASSEMBLE, Job.status == JobStatus.SUCCEEDED
                    )
                )
            if done:
                break
            time.sleep(0.1)
        files = sorted((phantom / "xray").glob("*.dcm"))[: args.xrays] * args.repeat
        for number, file in enumerate(files):
            dataset = dcmread(file)
            if number >= args.xrays:  # a repeat: the same image as a new instance
                dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = (
                    generate_uid()
                )
            acknowledged = send(settings.node.port, [dataset])
            sop = str(dataset.SOPInstanceUID)
            while True:
                with sessions() as session:
                    registration = session.scalars(
                        select(Registration)
                        .join(Registration.instance)
                        .where(Registration.instance.has(sop_instance_uid=sop))
                    ).first()
                    if registration is not None:
                        seen = time.monotonic()
                        job = session.get(Job, registration.job_id)
                        queued_s = (job.started_at - job.created_at).total_seconds()
                        timings = registration.metrics["timings"]
                        break
                time.sleep(0.02)
            # Let the export of this X-ray finish before the next one arrives.
            while True:
                with sessions() as session:
                    busy = session.scalar(
                        select(func.count(Job.id)).where(
                            Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
                            Job.kind != JobKind.FINETUNE,
                        )
                    )
                if not busy:
                    break
                time.sleep(0.05)
            row = {
                "xray": file.name,
                "rss_mb": resident_mb(),
                "total_s": round(seen - acknowledged, 3),
                "queue_wait_s": round(queued_s, 3),
                **{k: round(v, 3) for k, v in timings.items()},
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        node.stop()
        holds.close()
    summary = {
        key: round(float(np.median([r[key] for r in rows])), 3)
        for key in ("total_s", "queue_wait_s", "read_s", "initialise_s", "refine_s", "gate_s")
    }
    rss = [r["rss_mb"] for r in rows]
    tail = rss[len(rss) // 4 :]  # after the first quarter: caches and allocator warmed up
    memory = {
        "rss_mb_first": rss[0],
        "rss_mb_last": rss[-1],
        "rss_mb_peak": peak_resident_mb(),
        # Growth per 100 X-rays after warm-up (least squares): a leak shows as a steady rise.
        "rss_mb_per_100_xrays": round(float(np.polyfit(range(len(tail)), tail, 1)[0] * 100), 2)
        if len(tail) > 2
        else None,
    }
    return {"xrays": len(rows), "median": summary, "memory": memory, "rows": rows}


def resident_mb() -> float:
    """This process's resident memory now (the node and its worker run in it)."""
    return _status_mb("VmRSS")


def peak_resident_mb() -> float:
    return _status_mb("VmHWM")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def queue_throughput(args: argparse.Namespace) -> dict:
    from tests.support.postgres import new_postgres_database, running_postgres

    results = {}
    with running_postgres() as server:
        for count in (int(c) for c in args.workers.split(",")):
            with new_postgres_database(server) as url:
                upgrade(url)
                engine = make_engine(url)
                sessions = session_factory(engine)
                with sessions() as session:
                    for _ in range(args.jobs):
                        queue.enqueue(session, JobKind.NOOP, {"seconds": 0.0})
                    session.commit()
                env = {k: v for k, v in os.environ.items() if not k.startswith("XVR_NODE")}
                env |= {
                    "XVR_NODE__DATABASE__URL": url,
                    "XVR_NODE__STORAGE__ROOT": str(scratch_folder("xvr-bench-queue-")),
                    "XVR_NODE__WORKER__DEVICE": "cpu",
                    "XVR_NODE__SCHEDULER__POLL_INTERVAL_S": "0.05",
                }
                workers = [
                    subprocess.Popen(
                        [sys.executable, "-m", "xvr_node", "worker", "--kind", "noop"],
                        env=env,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    for _ in range(count)
                ]
                while True:
                    with sessions() as session:
                        if queue.counts_by_status(session) == {"succeeded": args.jobs}:
                            first, last = session.execute(
                                select(func.min(Job.started_at), func.max(Job.finished_at))
                            ).one()
                            break
                    time.sleep(0.2)
                for worker in workers:
                    worker.send_signal(signal.SIGTERM)
                for worker in workers:
                    worker.wait(timeout=60)
                engine.dispose()
                seconds = (last - first).total_seconds()
                results[count] = {"jobs": args.jobs, "seconds": round(seconds, 2)}
                results[count]["jobs_per_s"] = round(args.jobs / seconds, 1)
                print(count, "worker(s):", json.dumps(results[count]), flush=True)
    return results


def pickup(args: argparse.Namespace) -> dict:
    """Commit of a job → its start, with a worker idle (LISTEN/NOTIFY, polling as fallback)."""
    from tests.support.postgres import new_postgres_database, running_postgres

    waits = []
    with running_postgres() as server, new_postgres_database(server) as url:
        upgrade(url)
        engine = make_engine(url)
        sessions = session_factory(engine)
        env = {k: v for k, v in os.environ.items() if not k.startswith("XVR_NODE")}
        env |= {
            "XVR_NODE__DATABASE__URL": url,
            "XVR_NODE__STORAGE__ROOT": str(scratch_folder("xvr-bench-pickup-")),
            "XVR_NODE__WORKER__DEVICE": "cpu",
        }
        worker = subprocess.Popen(
            [sys.executable, "-m", "xvr_node", "worker", "--kind", "noop"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(10)  # imports, then the worker listens
        rng = np.random.default_rng(0)
        for _ in range(args.jobs):
            time.sleep(float(rng.uniform(0.2, 1.0)))  # the worker is idle when a job comes
            with sessions() as session:
                job = queue.enqueue(session, JobKind.NOOP, {"seconds": 0.0})
                committed = datetime.now(UTC)  # just before the commit: errs on the long side
                session.commit()
                job_id = job.id
            while True:
                with sessions() as session:
                    started = session.get(Job, job_id).started_at
                if started is not None:
                    break
                time.sleep(0.005)
            waits.append((started - committed).total_seconds())
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
        engine.dispose()
    milliseconds = np.array(waits) * 1000
    return {
        "jobs": args.jobs,
        "pickup_ms": {
            "median": round(float(np.median(milliseconds)), 1),
            "p95": round(float(np.percentile(milliseconds, 95)), 1),
            "max": round(float(milliseconds.max()), 1),
        },
    }


def startup(args: argparse.Namespace) -> dict:
    """``serve`` on the embedded default: first initialisation, then start-ups and stops."""
    from xvr_node.catalog.embedded import EmbeddedCluster

    work = scratch_folder("xvr-bench-startup-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("XVR_NODE")}
    env |= {
        "XVR_NODE__STORAGE__ROOT": str(work / "store"),
        "XVR_NODE__NODE__PORT": str(free_port()),
        "XVR_NODE__MONITORING__ENABLED": "false",
        "XVR_NODE__WORKER__DEVICE": "cpu",
        "PYTHONUNBUFFERED": "1",
    }
    command = [sys.executable, "-m", "xvr_node"]
    began = time.monotonic()
    subprocess.run([*command, "db", "upgrade"], env=env, check=True, capture_output=True)
    first = time.monotonic() - began
    starts, ready, stops = [], [], []
    for _ in range(args.repeat):
        began = time.monotonic()
        node = subprocess.Popen(
            [*command, "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        assert node.stdout is not None
        for line in node.stdout:
            if "event=listening" in line:
                break
        else:
            raise RuntimeError(f"serve exited with {node.wait()} before listening")
        starts.append(time.monotonic() - began)
        for line in node.stdout:  # the registration stack loads behind the listener
            if "event=workers_ready" in line:
                break
        ready.append(time.monotonic() - began)
        began = time.monotonic()
        node.send_signal(signal.SIGTERM)
        node.communicate(timeout=120)
        stops.append(time.monotonic() - began)
        if EmbeddedCluster(work / "store").is_running():
            raise RuntimeError("serve stopped but left its catalog server running")
        last = {"start_s": starts[-1], "workers_ready_s": ready[-1], "stop_s": stops[-1]}
        print(json.dumps({key: round(value, 2) for key, value in last.items()}))
    return {
        "db_upgrade_first_s": round(first, 2),
        "serve_to_listening_s": {
            "median": round(float(np.median(starts)), 2),
            "max": round(max(starts), 2),
        },
        "serve_to_workers_ready_s": {
            "median": round(float(np.median(ready)), 2),
            "max": round(max(ready), 2),
        },
        "serve_stop_s": {"median": round(float(np.median(stops)), 2), "max": round(max(stops), 2)},
        "repeat": args.repeat,
    }


def deliver_rate(args: argparse.Namespace) -> dict:
    """Objects/s of one delivery run to Orthanc on loopback (the node's embedded catalog)."""
    from tests.support.orthanc import running_orthanc
    from tests.support.outbox import noise_captures
    from xvr_node.config import Destination
    from xvr_node.dicom.storage import FileStore
    from xvr_node.jobs.export import deliver, store_result_objects

    runs = []
    for run in range(args.repeat):
        root = scratch_folder("xvr-bench-deliver-", under="/tmp")
        # The embedded default as a node runs it (fsync on): every answer is one commit.
        with catalog_server(None, root / "store") as url, running_orthanc(root / "pacs") as pacs:
            upgrade(url)
            destination = Destination(
                name="pacs", ae_title=pacs.aet, host="127.0.0.1", port=pacs.dicom_port
            )
            settings = load_settings(
                None,
                environ={
                    "XVR_NODE__STORAGE__ROOT": str(root / "store"),
                    "XVR_NODE__DESTINATIONS": json.dumps([destination.model_dump(mode="json")]),
                },
            )
            engine = make_engine(url)
            store = FileStore(root / "store")
            with session_factory(engine)() as session:
                objects = noise_captures(args.jobs, seed=run)
                store_result_objects(session, store, objects, [destination])
                began = time.perf_counter()
                summary = deliver(session, store, settings, "pacs", datetime.now(UTC))
                seconds = time.perf_counter() - began
            engine.dispose()
            assert summary["sent"] == args.jobs, summary
            assert int(pacs.rest("/statistics")["CountInstances"]) == args.jobs
        runs.append(round(args.jobs / seconds, 1))
        print(f"run {run + 1}: {args.jobs} objects in {seconds:.2f} s", flush=True)
    return {"objects": args.jobs, "objects_per_s": runs, "median": float(np.median(runs))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["latency", "queue", "startup", "pickup", "deliver"])
    parser.add_argument("--xrays", type=int, default=8)
    parser.add_argument("--phantom", type=Path, help="send this phantom's CT and X-rays")
    parser.add_argument("--size", type=int, default=192, help="pixels of the built phantom")
    parser.add_argument(
        "--repeat", type=int, default=1, help="send the X-rays this many times (new UIDs)"
    )
    parser.add_argument("--set", action="append", default=[], metavar="SECTION__KEY=VALUE")
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    run = {
        "latency": latency,
        "queue": queue_throughput,
        "startup": startup,
        "pickup": pickup,
        "deliver": deliver_rate,
    }[args.what]
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"jobs-{args.what}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
