"""Training benchmark: throughput, and how good the model's first guesses are after a budget.

    .venv/bin/python bench/training.py [--budget-s 600] [--threads 2] [--out bench/results]

1. Training DRRs per second at the XVR.md defaults (resnet18, 128 px, batch 116) and at a
   small CPU configuration (resnet18, 64 px, batch 4; the reference measured 1.65 DRR/s).
2. A patient-specific model trained de novo on the phantom CT for a fixed wall-clock budget
   at the small configuration, then its initial estimates (model initializer, before any
   refinement) on phantom frames: median mTRE, and the share a refinement can take from there.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from xvr_node.config import TrainingSettings
from xvr_node.dicom.volume import assemble_volume, read_series_files
from xvr_node.phantom import PhantomSpec, build_phantom
from xvr_node.xvr.initialize import ModelInitializer
from xvr_node.xvr.metrics import mean_target_registration_error, summarize
from xvr_node.xvr.train import measure_throughput, train
from xvr_node.xvr.xray import read_xray_frames

ROOT = Path(__file__).resolve().parents[1]

SMALL = {
    "backbone": "resnet18",
    "detector_size_px": 64,
    "pixel_spacing_mm": 2.1764375 * 2,
    "batch_size": 4,
    "gradient_accumulation": 1,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=600.0)
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--skip-defaults",
        action="store_true",
        help="Do not time the XVR.md default configuration (slow on CPU).",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    phantom = Path(tempfile.mkdtemp(prefix="bench-training-"))
    build_phantom(
        phantom, PhantomSpec(seed=5, frames=args.frames, columns=128, rows=128, ct_downsample=2)
    )
    truth = json.loads((phantom / "truth.json").read_text())
    volume = assemble_volume(read_series_files(sorted((phantom / "ct").glob("*.dcm")))).volume

    results: dict = {"threads": args.threads}
    small = TrainingSettings(**SMALL)
    results["throughput_small"] = measure_throughput(volume, small, iterations=5)
    print("small configuration:", json.dumps(results["throughput_small"]), flush=True)
    if not args.skip_defaults:
        results["throughput_defaults"] = measure_throughput(
            volume, TrainingSettings(), iterations=2
        )
        print("XVR.md defaults:", json.dumps(results["throughput_defaults"]), flush=True)

    # Fixed budget: as many iterations as the small configuration does in budget_s.
    iterations = max(10, int(results["throughput_small"]["it_per_s"] * args.budget_s))
    run = phantom / "run"
    started = time.perf_counter()
    checkpoint = train(
        [volume], small.model_copy(update={"warmup_iterations": 50}), run, iterations=iterations
    )
    results["training"] = {
        "iterations": iterations,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print("trained:", json.dumps(results["training"]), flush=True)

    initializer = ModelInitializer(checkpoint)
    errors = []
    for record in truth["xrays"]:
        (frame,) = read_xray_frames(phantom / record["file"])
        estimate = initializer.matrix_for(frame, volume)
        errors.append(
            mean_target_registration_error(
                estimate, np.array(record["matrix"]), np.array(record["fiducials_lps"])
            )
        )
    summary = summarize(errors)
    results["initial_estimates"] = {
        "mtre_mm": [round(e, 2) for e in errors],
        "median_mtre_mm": summary.median_mtre_mm,
        "under_20mm": float(np.mean(np.array(errors) < 20.0)),
    }
    print("model initial estimates:", json.dumps(results["initial_estimates"]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "training.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
