"""Losses and schedule of I-MMSeg (method.md), evaluation metrics, and atomic file writing."""
import contextlib
import functools
import math
import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class DiceLoss(nn.Module):
    """Soft Dice on softmax probabilities, per class over the whole batch, weighted and averaged over classes.

    Squared terms in the denominator, as in TransUNet; ``class_weights`` defaults to
    0.5 for the background and 1 for the other classes.
    """

    def __init__(self, num_classes, class_weights=None, smooth=1e-5):
        super().__init__()
        self.num_classes = num_classes
        self.smooth = smooth
        weights = class_weights if class_weights is not None else [0.5] + [1.0] * (num_classes - 1)
        self.register_buffer("class_weights", torch.as_tensor(weights, dtype=torch.float32), persistent=False)

    def forward(self, logits, target):
        probs = logits.float().softmax(dim=1)
        one_hot = F.one_hot(target, self.num_classes).permute(0, 3, 1, 2).to(probs.dtype)
        dims = (0, 2, 3)
        intersect = (probs * one_hot).sum(dims)
        denominator = (probs * probs).sum(dims) + one_hot.sum(dims)
        dice = (2 * intersect + self.smooth) / (denominator + self.smooth)
        return ((1 - dice) * self.class_weights).sum() / self.num_classes


class SegmentationLoss(nn.Module):
    """0.2 cross-entropy + 0.8 soft Dice (background weight 0.5), on logits."""

    def __init__(self, num_classes, ce_weight=0.2, dice_weight=0.8, class_weights=None):
        super().__init__()
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight
        self.dice = DiceLoss(num_classes, class_weights)

    def forward(self, logits, target):
        return self.ce_weight * F.cross_entropy(logits.float(), target) + self.dice_weight * self.dice(logits, target)


class SubsetStageLoss(nn.Module):
    """The subset stage's loss (networks.subset_stage): the subset view's segmentation loss against the labels plus
    ``soft_target_weight`` times its divergence from the complete view's class probabilities, KL(complete || subset)
    per pixel, averaged over the pixels; the complete view is a target only (detached)."""

    def __init__(self, num_classes, soft_target_weight, dice_class_weights=None):
        super().__init__()
        self.segmentation = SegmentationLoss(num_classes, class_weights=dice_class_weights)
        self.soft_target_weight = soft_target_weight

    def forward(self, output, labels):
        """``output`` a SubsetStageOutput -> (total, {term: value}), the terms for logging (detached by the caller)."""
        terms = {"subset_fused": self.segmentation(output.fused_logits, labels)}
        total = terms["subset_fused"]
        if self.soft_target_weight:
            target = output.complete_logits.detach().float().log_softmax(dim=1)
            subset = output.fused_logits.float().log_softmax(dim=1)
            terms["soft_targets"] = (target.exp() * (target - subset)).sum(dim=1).mean()
            total = total + self.soft_target_weight * terms["soft_targets"]
        return total, terms


