"""Cine tracking benchmark: time and accuracy per tracked frame, on X-rays the node did not render.

    .venv/bin/python bench/tracking.py [--seeds 2] [--frames 8] [--size 512] [--threads 2]
        [--set SECTION__KEY=VALUE ...] [--against SECTION__KEY=VALUE ...] [--cold-before]
        [--out DIR]

Each seed is a realistic phantom patient (as ``bench/robustness.py`` builds them: independent
X-ray formation, positioning errors up to ±10° and ±30 mm) with one rotating cine run (2° of
primary angle per frame). Each run goes through what a register job does: the first frame
from multi-start, every later frame tracked from the one before (``StartPolicy.track``), the
quality gate on each. With ``--against`` the same runs are registered again with that
configuration, one run after the other in the same process (before/after, same frames);
with ``--cold-before`` the "before" runs start each tracked frame's intensity model and
whitening afresh instead of from the previous frame's outcome.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from robustness import _environment, build


def register_run(
    folder: Path, environ: dict[str, str], device: str, warm: bool = True
) -> list[dict]:
    """Every frame of the phantom's cine run, as the node registers it (``warm``: each
    tracked frame starts from the previous frame's outcome, as register jobs do)."""
    from xvr_node.config import load_settings
    from xvr_node.dicom.volume import assemble_volume, read_series_files
    from xvr_node.jobs.register import StartPolicy
    from xvr_node.xvr.metrics import mean_target_registration_error as mtre
    from xvr_node.xvr.quality import assess
    from xvr_node.xvr.register import RefineSettings, Registrar
    from xvr_node.xvr.xray import read_xray_frames

    settings = load_settings(None, environ=environ)
    truth = json.loads((folder / "truth.json").read_text())
    records = [r for r in truth["xrays"] if Path(r["file"]).name.startswith("CINE")]
    volume = assemble_volume(read_series_files(sorted((folder / "ct").glob("*.dcm")))).volume
    registrar = Registrar(
        volume, RefineSettings.from_settings(settings.registration), device=device
    )
    policy = StartPolicy.from_settings(settings.registration)
    frames = read_xray_frames(folder / records[0]["file"])
    rows, previous = [], None
    for index, (frame, record) in enumerate(zip(frames, records, strict=True)):
        true, points = np.array(record["matrix"]), np.array(record["fiducials_lps"])
        started = time.perf_counter()
        if previous is None:
            choice = policy.choose(registrar, frame)
        else:
            choice = policy.track(registrar, frame, frames[index - 1], previous.final_matrix)
        outcome = registrar.register(
            frame,
            choice.matrix,
            first_level=choice.refined_levels,
            warm=previous if warm else None,
        )
        verdict = assess(registrar, frame, outcome, choice.margin, policy.gate)
        seconds = time.perf_counter() - started
        previous = outcome
        rows.append(
            {
                "phantom": folder.name,
                "frame": index,
                "tracked": index > 0,
                "start_mtre_mm": mtre(choice.matrix, true, points),
                "final_mtre_mm": mtre(outcome.final_matrix, true, points),
                "reliable": verdict.reliable,
                "iterations": outcome.iterations,
                "seconds": seconds,
            }
        )
        print(
            f"{folder.name} frame {index}: start {rows[-1]['start_mtre_mm']:.2f} → "
            f"{rows[-1]['final_mtre_mm']:.2f} mm, {seconds:.2f} s",
            flush=True,
        )
    return rows


def summarize(rows: list[dict]) -> dict:
    """Figures over the tracked frames (each run's first frame is multi-start's, not tracking's)."""
    tracked = [r for r in rows if r["tracked"]]
    errors = np.array([r["final_mtre_mm"] for r in tracked])
    seconds = np.array([r["seconds"] for r in tracked])
    return {
        "tracked_frames": len(tracked),
        "under_1mm": float(np.mean(errors < 1.0)),
        "under_2mm": float(np.mean(errors < 2.0)),
        "median_mtre_mm": float(np.median(errors)),
        "max_mtre_mm": float(errors.max()),
        "median_start_mtre_mm": float(np.median([r["start_mtre_mm"] for r in tracked])),
        "median_seconds": float(np.median(seconds)),
        "p90_seconds": float(np.percentile(seconds, 90)),
        "frames_per_second": float(len(seconds) / seconds.sum()),
        "median_iterations": float(np.median([r["iterations"] for r in tracked])),
        "unreliable": int(sum(not r["reliable"] for r in tracked)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--frames", type=int, default=8, help="frames per cine run")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION__KEY=VALUE")
    parser.add_argument("--against", action="append", default=[], metavar="SECTION__KEY=VALUE")
    parser.add_argument(
        "--cold-before",
        action="store_true",
        help="also run without the previous frame's warm start, as 'before'",
    )
    parser.add_argument("--phantoms", type=Path, help="reuse the phantoms of an earlier run")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    root = args.phantoms or args.out / "tracking-phantoms"
    folders = []
    for seed in range(args.seeds):
        folder = root / f"seed{seed}-{args.size}px-cine{args.frames}"
        if not (folder / "truth.json").exists():
            build(seed, 0, args.size, root, cine=args.frames)
        folders.append(folder)
    configurations = {"after": (_environment({}, args.set), True)}
    if args.against or args.cold_before:
        before = _environment(configurations["after"][0], args.against)
        configurations["before"] = (before, not args.cold_before)
    results = {}
    for name in sorted(configurations, key=["before", "after"].index):
        environ, warm = configurations[name]
        rows = [
            row
            for folder in folders
            for row in register_run(folder, environ, args.device, warm=warm)
        ]
        results[name] = {
            "summary": summarize(rows),
            "rows": rows,
            "environ": environ,
            "warm": warm,
        }
        print(name, json.dumps(results[name]["summary"], indent=1), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tracking.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
