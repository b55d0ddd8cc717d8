"""Datasets over preprocess_data.py's output, and the training augmentation of method.md.

Training items are slices: ``image`` (3, H, W) float32 in [0, 1] with the sequences
in the order bSSFP, LGE, T2w, ``label`` (H, W) int64, ``case_name``. Volume items
(validation and test) hold ``image`` (3, H, W, D), ``label`` (H, W, D), ``case_name``,
``geometry`` (a CaseGeometry, or None for volumes written without one) and ``meta``
(the h5 attributes: source files, label map, intensity range).
"""
import logging
import math
from pathlib import Path

import h5py
import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from .geometry import CaseGeometry
from .layouts import DataError
from .vocabulary import CLASS_NAMES, MODALITIES

logger = logging.getLogger(__name__)

VOLUME_SPLITS = ("val", "test_vol")


def _read_list(path):
    if not path.is_file():
        raise FileNotFoundError(f"list file {path} does not exist; run preprocess_data.py to create it")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


class MyoPSDataset(Dataset):
    """Slices (``split='train'``) or volumes (``'val'``, ``'test_vol'``) of a preprocessed dataset.

    base_dir holds ``bSSFP/``, ``LGE/``, ``T2w/`` and, unless ``list_dir`` says
    otherwise, the list files ``train.txt``, ``val.txt`` and ``test_vol.txt``.
    The review release's ``Processed_data`` has the same layout and file names and
    is read as it is, with ``list_dir`` its ``list/`` folder: float32 labels are
    accepted when they hold whole class indices, and its volumes carry no geometry.
    """

    def __init__(self, base_dir, list_dir=None, split="train", transform=None):
        self.base_dir = Path(base_dir)
        self.split = split
        self.transform = transform
        self.sample_list = _read_list(Path(list_dir or base_dir) / f"{split}.txt")
        missing = [str(self.base_dir / m) for m in MODALITIES if not (self.base_dir / m).is_dir()]
        if missing:
            raise FileNotFoundError(f"{self.base_dir} is not a preprocessed dataset: missing {', '.join(missing)}")

    def __len__(self):
        return len(self.sample_list)

    def _path(self, modality, name):
        if self.split in VOLUME_SPLITS:
            return self.base_dir / modality / "test_vol_h5" / f"{name}.npy.h5"
        return self.base_dir / modality / "train_npz" / f"{name}.npz"

    def __getitem__(self, index):
        name = self.sample_list[index]
        if self.split in VOLUME_SPLITS:
            return self._volume(name)
        images, label = [], None
        for modality in MODALITIES:
            path = self._path(modality, name)
            if not path.is_file():
                raise FileNotFoundError(f"slice {name}: missing {path}")
            with np.load(path) as data:
                missing = {"image", "label"} - set(data.files)
                if missing:
                    raise DataError(f"slice {name}: {path} has no array {', '.join(sorted(missing))} "
                                    f"(expected 'image' and 'label', has {data.files})")
                images.append(data["image"].astype(np.float32))
                if label is None:
                    label = _class_indices(data["label"], path)
        sample = {"image": np.stack(images), "label": label}
        if self.transform is not None:
            sample = self.transform(sample)
        else:
            sample = {"image": torch.from_numpy(sample["image"]), "label": torch.from_numpy(sample["label"])}
        sample["case_name"] = name
        return sample

    def _volume(self, name):
        images, label, meta = [], None, None
        for modality in MODALITIES:
            path = self._path(modality, name)
            if not path.is_file():
                raise FileNotFoundError(f"volume {name}: missing {path}")
            with h5py.File(path, "r") as handle:
                missing = {"image", "label"} - set(handle.keys())
                if missing:
                    raise DataError(f"volume {name}: {path} has no dataset {', '.join(sorted(missing))} "
                                    f"(expected 'image' and 'label', has {sorted(handle.keys())})")
                images.append(handle["image"][:].astype(np.float32))
                if label is None:
                    label = _class_indices(handle["label"][:], path)
                    meta = {key: _plain(value) for key, value in handle.attrs.items()}
        geometry = CaseGeometry.from_attrs(meta) if "geometry" in meta else None
        return {"image": torch.from_numpy(np.stack(images)), "label": torch.from_numpy(label), "case_name": name,
                "geometry": geometry, "meta": meta}


def _class_indices(label, path):
    """The label as int64 class indices; stored as any dtype (the release writes float32) holding whole 0-3."""
    classes = label.astype(np.int64)
    if not np.array_equal(classes, label) or classes.min() < 0 or classes.max() >= len(CLASS_NAMES):
        values = np.unique(label)
        raise DataError(f"{path}: label values must be whole numbers in 0-{len(CLASS_NAMES) - 1}, found "
                        f"{values[:10].tolist()}{' ...' if values.size > 10 else ''}")
    return classes


