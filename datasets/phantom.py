"""Synthetic three-sequence cardiac short-axis MRI: the embedded default dataset, in the MyoPS380 raw layout.

    python -m datasets.phantom --out data/phantom --cases 20 --seed 0

writes, for case ids case0001 .. caseNNNN (files of these cases that exist already are replaced only
with --overwrite),

    OUT/Raw_data/{bSSFP,LGE,T2w}/caseNNNN.nii.gz   float32 images at raw-scanner-like scales
    OUT/Raw_data/label/caseNNNN_gt.nii.gz           uint8: 0 background, 1 normal myocardium, 2 scar, 3 edema

Each case is a stack of short-axis slices (axes 0 and 1 in-plane, axis 2 from base to apex) through an
elliptic body with lungs at its sides, a right-ventricular crescent and a left ventricle whose myocardial
ring holds, in most cases, a scar wedge from the endocardium outwards, enclosed by transmural edema
(MyoPS convention: the edema label excludes the scar). The three sequences see the tissues with their
own contrasts: bSSFP shows the anatomy and no pathology, LGE a bright scar in nulled myocardium, T2w
bright edema and scar with black blood. Partial-volume blur, a bias field per sequence, Rician noise and
a small in-plane misalignment of LGE and T2w against bSSFP and the label make the images less ideal.

A case depends only on its number and the seed (``numpy.random.default_rng([seed, index])``), so any
case can be regenerated alone and a run with more cases extends a run with fewer.
"""
import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from datasets.vocabulary import MODALITIES

logger = logging.getLogger("datasets.phantom")

DEFAULT_CASES = 20
DEFAULT_SEED = 0
RAW_DIR = "Raw_data"
LABEL_DIR = "label"
TEMPORARY_SUFFIX = ".tmp.nii.gz"  # keeps the .nii.gz ending: nibabel picks the compression from the name

# Tissues of the tissue map, in the order of the contrast tables, and the label each one gets.
TISSUES = ("air", "body", "lung", "blood", "myocardium", "scar", "edema")
AIR, BODY, LUNG, BLOOD, MYOCARDIUM, SCAR, EDEMA = range(len(TISSUES))
LABEL_OF_TISSUE = np.array([0, 0, 0, 0, 1, 2, 3], dtype=np.uint8)
SCAR_LABEL, EDEMA_LABEL = 2, 3

# Geometry of a case; ranges are (low, high) of uniform draws.
IN_PLANE_PX = (144, 176)
AXIS_DIFFERENCE_PX = 8  # the two in-plane sizes differ by at most this much
SLICES = (6, 9)
SPACING_MM = (1.0, 1.3)
THICKNESS_MM = (8.0, 10.0)
ORIGIN_JITTER_MM = 30.0
LV_OFFSET_MM = 10.0  # the left-ventricle centre lies within this distance of the image centre

# Left ventricle: endocardial radius from base to apex, ellipticity, wall thickness around the ring.
LV_BASE_RADIUS_MM = (16.0, 21.0)
LV_APEX_RADIUS_MM = (12.5, 14.5)
LV_TAPER_EXPONENT = (0.8, 1.5)
ELLIPTICITY = (0.02, 0.06)
WALL_MM = (6.0, 11.0)
WALL_MEAN_MM = (7.5, 9.5)
WALL_SLOPE_MM = 1.5  # change of the mean thickness from base to apex, at most
WALL_HARMONICS = 2
WALL_HARMONIC_MM = 1.2  # amplitude of the first harmonic at most; the n-th gets 1/n of it
WALL_PHASE_DRIFT = 0.5  # rad from base to apex

# Right ventricle: an ellipse of blood beside the septum, cut by the left-ventricular epicardium.
RV_DIRECTION = np.pi
RV_DIRECTION_SPREAD = np.deg2rad(45.0)
RV_RADIAL_MM = (10.0, 15.0)
RV_TANGENTIAL_MM = (26.0, 36.0)
RV_OVERLAP = (0.0, 0.4)  # centre beyond the epicardium, in radial semi-axes
RV_APEX_SHRINK = (0.3, 0.6)

