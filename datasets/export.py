"""Writing predictions (test.py, predict.py): NIfTI label volumes that overlay on the patient's images, PNG overlays."""
import gzip

import nibabel as nib
import numpy as np

from utils import atomic_path

from .vocabulary import MODALITIES

COLOURS = {1: (0, 200, 0), 2: (255, 220, 0), 3: (0, 120, 255)}  # myocardium, scar, edema


def save_nifti(prediction, affine, path, header=None):
    """Atomic .nii.gz write of a label volume in its own integer type; returns the image written.

    With ``header`` (the input image's), the output keeps its orientation codes and units;
    otherwise the units are mm. nibabel picks the format from the file name, so bytes are written here.
    """
    prediction = np.asarray(prediction)
    image = nib.Nifti1Image(prediction, affine, header)
    image.set_data_dtype(prediction.dtype)
    if header is None:
        image.header.set_xyzt_units("mm")
    else:
        image.header["cal_min"], image.header["cal_max"] = 0, 0  # the input's display window is not the labels'
    with atomic_path(path) as temporary:
        temporary.write_bytes(gzip.compress(image.to_bytes(), mtime=0))
    return image


def save_overlay(image, label, prediction, path):
    """One row per slice: LGE, LGE with the reference (when ``label`` is given), LGE with the prediction.

    ``image`` is (M, H, W, Z) in [0, 1] with the sequences in the order of MODALITIES.
    """
    from PIL import Image  # only --save_png needs Pillow

    lge = image[MODALITIES.index("LGE")]
    masks = [prediction] if label is None else [label, prediction]
    rows = []
    for z in range(prediction.shape[2]):
        grey = (np.clip(lge[:, :, z], 0, 1) * 255).astype(np.uint8)
        base = np.stack([grey] * 3, axis=-1).astype(np.float32)
        panels = [base]
        for mask in masks:
            overlay = base.copy()
            for value, colour in COLOURS.items():
                overlay[mask[:, :, z] == value] = 0.4 * overlay[mask[:, :, z] == value] + 0.6 * np.asarray(colour)
            panels.append(overlay)
        rows.append(np.concatenate(panels, axis=1))
    with atomic_path(path) as temporary:
        Image.fromarray(np.concatenate(rows, axis=0).astype(np.uint8)).save(temporary, format="PNG")
