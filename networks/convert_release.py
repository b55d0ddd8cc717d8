"""The review release's I-MMSeg checkpoint mapped onto this project's model: pure state-dict conversion.

The release saves a bare ``state_dict`` of its ``VisionTransformer`` (with the
``module.`` prefixes of ``nn.DataParallel``, or without). Its weights are mapped
onto the ``R50-only-release`` configuration, whose switches reproduce the release's
function (see ``vit_seg_configs.RELEASE_SWITCHES`` and documentation/authors_checkpoint.md).
Modules that the release builds but never uses for its outputs (a fourth decoder, a fifth
prediction head, four plain segmentation heads and one contrast projection) are dropped
and listed. The dynamic heads' controller rows are reordered from the release's
parameter layout [w1, w2, b1, b2] to ours [w1, b1, w2, b2], which gives the same
heads. The text priors are not part of the release's state dict: they come from
its ``text_features/`` folder or from a prior file of this project.

A key of the release that is missing, of another shape, or unknown is named. Writing a
checkpoint of this project from the result is ``engine.release.convert``'s job; the command
line is the root script ``convert_release.py`` (``python -m networks.convert_release`` runs it too).
"""
import hashlib
import logging
import re
from pathlib import Path

import torch

from datasets.vocabulary import CLASS_NAMES, MODALITIES
from priors import BIOMEDCLIP_REF, PriorEmbeddings, PriorFileError

from .vit_seg_configs import get_config
from .vit_seg_modeling import build_model

logger = logging.getLogger("convert_release")

TARGET_CONFIG = "R50-only-release"
RELEASE_MODALITY_NAMES = ("cine", "psir", "t2w")  # the release's names for bSSFP, LGE, T2w
# The release's text_features/ files: intensity priors (3 x 512) and class embeddings (4 x 512).
TEXT_FEATURE_FILES = {"intensity": "embedding_MRI_information.pth", "classes": "embedding_class_information.pth"}
# Modules of the release that none of its outputs uses.
DROPPED_MODULES = {
    "decoder4": "a fourth decoder, never called",
    "forward_prediction_head4": "a fifth dynamic head, never called",
    "segmentation_head": "a plain segmentation head, never called",
    "segmentation_head1": "a plain segmentation head, never called",
    "segmentation_head2": "a plain segmentation head, never called",
    "segmentation_head3": "a plain segmentation head, never called",
    "fusion_embed": "a contrast projection of fused skips, never called",
}
FUSION_PARTS = {"fusion_proj.": "0.", "norm.": "1."}  # the release's Fusion_Embed -> our ConcatFusion
HEAD_PARTS = {"controller.": "controller.", "precls_conv.": "precls.",  # the release's ForwardPredictionHead
              "GAP_512.": "context.0.", "GAP_256.": "context.1.", "Gap_64.": "context.2."}
CBAM_PARTS = {"cbam.channel_att.mlp.": "0.channel_mlp.", "cbam.spatial_att.conv.": "0.spatial.", "conv1x1.": "1."}
CONTRAST_PARTS = {"features64_to_64.": "projections.0.", "features256_to_128.": "projections.1.",
                  "features512_to_256.": "projections.2."}
TEXT_BUFFERS = ("intensity_priors", "class_embeddings")


class ReleaseCheckpointError(ValueError):
    """The release's checkpoint or text features do not fit the target model: the message names the keys."""


def module_rules(num_modalities=3):
    """(release prefix, our prefix, inner renames or None), one per module of the release that is kept."""
    rules = [("text_to_vision.0.", "class_proj.0.", None),
             ("modal_text_to_vision.0.", "cmfe.prior_proj.0.", None),
             ("modal_text_to_weight.0.", "cfm.prior_mlp.", None),
             ("dec_output_fusion.", "decoder_fusion.", FUSION_PARTS),
             ("forward_prediction_head.", "fused_head.", HEAD_PARTS)]
    rules += [(f"feature_fusion.fusion{s + 1}.", f"skip_fusions.{s}.", FUSION_PARTS) for s in range(3)]
    rules += [(f"text_to_{dim}.0.", f"anchor_projections.{s}.0.", None) for s, dim in enumerate((64, 128, 256))]
    for m, name in enumerate(RELEASE_MODALITY_NAMES[:num_modalities]):
        rules += [(f"transformer{m + 1}.embeddings.hybrid_model.", f"transformers.{m}.hybrid_model.", None),
                  (f"decoder{m + 1}.", f"decoders.{m}.", None),
                  (f"GAP_{name}.1.", f"cmfe.visual_proj.{m}.", None),
                  (f"class_MLP_{name}.", f"cmfe.gates.{m}.", None),
                  (f"mix_{name}.", f"cmfe.fuse.{m}.", FUSION_PARTS),
                  (f"CBAMFeatureReducer_{name}.", f"cfm.visual.{m}.", CBAM_PARTS),
                  (f"class_MLP_dec_{name}.", f"cfm.style.{m}.", None),
                  (f"Class_Feature_Modulation_{name}.fc.", f"cfm.film.{m}.", None),
                  (f"{name}_embed.", f"contrast_projections.{m}.", CONTRAST_PARTS),
                  (f"forward_prediction_head{m + 1}.", f"modality_heads.{m}.", HEAD_PARTS)]
    return rules


def strip_module_prefix(state_dict):
    """The keys without the ``module.`` prefix that ``nn.DataParallel`` adds."""
    return {key[len("module."):] if key.startswith("module.") else key: value for key, value in state_dict.items()}


