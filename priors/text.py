"""Prompt sets: the human-editable JSON files under ``priors/prompts/``."""
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

from datasets.vocabulary import CLASS_NAMES, MODALITIES

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
DEFAULT_PROMPTS = PROMPT_DIR / "intensity.json"


class PromptFileError(ValueError):
    """A prompt file is unreadable or lacks a prompt: the message names the file and the key."""


@dataclass(frozen=True)
class PromptSet:
    """One prompt per sequence (the intensity priors) and one per class, in the model's order."""
    name: str
    modality: Dict[str, str]
    classes: Dict[str, str]

    @property
    def modality_texts(self):
        return [self.modality[m] for m in MODALITIES]

    @property
    def class_texts(self):
        return [self.classes[c] for c in CLASS_NAMES]

    def as_dict(self):
        return {"name": self.name, "modality": dict(self.modality), "class": dict(self.classes)}

    @property
    def sha256(self):
        """Hash of the texts alone, in model order: renaming the set or reformatting the file keeps it."""
        canonical = json.dumps([self.modality_texts, self.class_texts], ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def load_prompts(path=DEFAULT_PROMPTS):
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PromptFileError(f"prompt file {path} does not exist (the shipped sets are in {PROMPT_DIR})") from None
    except (OSError, json.JSONDecodeError) as error:
        raise PromptFileError(f"prompt file {path} is not readable JSON: {error}") from None
    if not isinstance(data, dict):
        raise PromptFileError(f"prompt file {path}: expected a JSON object with 'modality' and 'class'")
    sections = {}
    for section, keys in (("modality", MODALITIES), ("class", CLASS_NAMES)):
        entries = data.get(section)
        if not isinstance(entries, dict):
            raise PromptFileError(f"prompt file {path}: missing the '{section}' object with keys {list(keys)}")
        for key in keys:
            text = entries.get(key)
            if not isinstance(text, str) or not text.strip():
                raise PromptFileError(f"prompt file {path}: '{section}.{key}' must be a non-empty string")
        unknown = sorted(set(entries) - set(keys))
        if unknown:
            raise PromptFileError(f"prompt file {path}: unknown '{section}' keys {unknown}; expected {list(keys)}")
        sections[section] = {key: entries[key].strip() for key in keys}
    return PromptSet(name=str(data.get("name", path.stem)), modality=sections["modality"], classes=sections["class"])
