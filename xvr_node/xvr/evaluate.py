"""``evaluate``: registration results against a phantom's truth.json, as a metrics table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from xvr_node.geometry import Intrinsics
from xvr_node.xvr.metrics import (
    double_geodesic,
    format_table,
    mean_projection_error,
    mean_target_registration_error,
)


def load_results(path: Path) -> list[dict]:
    """One result JSON, or every ``*.json`` in a folder."""
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    return [json.loads(f.read_text()) for f in files]


def evaluation_rows(results: list[dict], truth: dict) -> list[dict]:
    """A metrics row per result, matched to the truth by SOP Instance UID and frame."""
    records = {(r["sop_instance_uid"], r["frame_number"]): r for r in truth["xrays"]}
    rows = []
    for result in results:
        key = (result["sop_instance_uid"], result.get("frame_number") or 1)
        record = records.get(key)
        if record is None:
            raise KeyError(f"no truth for {result['sop_instance_uid']} frame {key[1]}")
        true = np.array(record["matrix"])
        intrinsics = Intrinsics.from_json(result["intrinsics"])
        points = np.array(record["fiducials_lps"])
        final = np.array(result["final_matrix"])
        initial = np.array(result["initial_matrix"])
        name = Path(record["file"]).name + (
            f"#{record['frame_number']}" if record["number_of_frames"] > 1 else ""
        )
        rows.append(
            {
                "name": name,
                "initial_mtre_mm": mean_target_registration_error(initial, true, points),
                "final_mtre_mm": mean_target_registration_error(final, true, points),
                "mpe_mm": mean_projection_error(final, true, intrinsics, points),
                "dgeo_mm": double_geodesic(final, true, intrinsics.sid_mm, intrinsics=intrinsics)[
                    2
                ],
                "iterations": result.get("iterations"),
                "seconds": result.get("wall_time_s"),
            }
        )
    return rows


def evaluate(results_path: Path, truth_path: Path) -> str:
    truth = json.loads(truth_path.read_text())
    return format_table(evaluation_rows(load_results(results_path), truth))
