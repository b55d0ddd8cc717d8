"""Named model configurations, selected by ``--vit_name`` as in TransUNet.

Every size the networks build comes from here. The factories return a fresh
``ml_collections.ConfigDict`` on each call, so a caller may change its copy
(``config.n_skip = 2``) without affecting anyone else's.

- ``R50-ViT-B_16``: the paper's encoder, shapes of Google's ImageNet-21k release.
- ``R50-only``: the same ResNet without transformer layers, as in the released
  review code (bottleneck of 1024 channels at H/16).
- ``R50-only-release``: ``R50-only`` with the switches of ``RELEASE_SWITCHES`` on, so
  that it computes the released review code's function (``networks.convert_release``
  maps the release's checkpoint onto it).
- ``compact``: a narrow, shallow variant for CPU experiments.
- ``compact-half``: ``compact`` with half its ResNet and decoder widths (I-MMSeg's step at 0.5-0.6 of
  ``compact``'s on a CPU; the benchmark's ``immseg_half``).
- ``testing``: a tiny variant for unit tests; ``testing-release`` adds the release's switches.
"""
import ml_collections

from datasets.vocabulary import CLASS_NAMES, MODALITIES
DEFAULT_PRETRAINED_PATH = "model/vit_checkpoint/imagenet21k/R50-ViT-B_16.npz"


# Switches between this repository's function (the values here, which every configuration gets) and the
# released review code's. A configuration saved before a switch existed (a checkpoint's spec) is completed
# with these values by ``with_switch_defaults``: they are the behaviour such checkpoints were trained with.
SWITCH_DEFAULTS = {
    "resnet.input_repeat": 1,  # each one-channel input is repeated this many times before the stem
    "resnet.pool_padding": 1,  # stem max pool padding; 0: TransUNet's pool, stage-1 skip zero-padded to H/4
    "resnet.projection_norm": "group",  # residual projection norm: "group" as gn1-3, "per_channel" GroupNorm(C, C)
    "resnet.output_dropout": 0.0,  # dropout on the ResNet's output map (training only)
    "cmfe.gate_output": "sigmoid",  # output of the CMFE gate MLP: "sigmoid" or "gelu_sigmoid"
    "cmfe.gate_dropout": 0.0,  # dropout on the gate values (training only)
    "cfm.mlp_output": "none",  # output of CFM's prior and style MLPs: "none" or "gelu_sigmoid"
    "cfm.mlp_dropout": 0.0,  # dropout after those MLPs (training only)
    "cfm.average_visual_over_batch": False,  # v_m averaged over the batch (only the training-time modality heads)
    "contrast.anchor_copies": 1,  # times each class anchor enters the contrastive loss
}

# What the released review code does (read from its networks/ and utils.py; documentation/release_differences.md).
RELEASE_SWITCHES = {
    "resnet.input_repeat": 3,
    "resnet.pool_padding": 0,
    "resnet.projection_norm": "per_channel",
    "resnet.output_dropout": 0.1,
    "cmfe.gate_output": "gelu_sigmoid",
    "cmfe.gate_dropout": 0.1,
    "cfm.mlp_output": "gelu_sigmoid",
    "cfm.mlp_dropout": 0.1,
    "cfm.average_visual_over_batch": True,
    "contrast.anchor_copies": 2,  # its anchors, computed on each of its two DataParallel GPUs, are gathered
}


def _set_switches(config, switches, only_missing=False):
    for dotted, value in switches.items():
        *groups, name = dotted.split(".")
        node = config
        for group in groups:
            node = node[group]
        if not only_missing or name not in node:
            node[name] = value
    return config


def with_switch_defaults(config):
    """A copy of ``config`` (a ConfigDict, or a checkpoint spec's plain dict) with absent switches set to
    ``SWITCH_DEFAULTS``."""
    return _set_switches(ml_collections.ConfigDict(config).copy_and_resolve_references(), SWITCH_DEFAULTS,
                         only_missing=True)


def _method_config():
    """The I-MMSeg parts that follow the encoder (method.md), at the paper's sizes."""
    config = ml_collections.ConfigDict()
    config.n_classes = len(CLASS_NAMES)
    config.n_modalities = len(MODALITIES)
    config.text_dim = 512  # replaced by the prior file's dimension when one is used

    config.decoder_head_channels = 512
    config.decoder_channels = (256, 128, 64, 16)
    config.n_skip = 3

    config.cmfe = ml_collections.ConfigDict()
    config.cmfe.prior_dim = 256  # p_m and g_m
    config.cmfe.gate_hidden = 256

    config.class_dim = 256  # Q = ReLU(Linear(K))

    config.cfm = ml_collections.ConfigDict()
    config.cfm.prior_hidden = 128
    config.cfm.prior_dim = 64  # r_m
    config.cfm.visual_dim = 64  # v_m
    config.cfm.cbam_reduction = 16
    config.cfm.style_hidden = 64
    config.cfm.style_dim = 32  # s_m

    config.head = ml_collections.ConfigDict()
    config.head.context_dim = 256  # z
    config.head.channels = 4  # the tiny per-class head works on 4 channels
    config.head.norm_groups = 4

    config.contrast = ml_collections.ConfigDict()
    config.contrast.dims = (64, 128, 256)  # for skips at H/2, H/4, H/8
    config.contrast.samples_per_scale = (5, 2, 1)  # times contrast_sample_num
    config.contrast.sample_num = 10
    config.contrast.temperature = 0.07
    config.contrast.ignore_classes = ((2, 3), (0,), (0,))  # bSSFP, LGE, T2w

    config.use_cmfe = True
    config.use_cfm = True
    config.use_contrast = True
    config.use_text_prior = True
    return config


