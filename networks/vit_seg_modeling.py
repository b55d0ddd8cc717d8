"""I-MMSeg on TransUNet R50-ViT-B_16 encoders, and TransUNet baselines built from the same parts.

``IMMSeg`` is the I-MMSeg network and ``TransUNetBaseline`` the TransUNet baselines
built from the same parts. ``VisionTransformer`` (the review release's name of its
I-MMSeg class) and ``TransUNet`` (this project's earlier name of the baseline) are kept
as aliases for users' scripts. All models take ``images`` of shape (B, 3, H, W), the
sequences in the order of ``MODALITIES`` (bSSFP, LGE, T2w), intensities in [0, 1].
In eval mode they return class logits (B, K, H, W); in training mode a
:class:`SegmentationOutput` with what the losses need. A patient missing a sequence is served by a subset stage
trained on a finished I-MMSeg model (``networks.subset_stage``).
"""
import logging
import math
from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from datasets.vocabulary import MODALITIES

from . import vit_seg_configs as configs
from .immseg_modules import (ClassFeatureModulation, ConcatFusion, ContrastProjection, CrossModalFeatureEnhancement,
                             DynamicClassHead)
from .npz_weights import NpzReader, conv_kernel, dense_kernel, flat, resize_position_embedding
from .vit_seg_modeling_resnet_skip import ResNetV2

logger = logging.getLogger(__name__)

LN_EPS = 1e-6
ATTENTION = "MultiHeadDotProductAttention_1"
ATTENTION_NORM = "LayerNorm_0"
MLP_NORM = "LayerNorm_2"
MLP_DENSE = ("MlpBlock_3/Dense_0", "MlpBlock_3/Dense_1")


class SegmentationOutput(NamedTuple):
    """What a model returns in training mode.

    fused_logits: (B, K, H, W), or None when the fused head was not requested.
    modality_logits: one (B, K, H, W) per modality head (empty for the baselines).
    contrast_embeddings: per modality, the projected skips at H/2, H/4, H/8, or None.
    class_anchors: the class embeddings projected to each of those scales, (K, d_s), or None.
    """
    fused_logits: Optional[torch.Tensor]
    modality_logits: Tuple[torch.Tensor, ...] = ()
    contrast_embeddings: Optional[Tuple[Tuple[torch.Tensor, ...], ...]] = None
    class_anchors: Optional[Tuple[torch.Tensor, ...]] = None


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.transformer.num_heads
        if hidden % self.num_heads:
            raise ValueError(f"hidden_size {hidden} is not divisible by num_heads {self.num_heads}")
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.attention_dropout = config.transformer.attention_dropout_rate
        self.proj_dropout = nn.Dropout(config.transformer.attention_dropout_rate)

    def forward(self, x):
        batch, tokens, hidden = x.shape
        q, k, v = (proj(x).view(batch, tokens, self.num_heads, -1).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        context = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attention_dropout if self.training else 0.0)
        return self.proj_dropout(self.out(context.transpose(1, 2).reshape(batch, tokens, hidden)))

    def load_from(self, reader, prefix):
        for name in ("query", "key", "value", "out"):
            layer = getattr(self, name)
            in_axes = 2 if name == "out" else 1
            reader.assign(layer.weight, f"{prefix}/{name}/kernel", lambda k, a=in_axes: dense_kernel(k, a))
            reader.assign(layer.bias, f"{prefix}/{name}/bias", flat)


class Mlp(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.transformer.mlp_dim)
        self.fc2 = nn.Linear(config.transformer.mlp_dim, config.hidden_size)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(config.transformer.dropout_rate)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.normal_(fc.bias, std=1e-6)

    def forward(self, x):
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config):
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=LN_EPS)
        self.attn = Attention(config)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=LN_EPS)
        self.ffn = Mlp(config)

    def forward(self, x):
        x = x + self.attn(self.attention_norm(x))
        return x + self.ffn(self.ffn_norm(x))

    def load_from(self, reader, prefix):
        for norm, key in ((self.attention_norm, ATTENTION_NORM), (self.ffn_norm, MLP_NORM)):
            reader.assign(norm.weight, f"{prefix}/{key}/scale", flat)
            reader.assign(norm.bias, f"{prefix}/{key}/bias", flat)
        self.attn.load_from(reader, f"{prefix}/{ATTENTION}")
        for fc, key in zip((self.ffn.fc1, self.ffn.fc2), MLP_DENSE):
            reader.assign(fc.weight, f"{prefix}/{key}/kernel", dense_kernel)
            reader.assign(fc.bias, f"{prefix}/{key}/bias", flat)


