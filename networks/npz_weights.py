"""Reading Google's ViT / BiT ``.npz`` releases into PyTorch modules.

Modules describe which npz key fills which of their tensors by calling
:meth:`NpzReader.assign` from their ``load_from``; nothing is copied until every
key has been found with the right shape, so a bad file leaves the model
untouched and the error names every missing or mis-shaped key.
"""
import logging

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


class PretrainedWeightsError(ValueError):
    """An npz file does not fit the model: the message names the keys."""


def conv_kernel(hwio):
    """Flax conv kernel (H, W, in, out) -> PyTorch weight (out, in, H, W)."""
    return hwio.permute(3, 2, 0, 1)


def dense_kernel(kernel, in_axes=1):
    """Flax dense kernel (in axes..., out axes...) -> ``nn.Linear`` weight (out, in).

    Attention kernels keep heads as separate axes: query/key/value are
    (hidden, heads, head_dim) with one input axis, the output projection
    (heads, head_dim, hidden) with two.
    """
    in_features = int(np.prod(kernel.shape[:in_axes]))
    return kernel.reshape(in_features, -1).t()


def flat(value):
    """GroupNorm / LayerNorm parameters and biases stored with extra unit axes."""
    return value.reshape(-1)


def adapt_input_channels(weight, in_channels):
    """Adapt an RGB stem kernel (out, 3, kh, kw) to ``in_channels`` inputs.

    One channel sums the RGB kernels (a grey image seen as R = G = B); other counts
    repeat the kernels and rescale so that the expected activation is unchanged.
    """
    if weight.shape[1] == in_channels:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_channels // weight.shape[1])
    return weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)


def resize_position_embedding(posemb, grid_hw, num_prefix_tokens):
    """Drop prefix tokens (the class token) and interpolate the grid of (1, N, D) position embeddings."""
    posemb = posemb[:, num_prefix_tokens:]
    old = int(round(posemb.shape[1] ** 0.5))
    if old * old != posemb.shape[1]:
        raise PretrainedWeightsError(f"position embeddings of {posemb.shape[1]} tokens are not a square grid")
    if (old, old) == tuple(grid_hw):
        return posemb
    logger.info("resizing position embeddings from %dx%d to %dx%d", old, old, *grid_hw)
    grid = posemb.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(grid_hw), mode="bilinear", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, grid_hw[0] * grid_hw[1], -1)


class NpzReader:
    """Collects (tensor, value) assignments from an npz mapping, then copies them all at once."""

    def __init__(self, weights):
        self.weights = weights
        self.assignments = []
        self.missing = []
        self.mismatched = []
        self.used = set()

    def assign(self, tensor, key, convert=None):
        if key not in self.weights:
            self.missing.append(key)
            return
        value = torch.from_numpy(np.asarray(self.weights[key], dtype=np.float32))
        if convert is not None:
            value = convert(value)
        if tuple(value.shape) != tuple(tensor.shape):
            self.mismatched.append(f"{key}: {tuple(value.shape)} in the file, {tuple(tensor.shape)} in the model")
            return
        self.used.add(key)
        self.assignments.append((tensor, value))

    def commit(self, source="npz"):
        """Copy every assignment, or raise naming every problem and copy nothing."""
        if self.missing or self.mismatched:
            lines = [f"{source} does not fit the model:"]
            lines += [f"  missing key {key}" for key in self.missing]
            lines += [f"  wrong shape {text}" for text in self.mismatched]
            raise PretrainedWeightsError("\n".join(lines))
        with torch.no_grad():
            for tensor, value in self.assignments:
                tensor.copy_(value.to(dtype=tensor.dtype, device=tensor.device))
        unused = sorted(set(self.weights.keys()) - self.used)
        if unused:
            logger.info("%s: %d keys not used by this model (e.g. %s)", source, len(unused), ", ".join(unused[:3]))
        return len(self.assignments)