# Body and lungs, as fractions of the field of view and of the body's semi-axes.
BODY_OFFSET_MM = 8.0
BODY_SEMI_AXES = ((0.42, 0.58), (0.38, 0.52))
LUNG_LATERAL = (0.5, 0.65)
LUNG_VERTICAL = 0.15
LUNG_SEMI_AXES = ((0.25, 0.35), (0.45, 0.65))
HEART_MARGIN_MM = (2.0, 5.0)  # tissue kept between the heart and the lungs

# Pathology.
HEALTHY_FRACTION = 0.15
SCAR_WIDTH = np.deg2rad((40.0, 120.0))
SCAR_DEPTH = (0.4, 1.0)  # fraction of the wall, from the endocardium
SCAR_RUN = (0.5, 1.0)  # fraction of the slices holding scar; at least MIN_RUN slices
MIN_RUN = 2
SCAR_DRIFT = np.deg2rad(30.0)  # drift of the sector angle from base to apex, at most
SCAR_WOBBLE = np.deg2rad(8.0)
WIDTH_VARIATION = 0.1
DEPTH_VARIATION = 0.1
EDEMA_MARGIN = np.deg2rad((15.0, 40.0))  # on each side of the scar
EDEMA_EXTRA_SLICES = 1  # edema may reach this many slices beyond the scar at either end
SECOND_WEDGE_FRACTION = 0.3
SECOND_WEDGE_OFFSET = np.deg2rad((120.0, 240.0))
SECOND_WEDGE_WIDTH = (0.4, 0.75)  # fraction of the first wedge's width
SECOND_WEDGE_MIN_WIDTH = np.deg2rad(30.0)
SECOND_WEDGE_RUN = (0.3, 0.8)
MIN_REGION_AREA_MM2 = 70.0  # scar and edema per slice: over 30 pixels at 1.4 mm
AREA_ANGLES = 360  # angular samples for the area estimate

# Contrasts: relative intensities before scaling (air 0), varied per case, tissue texture.
CONTRASTS = {
    "bSSFP": {"body": 0.45, "lung": 0.05, "blood": 1.0, "myocardium": 0.25, "scar": 0.25, "edema": 0.25},
    "LGE": {"body": 0.30, "lung": 0.03, "blood": 0.55, "myocardium": 0.08, "scar": 0.90, "edema": 0.12},
    "T2w": {"body": 0.40, "lung": 0.05, "blood": 0.10, "myocardium": 0.30, "scar": 0.70, "edema": 0.75},
}
PATHOLOGY_BLIND = ("bSSFP",)  # scar and edema look like normal myocardium
CONTRAST_VARIATION = 0.1
TEXTURE_SCALE_MM = 8.0
TEXTURE_SLICE_SIGMA = 0.6
TEXTURE_GAIN = np.array([0.0, 0.12, 0.12, 0.03, 0.03, 0.03, 0.03], dtype=np.float32)

# Acquisition.
REFERENCE_SEQUENCE = "bSSFP"  # aligned with the label; the others are shifted against it
PARTIAL_VOLUME_SIGMA_PX = 0.6
MISALIGNMENT_PX = (0.25, 1.5)
BIAS_AMPLITUDE = (0.15, 0.25)
BIAS_WAVES = 3
BIAS_FREQUENCY = (0.7, 0.7, 0.3)  # cycles over half the volume along x, y and the slices, at most
PEAK_INTENSITY = (350.0, 3400.0)
NOISE_FRACTION = (0.02, 0.04)  # Rician sigma, of the sequence's maximum


