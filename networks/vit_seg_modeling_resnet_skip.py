"""ResNetV2 of the R50-ViT hybrid: weight-standardised convolutions and GroupNorm, returning skips."""
from collections import OrderedDict

import torch.nn as nn
import torch.nn.functional as F

from .npz_weights import adapt_input_channels, conv_kernel, flat

GN_EPS = 1e-6  # as in the Flax models the weights were trained with


class StdConv2d(nn.Conv2d):
    """Conv2d whose kernel is standardised (zero mean, unit variance per output channel) at every call.

    The standardisation runs as one batch-norm call over the flattened kernel,
    which fuses the mean, variance and scaling (and their gradients) into single kernels.
    """

    eps = 1e-5

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                              momentum=0.0, eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def conv3x3(cin, cout, stride=1):
    return StdConv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(cin, cout, stride=1):
    return StdConv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


def projection_group_norm(kind, norm_groups, channels):
    if kind == "group":
        return nn.GroupNorm(norm_groups, channels, eps=GN_EPS)
    if kind == "per_channel":
        return nn.GroupNorm(channels, channels)
    raise ValueError(f"unknown resnet.projection_norm {kind!r}; expected 'group' or 'per_channel'")


class Bottleneck(nn.Module):
    """The hybrid's residual unit: 1x1 -> 3x3 (strided) -> 1x1, GroupNorm after each conv.

    A projection (1x1 conv + GroupNorm) joins the residual when the shape changes; its
    norm is ``projection_norm``: "group" (as gn1-3) or "per_channel" (GroupNorm(C, C),
    eps 1e-5, as in the released review code).
    """

    def __init__(self, cin, cout, cmid, stride=1, norm_groups=32, projection_norm="group"):
        super().__init__()
        self.conv1 = conv1x1(cin, cmid)
        self.gn1 = nn.GroupNorm(norm_groups, cmid, eps=GN_EPS)
        self.conv2 = conv3x3(cmid, cmid, stride)
        self.gn2 = nn.GroupNorm(norm_groups, cmid, eps=GN_EPS)
        self.conv3 = conv1x1(cmid, cout)
        self.gn3 = nn.GroupNorm(norm_groups, cout, eps=GN_EPS)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or cin != cout:
            self.downsample = conv1x1(cin, cout, stride)
            self.gn_proj = projection_group_norm(projection_norm, norm_groups, cout)
        else:
            self.downsample = None

    def forward(self, x):
        residual = x if self.downsample is None else self.gn_proj(self.downsample(x))
        y = self.relu(self.gn1(self.conv1(x)))
        y = self.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return self.relu(residual + y)

    def load_from(self, reader, prefix):
        """``prefix`` is the npz path of the unit, e.g. ``block1/unit1``."""
        for index in (1, 2, 3):
            reader.assign(getattr(self, f"conv{index}").weight, f"{prefix}/conv{index}/kernel", conv_kernel)
            gn = getattr(self, f"gn{index}")
            reader.assign(gn.weight, f"{prefix}/gn{index}/scale", flat)
            reader.assign(gn.bias, f"{prefix}/gn{index}/bias", flat)
        if self.downsample is not None:
            reader.assign(self.downsample.weight, f"{prefix}/conv_proj/kernel", conv_kernel)
            reader.assign(self.gn_proj.weight, f"{prefix}/gn_proj/scale", flat)
            reader.assign(self.gn_proj.bias, f"{prefix}/gn_proj/bias", flat)


class ResNetV2(nn.Module):
    """Root (7x7/2 conv, GN, ReLU, 3x3/2 max pool) and three stages of bottleneck units.

    ``forward`` returns the stage-3 map (16 * width channels at H/16) and the skip
    features, coarsest first: stage 2 (8w at H/8), stage 1 (4w at H/4), root (w at H/2).

    ``input_repeat`` repeats the input channels before the stem (whose kernel then
    takes ``in_channels * input_repeat``). With ``pool_padding`` 0 (TransUNet's pool)
    the stage-1 map is one pixel short of H/4: the skips are zero-padded at the bottom
    and right to H/4 and H/8, while the stages themselves run on the unpadded maps.
    """

    def __init__(self, block_units, width_factor, in_channels=1, norm_groups=32, input_repeat=1, pool_padding=1,
                 projection_norm="group"):
        super().__init__()
        width = int(64 * width_factor)
        self.width = width
        self.input_repeat = input_repeat
        self.root = nn.Sequential(OrderedDict([
            ("conv", StdConv2d(in_channels * input_repeat, width, kernel_size=7, stride=2, padding=3, bias=False)),
            ("gn", nn.GroupNorm(norm_groups, width, eps=GN_EPS)),
            ("relu", nn.ReLU(inplace=True)),
        ]))
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=pool_padding)
        stages = []
        stage_channels = []
        cin = width
        for index, units in enumerate(block_units):
            cmid = width * 2 ** index
            cout = cmid * 4
            stride = 1 if index == 0 else 2
            blocks = [(f"unit{u + 1}", Bottleneck(cin if u == 0 else cout, cout, cmid, stride if u == 0 else 1,
                                                  norm_groups, projection_norm)) for u in range(units)]
            stages.append((f"block{index + 1}", nn.Sequential(OrderedDict(blocks))))
            stage_channels.append(cout)
            cin = cout
        self.body = nn.Sequential(OrderedDict(stages))
        self.out_channels = cin
        self.skip_channels = tuple(stage_channels[-2::-1]) + (width,)

    def forward(self, x):
        if self.input_repeat != 1:
            x = x.repeat(1, self.input_repeat, 1, 1)
        root = self.root(x)
        x = self.pool(root)
        skips = [root]
        for stage in list(self.body)[:-1]:
            x = stage(x)
            height, width = (n // 2 ** len(skips) for n in root.shape[-2:])
            short_rows, short_columns = height - x.shape[-2], width - x.shape[-1]
            skips.append(F.pad(x, (0, short_columns, 0, short_rows)) if short_rows or short_columns else x)
        x = self.body[-1](x)
        return x, skips[::-1]

    def load_from(self, reader):
        in_channels = self.root.conv.weight.shape[1]
        reader.assign(self.root.conv.weight, "conv_root/kernel",
                      lambda k: adapt_input_channels(conv_kernel(k), in_channels))
        reader.assign(self.root.gn.weight, "gn_root/scale", flat)
        reader.assign(self.root.gn.bias, "gn_root/bias", flat)
        for block_name, block in self.body.named_children():
            for unit_name, unit in block.named_children():
                unit.load_from(reader, f"{block_name}/{unit_name}")