class TextAnchoredContrastiveLoss(nn.Module):
    """Supervised contrastive loss on sampled pixel embeddings, with the projected class embeddings as anchors.

    At each scale the labels are nearest-downsampled to the embedding grid; for
    each image and each present, non-ignored class up to ``samples_per_scale[s]``
    pixels are drawn without replacement (all images and classes at once). The
    K class anchors join with their class ids (``anchor_copies`` times each: the released
    review code gathers the anchors of its two GPUs). Features are L2-normalised; for
    each sample i and positive p the loss is -log(exp(s_ip) / (exp(s_ip) +
    sum over negatives n of exp(s_in))), s = cosine / temperature, averaged over
    the positives of i and then over the samples that have a positive. The
    scales' losses are summed. Without any sampled pixel the loss is a zero that
    stays connected to the graph.

    On a GPU every tensor has a fixed size: a draw that finds fewer pixels than asked keeps
    its slots, marked invalid and left out of every sum, so the loss never waits for the
    device to say how many pixels it found (no host synchronisation, graph-capturable).
    On the CPU, where knowing the count costs nothing, the invalid slots are dropped first.
    """

    def __init__(self, samples_per_scale=(50, 20, 10), temperature=0.07, anchor_copies=1, fixed_size=None):
        super().__init__()
        self.fixed_size = fixed_size  # None: on GPUs only
        self.samples_per_scale = tuple(samples_per_scale)
        self.temperature = temperature
        self.anchor_copies = anchor_copies

    def forward(self, embeddings, labels, anchors, ignore_classes=()):
        """embeddings: per scale (B, d_s, h_s, w_s); labels: (B, H, W); anchors: per scale (K, d_s)."""
        if not (len(embeddings) == len(anchors) == len(self.samples_per_scale)):
            raise ValueError(f"expected {len(self.samples_per_scale)} scales of embeddings and anchors, "
                             f"got {len(embeddings)} and {len(anchors)}")
        total = 0.0
        for features, anchor, count in zip(embeddings, anchors, self.samples_per_scale):
            sampled, targets, valid = self.sample(features, labels, count, anchor.shape[0], ignore_classes)
            if not (sampled.is_cuda if self.fixed_size is None else self.fixed_size):
                sampled, targets, valid = sampled[valid], targets[valid], valid[valid]
            classes = torch.arange(anchor.shape[0], device=anchor.device).repeat(self.anchor_copies)
            anchor = anchor.float().repeat(self.anchor_copies, 1)
            # In float32 under any autocast: in fp16 a zero feature normalises to NaN and exp() underflows.
            with autocast_off(sampled.device):
                total = total + self.supervised_contrast(
                    F.normalize(torch.cat([sampled.float(), anchor]), dim=1), torch.cat([targets, classes]),
                    torch.cat([valid, torch.ones_like(classes, dtype=torch.bool)]))
        return total

    @staticmethod
    def sample(features, labels, count, num_classes, ignore_classes=()):
        """``count`` random pixel slots per image and class -> (B*K*count, d) features, (B*K*count,) class ids and
        (B*K*count,) validity: a class with fewer than ``count`` pixels fills its other slots with invalid ones."""
        batch, dim, height, width = features.shape
        small = F.interpolate(labels[:, None].float(), size=(height, width), mode="nearest")[:, 0].long()
        small = small.flatten(1)
        classes = torch.arange(num_classes, device=features.device)
        member = small[:, None, :] == classes[None, :, None]
        if ignore_classes:  # compared with Python numbers: no index tensor to copy to the device
            ignored = functools.reduce(torch.logical_or, [classes == c for c in ignore_classes])
            member = member & ~ignored[None, :, None]
        keys = torch.rand(small.shape, device=features.device)
        keyed = torch.where(member, keys[:, None, :], torch.full_like(keys[:, None, :], 2.0))
        count = min(count, small.shape[1])
        values, index = keyed.topk(count, dim=-1, largest=False)
        valid = (values < 2.0).view(batch * num_classes * count)
        flat = features.flatten(2).transpose(1, 2)
        gathered = torch.gather(flat, 1, index.view(batch, num_classes * count, 1).expand(-1, -1, dim))
        targets = classes.view(1, num_classes, 1).expand(batch, -1, count).reshape(-1)
        return gathered.reshape(-1, dim), targets, valid

    def supervised_contrast(self, features, targets, valid):
        similarity = features @ features.t() / self.temperature
        # any per-row shift cancels in log_prob; the maximum over valid columns keeps exp() in range
        shift = similarity.detach().masked_fill(~valid[None, :], -math.inf).max(dim=1, keepdim=True).values
        similarity = similarity - shift
        same = targets[:, None] == targets[None, :]
        pair = valid[:, None] & valid[None, :]
        positive = same & pair & ~torch.eye(len(targets), dtype=torch.bool, device=targets.device)
        exp = similarity.exp()
        negative_sum = (exp * (~same & valid[None, :])).sum(dim=1, keepdim=True)
        log_prob = similarity - torch.log(exp + negative_sum)
        positives = positive.sum(dim=1)
        has_positive = positives > 0
        per_sample = (log_prob * positive).sum(dim=1) / positives.clamp(min=1)
        # zero (still connected to the graph) when no sample has a positive
        return -(per_sample * has_positive).sum() / has_positive.sum().clamp(min=1)


def autocast_off(device):
    """A context with autocast off on ``device`` (a device without autocast, such as ``meta``, needs none)."""
    if not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


class LossWeights(NamedTuple):
    fused: float
    modality: float
    contrast: float


