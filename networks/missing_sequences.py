"""Any subset of the sequences (documentation/missing_sequences.md): masks of the sequences a sample has, the
subsets that the subset stage (networks.subset_stage) serves, and a model applied to a fixed subset.

A mask ``present`` is a bool tensor (B, M), True where sample b has sequence m (order of ``MODALITIES``);
None means every sequence of every sample.
"""
import itertools

import torch

from datasets.vocabulary import MODALITIES


def proper_subsets(num_modalities=len(MODALITIES), device=None):
    """(2**M - 2, M) bool: every non-empty proper subset of the M sequences as a row, in a fixed order."""
    rows = [row for row in itertools.product((False, True), repeat=num_modalities) if any(row) and not all(row)]
    return torch.tensor(rows, dtype=torch.bool, device=device)


def proper_subset_names(num_modalities=len(MODALITIES)):
    """The proper subsets of the sequences as tuples of names, in the order of ``proper_subsets``."""
    return [tuple(name for name, kept in zip(MODALITIES, row) if kept)
            for row in proper_subsets(num_modalities).tolist()]


def draw_subset_views(batch_size, subsets):
    """(B, M) mask: one of ``subsets`` per sample, drawn uniformly, for the second view of the subset stage's step
    (every sample is also seen complete). Drawn from the global generator of ``subsets``' device, on that device, so
    the step never waits for it and a checkpoint's RNG states let a resumed run draw the same views."""
    return subsets[torch.randint(len(subsets), (batch_size,), device=subsets.device)]


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
    """A model applied to ``sequences`` alone: the other sequences' channels are zero-filled, whatever they hold.
    With ``leave_out`` the model must be a subset stage (networks.subset_stage.SubsetIMMSeg), whose subset path
    segments them, and ``sequences`` a proper subset; without it the model sees the zeros as it would see an image
    (any model: test.py --missing zero_fill)."""

    def __init__(self, model, sequences, leave_out=True):
        super().__init__()
        self.model = model
        self.sequences = tuple(name for name in MODALITIES if name in sequences)
        self.leave_out = leave_out
        if leave_out and not hasattr(model, "subset_logits"):
            raise ValueError(f"a {type(model).__name__} has no subset path to leave sequences out: give a subset stage "
                             "(train.py --subsets_from), or zero-fill the missing sequences (leave_out=False)")
        if leave_out and len(self.sequences) == len(MODALITIES):
            raise ValueError("a subset stage's subset path serves a proper subset of the sequences; with all of them "
                             "use the model itself")
        # on the model's device, and moved with this module: a mask on another device than the images is an error
        # (or, for a CPU mask beside CUDA images, a copy that waits for the device) in every forward
        device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
        self.register_buffer("present", present_mask(sequences, device=device)[0], persistent=False)

    def _inputs(self, images):
        """(the images with the other sequences zero-filled, the (B, M) mask)."""
        present = self.present.expand(images.shape[0], -1)
        return torch.where(present[:, :, None, None], images, 0), present

    def forward(self, images):
        images, present = self._inputs(images)
        if self.leave_out:  # the stage's subset path, chosen without a read from the device
            return self.model.subset_logits(images, present)
        return self.model(images)

    def head_logits(self, images):
        """Each head's logits on the zero-filled images (a subset stage serves its fused head alone on a subset)."""
        images, present = self._inputs(images)
        return self.model.head_logits(images, present=present) if self.leave_out else self.model.head_logits(images)
