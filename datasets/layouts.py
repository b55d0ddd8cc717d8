"""Raw dataset layouts: finding a case's three sequences and label, loading and checking them.

- MyoPS380: ``Raw_data/{bSSFP,LGE,T2w}/caseXXXX.nii.gz`` and ``Raw_data/label/caseXXXX_gt.nii.gz``,
  labels 0-3 (also the phantom's layout).
- MyoPS 2020, flat: ``myops_training_1XX_{C0,DE,T2,gd}.nii.gz``; per case:
  ``CaseXXXX/CaseXXXX_{C0,LGE,T2,gd}.nii.gz``; LGE may be named ``DE`` or ``LGE`` in either;
  labels 200 (myocardium), 2221 (scar), 1220 (edema), 500 and 600 (blood pools, background here).

Files end in ``.nii.gz`` or ``.nii``. The finders' ``labelled=False`` is for new patients
(predict.py): labels are neither required nor read, the flat layout also takes the challenge's
``myops_test_2XX_*`` files, and a case that lacks a sequence is still listed, so that
:func:`load_case` reports it for that case alone.
"""
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import nibabel as nib
import numpy as np

from .vocabulary import MODALITIES

# accepted file suffixes per role, the layout's usual one first: flat files say DE, per-case folders LGE
MYOPS2020_SUFFIXES = {"flat": {"bSSFP": ("C0",), "LGE": ("DE", "LGE"), "T2w": ("T2",), "label": ("gd",)},
                      "per_case": {"bSSFP": ("C0",), "LGE": ("LGE", "DE"), "T2w": ("T2",), "label": ("gd",)}}
GEOMETRY_TOLERANCE_MM = 1e-3
NIFTI_ENDINGS = (".nii.gz", ".nii")


class DataError(ValueError):
    """Bad input data; the message names the case, the file and what was expected."""


@dataclass(frozen=True)
class CaseFiles:
    case_id: str
    images: Dict[str, Path]
    label: Optional[Path] = None  # None: a case without label (or whose label is not to be read)

    @property
    def paths(self):
        return {**self.images, **({"label": self.label} if self.label is not None else {})}


@dataclass
class CaseVolumes:
    case_id: str
    images: Dict[str, np.ndarray]  # float32 (X, Y, Z)
    label: Optional[np.ndarray]  # uint8 (X, Y, Z), classes 0-3; None for a case without label
    spacing: tuple
    affine: np.ndarray
    headers: Dict[str, object] = field(default_factory=dict)  # each sequence's NIfTI header


def _nifti_stem(name):
    """A NIfTI file name without its ending; None for other (or hidden) files."""
    for ending in NIFTI_ENDINGS:
        if name.endswith(ending) and not name.startswith("."):
            return name[:-len(ending)]
    return None


def _nifti_files(folder):
    """{stem: path} of the NIfTI files in a folder; ``.nii.gz`` wins over ``.nii`` of the same stem."""
    files = {}
    for path in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else ():
        stem = _nifti_stem(path.name)
        if stem is not None and path.is_file() and (stem not in files or path.name.endswith(".gz")):
            files[stem] = path
    return files


def find_myops380_cases(src, labelled=True):
    root = Path(src) / "Raw_data"
    folders = {m: root / m for m in MODALITIES}
    if labelled:
        folders["label"] = root / "label"
    missing = [str(f) for f in folders.values() if not f.is_dir()]
    if missing:
        raise DataError(f"{src} is not in the MyoPS380 layout: missing folder(s) {', '.join(missing)} "
                        "(expected Raw_data/{bSSFP,LGE,T2w}/caseXXXX.nii.gz"
                        + (" and Raw_data/label/caseXXXX_gt.nii.gz)" if labelled else ")"))
    files = {role: _nifti_files(folder) for role, folder in folders.items()}
    ids = {stem for m in MODALITIES for stem in files[m]}
    if labelled:
        ids |= {stem[:-len("_gt")] for stem in files["label"] if stem.endswith("_gt")}

    def path(role, stem):
        return files[role].get(stem, folders[role] / f"{stem}.nii.gz")

    cases = [CaseFiles(case, {m: path(m, case) for m in MODALITIES}, path("label", f"{case}_gt") if labelled else None)
             for case in sorted(ids)]
    return _checked_cases(cases, src, labelled)


