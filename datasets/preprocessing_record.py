"""The preprocessing record of a dataset folder (its dataset.json's sequences and settings) and its comparison
with another: test data must have been written with the training data's values."""
import json
from pathlib import Path


# What the model sees of preprocessing: test data must have been written with the training data's values.
PREPROCESSING_KEYS = ("spacing_mm", "crop_size", "intensity", "percentiles", "crop_centre")


def read_preprocessing(root_path):
    """The preprocessing record of a dataset folder: its dataset.json's "modalities" and "settings".

    None for data without dataset.json (such as the review release's processed data).
    """
    path = Path(root_path) / "dataset.json"
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