@dataclass
class Geometry:
    """Voxel grid of a case and where the left ventricle sits in it."""
    shape: tuple
    spacing: float
    thickness: float
    affine: np.ndarray
    lv_offset: np.ndarray  # mm from the image centre

    @property
    def position(self):
        """Slice position, 0 at the base and 1 at the apex, shaped (Z,)."""
        return np.linspace(0.0, 1.0, self.shape[2])

    def grid(self):
        """In-plane coordinates in mm from the image centre, shaped (X, 1, 1) and (1, Y, 1)."""
        x = (np.arange(self.shape[0]) - (self.shape[0] - 1) / 2) * self.spacing
        y = (np.arange(self.shape[1]) - (self.shape[1] - 1) / 2) * self.spacing
        return x[:, None, None], y[None, :, None]


@dataclass
class LeftVentricle:
    """Endocardium and wall thickness as smooth functions of the angle, per slice."""
    radius: np.ndarray  # (Z,) mean endocardial radius, mm
    ellipticity: float
    ellipse_angle: float
    thickness: np.ndarray  # (Z,) mean wall thickness, mm
    harmonic_amplitudes: np.ndarray  # (H,)
    harmonic_phases: np.ndarray  # (H, Z)

    def endocardium(self, theta):
        """Endocardial radius at the angles ``theta`` (..., 1), shaped (..., Z)."""
        return self.radius * (1 + self.ellipticity * np.cos(2 * (theta - self.ellipse_angle)))

    def wall(self, theta):
        """Wall thickness at the angles ``theta`` (..., 1), shaped (..., Z)."""
        wall = self.thickness
        for order, (amplitude, phase) in enumerate(zip(self.harmonic_amplitudes, self.harmonic_phases), start=1):
            wall = wall + amplitude * np.cos(order * theta - phase)
        return np.clip(wall, *WALL_MM)


@dataclass
class RightVentricle:
    """An ellipse per slice beside the left ventricle; its blood is the part outside the epicardium."""
    direction: float
    distance: np.ndarray  # (Z,) centre from the left-ventricle centre, mm
    radial: np.ndarray  # (Z,) semi-axis towards the left ventricle, mm
    tangential: np.ndarray  # (Z,)

    def inside(self, x, y, margin=0.0):
        """Mask of the ellipse grown by ``margin`` mm, at coordinates from the left-ventricle centre."""
        cos, sin = np.cos(self.direction), np.sin(self.direction)
        along = x * cos + y * sin - self.distance
        across = y * cos - x * sin
        return (along / (self.radial + margin)) ** 2 + (across / (self.tangential + margin)) ** 2 < 1


@dataclass
class Body:
    """Elliptic body with two lungs, the same on every slice, in mm from the image centre."""
    centre: np.ndarray  # (2,)
    semi_axes: np.ndarray  # (2,)
    lung_centres: np.ndarray  # (2, 2)
    lung_semi_axes: np.ndarray  # (2, 2)
    heart_margin: float


@dataclass
class Wedge:
    """A scar sector of the myocardial ring and the edema around it."""
    centre: np.ndarray  # (Z,) angle of the sector's middle, rad
    half_width: np.ndarray  # (Z,) of the scar, rad
    depth: np.ndarray  # (Z,) scar extent from the endocardium, fraction of the wall
    margins: np.ndarray  # (2, Z) edema beyond the scar on either side, rad
    scar_slices: np.ndarray  # (Z,) bool
    edema_slices: np.ndarray  # (Z,) bool

    def masks(self, theta, depth):
        """Scar and edema masks (scar included) at angles ``theta`` and wall depths ``depth``."""
        offset = (theta - self.centre + np.pi) % (2 * np.pi) - np.pi
        scar = (np.abs(offset) <= self.half_width) & (depth < self.depth) & self.scar_slices
        edema = ((offset >= -(self.half_width + self.margins[0])) & (offset <= self.half_width + self.margins[1])
                 & self.edema_slices)
        return scar, edema


def case_name(index):
    """Case id of case ``index``: 1 -> 'case0001'."""
    return f"case{index:04d}"