def find_myops2020_cases(src, labelled=True):
    src = Path(src)
    prefix = "myops_training" if labelled else "myops_(?:training|test)"
    flat = {}
    for stem, path in _nifti_files(src).items():
        match = re.fullmatch(rf"({prefix}_\d+)_(\w+)", stem)
        if match:
            flat.setdefault(match.group(1), {})[match.group(2)] = path
    per_case = {p.name: {stem[len(p.name) + 1:]: f for stem, f in _nifti_files(p).items()
                         if stem.startswith(f"{p.name}_")}
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
        cases.append(CaseFiles(case, {m: paths[m] for m in MODALITIES}, paths["label"] if labelled else None))
    return _checked_cases(cases, src, labelled)


def find_cases(src, labelled=True):
    """The cases under ``src`` in whichever layout it holds: MyoPS380 with ``Raw_data/``, else MyoPS 2020."""
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"input folder {src} does not exist")
    if (src / "Raw_data").is_dir():
        return find_myops380_cases(src, labelled)
    try:
        return find_myops2020_cases(src, labelled)
    except DataError as error:
        raise DataError(f"{error}; nor does it hold the MyoPS380 layout's Raw_data/ folder") from None


def _checked_cases(cases, src, every_file=True):
    """The cases, if there are any and (with ``every_file``) all their files exist."""
    if not cases:
        raise DataError(f"no cases found under {src}")
    if every_file:
        for case in cases:
            require_files(case)
    return cases


def require_files(case, allow_missing_sequences=False):
    """A file of the case that does not exist is an error naming the case, the role and the path; with
    ``allow_missing_sequences`` a missing sequence is not, as long as one sequence is there."""
    for role, path in case.paths.items():
        if not path.is_file() and not (allow_missing_sequences and role in case.images):
            raise DataError(f"case {case.case_id}: missing {role} file {path}")
    if not any(path.is_file() for path in case.images.values()):
        raise DataError(f"case {case.case_id}: none of its sequences is there "
                        f"({', '.join(map(str, case.images.values()))})")


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


def load_case(case, label_map=None, allow_missing_sequences=False):
    """Load and check one case: readable 3D volumes of one shape and geometry, finite intensities, known labels.

    The label is read (and mapped by ``label_map``) when the case has one. With ``allow_missing_sequences`` a
    sequence whose file does not exist is left out of ``images`` (a case for a model that runs on any subset).
    """
    require_files(case, allow_missing_sequences)
    images, headers = {}, {}
    for modality, path in case.images.items():
        if allow_missing_sequences and not path.is_file():
            continue
        data, header = _load(path, case.case_id, modality)
        values = data.astype(np.float32)
        if not np.isfinite(values).all():
            raise DataError(f"case {case.case_id}: {modality} file {path} holds NaN or infinite intensities")
        if values.max() == values.min():
            raise DataError(f"case {case.case_id}: {modality} file {path} is empty (constant value {values.max()})")
        images[modality], headers[modality] = values, header
    if case.label is not None:
        label_data, headers["label"] = _load(case.label, case.case_id, "label")

    reference_role = next(iter(images))
    reference = headers[reference_role]
    for role, header in headers.items():
        if header.shape[:3] != reference.shape[:3]:
            raise DataError(f"case {case.case_id}: {role} file {case.paths[role]} has shape {header.shape[:3]}, "
                            f"expected {reference.shape[:3]} as {case.paths[reference_role].name}")
        if not np.allclose(header.affine, reference.affine, atol=GEOMETRY_TOLERANCE_MM):
            raise DataError(f"case {case.case_id}: {role} file {case.paths[role]} is not aligned with "
                            f"{case.paths[reference_role].name} (affines differ by up to "
                            f"{np.abs(header.affine - reference.affine).max():.4g} mm); resample it onto the same grid")
    label = map_labels(label_data, label_map, case.case_id, case.label) if case.label is not None else None
    return CaseVolumes(case.case_id, images, label, tuple(float(z) for z in reference.header.get_zooms()[:3]),
                       reference.affine, {modality: headers[modality].header for modality in images})


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