def get_r50_b16_config():
    """ResNet-50 (3, 4, 9 units) + ViT-B/16, the paper's per-modality encoder."""
    config = _method_config()
    config.name = "R50-ViT-B_16"
    config.patches = ml_collections.ConfigDict({"size": (16, 16)})
    config.hidden_size = 768
    config.transformer = ml_collections.ConfigDict()
    config.transformer.mlp_dim = 3072
    config.transformer.num_heads = 12
    config.transformer.num_layers = 12
    config.transformer.attention_dropout_rate = 0.0
    config.transformer.dropout_rate = 0.1
    config.resnet = ml_collections.ConfigDict()
    config.resnet.num_layers = (3, 4, 9)
    config.resnet.width_factor = 1.0  # root width 64 * width_factor
    config.resnet.norm_groups = 32
    config.classifier = "seg"
    config.pretrained_path = DEFAULT_PRETRAINED_PATH
    return _set_switches(config, SWITCH_DEFAULTS)


def get_r50_only_config():
    """The released review code's encoder: the ResNet stages, no transformer layers."""
    config = get_r50_b16_config()
    config.name = "R50-only"
    config.transformer.num_layers = 0
    return config


def get_r50_only_release_config():
    """``R50-only`` computing the released review code's function: the target of ``networks.convert_release``."""
    config = _set_switches(get_r50_only_config(), RELEASE_SWITCHES)
    config.name = "R50-only-release"
    return config


def get_compact_config():
    """A narrow encoder and decoder for CPU training (about a second per step at batch 8, 128 px)."""
    config = get_r50_b16_config()
    config.name = "compact"
    config.hidden_size = 128
    config.transformer.mlp_dim = 256
    config.transformer.num_heads = 4
    config.transformer.num_layers = 1
    config.transformer.dropout_rate = 0.0
    config.resnet.num_layers = (1, 2, 2)
    config.resnet.width_factor = 0.25
    config.resnet.norm_groups = 8
    config.decoder_head_channels = 96
    config.decoder_channels = (64, 32, 16, 16)
    config.cmfe.prior_dim = 64
    config.cmfe.gate_hidden = 64
    config.class_dim = 64
    config.cfm.prior_hidden = 64
    config.cfm.prior_dim = 32
    config.cfm.visual_dim = 32
    config.cfm.cbam_reduction = 8
    config.cfm.style_hidden = 32
    config.cfm.style_dim = 16
    config.head.context_dim = 64
    config.contrast.dims = (32, 32, 64)
    return config


def get_compact_half_config():
    """``compact`` with half the ResNet width, half the decoder channels and 64 (not 96) channels in the
    decoder's first convolution; the transformer, the text projections and the contrastive dimensions stay. On a
    2-core CPU, I-MMSeg's bf16 step at batch 8 and 128 px takes 0.5-0.6 of ``compact``'s (the MyoPS 2020 benchmark:
    benchmarks/results/notes/2026-11-30_half-width-immseg.md)."""
    config = get_compact_config()
    config.name = "compact-half"
    config.resnet.width_factor = 0.125
    config.resnet.norm_groups = 4
    config.decoder_head_channels = 64
    config.decoder_channels = (32, 16, 8, 8)
    return config


def get_testing():
    """A tiny configuration for unit tests: every module of the method, minimal widths."""
    config = get_r50_b16_config()
    config.name = "testing"
    config.hidden_size = 16
    config.transformer.mlp_dim = 32
    config.transformer.num_heads = 2
    config.transformer.num_layers = 1
    config.transformer.dropout_rate = 0.0
    config.resnet.num_layers = (1, 1, 1)
    config.resnet.width_factor = 0.125
    config.resnet.norm_groups = 4
    config.text_dim = 24
    config.decoder_head_channels = 16
    config.decoder_channels = (16, 8, 8, 8)
    config.cmfe.prior_dim = 8
    config.cmfe.gate_hidden = 8
    config.class_dim = 8
    config.cfm.prior_hidden = 8
    config.cfm.prior_dim = 8
    config.cfm.visual_dim = 8
    config.cfm.cbam_reduction = 4
    config.cfm.style_hidden = 8
    config.cfm.style_dim = 8
    config.head.context_dim = 8
    config.contrast.dims = (8, 8, 8)
    config.contrast.sample_num = 2
    return config


def get_testing_release():
    """``testing`` without transformer layers and with the released review code's switches (conversion tests)."""
    config = _set_switches(get_testing(), RELEASE_SWITCHES)
    config.name = "testing-release"
    config.transformer.num_layers = 0
    return config


CONFIG_FACTORIES = {
    "R50-ViT-B_16": get_r50_b16_config,
    "R50-only": get_r50_only_config,
    "R50-only-release": get_r50_only_release_config,
    "compact": get_compact_config,
    "compact-half": get_compact_half_config,
    "testing": get_testing,
    "testing-release": get_testing_release,
}


def get_config(name):
    """A fresh configuration by name; an unknown name lists the known ones."""
    try:
        return CONFIG_FACTORIES[name]()
    except KeyError:
        raise ValueError(f"unknown --vit_name {name!r}; expected one of {sorted(CONFIG_FACTORIES)}") from None
