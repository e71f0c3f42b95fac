"""X-ray physics for the phantom's independent image formation (numpy and scipy only).

Material attenuation, a kVp spectrum, a two-material reading of HU, the patient table, dense
devices, scatter, detector blur, quantum noise and vendor pixel storage. Approximations chosen
to differ from the registration renderer's single linear HU → μ mapping the way a real C-arm
does, not to be a Monte Carlo: every figure here is an order-of-magnitude physical value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from xvr_node.geometry import Intrinsics, project

#: Energies (keV) of the tabulated mass attenuation coefficients below.
TABLE_ENERGIES_KEV = np.array([20.0, 30.0, 40.0, 50.0, 60.0, 80.0, 100.0, 150.0])
#: Mass attenuation coefficients μ/ρ (cm²/g), NIST XCOM / ICRU-44 values (coherent included).
MASS_ATTENUATION_CM2_G = {
    "water": np.array([0.8096, 0.3756, 0.2683, 0.2269, 0.2059, 0.1837, 0.1707, 0.1505]),
    "bone": np.array([4.001, 1.331, 0.6655, 0.4242, 0.3148, 0.2229, 0.1855, 0.1480]),
    "aluminium": np.array([3.441, 1.128, 0.5685, 0.3681, 0.2778, 0.2018, 0.1704, 0.1378]),
    "carbon": np.array([0.4420, 0.2562, 0.2076, 0.1871, 0.1753, 0.1610, 0.1514, 0.1347]),
    "iron": np.array([25.68, 8.176, 3.629, 1.958, 1.205, 0.5952, 0.3717, 0.1964]),
    "copper": np.array([33.79, 10.92, 4.862, 2.613, 1.593, 0.7630, 0.4584, 0.2217]),
}
#: Mass densities (g/cm³) of the materials as they occur here.
DENSITY_G_CM3 = {
    "water": 1.0,
    "bone": 1.92,  # ICRU cortical bone
    "aluminium": 2.699,
    "carbon_fibre": 1.6,
    "iron": 7.87,  # stainless steel guidewire, electrode snaps
    "copper": 8.96,
}
#: Effective energy at which a 120 kVp CT's HU scale is calibrated.
CT_EFFECTIVE_KEV = 70.0
#: Air-kerma → fluence of a fluoroscopy spectrum: ~30 photons/mm² per nGy (50–60 keV).
PHOTONS_PER_MM2_PER_NGY = 30.0


def mass_attenuation(material: str, energies_kev: np.ndarray) -> np.ndarray:
    """μ/ρ (cm²/g) of ``material`` at ``energies_kev``, log-log interpolated."""
    table = MASS_ATTENUATION_CM2_G[material]
    energies = np.clip(np.asarray(energies_kev, dtype=float), 20.0, 150.0)
    return np.exp(np.interp(np.log(energies), np.log(TABLE_ENERGIES_KEV), np.log(table)))


def bone_hu() -> float:
    """HU of cortical bone on a CT calibrated at :data:`CT_EFFECTIVE_KEV`."""
    water = mass_attenuation("water", CT_EFFECTIVE_KEV)
    bone = mass_attenuation("bone", CT_EFFECTIVE_KEV) * DENSITY_G_CM3["bone"]
    return float(1000.0 * (bone / water - 1.0))


def decompose_hu(hu: np.ndarray) -> np.ndarray:
    """Two-material densities (g/cm³) ``[water, bone]`` of each voxel.

    Below 0 HU a voxel is water diluted with air; above, water mixed with cortical bone in
    the proportion its HU lies between water and bone at the CT's energy (beyond cortical
    bone, denser metal counts as proportionally denser bone). Bone's photoelectric rise at
    fluoroscopy energies then makes its attenuation nonlinear in HU, as on a real C-arm.
    """
    hu = np.asarray(hu, dtype=np.float32)
    fraction = np.clip(hu / bone_hu(), 0.0, None)
    water = np.where(
        hu <= 0.0, np.clip(1.0 + hu / 1000.0, 0.0, 1.0), 1.0 - np.minimum(fraction, 1.0)
    )
    bone = fraction * DENSITY_G_CM3["bone"]
    return np.stack([water, bone]).astype(np.float32)


def linear_density(hu: np.ndarray) -> np.ndarray:
    """Density relative to water, linear in HU (air 0, water 1): the mono-energetic model."""
    return np.clip(1.0 + np.asarray(hu, dtype=np.float32) / 1000.0, 0.0, None)[None]


@dataclass(frozen=True)
class Spectrum:
    """A few energy bins of the beam, weighted by photons reaching the patient."""

    energies_kev: np.ndarray
    photon_weights: np.ndarray  # sum to 1

    @classmethod
    def tube(cls, kvp: float, filtration_mm_al: float = 3.5, bins: int = 8) -> Spectrum:
        """Kramers' bremsstrahlung (photons ∝ (kVp − E)/E) hardened by the tube filtration."""
        low = 15.0
        energies = low + (np.arange(bins) + 0.5) * (kvp - low) / bins
        photons = (kvp - energies) / energies
        photons *= np.exp(
            -mass_attenuation("aluminium", energies)
            * DENSITY_G_CM3["aluminium"]
            * filtration_mm_al
            / 10.0
        )
        return cls(energies, photons / photons.sum())

    @classmethod
    def mono(cls, energy_kev: float) -> Spectrum:
        return cls(np.array([float(energy_kev)]), np.array([1.0]))

    @property
    def mean_energy_kev(self) -> float:
        return float(self.photon_weights @ self.energies_kev)

    def transmission(self, areal_g_cm2: dict[str, np.ndarray]) -> np.ndarray:
        """Energy-integrated transmitted fraction behind the given material layers.

        ``areal_g_cm2`` maps a material of :data:`MASS_ATTENUATION_CM2_G` to its areal density
        per pixel. The detector integrates energy, so each bin counts with weight E.
        """
        shape = next(iter(areal_g_cm2.values())).shape
        weights = self.photon_weights * self.energies_kev
        weights = weights / weights.sum()
        result = np.zeros(shape, dtype=np.float64)
        for energy, weight in zip(self.energies_kev, weights, strict=True):
            exponent = np.zeros(shape, dtype=np.float64)
            for material, areal in areal_g_cm2.items():
                exponent += mass_attenuation(material, energy) * areal
            result += weight * np.exp(-exponent)
        return result


