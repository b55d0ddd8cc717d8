"""The subset stage (documentation/missing_sequences.md): a finished I-MMSeg model, frozen and untouched, with a few
parameters per proper subset of the sequences beside it that serve the samples missing one or two sequences.

A sample with every sequence goes through the complete model as it is. A sample that has only a proper subset S
goes through the same frozen modules with three additions, each of its own for S and the identity at the start:

- stand-ins: each missing sequence's bottleneck and skips are the mean of the present sequences' encoder features
  at that scale, scaled and shifted per channel;
- modulation: the output of every conv-BN-ReLU block after the encoders (CMFE's fusions, the decoders' blocks, the
  fused head's skip and decoder fusions) is scaled and shifted per channel;
- the class features Q of the fused head are scaled and shifted per dimension.

CMFE, the decoders and the fused head then run as on a complete sample (nothing left out). A scale is stored as
``1 + gamma``, so that weight decay pulls every addition towards the identity.
"""
import contextlib
import functools
from typing import NamedTuple

import torch
import torch.nn as nn

from .immseg_modules import ConcatFusion
from .missing_sequences import check_present, proper_subsets
from .vit_seg_modeling import Conv2dReLU, IMMSeg

# the conv-BN-ReLU blocks whose outputs are modulated; after the encoders, the only ones of I-MMSeg
MODULATED_BLOCKS = (Conv2dReLU, ConcatFusion)


class SubsetStageOutput(NamedTuple):
    """What the stage returns in training: the subset view's fused logits and the complete model's fused logits of
    the same samples (every sequence; computed without gradient)."""
    fused_logits: torch.Tensor
    complete_logits: torch.Tensor


class ChannelAffine(nn.Module):
    """Per subset s, ``x * (1 + gamma[s]) + beta[s]`` along a channel dimension; gamma = beta = 0 at the start."""

    def __init__(self, num_subsets, channels):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(num_subsets, channels))
        self.beta = nn.Parameter(torch.zeros(num_subsets, channels))

    def forward(self, x, index, channel_dim=1):
        """``x`` (B, ..., C, ...) with the channels at ``channel_dim``; ``index`` (B,): the subset of each sample."""
        shape = [1] * x.dim()
        shape[0], shape[channel_dim] = index.shape[0], -1
        return x * (1 + self.gamma[index].view(shape)) + self.beta[index].view(shape)


def _modulate(affine, index, module, inputs, output):
    """A forward hook: the block's output, modulated for the subsets ``index``."""
    return affine(output, index)


