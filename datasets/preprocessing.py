"""One case's preprocessing in memory, the same for training data (preprocess_data.py) and new patients (predict.py).

The sequences are resampled in-plane to the target spacing (cubic), cropped or
zero-padded to the field of view around the image centre (or, with the ``heart``
crop centre, around the heart's centre given per case, see datasets/roi.py), and mapped to [0, 1] by
the percentiles of that field of view (padding excluded), or with the ``released``
intensity mode clipped to [0, 255] and divided by 255; a label, when the case has
one, follows the same geometry (nearest). The settings are those recorded in
a preprocessed dataset's ``dataset.json``, so that a run's preprocessing can be
repeated exactly on cases it has never seen.
"""
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

from .geometry import CaseGeometry, plan_geometry, to_processed
from .layouts import CaseVolumes
from .roi import CROP_CENTRES

INTENSITY_MODES = ("percentile", "released")


@dataclass(frozen=True)
class PreprocessingSettings:
    spacing_mm: Optional[float]  # in-plane target spacing; 0 or None keeps the spacing
    crop_size: int
    percentiles: Optional[Tuple[float, float]]  # of the percentile intensity mode
    intensity: str = "percentile"
    crop_centre: str = "image"  # "heart": around a centre given per case

    @classmethod
    def from_dataset_settings(cls, settings, source):
        """From a dataset.json's ``settings`` (one without an intensity mode is percentile); errors name ``source``."""
        intensity = settings.get("intensity", "percentile")
        if intensity not in INTENSITY_MODES:
            raise ValueError(f"{source}: unknown intensity mode {intensity!r}; expected one of {INTENSITY_MODES}")
        required = ("spacing_mm", "crop_size") + (("percentiles",) if intensity == "percentile" else ())
        missing = [key for key in required if key not in settings]
        if missing:
            raise ValueError(f"{source} lacks the preprocessing setting(s) {', '.join(missing)}")
        crop_centre = settings.get("crop_centre", "image")
        if crop_centre not in CROP_CENTRES:
            raise ValueError(f"{source}: unknown crop centre {crop_centre!r}; expected one of {CROP_CENTRES}")
        percentiles = tuple(float(p) for p in settings["percentiles"]) if intensity == "percentile" else None
        return cls(settings["spacing_mm"], int(settings["crop_size"]), percentiles, intensity, crop_centre)


@dataclass
class ProcessedCase:
    images: Dict[str, np.ndarray]  # float32 (C, C, Z) in [0, 1]
    label: Optional[np.ndarray]  # uint8 (C, C, Z), or None for a case without label
    geometry: CaseGeometry
    intensity_ranges: Dict[str, Tuple[float, float]]  # raw values mapped to 0 and 1


def normalise(image, percentiles):
    """Map the percentiles of the image's defined (non-NaN) pixels to [0, 1], clip, and set NaN padding to 0.

    Robust to raw scanner ranges; a field of view without contrast is mapped by its extremes.
    """
    low, high = np.nanpercentile(image, percentiles)
    if high <= low:
        low, high = np.nanmin(image), np.nanmax(image)
    if high <= low:
        high = low + 1.0
    scaled = np.clip((image - low) / (high - low), 0.0, 1.0)
    return np.nan_to_num(scaled, nan=0.0).astype(np.float32), (float(low), float(high))


def scale_like_release(image):
    """The review release's scaling: clip to [0, 255], divide by 255; NaN padding becomes 0.

    Meant for volumes already scaled to [0, 255] (the released MyoPS380 data); raw
    scanner values above 255 all become 1.
    """
    scaled = np.clip(image, 0.0, 255.0) / 255.0
    return np.nan_to_num(scaled, nan=0.0).astype(np.float32), (0.0, 255.0)


def preprocess_case(volumes: CaseVolumes, settings: PreprocessingSettings, centre=None) -> ProcessedCase:
    """Resample, crop and normalise a loaded case (see the module docstring); ``centre`` (x, y in voxel
    indices) is required with the heart crop centre and refused with the image centre."""
    if (centre is None) != (settings.crop_centre == "image"):
        raise ValueError(f"{volumes.case_id}: the {settings.crop_centre} crop centre "
                         f"{'needs the heart centre' if centre is None else 'takes no centre'}")
    shape = next(iter(volumes.images.values())).shape
    geometry = plan_geometry(shape, volumes.spacing, volumes.affine, settings.spacing_mm, settings.crop_size, centre)
    label = to_processed(volumes.label, geometry, order=0) if volumes.label is not None else None
    images, ranges = {}, {}
    for modality, image in volumes.images.items():
        field_of_view = to_processed(image, geometry, order=3, fill=np.nan)
        images[modality], ranges[modality] = (scale_like_release(field_of_view) if settings.intensity == "released"
                                              else normalise(field_of_view, settings.percentiles))
    return ProcessedCase(images, label, geometry, ranges)