def _sample_geometry(rng):
    nx = int(rng.integers(IN_PLANE_PX[0], IN_PLANE_PX[1] + 1))
    ny = int(np.clip(nx + rng.integers(-AXIS_DIFFERENCE_PX, AXIS_DIFFERENCE_PX + 1), *IN_PLANE_PX))
    nz = int(rng.integers(SLICES[0], SLICES[1] + 1))
    spacing, thickness = rng.uniform(*SPACING_MM), rng.uniform(*THICKNESS_MM)
    affine = np.diag([spacing, spacing, thickness, 1.0])
    extent = np.array([nx * spacing, ny * spacing, nz * thickness])
    affine[:3, 3] = -extent / 2 + rng.uniform(-ORIGIN_JITTER_MM, ORIGIN_JITTER_MM, 3)
    distance, angle = LV_OFFSET_MM * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
    lv_offset = distance * np.array([np.cos(angle), np.sin(angle)])
    return Geometry((nx, ny, nz), spacing, thickness, affine, lv_offset)


def _sample_left_ventricle(rng, position):
    base, apex = rng.uniform(*LV_BASE_RADIUS_MM), rng.uniform(*LV_APEX_RADIUS_MM)
    radius = base + (apex - base) * position ** rng.uniform(*LV_TAPER_EXPONENT)
    thickness = rng.uniform(*WALL_MEAN_MM) + rng.uniform(-WALL_SLOPE_MM, WALL_SLOPE_MM) * (position - 0.5)
    orders = np.arange(1, WALL_HARMONICS + 1)
    amplitudes = rng.uniform(0, WALL_HARMONIC_MM, len(orders)) / orders
    phases = (rng.uniform(0, 2 * np.pi, (len(orders), 1))
              + rng.uniform(-WALL_PHASE_DRIFT, WALL_PHASE_DRIFT, (len(orders), 1)) * position)
    return LeftVentricle(radius, rng.uniform(*ELLIPTICITY), rng.uniform(0, np.pi), thickness, amplitudes, phases)


def _sample_right_ventricle(rng, lv, position):
    direction = RV_DIRECTION + rng.uniform(-RV_DIRECTION_SPREAD, RV_DIRECTION_SPREAD)
    scale = 1 - rng.uniform(*RV_APEX_SHRINK) * position
    radial = rng.uniform(*RV_RADIAL_MM) * scale
    tangential = rng.uniform(*RV_TANGENTIAL_MM) * scale
    distance = lv.radius + lv.thickness + rng.uniform(*RV_OVERLAP) * radial
    return RightVentricle(direction, distance, radial, tangential)


def _sample_body(rng, geometry):
    field_of_view = np.array(geometry.shape[:2]) * geometry.spacing
    semi_axes = field_of_view * [rng.uniform(*limits) for limits in BODY_SEMI_AXES]
    centre = rng.uniform(-BODY_OFFSET_MM, BODY_OFFSET_MM, 2)
    lateral = rng.uniform(*LUNG_LATERAL, 2) * [-1, 1]
    vertical = rng.uniform(-LUNG_VERTICAL, LUNG_VERTICAL, 2)
    lung_centres = centre + np.stack([lateral, vertical], axis=1) * semi_axes
    lung_semi_axes = np.stack([rng.uniform(*limits, 2) for limits in LUNG_SEMI_AXES], axis=1) * semi_axes
    return Body(centre, semi_axes, lung_centres, lung_semi_axes, rng.uniform(*HEART_MARGIN_MM))


def _annular_area_per_radian(radius, wall, depth):
    """Area (mm^2) per radian of the ring from the endocardium out to ``depth`` of the wall."""
    return ((radius + depth * wall) ** 2 - radius ** 2) / 2


def _grow_to_min_area(wedge, lv):
    """Widen scar and edema on slices where they would cover less than MIN_REGION_AREA_MM2.

    The estimate takes the smallest endocardial radius and wall thickness of each slice, so it errs
    towards larger regions; apical slices with shallow scars are where it matters.
    """
    angles = np.linspace(0, 2 * np.pi, AREA_ANGLES, endpoint=False)[:, None]
    radius, wall = lv.endocardium(angles).min(axis=0), lv.wall(angles).min(axis=0)
    scar_half_width = MIN_REGION_AREA_MM2 / (2 * _annular_area_per_radian(radius, wall, wedge.depth))
    edema_margin = MIN_REGION_AREA_MM2 / (2 * _annular_area_per_radian(radius, wall, 1.0))
    return replace(wedge, half_width=np.maximum(wedge.half_width, scar_half_width),
                   margins=np.maximum(wedge.margins, edema_margin))


