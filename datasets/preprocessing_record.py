"""The preprocessing record of a dataset folder (its dataset.json's sequences and settings) and its comparison
with another: test data must have been written with the training data's values."""
import copy
import json
from pathlib import Path

from datasets.vocabulary import CLASS_NAMES, MODALITIES


RECORD_FORMAT = "immseg-preprocessed/1"

# What the model sees of preprocessing: test data must have been written with the training data's values.
PREPROCESSING_KEYS = ("spacing_mm", "crop_size", "intensity", "percentiles", "crop_centre")


# The review release's processed MyoPS380 (its preprocess_data.py): the released 128 x 128 crops at their own
# spacing, intensities clipped to [0, 255] and divided by 255 (preprocess_data.py --intensity released does the same).
RELEASE_PREPROCESSING = {"modalities": list(MODALITIES),
                         "settings": {"dataset": "MyoPS380 (the review release's preprocess_data.py)",
                                      "spacing_mm": 0.0, "crop_size": 128, "intensity": "released"}}


def write_record(folder, settings, split, summary, crop_centres):
    """<folder>/dataset.json: the record a preprocessed folder carries (its format, sequences, classes, settings,
    split, summary and each case's crop centre); read back by :func:`read_preprocessing`."""
    record = {"format": RECORD_FORMAT, "modalities": list(MODALITIES), "classes": list(CLASS_NAMES),
              "settings": settings, "split": split, "summary": summary, "crop_centres": crop_centres}
    (Path(folder) / "dataset.json").write_text(json.dumps(record, indent=2) + "\n")


def is_release_layout(root_path):
    """Whether a folder is the review release's Processed_data: the sequence folders with its train_npz/ or
    test_vol_h5/ files, and no dataset.json (which every folder preprocess_data.py writes has)."""
    root = Path(root_path)
    return not (root / "dataset.json").exists() and all(
        (root / modality / "train_npz").is_dir() or (root / modality / "test_vol_h5").is_dir()
        for modality in MODALITIES)


def read_preprocessing(root_path):
    """The preprocessing record of a dataset folder: its dataset.json's "modalities" and "settings", or the review
    release's scaling and grid for its Processed_data (``is_release_layout``). None for a folder with neither."""
    path = Path(root_path) / "dataset.json"
    if is_release_layout(root_path):
        return copy.deepcopy(RELEASE_PREPROCESSING)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not readable JSON: {error}") from None
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict) \
            or not isinstance(record.get("modalities"), list):
        raise ValueError(f"{path} lacks the 'modalities' list and 'settings' that preprocess_data.py writes")
    return {"modalities": record["modalities"], "settings": record["settings"]}


def preprocessing_differences(trained, tested):
    """The differences, as sentences, between the training data's and the test data's preprocessing records."""
    def comparable(record):
        values = {"sequence order": record["modalities"],
                  **{key: record["settings"].get(key) for key in PREPROCESSING_KEYS}}
        values["intensity"] = values["intensity"] or "percentile"  # records from before --intensity existed
        values["crop_centre"] = values["crop_centre"] or "image"  # records from before --crop_centre existed
        return values

    trained, tested = comparable(trained), comparable(tested)
    return [f"{key}: {trained[key]!r} in the training data, {tested[key]!r} here" for key in trained
            if trained[key] != tested[key]]