# --- the patient table ----------------------------------------------------------------------


@dataclass(frozen=True)
class PatientTable:
    """A carbon-fibre sandwich table top under the patient, long along LPS z.

    ``top_y_lps`` is its upper surface (LPS y grows toward the patient's back, so the table
    lies at larger y than a supine patient). Skins of carbon fibre enclose a foam core.
    """

    top_y_lps: float
    centre_x_lps: float
    width_mm: float = 500.0
    skin_mm: float = 1.5
    core_mm: float = 37.0
    core_density_g_cm3: float = 0.1

    def to_json(self) -> dict:
        return {
            "top_y_lps": self.top_y_lps,
            "centre_x_lps": self.centre_x_lps,
            "width_mm": self.width_mm,
            "skin_mm": self.skin_mm,
            "skin_material": "carbon fibre (1.6 g/cm3)",
            "core_mm": self.core_mm,
            "core_density_g_cm3": self.core_density_g_cm3,
        }

    def areal_density(self, source: np.ndarray, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """g/cm² of carbon (skins) and water-like foam (core) along each source → pixel ray."""
        skins = _slab_length(source, pixels, self, self.top_y_lps, self.top_y_lps + self.skin_mm)
        bottom = self.top_y_lps + self.skin_mm + self.core_mm
        skins += _slab_length(source, pixels, self, bottom, bottom + self.skin_mm)
        core = _slab_length(source, pixels, self, self.top_y_lps + self.skin_mm, bottom)
        return {
            "carbon": skins * DENSITY_G_CM3["carbon_fibre"] / 10.0,
            "water": core * self.core_density_g_cm3 / 10.0,
        }


def _slab_length(
    source: np.ndarray, pixels: np.ndarray, table: PatientTable, y_low: float, y_high: float
) -> np.ndarray:
    """mm of each ray inside the box x ∈ table width, y ∈ [y_low, y_high] (z unbounded)."""
    direction = pixels - source
    t_low = np.zeros(pixels.shape[:-1])
    t_high = np.ones(pixels.shape[:-1])
    half = table.width_mm / 2.0
    for axis, low, high in (
        (0, table.centre_x_lps - half, table.centre_x_lps + half),
        (1, y_low, y_high),
    ):
        d = direction[..., axis]
        with np.errstate(divide="ignore", invalid="ignore"):
            t0 = (low - source[axis]) / d
            t1 = (high - source[axis]) / d
        near, far = np.minimum(t0, t1), np.maximum(t0, t1)
        parallel = d == 0
        inside = (source[axis] >= low) & (source[axis] <= high)
        near = np.where(parallel, np.where(inside, -np.inf, np.inf), near)
        far = np.where(parallel, np.where(inside, np.inf, -np.inf), far)
        t_low, t_high = np.maximum(t_low, near), np.minimum(t_high, far)
    return np.clip(t_high - t_low, 0.0, None) * np.linalg.norm(direction, axis=-1)


# --- dense devices ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    """A dense object not in the CT: a tube of radius ``radius_mm`` along ``path_lps``.

    Modelled as points every fraction of a millimetre along the path, each carrying its
    slice of the tube's mass, splatted onto the detector with the projected tube's profile.
    """

    kind: str
    material: str  # a key of MASS_ATTENUATION_CM2_G and DENSITY_G_CM3
    radius_mm: float
    path_lps: np.ndarray  # (n, 3) polyline

    def to_json(self) -> dict:
        step = max(1, len(self.path_lps) // 40)
        return {
            "kind": self.kind,
            "material": self.material,
            "radius_mm": self.radius_mm,
            "path_lps": np.round(self.path_lps[::step], 2).tolist(),
        }

    def mass_points(self, spacing_mm: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
        """Points along the path and the mass (g) each carries."""
        segments = np.diff(self.path_lps, axis=0)
        lengths = np.linalg.norm(segments, axis=1)
        points, masses = [], []
        density = DENSITY_G_CM3[self.material]
        area_cm2 = np.pi * (self.radius_mm / 10.0) ** 2
        for start, segment, length in zip(self.path_lps[:-1], segments, lengths, strict=True):
            count = max(1, int(np.ceil(length / spacing_mm)))
            fractions = (np.arange(count) + 0.5) / count
            points.append(start + fractions[:, None] * segment)
            masses.append(np.full(count, density * area_cm2 * length / 10.0 / count))
        return np.concatenate(points), np.concatenate(masses)


def splat_devices(
    devices: list[Device], matrix: np.ndarray, intrinsics: Intrinsics
) -> dict[str, np.ndarray]:
    """Areal density (g/cm²) per material that the devices add to each pixel's ray.

    A mass m at magnification M covers M²·(pixel area) less of the detector per pixel than at
    the detector, so it adds m / (pixel area / M²) to the pixel it projects on; the amount is
    spread with the chord profile of the projected tube (radius M·r) so that wide wires are
    as wide as they look.
    """
    maps: dict[str, np.ndarray] = {}
    rows, columns = intrinsics.rows, intrinsics.columns
    pixel_area_cm2 = intrinsics.row_spacing_mm * intrinsics.column_spacing_mm / 100.0
    source = matrix @ np.r_[intrinsics.source_in_image_plane, 1.0]
    axis_to_detector = -matrix[:3, 2]
    for device in devices:
        points, masses = device.mass_points()
        depth = (points - source[:3]) @ axis_to_detector
        if np.any(depth <= 0):
            continue
        magnification = intrinsics.sid_mm / depth
        uv = project(matrix, intrinsics, points)
        radius_px = np.maximum(
            device.radius_mm
            * magnification
            / min(intrinsics.row_spacing_mm, intrinsics.column_spacing_mm),
            0.75,
        )
        reach = int(np.ceil(radius_px.max()))
        offsets = np.arange(-reach, reach + 1)
        du, dv = np.meshgrid(offsets, offsets, indexing="xy")
        centre_u, centre_v = np.rint(uv[:, 0]), np.rint(uv[:, 1])
        target_u = centre_u[:, None] + du.ravel()[None]
        target_v = centre_v[:, None] + dv.ravel()[None]
        distance2 = (target_u - uv[:, [0]]) ** 2 + (target_v - uv[:, [1]]) ** 2
        weights = np.sqrt(np.clip(radius_px[:, None] ** 2 - distance2, 0.0, None))
        weights /= weights.sum(axis=1, keepdims=True)
        areal = (masses * magnification**2 / pixel_area_cm2)[:, None] * weights
        inside = (target_u >= 0) & (target_u < columns) & (target_v >= 0) & (target_v < rows)
        image = maps.setdefault(device.material, np.zeros((rows, columns)))
        np.add.at(
            image,
            (target_v[inside].astype(int), target_u[inside].astype(int)),
            areal[inside],
        )
    return maps


# --- detector -----------------------------------------------------------------------------------


def add_scatter(
    primary: np.ndarray,
    source_weight: np.ndarray,
    body: np.ndarray,
    scatter_to_primary: float,
    sigma_px: float,
) -> tuple[np.ndarray, float]:
    """Scatter as a broad low-pass of the irradiated primary, scaled to a scatter/primary ratio.

    ``source_weight`` is where scatter originates (primary reaching the detector times the
    thickness it crossed, zero outside the collimated field); ``body`` marks pixels behind the
    patient, where the median scatter-to-primary ratio is set to ``scatter_to_primary``.
    Returns the scatter image and the ratio reached.
    """
    # A kernel tens of millimetres wide: blur a 1/8 image and bring it back.
    factor = max(1, int(sigma_px // 4))
    rows, columns = source_weight.shape
    small = _block_mean(source_weight, factor)
    blurred = ndimage.gaussian_filter(small, sigma_px / factor, mode="constant")
    scatter = ndimage.zoom(blurred, (rows / small.shape[0], columns / small.shape[1]), order=1)
    scatter = scatter[:rows, :columns]
    scatter = np.pad(
        scatter, ((0, rows - scatter.shape[0]), (0, columns - scatter.shape[1])), mode="edge"
    )
    region = body & (primary > 0)
    if not region.any() or scatter[region].max() <= 0:
        return np.zeros_like(primary), 0.0
    ratio = np.median(scatter[region] / primary[region])
    scatter *= scatter_to_primary / ratio
    return scatter, float(np.median(scatter[region] / primary[region]))


def _block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    rows, columns = image.shape
    padded = np.pad(image, ((0, -rows % factor), (0, -columns % factor)), mode="edge")
    return padded.reshape(padded.shape[0] // factor, factor, -1, factor).mean(axis=(1, 3))


def detector_blur(
    image: np.ndarray, sigma_px: float, glare_px: float, glare_fraction: float
) -> np.ndarray:
    """Scintillator light spread: a sharp Gaussian core plus a faint wide glare tail."""
    core = ndimage.gaussian_filter(image, sigma_px, mode="nearest")
    if glare_fraction <= 0:
        return core
    tail = ndimage.gaussian_filter(image, glare_px, mode="nearest")
    return (1.0 - glare_fraction) * core + glare_fraction * tail


# --- pixel storage -------------------------------------------------------------------------------

STORAGE_BITS = {"lin12": 12, "log8": 8, "log10": 10}


def store_linear(signal: np.ndarray, field: np.ndarray, bits: int = 12) -> tuple[np.ndarray, dict]:
    """Values proportional to detected quanta: the brightest anatomy at 3/4 of the range."""
    top = 2**bits - 1
    reference = float(np.percentile(signal[field], 99.0)) if field.any() else 1.0
    gain = 0.75 * top / max(reference, 1e-9)
    stored = np.rint(np.clip(signal * gain, 0, top)).astype(np.uint16)
    return stored, {"gain": gain, "bits_stored": bits}


def store_log(
    signal: np.ndarray,
    field: np.ndarray,
    bits: int,
    unsharp_amount: float,
    unsharp_sigma_px: float,
) -> tuple[np.ndarray, dict]:
    """Logarithm of the signal, windowed into ``bits`` and edge-enhanced by an unsharp mask.

    Higher values mean more transmitted intensity (Pixel Intensity Relationship Sign +1), so
    stored values fall as attenuation rises; outside the field stays 0.
    """
    top = 2**bits - 1
    logarithm = np.log(np.clip(signal, 1e-3, None))
    inside = logarithm[field] if field.any() else logarithm.ravel()
    low, high = np.percentile(inside, [0.5, 99.5])
    high = max(high, low + 1e-6)
    scaled = (logarithm - low) / (high - low)
    if unsharp_amount > 0:
        scaled = scaled + unsharp_amount * (
            scaled - ndimage.gaussian_filter(scaled, unsharp_sigma_px)
        )
    stored = np.rint(np.clip(scaled, 0.0, 1.0) * top)
    stored[~field] = 0
    return stored.astype(np.uint16 if bits > 8 else np.uint8), {
        "bits_stored": bits,
        "log_window": [float(low), float(high)],
        "unsharp_amount": unsharp_amount,
        "unsharp_sigma_px": unsharp_sigma_px,
    }
