"""The in-plane geometry of preprocessing, recorded so that it can be undone.

A volume (X, Y, Z) with spacing (sx, sy, sz) is resampled in-plane to about the
target spacing, giving (X', Y', Z), then cropped or zero-padded to a fixed field of
view of (C, C) around the image centre, or around a given point (the heart, for a
region-of-interest crop). :class:`CaseGeometry` stores both steps;
:func:`to_processed` applies them and :func:`to_original` inverts them (crop
reinserted into the resampled grid, then resampled back to (X, Y)).

Resampling maps the whole field of view onto the new grid (pixel edges align,
"grid mode"): output pixel i samples input coordinate (i + 0.5) * X / X' - 0.5.
"""
import json
import math
from dataclasses import asdict, dataclass
from typing import Tuple

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class CaseGeometry:
    original_shape: Tuple[int, int, int]
    original_spacing: Tuple[float, float, float]
    affine: Tuple[Tuple[float, ...], ...]
    resampled_shape: Tuple[int, int]
    crop_start: Tuple[int, int]  # in the resampled grid; negative values mean padding
    crop_size: Tuple[int, int]

    @property
    def processed_spacing(self):
        """Actual spacing of the processed grid (the target, up to rounding of the resampled shape)."""
        return tuple(self.original_spacing[a] * self.original_shape[a] / self.resampled_shape[a]
                     for a in range(2)) + (self.original_spacing[2],)

    @property
    def affine_array(self):
        return np.asarray(self.affine, dtype=np.float64)

    def to_attrs(self):
        """Flat attributes for an h5 file."""
        return {"geometry": json.dumps(asdict(self)), "processed_spacing": np.asarray(self.processed_spacing)}

    @classmethod
    def from_attrs(cls, attrs):
        data = json.loads(attrs["geometry"])
        return cls(**{key: _as_tuple(value) for key, value in data.items()})


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def plan_geometry(shape, spacing, affine, target_spacing, crop_size, centre=None):
    """Geometry for a volume: in-plane resampling to ``target_spacing`` (None keeps the spacing) and a crop around
    the image centre, or around ``centre`` (x, y in original voxel indices) when given."""
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    if target_spacing:
        resampled = tuple(max(1, int(round(shape[a] * spacing[a] / target_spacing))) for a in range(2))
    else:
        resampled = shape[:2]
    crop = (int(crop_size), int(crop_size))
    if centre is None:
        start = tuple((resampled[a] - crop[a]) // 2 for a in range(2))
    else:  # the centre's position on the resampled grid (grid mode, see the module docstring), rounded
        start = tuple(int(math.floor((float(centre[a]) + 0.5) * resampled[a] / shape[a] - crop[a] / 2 + 0.5))
                      for a in range(2))
    affine = tuple(tuple(float(v) for v in row) for row in np.asarray(affine))
    return CaseGeometry(shape, spacing, affine, resampled, start, crop)


def resize_inplane(volume, out_shape, order):
    """Resample axes 0 and 1 of (X, Y, ...) to ``out_shape`` in grid mode; order 0 nearest, 1 linear, 3 cubic."""
    in_shape = volume.shape[:2]
    if tuple(in_shape) == tuple(out_shape):
        return volume.copy()
    scale = np.array(in_shape, dtype=np.float64) / np.array(out_shape, dtype=np.float64)
    offset = 0.5 * scale - 0.5
    flat = volume.reshape(in_shape + (-1,))
    out = np.empty(tuple(out_shape) + (flat.shape[2],), dtype=volume.dtype)
    for index in range(flat.shape[2]):
        out[..., index] = ndimage.affine_transform(flat[..., index], scale, offset=offset, output_shape=out_shape,
                                                   order=order, mode="nearest", prefilter=order > 1)
    return out.reshape(tuple(out_shape) + volume.shape[2:])


def crop_or_pad(volume, start, size, fill=0):
    """Window ``[start, start + size)`` of axes 0 and 1, padded with ``fill`` where it leaves the volume."""
    out = np.full(tuple(size) + volume.shape[2:], fill, dtype=volume.dtype)
    src = [slice(max(start[a], 0), min(start[a] + size[a], volume.shape[a])) for a in range(2)]
    dst = [slice(s.start - start[a], s.stop - start[a]) for a, s in enumerate(src)]
    out[dst[0], dst[1]] = volume[src[0], src[1]]
    return out


def uncrop(window, start, full_shape, fill=0):
    """Inverse of :func:`crop_or_pad`: put the window back into an array of ``full_shape`` (axes 0, 1)."""
    out = np.full(tuple(full_shape) + window.shape[2:], fill, dtype=window.dtype)
    dst = [slice(max(start[a], 0), min(start[a] + window.shape[a], full_shape[a])) for a in range(2)]
    src = [slice(d.start - start[a], d.stop - start[a]) for a, d in enumerate(dst)]
    out[dst[0], dst[1]] = window[src[0], src[1]]
    return out


def to_processed(volume, geometry, order, fill=0):
    """Original (X, Y, ...) -> processed (C, C, ...)."""
    return crop_or_pad(resize_inplane(volume, geometry.resampled_shape, order), geometry.crop_start,
                       geometry.crop_size, fill)


def to_original(volume, geometry, order, fill=0):
    """Processed (C, C, ...) -> original (X, Y, ...)."""
    resampled = uncrop(volume, geometry.crop_start, geometry.resampled_shape, fill)
    return resize_inplane(resampled, geometry.original_shape[:2], order)


def probabilities_to_original(probabilities, geometry):
    """Class probabilities (K, C, C, Z) -> label volume (X, Y, Z) in the original grid.

    Probabilities are resampled linearly (outside the field of view: background),
    then the most probable class is taken, as nnU-Net exports its predictions.
    """
    resampled = []
    for k, channel in enumerate(probabilities):
        resampled.append(to_original(channel.astype(np.float32), geometry, order=1, fill=1.0 if k == 0 else 0.0))
    return np.argmax(np.stack(resampled), axis=0).astype(np.uint8)
