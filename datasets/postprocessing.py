"""Anatomical post-processing of predicted label volumes (test.py and predict.py, ``--postprocess``).

The myocardium is one connected wall, and scar and edema lie within it; a blob of myocardium, scar or
edema away from it is a false positive. Labels: 0 background, 1 normal myocardium, 2 scar, 3 edema.
"""
import numpy as np
from scipy import ndimage


def largest_component(mask):
    """The largest connected component of a boolean volume (26-connectivity in 3-D); all False if it is empty."""
    mask = np.asarray(mask, dtype=bool)
    components, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    if count <= 1:
        return mask
    sizes = np.bincount(components.ravel())[1:]
    return components == 1 + int(np.argmax(sizes))


def keep_largest_myocardium(labels):
    """A copy of a class-0-3 volume in which only the largest connected component of the whole myocardium
    (classes 1-3 together) keeps its labels; every other myocardium, scar or edema voxel becomes background.

    Components are 3-D with 26-connectivity, so slices of one heart that touch in any corner stay together.
    """
    labels = np.asarray(labels)
    kept = labels.copy()
    kept[~largest_component(labels > 0)] = 0
    return kept