def our_key(release_key, rules):
    """Our name for a release key, or None when no rule covers it."""
    for release_prefix, our_prefix, parts in rules:
        if not release_key.startswith(release_prefix):
            continue
        rest = release_key[len(release_prefix):]
        if parts is None:
            return our_prefix + rest
        for release_part, our_part in parts.items():
            if rest.startswith(release_part):
                return our_prefix + our_part + rest[len(release_part):]
    return None


def controller_to_ours(tensor, channels):
    """The release's controller output rows [w1 (c*c), w2 (c), b1 (c), b2 (1)] in our order [w1, b1, w2, b2];
    its 1x1 convolution kernel (P, D, 1, 1) becomes a linear weight (P, D)."""
    c = channels
    w1, w2, b1, b2 = tensor.reshape(tensor.shape[0], -1).split([c * c, c, c, 1], dim=0)
    reordered = torch.cat([w1, b1, w2, b2])
    return reordered.reshape(-1) if tensor.dim() == 1 else reordered


def dropped_module(release_key):
    module = release_key.split(".", 1)[0]
    return module if module in DROPPED_MODULES else None


def convert_state_dict(release_state, target_state, head_channels):
    """Map the release's state dict onto ``target_state``'s keys and shapes.

    Returns the converted state dict (without the text buffers, which the model holds
    from its priors) and {dropped module: number of tensors}. Raises
    ReleaseCheckpointError naming every unknown, missing or mis-shaped key.
    """
    rules = module_rules()
    converted, dropped, unknown, misshaped = {}, {}, [], []
    for release_key, value in strip_module_prefix(release_state).items():
        module = dropped_module(release_key)
        if module is not None:
            dropped[module] = dropped.get(module, 0) + 1
            continue
        key = our_key(release_key, rules)
        if key is None or key not in target_state:
            unknown.append(release_key)
            continue
        if re.search(r"(^|\.)controller\.(weight|bias)$", key):
            value = controller_to_ours(value, head_channels)
        if tuple(value.shape) != tuple(target_state[key].shape):
            misshaped.append(f"{release_key} {tuple(value.shape)} -> {key} {tuple(target_state[key].shape)}")
            continue
        converted[key] = value
    missing = sorted(set(target_state) - set(converted) - set(TEXT_BUFFERS))
    problems = []
    if missing:
        problems.append(f"missing ({len(missing)}): " + ", ".join(missing))
    if misshaped:
        problems.append(f"of another shape ({len(misshaped)}): " + ", ".join(misshaped))
    if unknown:
        problems.append(f"unknown to the conversion ({len(unknown)}): " + ", ".join(sorted(unknown)))
    if problems:
        raise ReleaseCheckpointError("the checkpoint does not fit the release's model at this configuration: keys "
                                     + "; keys ".join(problems))
    return converted, dropped


def load_release_state(path):
    """The state dict of a release checkpoint (tensors only; read on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise ReleaseCheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ReleaseCheckpointError(f"{path} is not a readable torch file: {error}") from None
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ReleaseCheckpointError(f"{path} is not a state dict of tensors (the release saves "
                                     "model.state_dict() as epoch_N.pth)")
    return state


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_text_features(directory):
    """The release's text_features/ folder as PriorEmbeddings (tensors saved on a GPU are read to the CPU)."""
    directory = Path(directory)
    tensors = {}
    for name, file_name in TEXT_FEATURE_FILES.items():
        path = directory / file_name
        if not path.is_file():
            raise PriorFileError(f"{path} does not exist: --text_features must be the release's text_features/ "
                                 f"folder holding {', '.join(TEXT_FEATURE_FILES.values())}")
        try:
            tensors[name] = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise PriorFileError(f"{path} is not a readable torch file: {error}") from None
        if not torch.is_tensor(tensors[name]):
            raise PriorFileError(f"{path} holds a {type(tensors[name]).__name__}, expected a tensor")
    provenance = {
        "encoder": "biomedclip", "encoder_ref": BIOMEDCLIP_REF, "prompt_set": None, "prompts": None,
        "prompt_sha256": None, "modalities": list(MODALITIES), "classes": list(CLASS_NAMES),
        "dim": int(tensors["intensity"].shape[-1]),
        "files": {TEXT_FEATURE_FILES[name]: file_sha256(directory / TEXT_FEATURE_FILES[name]) for name in tensors},
        "origin": f"the review release's text features, {directory.resolve()}",
    }
    return PriorEmbeddings(tensors["intensity"].float(), tensors["classes"].float(), provenance).validate(
        str(directory))


def target_model(priors, img_size=128, config_name=TARGET_CONFIG):
    """Our model at the release's configuration with these priors, and its specification."""
    config = get_config(config_name)
    config.text_dim = priors.dim
    spec = {"model": "immseg", "modality": None, "img_size": img_size, "num_classes": config.n_classes,
            "config": config.to_dict()}
    return build_model("immseg", config, img_size, config.n_classes, priors.intensity, priors.classes), spec


def epochs_from_name(path):
    """Completed epochs of a release checkpoint named epoch_N.pth (N counts from 0), else None."""
    match = re.fullmatch(r"epoch_(\d+)\.pth", Path(path).name)
    return int(match.group(1)) + 1 if match else None


if __name__ == "__main__":  # the command line of before: the root script convert_release.py
    import sys

    from convert_release import main

    sys.exit(main())
