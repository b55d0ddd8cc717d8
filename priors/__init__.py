"""Text priors: prompt sets, frozen text encoders and prior files with provenance."""
from .encoders import BIOMEDCLIP_REF, EncoderUnavailableError, get_encoder
from .store import (PriorEmbeddings, PriorFileError, check_prompts, default_prior_path, encode_prompts,
                    import_embeddings, load_priors, resolve_priors, save_priors)
from .text import DEFAULT_PROMPTS, PromptFileError, PromptSet, load_prompts

__all__ = ["BIOMEDCLIP_REF", "DEFAULT_PROMPTS", "EncoderUnavailableError", "PriorEmbeddings", "PriorFileError",
           "PromptFileError", "PromptSet", "check_prompts", "default_prior_path", "encode_prompts", "get_encoder",
           "import_embeddings", "load_priors", "load_prompts", "resolve_priors", "save_priors"]
