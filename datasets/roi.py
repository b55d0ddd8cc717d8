"""Region of interest: where the heart is, so that a fine crop can be centred on it (``--crop_centre heart``).

Training cases are centred on their label; cases segmented without a label (test cases, new
patients) on the heart that a coarse model found (``locate_heart.py``). Centres are in-plane
(x, y) original voxel indices, written per case to a centres file.
"""
import json
import math
from pathlib import Path

import numpy as np
from utils import atomic_path

from .layouts import DataError
from .postprocessing import largest_component as largest_connected

CENTRES_FORMAT = "immseg-heart-centres/1"
CROP_CENTRES = ("image", "heart")


def heart_centre(label, largest_component=False):
    """(x, y) middle of the bounding box of the myocardium (classes > 0) over all slices; None if there is none.

    With ``largest_component`` (for predictions) only the largest 3-D connected component counts, so that a
    stray false positive away from the heart does not move the crop.
    """
    heart = np.asarray(label) > 0
    if largest_component:
        heart = largest_connected(heart)
    if not heart.any():
        return None
    return tuple(float(np.flatnonzero(heart.any(axis=tuple(b for b in range(heart.ndim) if b != a)))[[0, -1]].mean())
                 for a in range(2))


def write_centres(path, centres, source):
    """Atomically write {case: (x, y)} with a note on where the centres come from."""
    content = {"format": CENTRES_FORMAT, "source": source,
               "centres": {case: [round(float(v), 2) for v in centre] for case, centre in sorted(centres.items())}}
    with atomic_path(Path(path)) as temporary:
        temporary.write_text(json.dumps(content, indent=2) + "\n")


def read_centres(path):
    """{case: (x, y)} of a centres file; errors name the file and what was expected."""
    path = Path(path)
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as error:  # ValueError: not JSON, or not UTF-8 text
        raise DataError(f"heart centres file {path} is not readable JSON: {error}") from None
    if not isinstance(content, dict) or content.get("format") != CENTRES_FORMAT \
            or not isinstance(content.get("centres"), dict):
        raise DataError(f"{path} is not a heart centres file (format {CENTRES_FORMAT} with a 'centres' mapping, "
                        "written by locate_heart.py)")
    centres = {}
    for case, centre in content["centres"].items():
        if not (isinstance(centre, list) and len(centre) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                        for v in centre)):
            raise DataError(f"{path}: the centre of {case} is {centre!r}; expected [x, y] in voxel indices")
        centres[case] = tuple(float(v) for v in centre)
    return centres