def _sample_run(rng, n_slices, run_fraction):
    """Contiguous slices holding scar, and the edema slices around them."""
    run = min(n_slices, max(MIN_RUN, round(rng.uniform(*run_fraction) * n_slices)))
    start = int(rng.integers(0, n_slices - run + 1))
    before, after = rng.integers(0, EDEMA_EXTRA_SLICES + 1, 2)
    scar_slices = np.zeros(n_slices, dtype=bool)
    edema_slices = np.zeros(n_slices, dtype=bool)
    scar_slices[start:start + run] = True
    edema_slices[max(0, start - before):start + run + after] = True
    return scar_slices, edema_slices


def _sample_wedge(rng, lv, position, centre, width, run_fraction):
    scar_slices, edema_slices = _sample_run(rng, len(position), run_fraction)
    ramp = 2 * position - 1
    centre = (centre + rng.uniform(-SCAR_DRIFT, SCAR_DRIFT) * ramp / 2
              + rng.uniform(0, SCAR_WOBBLE) * np.sin(2 * np.pi * position + rng.uniform(0, 2 * np.pi)))
    half_width = width / 2 * (1 + rng.uniform(-WIDTH_VARIATION, WIDTH_VARIATION) * ramp)
    depth = np.clip(rng.uniform(*SCAR_DEPTH) + rng.uniform(-DEPTH_VARIATION, DEPTH_VARIATION) * ramp, *SCAR_DEPTH)
    margins = rng.uniform(*EDEMA_MARGIN, (2, 1)) * np.ones_like(position)
    return _grow_to_min_area(Wedge(centre, half_width, depth, margins, scar_slices, edema_slices), lv)


def _sample_pathology(rng, lv, position):
    """No wedge (HEALTHY_FRACTION of the cases), one, or sometimes a second, smaller one."""
    if rng.uniform() < HEALTHY_FRACTION:
        return []
    width, centre = rng.uniform(*SCAR_WIDTH), rng.uniform(0, 2 * np.pi)
    wedges = [_sample_wedge(rng, lv, position, centre, width, SCAR_RUN)]
    if rng.uniform() < SECOND_WEDGE_FRACTION:
        second_width = max(SECOND_WEDGE_MIN_WIDTH, width * rng.uniform(*SECOND_WEDGE_WIDTH))
        second_centre = centre + rng.uniform(*SECOND_WEDGE_OFFSET)
        wedges.append(_sample_wedge(rng, lv, position, second_centre, second_width, SECOND_WEDGE_RUN))
    return wedges


def _ellipse(x, y, centre, semi_axes):
    return ((x - centre[0]) / semi_axes[0]) ** 2 + ((y - centre[1]) / semi_axes[1]) ** 2 < 1


def _tissue_map(geometry, lv, rv, body, wedges):
    """Tissue codes (X, Y, Z), painted from the outside in: body, lungs, heart, pathology."""
    x, y = geometry.grid()
    lv_x, lv_y = x - geometry.lv_offset[0], y - geometry.lv_offset[1]
    radius, theta = np.hypot(lv_x, lv_y), np.arctan2(lv_y, lv_x)
    endocardium, wall = lv.endocardium(theta), lv.wall(theta)
    depth = (radius - endocardium) / wall  # 0 at the endocardium, 1 at the epicardium
    myocardium = (depth >= 0) & (depth < 1)
    lungs = (_ellipse(x, y, body.lung_centres[0], body.lung_semi_axes[0])
             | _ellipse(x, y, body.lung_centres[1], body.lung_semi_axes[1]))
    heart = (radius < endocardium + wall + body.heart_margin) | rv.inside(lv_x, lv_y, body.heart_margin)
    layers = ((_ellipse(x, y, body.centre, body.semi_axes), BODY), (lungs, LUNG), (heart, BODY),
              (rv.inside(lv_x, lv_y) & (depth >= 1), BLOOD), (depth < 0, BLOOD), (myocardium, MYOCARDIUM))
    tissue = np.full(geometry.shape, AIR, dtype=np.uint8)
    for mask, code in layers:
        tissue[np.broadcast_to(mask, geometry.shape)] = code
    for wedge in wedges:
        scar, edema = wedge.masks(theta, depth)
        tissue[edema & myocardium & (tissue != SCAR)] = EDEMA
        tissue[scar & myocardium] = SCAR
    return tissue