def _plain(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


# wider ranges for small datasets: intensities vary several-fold between scanners and cases, and a
# window larger than the slice zooms out as well as in
_STRONG = {"brightness": (0.6, 1.4), "gamma": (0.6, 1.6), "window": (0.8, 1.25), "noise_std": 0.05}
AUGMENTATIONS = {
    # method.md's ranges
    "paper": {"brightness": (0.8, 1.2), "gamma": (0.8, 1.2), "window": (0.8, 1.0), "noise_std": 0.05},
    "strong": _STRONG,
    # "strong" plus what nnU-Net adds for small 2-D datasets: wider scaling, an elastic deformation, and per
    # sequence a contrast change and a Gaussian blur, each with nnU-Net's probabilities
    "nnunet": {**_STRONG, "window": (0.7, 1.4), "contrast": (0.75, 1.25), "contrast_p": 0.15,
               "blur_sigma": (0.5, 1.0), "blur_p": 0.2,
               "elastic_alpha": (0.0, 200.0), "elastic_sigma": (9.0, 13.0), "elastic_p": 0.2},
}


class RandomGenerator:
    """method.md's augmentation, one geometric transform shared by the three sequences and the label.

    With probability 1/2 a rot90 and flip, else with 1/2 a rotation within
    +-``max_rotation`` degrees, else with 1/2 Gaussian noise; then (each with
    probability 1/2) a shift of up to ``max_shift`` px, a brightness factor and a
    gamma per sequence, and a random window of ``window`` times the side (below 1
    a crop, above 1 a zoom-out with zero padding); finally the result is resized to
    ``output_size``. All geometric steps are composed into one affine map and
    applied in a single resampling (images cubic, label nearest). Intensities stay
    in [0, 1]. The ranges come from a preset of ``AUGMENTATIONS``; a preset with
    ``elastic_*`` adds a smooth random displacement (``elastic_alpha`` scales uniform
    noise smoothed by a Gaussian of ``elastic_sigma`` output pixels) to that one
    resampling, and with ``contrast``/``blur_sigma`` each sequence may be rescaled about
    its mean and blurred. Presets without them draw the same random numbers as before.
    """

    def __init__(self, output_size, preset="paper", max_rotation=20.0, max_shift=5):
        if preset not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {preset!r}; expected one of {sorted(AUGMENTATIONS)}")
        self.output_size = tuple(output_size)
        self.max_rotation = max_rotation
        self.max_shift = max_shift
        self.ranges = AUGMENTATIONS[preset]

    def _geometry(self, size, rng):
        """Matrix and offset mapping output pixel coordinates to input pixel coordinates."""
        centre_in = (np.asarray(size, dtype=np.float64) - 1) / 2
        linear = np.eye(2)
        noise = False
        if rng.random() < 0.5:
            quarter = np.array([[0.0, -1.0], [1.0, 0.0]])
            linear = np.linalg.matrix_power(quarter, int(rng.integers(4)))
            if rng.random() < 0.5:
                linear = linear @ np.diag([-1.0, 1.0])
        elif rng.random() < 0.5:
            angle = math.radians(rng.uniform(-self.max_rotation, self.max_rotation))
            linear = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        elif rng.random() < 0.5:
            noise = True
        shift = rng.integers(-self.max_shift, self.max_shift + 1, size=2) if rng.random() < 0.5 else np.zeros(2)
        window = np.asarray(size, dtype=np.float64)
        window_offset = np.zeros(2)
        if rng.random() < 0.5:
            window = window * rng.uniform(*self.ranges["window"])
            window_offset = rng.uniform(-1, 1, size=2) * np.abs(np.asarray(size) - window) / 2
        scale = window / np.asarray(self.output_size, dtype=np.float64)
        matrix = linear @ np.diag(scale)
        centre_out = (np.asarray(self.output_size, dtype=np.float64) - 1) / 2
        offset = centre_in + window_offset - shift - matrix @ centre_out
        return matrix, offset, noise

    def _displacement(self, rng):
        """Elastic displacement (2, H, W) in output pixels, or None when the preset has none or it is not drawn."""
        if "elastic_p" not in self.ranges or rng.random() >= self.ranges["elastic_p"]:
            return None
        alpha, sigma = rng.uniform(*self.ranges["elastic_alpha"]), rng.uniform(*self.ranges["elastic_sigma"])
        noise = rng.uniform(-1.0, 1.0, size=(2, *self.output_size))
        return np.stack([alpha * ndimage.gaussian_filter(field, sigma, mode="constant") for field in noise])

    def _resample(self, array, matrix, offset, displacement, order):
        if displacement is None:
            return ndimage.affine_transform(array, matrix, offset, output_shape=self.output_size, order=order,
                                            mode="constant", cval=0)
        grid = np.indices(self.output_size, dtype=np.float64) + displacement
        coordinates = np.einsum("ij,jhw->ihw", matrix, grid) + offset[:, None, None]
        return ndimage.map_coordinates(array, coordinates, order=order, mode="constant", cval=0)

    def _intensities(self, channel, rng):
        """Per-sequence intensity changes of the preset, each drawn on its own."""
        ranges = self.ranges
        if "contrast_p" in ranges and rng.random() < ranges["contrast_p"]:
            mean = channel.mean()
            channel = np.clip((channel - mean) * rng.uniform(*ranges["contrast"]) + mean, 0.0, 1.0)
        if "blur_p" in ranges and rng.random() < ranges["blur_p"]:
            channel = ndimage.gaussian_filter(channel, rng.uniform(*ranges["blur_sigma"]))
        if rng.random() < 0.5:
            channel = np.clip(channel * rng.uniform(*ranges["brightness"]), 0.0, 1.0)
        if rng.random() < 0.5:
            channel = channel ** rng.uniform(*ranges["gamma"])
        return channel

    def __call__(self, sample, rng=None):
        rng = rng if rng is not None else np.random.default_rng(np.random.randint(2 ** 31))
        image, label = sample["image"], sample["label"]
        matrix, offset, noise = self._geometry(label.shape, rng)
        displacement = self._displacement(rng)
        warped = np.stack([self._resample(channel, matrix, offset, displacement, 3) for channel in image])
        warped_label = self._resample(label, matrix, offset, displacement, 0)
        warped = np.clip(warped, 0.0, 1.0)
        if noise:
            warped = np.clip(warped + rng.normal(0.0, self.ranges["noise_std"], warped.shape), 0.0, 1.0)
        warped = np.stack([self._intensities(channel, rng) for channel in warped])
        return {"image": torch.from_numpy(warped.astype(np.float32)),
                "label": torch.from_numpy(warped_label.astype(np.int64))}
