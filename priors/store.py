"""Prior files: the intensity priors (M x Dt), the class embeddings (K x Dt) and where they came from."""
import datetime
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from datasets.vocabulary import CLASS_NAMES, MODALITIES
from utils import atomic_torch_save

from .encoders import package_versions, get_encoder
from .text import DEFAULT_PROMPTS, load_prompts

logger = logging.getLogger(__name__)

FORMAT = "immseg-priors/1"
PRIOR_DIR = Path(__file__).resolve().parent / "embeddings"


class PriorFileError(ValueError):
    """A prior file is unreadable, malformed, or does not match the prompts in use."""


@dataclass
class PriorEmbeddings:
    intensity: torch.Tensor
    classes: torch.Tensor
    provenance: dict = field(default_factory=dict)

    @property
    def dim(self):
        return self.intensity.shape[1]

    def validate(self, source="prior embeddings"):
        for name, tensor, rows in (("intensity", self.intensity, len(MODALITIES)),
                                   ("classes", self.classes, len(CLASS_NAMES))):
            if not torch.is_tensor(tensor) or tensor.dim() != 2 or tensor.shape[0] != rows:
                shape = tuple(tensor.shape) if torch.is_tensor(tensor) else type(tensor).__name__
                raise PriorFileError(f"{source}: '{name}' must be a ({rows}, D) tensor, got {shape}")
            if not torch.isfinite(tensor).all():
                raise PriorFileError(f"{source}: '{name}' holds NaN or infinite values")
        if self.intensity.shape[1] != self.classes.shape[1]:
            raise PriorFileError(f"{source}: intensity priors are {self.intensity.shape[1]}-d but class "
                                 f"embeddings {self.classes.shape[1]}-d")
        return self


def _provenance(encoder_id, encoder_ref, prompts, dim, versions, origin):
    return {
        "encoder": encoder_id,
        "encoder_ref": encoder_ref,
        "prompt_set": prompts.name if prompts else None,
        "prompts": prompts.as_dict() if prompts else None,
        "prompt_sha256": prompts.sha256 if prompts else None,
        "modalities": list(MODALITIES),
        "classes": list(CLASS_NAMES),
        "dim": int(dim),
        "versions": versions,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "origin": origin,
    }


def encode_prompts(encoder_id, prompts, device="cpu"):
    """Encode a PromptSet with a frozen text encoder."""
    encoder = get_encoder(encoder_id, device)
    logger.info("encoding %d prompts with %s", len(prompts.modality_texts) + len(prompts.class_texts), encoder.ref)
    features = encoder.encode(prompts.modality_texts + prompts.class_texts)
    split = len(prompts.modality_texts)
    provenance = _provenance(encoder.id, encoder.ref, prompts, features.shape[1], encoder.versions(),
                             origin="encoded by priors.encode")
    return PriorEmbeddings(features[:split].clone(), features[split:].clone(), provenance).validate()


def import_embeddings(path, origin, encoder_id="imported", prompts=None):
    """Wrap a plain dict of ``modality`` (M x D) and ``class`` (K x D) tensors computed elsewhere."""
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PriorFileError(f"{path} does not exist") from None
    except Exception as error:
        raise PriorFileError(f"{path} is not a readable torch file: {error}") from None
    if not isinstance(data, dict) or not {"modality", "class"} <= set(data):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise PriorFileError(f"{path}: expected a dict with 'modality' and 'class' tensors, got {keys}")
    for key in ("modality", "class"):
        if not torch.is_tensor(data[key]):
            raise PriorFileError(f"{path}: '{key}' must be a tensor, got {type(data[key]).__name__}")
    provenance = _provenance(encoder_id, None, prompts, data["modality"].shape[-1], package_versions("torch"),
                             origin=f"imported from {path.resolve()}: {origin}")
    return PriorEmbeddings(data["modality"].float().clone(), data["class"].float().clone(),
                           provenance).validate(str(path))


def save_priors(priors, path):
    """Write atomically: a crash never leaves a half-written prior file."""
    if Path(path).is_dir():
        raise PriorFileError(f"{path} is a folder; give the prior file's name, such as {Path(path) / 'priors.pt'}")
    priors.validate()
    atomic_torch_save({"format": FORMAT, "intensity": priors.intensity, "classes": priors.classes,
                       "provenance": priors.provenance}, path)


def embeddings_sha256(intensity, classes):
    """SHA-256 of the priors' float32 values: identifies the embeddings whatever file holds them."""
    digest = hashlib.sha256()
    for tensor in (intensity, classes):
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_priors(path):
    path = Path(path)
    if not path.is_file():
        raise PriorFileError(f"prior file {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise PriorFileError(f"prior file {path} is not readable: {error}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise PriorFileError(f"{path} is not a prior file of this project (expected format {FORMAT}); "
                             "wrap embeddings computed elsewhere with: python -m priors.encode --import FILE")
    return PriorEmbeddings(data["intensity"], data["classes"], data.get("provenance", {})).validate(str(path))


def check_prompts(priors, prompts, source):
    """Raise if the file was encoded from other prompt texts; warn if its prompts are unknown."""
    recorded = priors.provenance.get("prompt_sha256")
    if recorded is None:
        logger.warning("%s records no prompt texts (%s); it cannot be checked against %s",
                       source, priors.provenance.get("origin", "unknown origin"), prompts.name)
        return
    if recorded != prompts.sha256:
        raise PriorFileError(
            f"{source} was encoded from the prompt set '{priors.provenance.get('prompt_set')}', whose texts differ "
            f"from the prompt file in use ('{prompts.name}'). Pass the matching --prompts, or re-encode with "
            f"python -m priors.encode --encoder {priors.provenance.get('encoder')} --prompts FILE --out {source}")


def default_prior_path(encoder_id, prompts):
    slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in encoder_id)
    return PRIOR_DIR / f"{slug}_{prompts.name}.pt"


def resolve_priors(path=None, encoder_id="biomedclip", prompt_file=DEFAULT_PROMPTS, device="cpu"):
    """The priors at ``path`` if it exists (checked against the prompts), else encode the prompts and save them there.

    Without ``path`` the file is ``priors/embeddings/<encoder>_<prompt set>.pt``.
    """
    prompts = load_prompts(prompt_file)
    path = Path(path) if path else default_prior_path(encoder_id, prompts)
    if path.exists():
        priors = load_priors(path)
        check_prompts(priors, prompts, str(path))
        logger.info("text priors from %s (%s, %d-d)", path, priors.provenance.get("encoder"), priors.dim)
        return priors, path
    priors = encode_prompts(encoder_id, prompts, device)
    save_priors(priors, path)
    logger.info("encoded the '%s' prompts with %s into %s (%d-d)", prompts.name, encoder_id, path, priors.dim)
    return priors, path