def _texture(rng, geometry):
    """Smooth, low-frequency random field with unit standard deviation, shaped like the volume."""
    sigma_px = TEXTURE_SCALE_MM / geometry.spacing
    noise = rng.standard_normal(geometry.shape, dtype=np.float32)
    field = ndimage.gaussian_filter(noise, (sigma_px, sigma_px, TEXTURE_SLICE_SIGMA))
    return field / field.std()


def _contrast(rng, sequence):
    """Relative intensity of each tissue in ``sequence``, varied by up to CONTRAST_VARIATION."""
    nominal = np.array([CONTRASTS[sequence].get(name, 0.0) for name in TISSUES])
    values = nominal * rng.uniform(1 - CONTRAST_VARIATION, 1 + CONTRAST_VARIATION, len(TISSUES))
    if sequence in PATHOLOGY_BLIND:
        values[[SCAR, EDEMA]] = values[MYOCARDIUM]
    return values.astype(np.float32)


def _misalignment(rng):
    """In-plane shift in voxels, of random direction and a length within MISALIGNMENT_PX."""
    length, angle = rng.uniform(*MISALIGNMENT_PX), rng.uniform(0, 2 * np.pi)
    return length * np.cos(angle), length * np.sin(angle), 0.0


def _bias_field(rng, shape):
    """Smooth multiplicative field of a few low-frequency waves, 1 +- a random BIAS_AMPLITUDE."""
    axes = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in shape), indexing="ij", sparse=True)
    field = np.zeros(shape, dtype=np.float32)
    for _ in range(BIAS_WAVES):
        frequencies = rng.uniform(-1, 1, 3) * BIAS_FREQUENCY
        phase = np.float32(rng.uniform(0, 2 * np.pi))
        field += np.cos(np.pi * sum(np.float32(f) * axis for f, axis in zip(frequencies, axes)) + phase)
    field -= field.mean()
    return 1 + np.float32(rng.uniform(*BIAS_AMPLITUDE)) * field / np.abs(field).max()


def _rician(rng, signal, sigma):
    """Magnitude of the signal plus complex Gaussian noise of standard deviation ``sigma``."""
    real = signal + np.float32(sigma) * rng.standard_normal(signal.shape, dtype=np.float32)
    imaginary = np.float32(sigma) * rng.standard_normal(signal.shape, dtype=np.float32)
    return np.hypot(real, imaginary)


def _render(rng, sequence, tissue, texture):
    """One sequence's image: contrast, texture, partial-volume blur, misalignment, bias, scale, noise."""
    image = _contrast(rng, sequence)[tissue] * (1 + TEXTURE_GAIN[tissue] * texture)
    image = ndimage.gaussian_filter(image, (PARTIAL_VOLUME_SIGMA_PX, PARTIAL_VOLUME_SIGMA_PX, 0))
    if sequence != REFERENCE_SEQUENCE:
        image = ndimage.shift(image, _misalignment(rng), order=1, mode="nearest")
    image *= _bias_field(rng, tissue.shape)
    image *= np.float32(rng.uniform(*PEAK_INTENSITY) / image.max())
    return _rician(rng, image, rng.uniform(*NOISE_FRACTION) * image.max()).astype(np.float32)


