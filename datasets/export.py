"""Writing predictions (test.py, predict.py): NIfTI label volumes that overlay on the patient's images."""
import gzip

import nibabel as nib
import numpy as np

from utils import atomic_path


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

