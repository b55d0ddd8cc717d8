"""Any subset of the sequences (documentation/missing_sequences.md): the mask of the sequences a sample has, its
random draw for ``--sequence_dropout``, and the zeroing of hidden sequences.

A mask ``present`` is a bool tensor (B, M), True where sample b has sequence m (order of ``MODALITIES``);
None means every sequence of every sample, the models' plain code path.
"""
import itertools

import torch

from datasets.vocabulary import MODALITIES


def proper_subsets(num_modalities=len(MODALITIES), device=None):
    """(2**M - 2, M) bool: every non-empty proper subset of the M sequences as a row, in a fixed order."""
    rows = [row for row in itertools.product((False, True), repeat=num_modalities) if any(row) and not all(row)]
    return torch.tensor(rows, dtype=torch.bool, device=device)


def draw_present(batch_size, probability, subsets):
    """(B, M) mask: each sample independently, with ``probability``, keeps only one of ``subsets`` (drawn
    uniformly), else every sequence. Drawn from the global generator of ``subsets``' device, on that device, so
    the step never waits for it and a checkpoint's RNG states let a resumed run draw the same masks."""
    hide = torch.rand(batch_size, device=subsets.device) < probability
    choice = torch.randint(len(subsets), (batch_size,), device=subsets.device)
    return subsets[choice] | ~hide[:, None]


def draw_subset_views(batch_size, subsets):
    """(B, M) mask: one of ``subsets`` per sample, drawn uniformly (--sequence_dropout_mode paired, where every
    sample is also seen complete), from the global generator of ``subsets``' device, as ``draw_present``."""
    return subsets[torch.randint(len(subsets), (batch_size,), device=subsets.device)]


def split_views(output, batch_size):
    """A training output of ``IMMSeg(..., subset_view=...)`` (2B samples) as the output of each view: the first
    with the contrastive embeddings, the second without (they come from the encoders, the same for both)."""
    def part(logits, views):
        return None if logits is None else logits[views]
    first, second = slice(None, batch_size), slice(batch_size, None)
    return (output._replace(fused_logits=part(output.fused_logits, first),
                            modality_logits=tuple(logits[first] for logits in output.modality_logits)),
            output._replace(fused_logits=part(output.fused_logits, second),
                            modality_logits=tuple(logits[second] for logits in output.modality_logits),
                            contrast_embeddings=None, class_anchors=None))


def zero_hidden(features, present, modality):
    """``features`` (B, ...) of sequence ``modality`` with the samples that lack it set to zero (``present`` None:
    ``features`` itself). A selection rather than a product, so that not even a NaN of a hidden sequence passes."""
    if present is None:
        return features
    keep = present[:, modality].view(-1, *([1] * (features.dim() - 1)))
    return torch.where(keep, features, 0)


def hide_sequences(images, present):
    """``images`` (B, M, H, W) with the hidden sequences zero-filled, as training feeds a sample that lacks them."""
    if present is None:
        return images
    return torch.where(present[:, :, None, None], images, 0)


def check_present(present, batch_size, num_modalities, require_one=False):
    """``present`` as a (B, M) bool mask (an (M,) mask applies to every sample), or None. ``require_one`` also checks
    that every sample has a sequence, a check that waits for the device (inference only)."""
    if present is None:
        return None
    if not torch.is_tensor(present) or present.dtype != torch.bool:
        raise ValueError(f"present must be a bool tensor of shape (B, {num_modalities}) or ({num_modalities},), True "
                         f"for each sequence a sample has (order {MODALITIES}), got {present!r}")
    if present.dim() == 1:
        present = present.expand(batch_size, -1)
    if tuple(present.shape) != (batch_size, num_modalities):
        raise ValueError(f"present must have shape ({batch_size}, {num_modalities}) or ({num_modalities},) for "
                         f"{batch_size} samples of {num_modalities} sequences, got {tuple(present.shape)}")
    # (a meta tensor, which the device-parity tests run on, holds no values to check)
    if require_one and not present.is_meta and not bool(present.any(dim=1).all()):
        raise ValueError("present leaves a sample without any sequence: each needs at least one")
    return present


def present_mask(names, batch_size=1, device=None):
    """(B, M) mask of the sequences named in ``names`` (e.g. ``("bSSFP", "LGE")`` for a patient without T2w)."""
    unknown = sorted(set(names) - set(MODALITIES))
    if unknown or not names:
        raise ValueError(f"expected a non-empty selection of the sequences {MODALITIES}, got {list(names)}")
    row = torch.tensor([name in names for name in MODALITIES], dtype=torch.bool, device=device)
    return row.expand(batch_size, -1).clone()


class SequenceSubset(torch.nn.Module):
    """A model applied to ``sequences`` alone: the other sequences' channels are zero-filled, whatever they hold,
    and, with ``leave_out`` (a model that runs on any subset: I-MMSeg trained with --sequence_dropout), left out of
    every fusion (``present``); without it the model sees the zeros as it would see an image (any model)."""

    def __init__(self, model, sequences, leave_out=True):
        super().__init__()
        self.model = model
        self.sequences = tuple(name for name in MODALITIES if name in sequences)
        self.leave_out = leave_out
        # on the model's device, and moved with this module: a mask on another device than the images is an error
        # (or, for a CPU mask beside CUDA images, a copy that waits for the device) in every forward
        device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
        self.register_buffer("present", present_mask(sequences, device=device)[0], persistent=False)

    def _inputs(self, images):
        present = self.present.expand(images.shape[0], -1)
        return hide_sequences(images, present), {"present": present} if self.leave_out else {}

    def forward(self, images):
        images, mask = self._inputs(images)
        if mask and hasattr(self.model, "subset_logits"):  # a subset stage: its subset path, chosen without a read
            return self.model.subset_logits(images, mask["present"])
        return self.model(images, **mask)

    def head_logits(self, images):
        images, mask = self._inputs(images)
        return self.model.head_logits(images, **mask)
