"""Multi-start: which start to refine, judged after a short refinement of each, not before.

A raw similarity at the start says little: a start 20 mm off often scores below a wrong pose
that happens to overlap more anatomy, while a few coarse steps bring the near one home. So:

1. every named start (model, positioner, fixed) is a candidate, and the positioner's and
   the model's starts are searched around: quasi-random rotations and shifts that span a
   realistic positioning error;
2. all candidates are scored raw at the coarsest level in one batch, and the best few of the
   searched ones join the named ones;
3. those are refined together for a few coarse steps (one batched render a step);
4. each is scored at the next level; the best wins, and the best *distinct* pose (further than
   ``distinct_mm`` from the winner) is the runner-up whose margin the quality gate reads.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from scipy.spatial.transform import Rotation
from scipy.stats import qmc

from xvr_node.geometry import rigid
from xvr_node.xvr.register import Registrar
from xvr_node.xvr.xray import XrayFrame

LOG = logging.getLogger(__name__)

#: Named starts that are searched around: they carry patient-specific information.
SEARCHED = ("dicom", "model")


@dataclass(frozen=True)
class SearchSettings:
    """How widely and how hard multi-start looks (config ``registration.multistart_search``)."""

    samples: int = 32  # perturbations around each searched start
    rotation_deg: float = 15.0  # ± about each axis, about the CT centre
    translation_mm: float = 50.0  # ± along each axis (LPS)
    keep: int = 4  # searched candidates that go on to the short refinement
    iterations: int = 30  # short refinement steps at the coarsest level
    distinct_mm: float = 5.0  # poses further apart than this are rivals


@dataclass
class StartChoice:
    """The start to refine, where it came from, and how clearly it won."""

    name: str
    matrix: np.ndarray
    similarity: float
    runner_up: float | None
    refined_levels: int = 1  # levels of the pyramid already refined (multi-start's coarse one)
    candidates: list[dict] = field(default_factory=list)

    @property
    def margin(self) -> float | None:
        return None if self.runner_up is None else self.similarity - self.runner_up

    def summary(self) -> dict:
        """What the catalog keeps of the choice (JSON)."""
        return {
            "chosen": self.name,
            "similarity": round(self.similarity, 5),
            "runner_up": None if self.runner_up is None else round(self.runner_up, 5),
            "margin": None if self.margin is None else round(self.margin, 5),
            "candidates": self.candidates,
        }


def perturbations(
    centre_lps: np.ndarray, settings: SearchSettings, seed: int = 0
) -> list[np.ndarray]:
    """Rigid LPS transforms spread evenly (Sobol) over the positioning-error box.

    Deterministic: the same frame is always searched the same way, so results reproduce.
    """
    if settings.samples <= 0:
        return []
    sampler = qmc.Sobol(d=6, scramble=True, seed=seed)
    unit = sampler.random(settings.samples) * 2.0 - 1.0
    transforms = []
    for row in unit:
        rotation = Rotation.from_euler("xyz", row[:3] * settings.rotation_deg, degrees=True)
        matrix = rotation.as_matrix()
        shift = row[3:] * settings.translation_mm
        transforms.append(rigid(matrix, centre_lps - matrix @ centre_lps + shift))
    return transforms


def pose_distance_mm(a: np.ndarray, b: np.ndarray, centre_lps: np.ndarray) -> float:
    """Mean distance of eight points 50 mm around the CT centre moved by each pose's inverse.

    Comparable to mTRE without knowing the truth: how far apart two results put anatomy.
    """
    corners = np.array(
        [[x, y, z] for x in (-50, 50) for y in (-50, 50) for z in (-50, 50)], dtype=float
    )
    points = np.c_[corners + centre_lps, np.ones(8)]
    moved_a = (np.linalg.inv(a) @ points.T).T[:, :3]
    moved_b = (np.linalg.inv(b) @ points.T).T[:, :3]
    return float(np.linalg.norm(moved_a - moved_b, axis=1).mean())


def choose_start(
    registrar: Registrar,
    frame: XrayFrame,
    named: Mapping[str, np.ndarray],
    settings: SearchSettings | None = None,
) -> StartChoice:
    """The best start after a short coarse refinement of the named and searched candidates."""
    settings = settings or SearchSettings()
    if not named:
        raise ValueError(f"{frame.name}: no start pose to choose from")
    centre = np.asarray(registrar.volume.center_lps, dtype=float)
    scales = registrar.settings.scales_for(frame.intrinsics)
    coarse, judge = scales[0], scales[min(1, len(scales) - 1)]

    names = list(named)
    matrices = [np.asarray(named[name], dtype=float) for name in names]
    searched_names: list[str] = []
    searched: list[np.ndarray] = []
    for name in names:
        if name not in SEARCHED:
            continue
        for index, error in enumerate(perturbations(centre, settings, seed=len(searched_names))):
            searched_names.append(f"{name}~{index}")
            searched.append(error @ named[name])
    # One batched raw score for every candidate; the best searched ones join the named.
    raw = registrar.score_batch(frame, matrices + searched, coarse)
    kept = list(range(len(matrices)))
    kept += [len(matrices) + int(i) for i in np.argsort(-raw[len(matrices) :])[: settings.keep]]
    names += [searched_names[i - len(named)] for i in kept[len(named) :]]
    matrices += [searched[i - len(named)] for i in kept[len(named) :]]
    raw_scores = raw[kept]
    refined = registrar.short_refine(frame, matrices, coarse, settings.iterations)
    final = registrar.score_batch(frame, refined, judge)
    final = np.where(np.isfinite(final), final, -np.inf)
    best = int(np.argmax(final))
    candidates = []
    runner_up: float | None = None
    for index, name in enumerate(names):
        distance = pose_distance_mm(refined[index], refined[best], centre)
        candidates.append(
            {
                "name": name,
                "raw": round(float(raw_scores[index]), 5),
                "refined": round(float(final[index]), 5),
                "moved_mm": round(pose_distance_mm(matrices[index], refined[index], centre), 2),
                "from_winner_mm": round(distance, 2),
            }
        )
        if distance > settings.distinct_mm and (runner_up is None or final[index] > runner_up):
            runner_up = float(final[index])
    winner = names[best].split("~")[0] + ("+search" if "~" in names[best] else "")
    LOG.info(
        "%s: multi-start chose %s at %.4f (runner-up %s) of %d candidates",
        frame.name,
        winner,
        final[best],
        "none" if runner_up is None else f"{runner_up:.4f}",
        len(names),
    )
    return StartChoice(
        name=winner,
        matrix=refined[best],
        similarity=float(final[best]),
        runner_up=runner_up,
        refined_levels=1,
        candidates=candidates,
    )