class Transformer(nn.Module):
    """One modality's hybrid encoder: ResNetV2, then (if num_layers > 0) ViT blocks on the H/16 map.

    As in R50-ViT-B/16, the 16 x 16 patches of the image are the pixels of the
    ResNet's H/16 map, embedded by a 1 x 1 convolution.

    forward: (B, in_channels, H, W) -> bottleneck (B, out_channels, H/16, W/16) and
    the ResNet skips, coarsest first.
    """

    def __init__(self, config, img_size, in_channels=1):
        super().__init__()
        if img_size % 16:
            raise ValueError(f"img_size must be a multiple of 16 (the encoder downsamples by 16), got {img_size}")
        resnet = config.resnet
        self.hybrid_model = ResNetV2(resnet.num_layers, resnet.width_factor, in_channels, resnet.norm_groups,
                                     resnet.input_repeat, resnet.pool_padding, resnet.projection_norm)
        self.output_dropout = nn.Dropout(resnet.output_dropout)
        self.grid_size = (img_size // 16, img_size // 16)
        self.skip_channels = self.hybrid_model.skip_channels
        self.num_layers = config.transformer.num_layers
        if self.num_layers:
            grid = self.grid_size
            self.patch_embeddings = nn.Conv2d(self.hybrid_model.out_channels, config.hidden_size, kernel_size=1)
            self.position_embeddings = nn.Parameter(torch.zeros(1, grid[0] * grid[1], config.hidden_size))
            nn.init.trunc_normal_(self.position_embeddings, std=0.02)
            self.dropout = nn.Dropout(config.transformer.dropout_rate)
            self.layer = nn.ModuleList(Block(config) for _ in range(self.num_layers))
            self.encoder_norm = nn.LayerNorm(config.hidden_size, eps=LN_EPS)
            self.out_channels = config.hidden_size
        else:
            self.out_channels = self.hybrid_model.out_channels

    def forward(self, x):
        x, skips = self.hybrid_model(x)
        x = self.output_dropout(x)
        if self.num_layers:
            x = self.patch_embeddings(x)
            height, width = x.shape[-2:]
            tokens = self.dropout(x.flatten(2).transpose(1, 2) + self.position_embeddings)
            for block in self.layer:
                tokens = block(tokens)
            x = self.encoder_norm(tokens).transpose(1, 2).reshape(x.shape[0], -1, height, width)
        return x, skips

    def load_from(self, reader):
        self.hybrid_model.load_from(reader)
        if not self.num_layers:
            return
        reader.assign(self.patch_embeddings.weight, "embedding/kernel", conv_kernel)
        reader.assign(self.patch_embeddings.bias, "embedding/bias", flat)
        key = "Transformer/posembed_input/pos_embedding"
        if key in reader.weights:
            tokens = np.asarray(reader.weights[key]).shape[1]
            prefix_tokens = tokens - int(math.isqrt(tokens)) ** 2
            reader.assign(self.position_embeddings, key,
                          lambda p: resize_position_embedding(p, self.grid_size, prefix_tokens))
        else:
            reader.missing.append(key)
        for index, block in enumerate(self.layer):
            block.load_from(reader, f"Transformer/encoderblock_{index}")
        reader.assign(self.encoder_norm.weight, "Transformer/encoder_norm/scale", flat)
        reader.assign(self.encoder_norm.bias, "Transformer/encoder_norm/bias", flat)


class Conv2dReLU(nn.Sequential):
    def __init__(self, in_channels, out_channels, kernel_size, padding=0):
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class DecoderBlock(nn.Module):
    """Bilinear x2 upsampling, optional skip concatenation, two 3x3 conv-BN-ReLU."""

    def __init__(self, in_channels, out_channels, skip_channels=0):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv1 = Conv2dReLU(in_channels + skip_channels, out_channels, 3, padding=1)
        self.conv2 = Conv2dReLU(out_channels, out_channels, 3, padding=1)

    def forward(self, x, skip=None):
        x = self.up(x)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class DecoderCup(nn.Module):
    """TransUNet's cascaded upsampler: 3x3 conv to the head width, then one block per x2 upsampling."""

    def __init__(self, config, in_channels, skip_channels):
        super().__init__()
        if not 0 <= config.n_skip <= len(skip_channels):
            raise ValueError(f"n_skip must be between 0 and {len(skip_channels)}, got {config.n_skip}")
        self.n_skip = config.n_skip
        head = config.decoder_head_channels
        self.conv_more = Conv2dReLU(in_channels, head, 3, padding=1)
        out_channels = tuple(config.decoder_channels)
        block_in = (head,) + out_channels[:-1]
        block_skip = [skip_channels[i] if i < self.n_skip else 0 for i in range(len(out_channels))]
        self.blocks = nn.ModuleList(DecoderBlock(i, o, s) for i, o, s in zip(block_in, out_channels, block_skip))
        self.out_channels = out_channels[-1]

    def forward(self, x, skips):
        x = self.conv_more(x)
        for index, block in enumerate(self.blocks):
            x = block(x, skips[index] if index < self.n_skip else None)
        return x


class IMMSeg(nn.Module):
    """I-MMSeg: three hybrid encoders, CMFE, three decoders, CFM, dynamic modality heads and a fused head.

    ``intensity_priors`` (M x Dt) and ``class_embeddings`` (K x Dt) are the frozen text
    features, kept as buffers. With ``config.use_text_prior`` off they are replaced
    by learned parameters of shape (M, config.text_dim) and (K, config.text_dim).
    """

    def __init__(self, config, img_size=128, num_classes=4, intensity_priors=None, class_embeddings=None):
        super().__init__()
        self.config = config
        self.img_size = img_size
        self.num_classes = num_classes
        num_modalities = config.n_modalities
        text_dim = self._register_text(config, num_modalities, num_classes, intensity_priors, class_embeddings)

        self.transformers = nn.ModuleList(Transformer(config, img_size) for _ in range(num_modalities))
        encoder = self.transformers[0]
        bottleneck, skips = encoder.out_channels, encoder.skip_channels
        num_positions = encoder.grid_size[0] * encoder.grid_size[1]
        self.cmfe = (CrossModalFeatureEnhancement(bottleneck, num_positions, text_dim, config.cmfe, num_modalities)
                     if config.use_cmfe else None)
        self.decoders = nn.ModuleList(DecoderCup(config, bottleneck, skips) for _ in range(num_modalities))
        decoder_out = self.decoders[0].out_channels

        self.class_proj = nn.Sequential(nn.Linear(text_dim, config.class_dim), nn.ReLU(inplace=True))
        self.cfm = (ClassFeatureModulation(bottleneck, text_dim, num_classes, config.cfm, num_modalities)
                    if config.use_cfm else None)

        def head():
            return DynamicClassHead(skips, decoder_out, config.class_dim, config.head.context_dim,
                                    config.head.channels, config.head.norm_groups)

        self.modality_heads = nn.ModuleList(head() for _ in range(num_modalities))
        self.skip_fusions = nn.ModuleList(ConcatFusion(num_modalities * c, c) for c in skips)
        self.decoder_fusion = ConcatFusion(num_modalities * decoder_out, decoder_out)
        self.fused_head = head()

        if config.use_contrast:
            dims = tuple(config.contrast.dims)
            self.contrast_projections = nn.ModuleList(ContrastProjection(skips[::-1], dims)
                                                      for _ in range(num_modalities))
            self.anchor_projections = nn.ModuleList(nn.Sequential(nn.Linear(text_dim, d), nn.ReLU(inplace=True))
                                                    for d in dims)

    def _register_text(self, config, num_modalities, num_classes, intensity_priors, class_embeddings):
        expected = {"intensity_priors": num_modalities, "class_embeddings": num_classes}
        if not config.use_text_prior:
            for name, rows in expected.items():
                setattr(self, name, nn.Parameter(torch.randn(rows, config.text_dim) * 0.02))
            return config.text_dim
        given = {"intensity_priors": intensity_priors, "class_embeddings": class_embeddings}
        dims = set()
        for name, rows in expected.items():
            tensor = given[name]
            if tensor is None:
                raise ValueError(f"{name} are required when config.use_text_prior is on "
                                 "(pass the prior file's tensors, or turn the text prior off)")
            if tensor.dim() != 2 or tensor.shape[0] != rows:
                raise ValueError(f"{name} must have shape ({rows}, Dt), got {tuple(tensor.shape)}")
            dims.add(tensor.shape[1])
            self.register_buffer(name, tensor.detach().float().clone())
        if len(dims) != 1:
            raise ValueError(f"intensity_priors and class_embeddings differ in dimension: {sorted(dims)}")
        return dims.pop()

    def encode_sequences(self, images):
        """Per modality the encoder's bottleneck and skips (coarsest first): each encoder sees its own sequence."""
        _check_images(images, self.config.n_modalities, self.img_size)
        encoded = [transformer(images[:, m:m + 1]) for m, transformer in enumerate(self.transformers)]
        return [x for x, _ in encoded], [s for _, s in encoded]

    def decode(self, bottlenecks, skips):
        """CMFE and the decoders on the encoders' outputs: per modality the bottleneck (after CMFE), the skips and the
        decoder output; the projected class features."""
        if self.cmfe is not None:
            bottlenecks = self.cmfe(bottlenecks, self.intensity_priors)
        decoded = [decoder(x, s) for decoder, x, s in zip(self.decoders, bottlenecks, skips)]
        return bottlenecks, skips, decoded, self.class_proj(self.class_embeddings)

    def _encode(self, images):
        """``decode`` of ``encode_sequences``."""
        return self.decode(*self.encode_sequences(images))

    def fused_logits(self, skips, decoded, class_features):
        """The fused head on the concatenated skips and decoder outputs."""
        fused_skips = [fusion(list(scale)) for fusion, scale in zip(self.skip_fusions, zip(*skips))]
        return self.fused_head(fused_skips, class_features, self.decoder_fusion(decoded))

    def _modality_logits(self, bottlenecks, skips, decoded, class_features):
        if self.cfm is not None:
            modality_classes = self.cfm(bottlenecks, self.intensity_priors, class_features)
        else:
            modality_classes = [class_features] * len(decoded)
        return tuple(head(s, q, d) for head, s, q, d in zip(self.modality_heads, skips, modality_classes, decoded))

    def forward(self, images, fused=True, contrast=True):
        """Eval: fused logits (B, K, H, W). Training: a SegmentationOutput; ``fused``/``contrast``
        select whether the fused head and the contrastive embeddings are computed."""
        bottlenecks, skips, decoded, class_features = self._encode(images)
        fused_logits = None
        if fused or not self.training:
            fused_logits = self.fused_logits(skips, decoded, class_features)
        if not self.training:
            return fused_logits
        modality_logits = self._modality_logits(bottlenecks, skips, decoded, class_features)
        embeddings = anchors = None
        if contrast and self.config.use_contrast:
            embeddings = tuple(proj(scales[::-1]) for proj, scales in zip(self.contrast_projections, skips))
            anchors = tuple(proj(self.class_embeddings) for proj in self.anchor_projections)
        return SegmentationOutput(fused_logits, modality_logits, embeddings, anchors)

    def head_logits(self, images):
        """{head: logits (B, K, H, W)} of the fused head ("fused", the method's output) and of each modality head
        (named by its sequence; trained beside the fused head, not used for prediction by the method)."""
        bottlenecks, skips, decoded, class_features = self._encode(images)
        modality_logits = self._modality_logits(bottlenecks, skips, decoded, class_features)
        return {"fused": self.fused_logits(skips, decoded, class_features),
                **dict(zip(MODALITIES[:self.config.n_modalities], modality_logits))}

    def load_from(self, weights, source="npz"):
        """Load Google's R50-ViT-B_16 npz (a mapping of key -> array) into all three encoders."""
        reader = NpzReader(weights)
        for transformer in self.transformers:
            transformer.load_from(reader)
        return reader.commit(source)


class TransUNetBaseline(nn.Module):
    """Baseline: one encoder, one decoder and a plain 3x3 segmentation head.

    ``input_modalities`` picks the sequences fed to the encoder as channels: one
    index for a single-sequence TransUNet, all three for early fusion.
    """

    def __init__(self, config, img_size=128, num_classes=4, input_modalities=(0,)):
        super().__init__()
        self.config = config
        self.img_size = img_size
        self.num_classes = num_classes
        self.input_modalities = tuple(input_modalities)
        if not self.input_modalities or not all(0 <= m < config.n_modalities for m in self.input_modalities):
            raise ValueError(f"input_modalities must index the {config.n_modalities} sequences, "
                             f"got {self.input_modalities}")
        # an index on the model's device (moved with it): indexing with a Python list copies it there every step
        self.register_buffer("input_index", torch.tensor(self.input_modalities), persistent=False)
        self.transformer = Transformer(config, img_size, in_channels=len(self.input_modalities))
        self.decoder = DecoderCup(config, self.transformer.out_channels, self.transformer.skip_channels)
        self.segmentation_head = nn.Conv2d(self.decoder.out_channels, num_classes, kernel_size=3, padding=1)

    def forward(self, images, fused=True, contrast=True):
        _check_images(images, self.config.n_modalities, self.img_size)
        x, skips = self.transformer(images.index_select(1, self.input_index))
        logits = self.segmentation_head(self.decoder(x, skips))
        return SegmentationOutput(logits) if self.training else logits

    def load_from(self, weights, source="npz"):
        reader = NpzReader(weights)
        self.transformer.load_from(reader)
        return reader.commit(source)


def _check_images(images, num_modalities, img_size):
    if images.dim() != 4 or images.shape[1] != num_modalities:
        raise ValueError(f"expected images of shape (B, {num_modalities}, H, W) with the sequences "
                         f"{MODALITIES} as channels, got {tuple(images.shape)}")
    if tuple(images.shape[-2:]) != (img_size, img_size):
        raise ValueError(f"the model was built for img_size {img_size}, got slices of "
                         f"{images.shape[-2]}x{images.shape[-1]}: resize them first")


def compile_regions(model):
    """The submodules that ``--compile`` compiles one by one (regional compilation): the repeated units (transformer
    blocks, ResNet bottlenecks, decoder blocks, heads, I-MMSeg's modules). The same code with parameters of the same
    shapes compiles once for all its instances, so the three encoders cost one compilation, not three, and the
    schedule's stages (which change what the model returns) recompile only the small modules around them."""
    from .vit_seg_modeling_resnet_skip import Bottleneck

    kinds = (Block, Bottleneck, DecoderBlock, DynamicClassHead, CrossModalFeatureEnhancement, ClassFeatureModulation,
             ContrastProjection)
    return [module for module in model.modules() if isinstance(module, kinds)]


VisionTransformer = IMMSeg  # the review release's name of the I-MMSeg class
TransUNet = TransUNetBaseline  # this project's earlier name of the baseline
CONFIGS = {name: factory() for name, factory in configs.CONFIG_FACTORIES.items()}
MODEL_NAMES = ("immseg", "transunet_single", "transunet_early")


def build_model(name, config, img_size=128, num_classes=4, intensity_priors=None, class_embeddings=None,
                modality="LGE", input_sequences=None):
    """I-MMSeg (``immseg``) or a TransUNet baseline on one sequence (``transunet_single``, see ``modality``)
    or on the sequences stacked as channels (``transunet_early``: ``input_sequences``, None for all three).
    Switches absent from ``config`` (a checkpoint written before they existed) take their defaults."""
    config = configs.with_switch_defaults(config)
    if name == "immseg":
        return IMMSeg(config, img_size, num_classes, intensity_priors, class_embeddings)
    if name == "transunet_single":
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
        return TransUNetBaseline(config, img_size, num_classes, (MODALITIES.index(modality),))
    if name == "transunet_early":
        sequences = MODALITIES[:config.n_modalities] if input_sequences is None else input_sequences
        unknown = sorted(set(sequences) - set(MODALITIES))
        if unknown or not sequences:
            raise ValueError(f"input_sequences {list(sequences)}: expected a non-empty subset of {MODALITIES}")
        return TransUNetBaseline(config, img_size, num_classes,
                                 tuple(MODALITIES.index(name) for name in MODALITIES if name in sequences))
    raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")
