"""Validate a trained pose regressor before it may start registrations.

A model's training loss says how well it fits DRRs from the training renderer. What matters
is whether, on X-rays of this patient, it lands inside the refinement's capture range. So
each model is scored on held-out X-rays formed with the realistic phantom's independent
image formation (its own ray marcher, spectrum, scatter, table, devices, noise, vendor
storage and fields; :mod:`xvr_node.phantom.realism`) at random C-arm views of the patient's
own CT: the network's first pose alone (median mTRE), and how often refinement started from
it alone ends under 2 mm. Only a model whose figures pass the configured bar is used.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from xvr_node.config import ModelCheckSettings
from xvr_node.ct_volume import CtVolume
from xvr_node.geometry import CarmPose, Intrinsics
from xvr_node.phantom.realism import (
    IndependentFormation,
    Realism,
    place_devices,
    place_table,
    sample_run_choices,
)
from xvr_node.xvr.initialize import ModelInitializer
from xvr_node.xvr.metrics import mean_target_registration_error
from xvr_node.xvr.register import RefineSettings, Registrar
from xvr_node.xvr.xray import XrayFrame

LOG = logging.getLogger(__name__)

#: The held-out detector's physical size (mm) and its X-ray tube voltage range (kVp).
DETECTOR_MM = 300.0
KVP = (70.0, 95.0)

#: Targets for mTRE: CT voxels of soft tissue or bone within this box around the centre.
TARGET_HALF_EXTENT_MM = np.array([90.0, 70.0, 90.0])
TARGETS = 24


@dataclass(frozen=True)
class HeldOutView:
    """One held-out X-ray and its truth."""

    frame: XrayFrame
    matrix: np.ndarray
    carm: CarmPose  # the true view


def held_out_views(
    volume: CtVolume,
    settings: ModelCheckSettings,
    seed: int,
    *,
    primary_deg: float = 40.0,
    secondary_deg: float = 20.0,
    offset_mm: float = 20.0,
) -> tuple[list[HeldOutView], np.ndarray]:
    """Realistic X-rays of ``volume`` at random clinical C-arm views, and the mTRE targets.

    Views: primary ±40°, secondary ±20°, source 62–78 % of a 980–1200 mm SID from a point
    within ±20 mm of the CT centre (each axis; the ranges are arguments). Storage and field
    (circle, rectangle, open) vary per view.
    """
    rng = np.random.default_rng([seed, 5])
    realism = Realism.from_preset("full")
    formation = IndependentFormation(
        volume, realism, place_table(volume), place_devices(volume, rng)
    )
    size = settings.size_px
    views = []
    for index in range(settings.views):
        sid = float(rng.uniform(980.0, 1200.0))
        intrinsics = Intrinsics(sid, size, size, DETECTOR_MM / size, DETECTOR_MM / size)
        centre = np.asarray(volume.center_lps) + rng.uniform(-offset_mm, offset_mm, 3)
        pose = CarmPose(
            float(rng.uniform(-primary_deg, primary_deg)),
            float(rng.uniform(-secondary_deg, secondary_deg)),
            sid * float(rng.uniform(0.62, 0.78)),
            tuple(centre),
        )
        matrix = pose.to_matrix(intrinsics)
        storage, field = sample_run_choices(realism, size, size, rng)
        pixels, _ = formation.form(
            matrix, intrinsics, float(rng.uniform(*KVP)), storage, field, rng
        )
        mask = field.blades(size, size) & field.intensifier(size, size)
        rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        frame = XrayFrame(
            pixels=np.asarray(pixels, dtype=np.float32),
            intrinsics=intrinsics,
            sop_instance_uid=f"held-out-{index}",
            frame_number=None,
            carm=None,  # the model alone: no positioner reading to lean on
            field=(int(rows[0]), int(rows[-1]) + 1, int(columns[0]), int(columns[-1]) + 1),
            log_stored=storage.startswith("log"),
            source=f"held-out view {index}",
            mask=mask,
            field_sources=("truth",),
        )
        views.append(HeldOutView(frame, matrix, pose))
    ijk = np.argwhere(volume.hu > -300.0)
    points = volume.voxel_to_lps(ijk)
    inside = points[np.all(np.abs(points - volume.center_lps) < TARGET_HALF_EXTENT_MM, axis=1)]
    targets = inside[rng.choice(len(inside), size=min(TARGETS, len(inside)), replace=False)]
    return views, targets


def check_model(
    initializer: ModelInitializer,
    volume: CtVolume,
    settings: ModelCheckSettings,
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    """The model's figures on held-out realistic X-rays, and whether they pass the bar.

    ``initial_mtre_median_mm``: the network's first pose; ``refined_under_2mm``: the share
    of views that refinement from that pose alone (levels ``settings.levels_px``) brings
    under 2 mm; ``failed``: views the model could not be asked about (e.g. coverage).
    """
    started = time.perf_counter()
    views, targets = held_out_views(volume, settings, seed)
    registrar = Registrar(
        volume, RefineSettings(levels_px=tuple(settings.levels_px)), device=device
    )
    initial, refined, failed = [], [], 0
    for view in views:
        try:
            start = initializer.matrix_for(view.frame, volume)
        except ValueError as error:
            LOG.info("model check: %s", error)
            failed += 1
            continue
        initial.append(mean_target_registration_error(start, view.matrix, targets))
        outcome = registrar.register(view.frame, start)
        refined.append(mean_target_registration_error(outcome.final_matrix, view.matrix, targets))
    asked = len(views)
    under = sum(1 for error in refined if error < 2.0) / asked if asked else 0.0
    median = float(np.median(initial)) if initial else None
    passes = (
        median is not None
        and median <= settings.max_initial_mtre_mm
        and under >= settings.min_refined_under_2mm
    )
    return {
        "views": asked,
        "failed": failed,
        "initial_mtre_median_mm": None if median is None else round(median, 2),
        "refined_under_2mm": round(under, 3),
        "refined_median_mm": round(float(np.median(refined)), 2) if refined else None,
        "bar": {
            "max_initial_mtre_mm": settings.max_initial_mtre_mm,
            "min_refined_under_2mm": settings.min_refined_under_2mm,
        },
        "passes": passes,
        "formation": "independent, full realism (xvr_node.phantom.realism)",
        "seconds": round(time.perf_counter() - started, 1),
    }
