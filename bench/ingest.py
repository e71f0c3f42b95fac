"""Ingest benchmark: a 1000-instance 512x512 CT series into xvr-node, Orthanc and storescp.

Every receiver runs on this machine with an empty store for each measurement; DCMTK's
``storescu`` sends over 1 and over 4 associations. ``TCP_NODELAY=1`` is set for every DCMTK
process and for Orthanc (without it they wait on Nagle's algorithm, ~20 instances/s).
Orthanc fsyncs before it acknowledges (``SyncStorageArea``), like xvr-node; storescp does not.

    .venv/bin/python bench/ingest.py [--instances 1000] [--out bench/results]

Prints a Markdown table and writes ``ingest.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from xvr_node.local_pacs import free_port

ROOT = Path(__file__).resolve().parents[1]


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def make_series(folder: Path, count: int) -> list[Path]:
    """``count`` CT slices of 512x512 (0.5 MB each), one series, realistic attributes."""
    folder.mkdir(parents=True, exist_ok=True)
    existing = sorted(folder.glob("*.dcm"))
    if len(existing) == count:
        return existing
    for old in existing:
        old.unlink()
    rng = np.random.default_rng(0)
    base = (rng.normal(40, 300, (512, 512))).clip(-1024, 3000).astype(np.int16)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    files = []
    for k in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = (
            "Bench^CT",
            "BENCH1",
            "",
            "O",
        )
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "080000", "1", ""
        ds.ReferringPhysicianName, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = (
            "",
            "CT",
            1,
            k + 1,
        )
        ds.Manufacturer, ds.PositionReferenceIndicator = "bench", ""
        ds.ImageType, ds.KVP, ds.AcquisitionNumber = ["ORIGINAL", "PRIMARY", "AXIAL"], 120, 1
        ds.ImagePositionPatient = [-180, -180, -500 + 0.5 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 0.5
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = 512
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.roll(base, k, axis=0).tobytes()
        path = folder / f"CT{k:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def wait_listening(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


class PeakMemory(threading.Thread):
    """Samples a process's resident memory; keeps the peak and a few points on the way."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak_kib, self.samples, self.running = pid, 0, [], True

    def run(self) -> None:
        while self.running:
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1])
                        self.peak_kib = max(self.peak_kib, rss)
                        self.samples.append((time.monotonic(), rss))
            except (FileNotFoundError, ProcessLookupError):
                return
            time.sleep(0.05)


def start_xvr_node(work: Path, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XVR_NODE")}
    env.update(
        {
            "XVR_NODE__STORAGE__ROOT": str(work / "store"),
            "XVR_NODE__NODE__PORT": str(port),
            "XVR_NODE__STORAGE__MIN_FREE_BYTES": "0",
            "XVR_NODE__LOGGING__LEVEL": "WARNING",
            "XVR_NODE__NODE__MAX_ASSOCIATIONS": "16",
        }
    )
    cli = [sys.executable, "-m", "xvr_node"]
    subprocess.run([*cli, "db", "upgrade"], env=env, check=True, capture_output=True)
    log = (work / "node.log").open("w")
    process = subprocess.Popen([*cli, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=log)
    time.sleep(1.0)
    wait_listening(port)
    return process


def start_orthanc(work: Path, port: int) -> subprocess.Popen:
    config = {
        "Name": "bench",
        "StorageDirectory": str(work / "storage"),
        "IndexDirectory": str(work / "index"),
        "DicomAet": "ORTHANC",
        "DicomPort": port,
        "HttpPort": free_port(),
        "HttpServerEnabled": False,
        "RemoteAccessAllowed": False,
        "DicomCheckCalledAet": False,
        "StorageCompression": False,
        "SyncStorageArea": True,
        "Plugins": [],
        "DicomThreadsCount": 8,
        "ConcurrentJobs": 2,
    }
    (work / "orthanc.json").write_text(json.dumps(config))
    orthanc = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    process = subprocess.Popen(
        [orthanc, str(work / "orthanc.json")],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=(work / "orthanc.log").open("w"),
    )
    wait_listening(port)
    return process


def start_storescp(work: Path, port: int) -> subprocess.Popen:
    (work / "out").mkdir()
    process = subprocess.Popen(
        ["/usr/bin/storescp", "--fork", "-od", str(work / "out"), "-aet", "STORESCP", str(port)],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_listening(port)
    return process


def send(files: list[Path], port: int, called: str, associations: int) -> float:
    """Send ``files`` split over parallel storescu processes; wall-clock seconds."""
    groups = [files[i::associations] for i in range(associations)]
    started = time.monotonic()
    senders = [
        subprocess.Popen(
            [
                "/usr/bin/storescu",
                "-aet",
                "BENCH",
                "-aec",
                called,
                "127.0.0.1",
                str(port),
                *map(str, group),
            ],
            env=dcmtk_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for group in groups
    ]
    for sender in senders:
        out, _ = sender.communicate()
        if sender.returncode != 0:
            raise RuntimeError(f"storescu failed: {out[-2000:]}")
    return time.monotonic() - started


def measure(name: str, start, called: str, files: list[Path], associations: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"ingest-{name}-"))
    port = free_port()
    process = start(work, port)
    memory = PeakMemory(process.pid)
    memory.start()
    try:
        seconds = send(files, port, called, associations)
    finally:
        memory.running = False
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(work, ignore_errors=True)
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    return {
        "receiver": name,
        "associations": associations,
        "instances": len(files),
        "seconds": round(seconds, 2),
        "instances_per_s": round(len(files) / seconds, 1),
        "mb_per_s": round(megabytes / seconds, 1),
        "peak_rss_mib": round(memory.peak_kib / 1024),
        "rss_mib_samples": [
            round(s[1] / 1024) for s in memory.samples[:: max(1, len(memory.samples) // 8)]
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "xvr-bench-ct")
    args = parser.parse_args()
    files = make_series(args.data, args.instances)
    receivers = [
        ("xvr-node", start_xvr_node, "XVRNODE"),
        ("orthanc", start_orthanc, "ORTHANC"),
        ("storescp", start_storescp, "STORESCP"),
    ]
    results = []
    for associations in (1, 4):
        for name, start, called in receivers:
            result = measure(name, start, called, files, associations)
            print(json.dumps(result), flush=True)
            results.append(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ingest.json").write_text(json.dumps(results, indent=1))
    print()
    print("| receiver | associations | instances/s | MB/s | ratio to Orthanc | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for result in results:
        orthanc = next(
            r
            for r in results
            if r["receiver"] == "orthanc" and r["associations"] == result["associations"]
        )
        ratio = result["instances_per_s"] / orthanc["instances_per_s"]
        print(
            f"| {result['receiver']} | {result['associations']} | {result['instances_per_s']} | "
            f"{result['mb_per_s']} | {ratio:.2f} | {result['peak_rss_mib']} |"
        )


if __name__ == "__main__":
    main()
