"""Raw dataset layouts: finding a case's three sequences and label, loading and checking them.

- MyoPS380: ``Raw_data/{bSSFP,LGE,T2w}/caseXXXX.nii.gz`` and ``Raw_data/label/caseXXXX_gt.nii.gz``,
  labels 0-3 (also the phantom's layout).
- MyoPS 2020, flat: ``myops_training_1XX_{C0,DE,T2,gd}.nii.gz``; per case:
  ``CaseXXXX/CaseXXXX_{C0,LGE,T2,gd}.nii.gz``; labels 200 (myocardium), 2221 (scar),
  1220 (edema), 500 and 600 (blood pools, background here).
"""
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import nibabel as nib
import numpy as np

from networks.vit_seg_configs import MODALITIES

LABEL_MAPS = {
    "MyoPS380": {0: 0, 1: 1, 2: 2, 3: 3},
    "MyoPS2020": {0: 0, 200: 1, 500: 0, 600: 0, 1220: 3, 2221: 2},
}
# accepted file suffixes per role, the layout's usual one first: flat files say DE, per-case folders LGE
MYOPS2020_SUFFIXES = {"flat": {"bSSFP": ("C0",), "LGE": ("DE", "LGE"), "T2w": ("T2",), "label": ("gd",)},
                      "per_case": {"bSSFP": ("C0",), "LGE": ("LGE", "DE"), "T2w": ("T2",), "label": ("gd",)}}
GEOMETRY_TOLERANCE_MM = 1e-3


class DataError(ValueError):
    """Bad input data; the message names the case, the file and what was expected."""


@dataclass(frozen=True)
class CaseFiles:
    case_id: str
    images: Dict[str, Path]
    label: Path

    @property
    def paths(self):
        return {**self.images, "label": self.label}


@dataclass
class CaseVolumes:
    case_id: str
    images: Dict[str, np.ndarray]  # float32 (X, Y, Z)
    label: np.ndarray  # uint8 (X, Y, Z), classes 0-3
    spacing: tuple
    affine: np.ndarray


def find_myops380_cases(src):
    root = Path(src) / "Raw_data"
    folders = {m: root / m for m in MODALITIES}
    folders["label"] = root / "label"
    missing = [str(f) for f in folders.values() if not f.is_dir()]
    if missing:
        raise DataError(f"{src} is not in the MyoPS380 layout: missing folder(s) {', '.join(missing)} "
                        "(expected Raw_data/{bSSFP,LGE,T2w}/caseXXXX.nii.gz and Raw_data/label/caseXXXX_gt.nii.gz)")
    ids = {p.name[:-len(".nii.gz")] for m in MODALITIES for p in folders[m].glob("[!.]*.nii.gz")}
    ids |= {p.name[:-len("_gt.nii.gz")] for p in folders["label"].glob("[!.]*_gt.nii.gz")}
    cases = [CaseFiles(case, {m: folders[m] / f"{case}.nii.gz" for m in MODALITIES},
                       folders["label"] / f"{case}_gt.nii.gz") for case in sorted(ids)]
    return _require_files(cases, src)


def find_myops2020_cases(src):
    src = Path(src)
    flat = {}
    for path in src.glob("myops_training_*_*.nii.gz"):
        match = re.fullmatch(r"(myops_training_\d+)_(\w+)\.nii\.gz", path.name)
        if match:
            flat.setdefault(match.group(1), {})[match.group(2)] = path
    per_case = {p.name: {f.name[len(p.name) + 1:-len(".nii.gz")]: f for f in p.glob(f"{p.name}_*.nii.gz")}
                for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")} if src.is_dir() else {}
    per_case = {case: files for case, files in per_case.items() if files}
    found = flat or per_case
    if not found:
        raise DataError(f"{src} is not in a MyoPS 2020 layout: expected myops_training_1XX_{{C0,DE,T2,gd}}.nii.gz "
                        "or CaseXXXX/CaseXXXX_{C0,LGE,T2,gd}.nii.gz")
    cases = []
    for case, files in sorted(found.items()):
        folder = src if flat else src / case
        paths = {}
        for role, suffixes in MYOPS2020_SUFFIXES["flat" if flat else "per_case"].items():
            present = [files[s] for s in suffixes if s in files]
            paths[role] = present[0] if present else folder / f"{case}_{suffixes[0]}.nii.gz"
        cases.append(CaseFiles(case, {m: paths[m] for m in MODALITIES}, paths["label"]))
    return _require_files(cases, src)


def _require_files(cases, src):
    if not cases:
        raise DataError(f"no cases found under {src}")
    for case in cases:
        for role, path in case.paths.items():
            if not path.is_file():
                raise DataError(f"case {case.case_id}: missing {role} file {path}")
    return cases


def _load(path, case_id, role):
    try:
        image = nib.load(str(path))
        data = np.asarray(image.dataobj)
    except Exception as error:
        raise DataError(f"case {case_id}: cannot read {role} file {path}: {error}") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"case {case_id}: {role} file {path} has shape {data.shape}, expected a 3D volume (X, Y, Z)")
    if data.size == 0:
        raise DataError(f"case {case_id}: {role} file {path} is empty")
    return data, image


def load_case(case, label_map):
    """Load and check one case: readable 3D volumes of one shape and geometry, finite intensities, known labels."""
    images, headers = {}, {}
    for modality, path in case.images.items():
        data, header = _load(path, case.case_id, modality)
        values = data.astype(np.float32)
        if not np.isfinite(values).all():
            raise DataError(f"case {case.case_id}: {modality} file {path} holds NaN or infinite intensities")
        if values.max() == values.min():
            raise DataError(f"case {case.case_id}: {modality} file {path} is empty (constant value {values.max()})")
        images[modality], headers[modality] = values, header
    label_data, headers["label"] = _load(case.label, case.case_id, "label")

    reference_role = next(iter(case.images))
    reference = headers[reference_role]
    for role, header in headers.items():
        if header.shape[:3] != reference.shape[:3]:
            raise DataError(f"case {case.case_id}: {role} file {case.paths[role]} has shape {header.shape[:3]}, "
                            f"expected {reference.shape[:3]} as {case.paths[reference_role].name}")
        if not np.allclose(header.affine, reference.affine, atol=GEOMETRY_TOLERANCE_MM):
            raise DataError(f"case {case.case_id}: {role} file {case.paths[role]} is not aligned with "
                            f"{case.paths[reference_role].name} (affines differ by up to "
                            f"{np.abs(header.affine - reference.affine).max():.4g} mm); resample it onto the same grid")
    return CaseVolumes(case.case_id, images, map_labels(label_data, label_map, case.case_id, case.label),
                       tuple(float(z) for z in reference.header.get_zooms()[:3]), reference.affine)


def map_labels(label, label_map, case_id, path):
    """Map raw label codes to classes 0-3; any code outside ``label_map`` is an error."""
    if not np.isfinite(label).all():
        raise DataError(f"case {case_id}: label file {path} holds NaN or infinite values")
    rounded = np.rint(label).astype(np.int64)
    if not np.array_equal(rounded, label):
        raise DataError(f"case {case_id}: label file {path} holds non-integer values")
    values = np.unique(rounded)
    unknown = [int(v) for v in values if int(v) not in label_map]
    if unknown:
        raise DataError(f"case {case_id}: label file {path} holds values {unknown}; expected only {sorted(label_map)}")
    lookup = np.zeros(int(values.max()) + 1, dtype=np.uint8)
    for code, target in label_map.items():
        if code <= values.max():
            lookup[code] = target
    return lookup[rounded]