def loss_weights(epoch, start_contrast_epoch=20, region_fusion_start_epoch=100, contrast_w=0.1,
                 use_contrast=True):
    """The two-stage schedule: modality heads (+ contrast from ``start_contrast_epoch``) until
    ``region_fusion_start_epoch``, then fused + 0.5 * modality + 0.5 * contrast_w * contrast."""
    contrast = contrast_w if use_contrast and epoch >= start_contrast_epoch else 0.0
    if epoch < region_fusion_start_epoch:
        return LossWeights(fused=0.0, modality=1.0, contrast=contrast)
    return LossWeights(fused=1.0, modality=0.5, contrast=0.5 * contrast)


BASELINE_WEIGHTS = LossWeights(fused=1.0, modality=0.0, contrast=0.0)


class IMMSegLoss(nn.Module):
    """The weighted sum of the terms a :class:`LossWeights` selects.

    fused: segmentation loss of the fused head; modality: sum over the modality
    heads; contrast: mean over modalities of the text-anchored contrastive loss,
    each with its modality's ignored classes. ``dice_class_weights`` replaces the soft
    Dice's class weights of every head (default method.md's: 0.5 background, 1 the rest).
    ``fixed_size_contrast``: the contrastive sampling's fixed size (TextAnchoredContrastiveLoss; None: on GPUs).
    Returns the total and the unweighted terms that were computed, for logging: detach
    them outside (a compiled loss that returns a term detached and the total equal to that term, as in the stage of
    the modality heads alone, where inductor folds the weight 1, returns a total without gradient).
    """

    def __init__(self, num_classes, contrast_config, dice_class_weights=None, fixed_size_contrast=None):
        super().__init__()
        self.segmentation = SegmentationLoss(num_classes, class_weights=dice_class_weights)
        counts = [int(s * contrast_config.sample_num) for s in contrast_config.samples_per_scale]
        self.contrast = TextAnchoredContrastiveLoss(counts, contrast_config.temperature, contrast_config.anchor_copies,
                                                    fixed_size_contrast)
        self.ignore_classes = tuple(tuple(c) for c in contrast_config.ignore_classes)

    def forward(self, output, labels, weights):
        terms = {}
        if weights.fused and output.fused_logits is not None:
            terms["fused"] = self.segmentation(output.fused_logits, labels)
        if weights.modality and output.modality_logits:
            terms["modality"] = sum(self.segmentation(logits, labels) for logits in output.modality_logits)
        if weights.contrast and output.contrast_embeddings is not None:
            per_modality = [self.contrast(embeddings, labels, output.class_anchors, ignore)
                            for embeddings, ignore in zip(output.contrast_embeddings, self.ignore_classes)]
            terms["contrast"] = sum(per_modality) / len(per_modality)
        if not terms:
            raise ValueError(f"no loss term is active for weights {weights} and this model output")
        total = sum(getattr(weights, name) * value for name, value in terms.items())
        return total, terms


def process_alive(pid):
    """Whether process ``pid`` of this machine runs (True where that cannot be checked safely)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _process_umask():
    """The process's umask: set and restored once, at import, before any thread of this package starts."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_UMASK = _process_umask()


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary file beside ``path`` that replaces ``path`` only if the block succeeds.

    A crash or an error inside the block leaves ``path`` as it was (absent or
    old) and removes the temporary file, so readers never see half a file. The
    file gets the permissions of one opened normally (0666 less the umask), not
    mkstemp's private 0600, so the rest of a group can read results and checkpoints.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    os.chmod(temporary, 0o666 & ~_UMASK)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj, path):
    with atomic_path(path) as temporary:
        torch.save(obj, temporary)


# Evaluation: structures of the paper's table, as sets of classes (0 background, 1 myocardium, 2 scar, 3 edema).
STRUCTURES = {
    "myocardium": (1,),
    "scar": (2,),
    "edema": (3,),
    "scar_edema": (2, 3),
    "whole_myocardium": (1, 2, 3),
}
PATHOLOGY = ("scar", "edema")


