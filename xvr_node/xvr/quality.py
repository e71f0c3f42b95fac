"""The quality gate: can the node vouch for a registration, from what it can see alone?

No truth is known at run time, so the verdict rests on five observable figures:

* **similarity** at a fixed 128-px level (the default finest level; whatever levels refined
  it): a right pose explains the X-ray's structure. Coarser levels are recorded too: on
  low-contrast views they score right poses as low as wrong ones (docs/benchmarks.md);
* **margin** over the best *distinct* start multi-start found: a clear winner, not a tie
  between two different answers;
* **overlap**: the fraction of the open field the projected CT covers (a pose that slid the
  CT out of view can still score on a little anatomy);
* **convergence**: the finest level ended on a plateau, not on its iteration cap;
* **agreement with the positioner**: how far the result puts anatomy from where the C-arm's
  own angles put it. Patient positioning errors move it by tens of millimetres; a wrong
  start that won moves it by a whole view, however well it scores.

Each figure is mapped to [0, 1] against its threshold (1 = comfortably past it); confidence is
the smallest of them, and a result is reliable when every figure passes. The thresholds are
calibrated on the realistic phantom (``bench/robustness.py``) and configurable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from xvr_node.xvr.multistart import pose_distance_mm
from xvr_node.xvr.register import Outcome, Registrar
from xvr_node.xvr.xray import XrayFrame

#: The detector size (shorter side, pixels) at which the gate measures similarity.
GATE_LEVEL_PX = 128

#: Coarser levels whose similarity is recorded with each verdict (for calibration only).
RECORDED_LEVELS_PX = (32, 64)


@dataclass(frozen=True)
class GateSettings:
    """Thresholds of the gate (config ``registration.quality``)."""

    min_similarity: float = 0.72
    min_margin: float = 0.0
    min_overlap: float = 0.6
    require_convergence: bool = False
    # Farther than this (mm, points around the CT centre) from the positioner's pose: not
    # trusted. 0: not checked. Files without positioner angles are not checked either.
    max_positioner_distance_mm: float = 60.0
    threshold: float = 0.5  # confidence at or above which a result is reliable


@dataclass
class Verdict:
    """The gate's answer for one result, with the figures and reasons behind it."""

    reliable: bool
    confidence: float
    figures: dict[str, float | bool | None] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    def words(self) -> str:
        """What the overlay and the SR say."""
        if self.reliable:
            return "reliable"
        return "NOT RELIABLE: " + "; ".join(self.reasons)

    def to_json(self) -> dict:
        return {
            "reliable": self.reliable,
            "confidence": round(self.confidence, 4),
            "figures": self.figures,
            "reasons": self.reasons,
        }


def field_overlap(registrar: Registrar, frame: XrayFrame, matrix: np.ndarray) -> float:
    """Fraction of the open field in which the CT, projected at ``matrix``, shows anatomy.

    Judged at the coarsest level: a pixel is covered where the DRR exceeds 5 % of its
    95th percentile inside the field (air and the CT's empty margins stay below).
    """
    scale = registrar.settings.scales_for(frame.intrinsics)[0]
    _, mask, _ = registrar._fixed_image(frame, scale)
    render = registrar._renderer(frame.intrinsics, scale)
    with torch.no_grad():
        drr = render(registrar._pose_tensor(matrix, frame.intrinsics))[0, 0]
    open_field = mask[0, 0] > 0
    values = drr[open_field]
    if values.numel() == 0:
        return 0.0
    level = torch.quantile(values.float(), 0.95)
    if level <= 0:
        return 0.0
    return float((values > 0.05 * level).float().mean())


def judged_similarity(registrar: Registrar, frame: XrayFrame, outcome: Outcome) -> float:
    """The result's similarity at the gate's own level (the shorter side at ``GATE_LEVEL_PX``).

    Similarity grows with coarseness, so the threshold holds only at one resolution: judging
    there keeps the calibration valid whatever levels the refinement ran.
    """
    return similarity_at(registrar, frame, outcome, GATE_LEVEL_PX)