class SubsetAdapters(nn.Module):
    """The parameters of the proper subsets of a complete I-MMSeg model: stand-ins per scale and sequence, the
    modulation of each conv-BN-ReLU block after the encoders, and the class features' modulation."""

    def __init__(self, complete):
        super().__init__()
        num_modalities = complete.config.n_modalities
        subsets = proper_subsets(num_modalities)
        codes = (subsets.long() << torch.arange(num_modalities)).sum(dim=1)
        lookup = torch.zeros(2 ** num_modalities, dtype=torch.long)
        lookup[codes] = torch.arange(len(subsets))
        self.register_buffer("code_weights", 1 << torch.arange(num_modalities), persistent=False)
        self.register_buffer("subset_of_code", lookup, persistent=False)  # mask code -> row of proper_subsets
        encoder = complete.transformers[0]
        scales = (encoder.out_channels, *encoder.skip_channels)
        self.standins = nn.ModuleList(nn.ModuleList(ChannelAffine(len(subsets), channels)
                                                    for _ in range(num_modalities)) for channels in scales)
        self.site_names = tuple(name for name, module in complete.named_modules()
                                if isinstance(module, MODULATED_BLOCKS))
        self.sites = nn.ModuleList(ChannelAffine(len(subsets), complete.get_submodule(name)[0].out_channels)
                                   for name in self.site_names)
        self.class_features = ChannelAffine(len(subsets), complete.config.class_dim)

    def subset_index(self, present):
        """(B,) the row of ``proper_subsets`` of each sample's mask (a proper subset), on the mask's device."""
        return self.subset_of_code[(present.long() * self.code_weights).sum(dim=1)]

    def fill_missing(self, bottlenecks, skips, present, index):
        """The encoders' outputs with each missing sequence's bottleneck and skips replaced by its stand-ins (a
        selection: nothing of a missing sequence's encoder output passes)."""
        per_scale = [list(bottlenecks)] + [[scales[level] for scales in skips] for level in range(len(skips[0]))]
        count = present.sum(dim=1)
        filled = []
        for features, standins in zip(per_scale, self.standins):
            keep = [present[:, m].view(-1, *([1] * (features[m].dim() - 1))) for m in range(len(features))]
            total = sum(torch.where(k, feature, 0) for k, feature in zip(keep, features))
            mean = total / count.view_as(keep[0]).to(total.dtype)
            filled.append([torch.where(k, feature, standin(mean, index))
                           for k, feature, standin in zip(keep, features, standins)])
        return filled[0], [list(scales) for scales in zip(*filled[1:])]

    @contextlib.contextmanager
    def modulating(self, complete, index):
        """Within the block, the modulated blocks of ``complete`` (this model's, or its inference copy's) scale and
        shift their outputs for the subsets ``index`` (B,); the hooks are removed on leaving."""
        handles = [complete.get_submodule(name).register_forward_hook(functools.partial(_modulate, affine, index))
                   for name, affine in zip(self.site_names, self.sites)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


class SubsetIMMSeg(nn.Module):
    """A complete I-MMSeg model (``complete``, frozen: no gradient, always in eval mode, so that neither its
    BatchNorm statistics nor its dropout ever change) with the subset stage's ``adapters`` beside it.

    forward(images, present): samples with every sequence (``present`` None, or a full row) go through ``complete``
    exactly as it computes alone; samples with a proper subset through the subset path. In training,
    forward(images, subset_view=...) returns a SubsetStageOutput.
    """

    def __init__(self, complete):
        super().__init__()
        if not isinstance(complete, IMMSeg):
            raise ValueError(f"the subset stage adds to an I-MMSeg model, got {type(complete).__name__}")
        self.complete = complete.requires_grad_(False).eval()
        self.adapters = SubsetAdapters(complete)

    @property
    def config(self):
        return self.complete.config

    def train(self, mode=True):
        super().train(mode)
        self.complete.eval()
        return self

    def subset_logits(self, images, present, encoded=None):
        """Fused logits (B, K, H, W) of samples that have only the sequences ``present`` (B, M), each row a proper
        subset (not checked: no wait for the device); ``encoded``: the encoders' outputs, if computed already."""
        bottlenecks, skips = encoded if encoded is not None else self.complete.encode_sequences(images)
        index = self.adapters.subset_index(present)
        bottlenecks, skips = self.adapters.fill_missing(bottlenecks, skips, present, index)
        with self.adapters.modulating(self.complete, index):
            _, skips, decoded, class_features = self.complete.decode(bottlenecks, skips)
            class_features = self.adapters.class_features(class_features.expand(len(index), -1, -1), index,
                                                          channel_dim=-1)
            return self.complete.fused_logits(skips, decoded, class_features)

    def training_views(self, images, subset_view):
        """The subset view of every sample (``subset_view`` (B, M), proper subsets) beside its complete view; the
        encoders and the complete view run without gradient, the encoders once for both."""
        subset_view = check_present(subset_view, images.shape[0], self.config.n_modalities)
        with torch.no_grad():
            encoded = self.complete.encode_sequences(images)
            _, skips, decoded, class_features = self.complete.decode(*encoded)
            complete_logits = self.complete.fused_logits(skips, decoded, class_features)
        return SubsetStageOutput(self.subset_logits(images, subset_view, encoded), complete_logits)

    def forward(self, images, present=None, subset_view=None):
        """Eval: fused logits (B, K, H, W), each sample routed by its row of ``present`` (B, M) or (M,) (None: every
        sequence). Training: ``subset_view`` is required and a SubsetStageOutput returned."""
        if self.training:
            if subset_view is None or present is not None:
                raise ValueError("in training the subset stage takes subset_view, the proper subset of each sample's "
                                 "second view (every sample is also seen complete)")
            return self.training_views(images, subset_view)
        if subset_view is not None:
            raise ValueError("subset_view is a second view for training; at inference give present")
        present = check_present(present, images.shape[0], self.config.n_modalities, require_one=True)
        if present is None:
            return self.complete(images)
        complete_rows = present.all(dim=1)
        if bool(complete_rows.all()):
            return self.complete(images)
        logits = self.subset_logits(images, present)
        if bool(complete_rows.any()):
            logits = torch.where(complete_rows[:, None, None, None], self.complete(images), logits)
        return logits

    def head_logits(self, images, present=None):
        """{"fused": logits} and the modality heads where every sequence is present (the complete model's); the
        subset path serves the fused head alone."""
        present = check_present(present, images.shape[0], self.config.n_modalities, require_one=not self.training)
        if present is None or bool(present.all()):
            return self.complete.head_logits(images)
        raise ValueError("the subset stage serves the fused head alone on a subset of the sequences: average no "
                         "modality head (--heads fused)")


COMPLETE_PREFIX = "complete."


def complete_weights(state_dict):
    """The complete model's entries of a SubsetIMMSeg state dict, under the complete model's own names."""
    return {name[len(COMPLETE_PREFIX):]: value for name, value in state_dict.items()
            if name.startswith(COMPLETE_PREFIX)}


def adapter_parameters_per_subset(model):
    """(parameters of one subset, parameters of the complete model): what the stage adds per proper subset."""
    adapters = sum(parameter.numel() for parameter in model.adapters.parameters())
    complete = sum(parameter.numel() for parameter in model.complete.parameters())
    return adapters // len(proper_subsets(model.config.n_modalities)), complete