def dice_hd95(prediction, reference, spacing):
    """Dice and HD95 (in the unit of ``spacing``, mm) of two binary volumes; ``spacing=None`` skips HD95 (NaN).

    Rules for empty structures, so that a miss is never scored as perfect or as a
    zero distance: both empty -> Dice NaN and HD95 NaN (undefined); exactly one
    empty -> Dice 0 and HD95 NaN (undefined, counted by the summary).
    """
    prediction, reference = np.asarray(prediction, bool), np.asarray(reference, bool)
    predicted, present = prediction.any(), reference.any()
    if not predicted and not present:
        return math.nan, math.nan
    if not predicted or not present:
        return 0.0, math.nan
    dice = 2.0 * np.logical_and(prediction, reference).sum() / (prediction.sum() + reference.sum())
    if spacing is None:
        return float(dice), math.nan
    from medpy.metric.binary import hd95  # only HD95 needs medpy (not training-time validation)

    return float(dice), float(hd95(prediction, reference, voxelspacing=tuple(float(s) for s in spacing)))


def case_metrics(prediction, reference, spacing):
    """{structure: (dice, hd95)} for label volumes with classes 0-3 (no HD95 when ``spacing`` is None)."""
    return {name: dice_hd95(np.isin(prediction, classes), np.isin(reference, classes), spacing)
            for name, classes in STRUCTURES.items()}


# The review release's evaluation (its test.py), behind the paper's tables: see released_dice_hd95.
RELEASED_EMPTY_PREDICTION_BELOW = 200
RELEASED_EMPTY_REFERENCE_AT_MOST = 200
RELEASED_RULES = ("both_present", "empty_scored_1", "empty_scored_0")


class ReleasedScore(NamedTuple):
    dice: float
    hd95: float
    rule: str  # one of RELEASED_RULES


def released_dice_hd95(prediction, reference):
    """Dice and HD95 of two binary volumes as the review release's test.py computes them.

    Both present: Dice, and HD95 in voxels (unit spacing along all three axes, so
    neighbouring slices are one voxel apart). Otherwise (either or both empty):
    Dice 1 and HD95 0 when the prediction has fewer than 200 voxels and the
    reference at most 200, else Dice 0 and HD95 0. A missed small structure or a
    small false positive thus scores as perfect, and no value is undefined.
    """
    prediction, reference = np.asarray(prediction, bool), np.asarray(reference, bool)
    if prediction.any() and reference.any():
        return ReleasedScore(*dice_hd95(prediction, reference, (1.0, 1.0, 1.0)), "both_present")
    if prediction.sum() < RELEASED_EMPTY_PREDICTION_BELOW and reference.sum() <= RELEASED_EMPTY_REFERENCE_AT_MOST:
        return ReleasedScore(1.0, 0.0, "empty_scored_1")
    return ReleasedScore(0.0, 0.0, "empty_scored_0")


def released_case_metrics(prediction, reference):
    """{structure: ReleasedScore} for label volumes with classes 0-3, in the processed grid."""
    return {name: released_dice_hd95(np.isin(prediction, classes), np.isin(reference, classes))
            for name, classes in STRUCTURES.items()}


def summarise_released(per_case):
    """The release's averages: plain means over all cases (no value is undefined), with std and rule counts."""
    summary = {}
    for name in STRUCTURES:
        scores = [metrics[name] for metrics in per_case]
        dice = np.array([score.dice for score in scores], dtype=np.float64)
        hd = np.array([score.hd95 for score in scores], dtype=np.float64)
        summary[name] = {"dice": float(dice.mean()), "dice_std": float(dice.std()), "hd95_px": float(hd.mean()),
                         "hd95_px_std": float(hd.std()), "n": len(scores),
                         **{f"n_{rule}": sum(score.rule == rule for score in scores) for rule in RELEASED_RULES}}
    return summary


def summarise(per_case):
    """Mean and std over cases of the defined values; undefined (NaN) values are left out and counted."""
    summary = {}
    for name in STRUCTURES:
        dice = np.array([metrics[name][0] for metrics in per_case], dtype=np.float64)
        hd = np.array([metrics[name][1] for metrics in per_case], dtype=np.float64)
        entry = {}
        for key, values in (("dice", dice), ("hd95", hd)):
            defined = values[~np.isnan(values)]
            entry[key] = float(defined.mean()) if defined.size else None
            entry[f"{key}_std"] = float(defined.std()) if defined.size else None
        entry.update(n=len(per_case), n_undefined_dice=int(np.isnan(dice).sum()),
                     n_undefined_hd95=int(np.isnan(hd).sum()))
        summary[name] = entry
    return summary