def generate_case(index: int, seed: int) -> dict:
    """Case ``index`` (1 for case0001) of the phantom with ``seed``, deterministic for the pair.

    Returns ``{"images": {sequence: float32 (X, Y, Z)}, "label": uint8 (X, Y, Z), "affine": (4, 4)}``
    with the sequences of ``MODALITIES``.
    """
    rng = np.random.default_rng([seed, index])
    geometry = _sample_geometry(rng)
    lv = _sample_left_ventricle(rng, geometry.position)
    rv = _sample_right_ventricle(rng, lv, geometry.position)
    body = _sample_body(rng, geometry)
    wedges = _sample_pathology(rng, lv, geometry.position)
    tissue = _tissue_map(geometry, lv, rv, body, wedges)
    texture = _texture(rng, geometry)
    images = {sequence: _render(rng, sequence, tissue, texture) for sequence in MODALITIES}
    return {"images": images, "label": LABEL_OF_TISSUE[tissue], "affine": geometry.affine}


def _save_nifti(array, affine, path):
    """Write ``array`` to ``path`` through a temporary file beside it, so readers never see half a file."""
    temporary = path.with_name(f".{path.name}{TEMPORARY_SUFFIX}")
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    try:
        nib.save(image, temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _describe(case):
    label = case["label"]
    sizes = "x".join(str(n) for n in label.shape)
    spacing = "x".join(f"{s:.2f}" for s in np.diag(case["affine"])[:3])
    scar = np.any(label == SCAR_LABEL, axis=(0, 1)).sum()
    edema = np.any(label == EDEMA_LABEL, axis=(0, 1)).sum()
    pathology = f"scar on {scar}, edema on {edema} slices" if scar else "no pathology"
    return f"{sizes} voxels of {spacing} mm, {pathology}"


def write_phantom(out_dir, cases: int = DEFAULT_CASES, seed: int = DEFAULT_SEED, overwrite: bool = False) -> list[str]:
    """Write cases 1 .. ``cases`` in the MyoPS380 raw layout under ``out_dir``; returns their ids.

    Files of those cases that already exist are an error unless ``overwrite``.
    """
    if cases < 1 or seed < 0:
        raise ValueError(f"need at least one case and a non-negative seed, got {cases} cases and seed {seed}")
    raw = Path(out_dir) / RAW_DIR
    existing = [path for index in range(1, cases + 1) for path in
                [raw / sequence / f"{case_name(index)}.nii.gz" for sequence in MODALITIES]
                + [raw / LABEL_DIR / f"{case_name(index)}_gt.nii.gz"] if path.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{raw} already holds {len(existing)} of the files to write (first {existing[0]}): "
                              "pass --overwrite to replace them, or choose another --out")
    for folder in (*MODALITIES, LABEL_DIR):
        (raw / folder).mkdir(parents=True, exist_ok=True)
    start, case_ids, pathological = time.perf_counter(), [], 0
    for index in range(1, cases + 1):
        case_id = case_name(index)
        case = generate_case(index, seed)
        for sequence, image in case["images"].items():
            _save_nifti(image, case["affine"], raw / sequence / f"{case_id}.nii.gz")
        _save_nifti(case["label"], case["affine"], raw / LABEL_DIR / f"{case_id}_gt.nii.gz")
        pathological += bool(np.any(case["label"] >= SCAR_LABEL))
        case_ids.append(case_id)
        logger.info("%s: %s", case_id, _describe(case))
    logger.info("phantom written to %s: %d cases (%d with pathology), seed %d, %.1f s", raw, cases, pathological,
                seed, time.perf_counter() - start)
    return case_ids


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m datasets.phantom", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="dataset folder; Raw_data/ is written in it")
    parser.add_argument("--cases", type=int, default=DEFAULT_CASES, help=f"number of cases (default {DEFAULT_CASES})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})")
    parser.add_argument("--overwrite", action="store_true", help="replace cases that already exist in --out")
    return parser.parse_args(argv)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        write_phantom(args.out, args.cases, args.seed, args.overwrite)
    except (ValueError, FileExistsError) as error:
        logger.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