def similarity_at(registrar: Registrar, frame: XrayFrame, outcome: Outcome, level: int) -> float:
    """The result's similarity with the image's shorter side brought to ``level`` pixels."""
    shorter = min(frame.intrinsics.rows, frame.intrinsics.columns)
    scale = max(1.0, shorter / level)
    return registrar.score(frame, outcome.final_matrix, scale, outcome.intensity)


def positioner_distance(registrar: Registrar, frame: XrayFrame, matrix: np.ndarray) -> float | None:
    """How far ``matrix`` puts anatomy from the positioner's pose (None without angles)."""
    if frame.carm is None:
        return None
    centre = np.asarray(registrar.volume.center_lps, dtype=float)
    return pose_distance_mm(matrix, registrar.dicom_pose(frame), centre)


def converged(outcome: Outcome, cap: int) -> bool:
    """Whether the finest level stopped on its plateaus rather than its iteration cap."""
    if not outcome.trajectory:
        return False
    last = outcome.trajectory[-1]["scale"]
    steps = sum(1 for record in outcome.trajectory if record["scale"] == last)
    return steps < cap


def _passing(value: float, threshold: float, spread: float) -> float:
    """0 at ``threshold − spread``, 0.5 at the threshold, 1 at ``threshold + spread``."""
    return float(np.clip(0.5 + 0.5 * (value - threshold) / spread, 0.0, 1.0))


def assess(
    registrar: Registrar,
    frame: XrayFrame,
    outcome: Outcome,
    margin: float | None,
    settings: GateSettings | None = None,
) -> Verdict:
    """The gate's verdict on ``outcome`` (``margin``: multi-start's, ``None`` without rivals)."""
    settings = settings or GateSettings()
    overlap = field_overlap(registrar, frame, outcome.final_matrix)
    did_converge = converged(outcome, registrar.settings.max_iterations_per_scale)
    similarity = judged_similarity(registrar, frame, outcome)
    scores = {
        "similarity": _passing(similarity, settings.min_similarity, 0.1),
        "overlap": _passing(overlap, settings.min_overlap, 0.2),
    }
    if margin is not None and settings.min_margin > 0:
        scores["margin"] = _passing(margin, settings.min_margin, max(settings.min_margin, 0.01))
    reasons = []
    if similarity < settings.min_similarity:
        reasons.append(f"similarity {similarity:.3f} < {settings.min_similarity:.3f}")
    if overlap < settings.min_overlap:
        reasons.append(f"CT covers {overlap:.0%} of the field < {settings.min_overlap:.0%}")
    if margin is not None and settings.min_margin > 0 and margin < settings.min_margin:
        reasons.append(f"a different start scores within {margin:.3f} of this one")
    positioner = positioner_distance(registrar, frame, outcome.final_matrix)
    if positioner is not None and settings.max_positioner_distance_mm > 0:
        limit = settings.max_positioner_distance_mm
        scores["positioner"] = _passing(-positioner, -limit, limit / 4)
        if positioner > limit:
            reasons.append(
                f"{positioner:.0f} mm from the view the C-arm's angles describe (> {limit:.0f})"
            )
    if settings.require_convergence and not did_converge:
        reasons.append("the finest level hit its iteration cap")
        scores["convergence"] = 0.0
    confidence = min(scores.values())
    reliable = not reasons and confidence >= settings.threshold
    if not reasons and not reliable:
        reasons.append(f"confidence {confidence:.2f} < {settings.threshold:.2f}")
    return Verdict(
        reliable=reliable,
        confidence=confidence,
        figures={
            "similarity": round(similarity, 5),
            "margin": None if margin is None else round(margin, 5),
            "overlap": round(overlap, 4),
            "converged": did_converge,
            "positioner_distance_mm": None if positioner is None else round(positioner, 2),
            **{
                f"similarity_{level}px": round(similarity_at(registrar, frame, outcome, level), 5)
                for level in RECORDED_LEVELS_PX
            },
        },
        reasons=reasons,
    )
