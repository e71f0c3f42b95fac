"""Training checkpoints: weights, optimiser state, and the conventions a model is valid under."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from xvr_node.config import TrainingSettings
from xvr_node.geometry import Intrinsics, reverse_x_axis_for
from xvr_node.xvr.model import PoseRegressor
from xvr_node.xvr.renderer import BONE_THRESHOLD_HU

FORMAT = "xvr-node-checkpoint-v1"

#: Name of the HU → density mapping in :func:`xvr_node.xvr.renderer.hu_to_density`.
HU_TO_DENSITY = "xvr-node-linear-v1"


@dataclass(frozen=True)
class Conventions:
    """Everything that must agree between the DRRs a model learnt from and an X-ray it reads.

    A model predicts poses in its own geometry: the same image shown under another
    orientation, detector flip, SID or pixel grid means another pose. Stored in every
    checkpoint and result so a mismatch is refused with a message naming the field.
    """

    orientation: str
    sid_mm: float
    pixel_spacing_mm: tuple[float, float]  # (row, column)
    principal_point_px: tuple[float, float]  # (column u0, row v0)
    image_size: tuple[int, int]  # (rows, columns)
    parameterization: str = "quaternion_adjugate"
    convention: str = "ZXY"
    hu_to_density: str = HU_TO_DENSITY
    bone_threshold_hu: float = BONE_THRESHOLD_HU
    reverse_x_axis: bool = field(init=False)

    def __post_init__(self) -> None:
        # Derived, never set on its own: see docs/geometry.md.
        object.__setattr__(self, "reverse_x_axis", reverse_x_axis_for(self.orientation))
        object.__setattr__(self, "sid_mm", float(self.sid_mm))
        object.__setattr__(self, "pixel_spacing_mm", tuple(map(float, self.pixel_spacing_mm)))
        object.__setattr__(self, "principal_point_px", tuple(map(float, self.principal_point_px)))
        object.__setattr__(self, "image_size", tuple(map(int, self.image_size)))
        object.__setattr__(self, "bone_threshold_hu", float(self.bone_threshold_hu))

    @classmethod
    def from_intrinsics(
        cls,
        intrinsics: Intrinsics,
        orientation: str,
        parameterization: str = "quaternion_adjugate",
        convention: str = "ZXY",
    ) -> Conventions:
        return cls(
            orientation=orientation,
            sid_mm=intrinsics.sid_mm,
            pixel_spacing_mm=(intrinsics.row_spacing_mm, intrinsics.column_spacing_mm),
            principal_point_px=(intrinsics.u0, intrinsics.v0),
            image_size=(intrinsics.rows, intrinsics.columns),
            parameterization=parameterization,
            convention=convention,
        )

    @classmethod
    def from_settings(cls, settings: TrainingSettings) -> Conventions:
        return cls.from_intrinsics(
            training_intrinsics(settings),
            settings.orientation,
            settings.parameterization,
            settings.convention,
        )

    @property
    def intrinsics(self) -> Intrinsics:
        rows, columns = self.image_size
        return Intrinsics(
            self.sid_mm, rows, columns, *self.pixel_spacing_mm, self.principal_point_px
        )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        return {key: list(v) if isinstance(v, tuple) else v for key, v in data.items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Conventions:
        names = {f.name for f in fields(cls) if f.init}
        unknown = set(data) - names - {"reverse_x_axis"}
        if unknown:
            raise ValueError(f"unknown convention fields: {', '.join(sorted(unknown))}")
        conventions = cls(**{key: value for key, value in data.items() if key in names})
        stored = data.get("reverse_x_axis")
        if stored is not None and bool(stored) != conventions.reverse_x_axis:
            raise ValueError(
                f"reverse_x_axis={stored} contradicts orientation {conventions.orientation}"
            )
        return conventions

    def mismatches(self, other: Conventions, rel_tol: float = 1e-6) -> list[str]:
        """One line per differing field, ``"<field>: <self> vs <other>"`` (empty: compatible)."""
        problems = []
        for item in fields(self):
            mine, theirs = getattr(self, item.name), getattr(other, item.name)
            if not _same(mine, theirs, rel_tol):
                problems.append(f"{item.name}: {_show(mine)} vs {_show(theirs)}")
        return problems


def _same(a: Any, b: Any, rel_tol: float) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y, rel_tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=1e-9)
    return a == b


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(_show(v) for v in value) + ")"
    return repr(value) if isinstance(value, str) else str(value)


def training_intrinsics(settings: TrainingSettings) -> Intrinsics:
    """The detector the training DRRs are rendered on: square, principal point centred."""
    size = settings.detector_size_px
    spacing = settings.pixel_spacing_mm
    return Intrinsics(settings.sdd_mm, size, size, spacing, spacing)


@dataclass
class Checkpoint:
    """What one checkpoint file holds (see :func:`save_checkpoint`)."""

    model: dict[str, torch.Tensor]
    model_config: dict[str, Any]
    conventions: Conventions
    settings: TrainingSettings
    iteration: int
    total_iterations: int
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    gradients: list[torch.Tensor | None] | None = None
    rng: dict[str, Any] | None = None
    run: dict[str, Any] = field(default_factory=dict)
    created: str = ""

    def build_model(self, device: str | torch.device = "cpu") -> PoseRegressor:
        model = PoseRegressor(**self.model_config)
        model.load_state_dict(self.model)
        return model.to(device)


def save_checkpoint(checkpoint: Checkpoint, path: Path) -> Path:
    """Write atomically (temporary file, then rename): a crash never leaves half a model."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": checkpoint.model,
        "model_config": checkpoint.model_config,
        "conventions": checkpoint.conventions.to_json(),
        "settings": checkpoint.settings.model_dump(mode="json"),
        "iteration": checkpoint.iteration,
        "total_iterations": checkpoint.total_iterations,
        "optimizer": checkpoint.optimizer,
        "scheduler": checkpoint.scheduler,
        "gradients": checkpoint.gradients,
        "rng": checkpoint.rng,
        "run": checkpoint.run,
    }
    temporary = path.with_name(path.name + ".part")
    torch.save(payload, temporary)
    os.replace(temporary, path)
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint; only tensors and plain data are unpickled (``weights_only``)."""
    try:
        payload = torch.load(Path(path), map_location=map_location, weights_only=True)
    except Exception as error:  # torch.load raises many kinds on a file that is no checkpoint
        raise ValueError(
            f"{path} is not an xvr-node checkpoint (unreadable: {type(error).__name__})"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path} is not an xvr-node checkpoint ({found!r})")
    return Checkpoint(
        model=payload["model"],
        model_config=payload["model_config"],
        conventions=Conventions.from_json(payload["conventions"]),
        settings=TrainingSettings.model_validate(payload["settings"]),
        iteration=payload["iteration"],
        total_iterations=payload["total_iterations"],
        optimizer=payload.get("optimizer"),
        scheduler=payload.get("scheduler"),
        gradients=payload.get("gradients"),
        rng=payload.get("rng"),
        run=payload.get("run") or {},
        created=payload.get("created", ""),
    )


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[PoseRegressor, Conventions]:
    """The trained network (in eval mode) and the conventions it must be used under."""
    checkpoint = load_checkpoint(path, map_location=device)
    model = checkpoint.build_model(device)
    model.eval()
    return model, checkpoint.conventions


def inference_checkpoint(source: Path, target: Path, provenance: dict[str, Any]) -> Path:
    """The weights of ``source`` alone, in half precision, for shipping a trained model.

    What resuming would need (optimiser, schedule, pending gradients, random states) is
    dropped, so a resnet10t model is about 10 MB instead of 60; the weights load back into
    the full-precision network unchanged but for rounding. ``provenance`` (how, on what and
    for how long it was trained) is kept in the run record.
    """
    state = load_checkpoint(source)
    half = {
        key: value.half() if value.is_floating_point() else value
        for key, value in state.model.items()
    }
    run = {key: state.run[key] for key in ("seed", "template_center_ras") if key in state.run}
    slim = Checkpoint(
        model=half,
        model_config=state.model_config,
        conventions=state.conventions,
        settings=state.settings,
        iteration=state.iteration,
        total_iterations=state.total_iterations,
        run={**run, "provenance": provenance},
    )
    return save_checkpoint(slim, target)
