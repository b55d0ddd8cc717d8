"""The review release's checkpoint conversion and the switches that reproduce the release's function.

The release's state dicts here are written by the tests from the release's module
layout (its key names; shapes at the ``testing`` widths), never taken from its code.
"""
import json
import logging

import pytest
import torch
import torch.nn.functional as F

import test as test_script
import train as train_script
from conftest import IMG_SIZE, make_batch, make_model
from convert_release import main
from engine.release import convert
from networks.convert_release import (DROPPED_MODULES, TEXT_FEATURE_FILES, ReleaseCheckpointError, controller_to_ours,
                                      convert_state_dict, load_text_features, target_model)
from networks.immseg_modules import Mlp
from networks.vit_seg_configs import RELEASE_SWITCHES, SWITCH_DEFAULTS, get_config, with_switch_defaults
from networks.vit_seg_modeling_resnet_skip import ResNetV2
from priors import PriorEmbeddings, save_priors
from test_training import train_args, workspace  # noqa: F401 (the phantom workspace fixture)
from engine.checkpoints import load_checkpoint, load_model_state, model_from_spec
from utils import TextAnchoredContrastiveLoss

RELEASE_CONFIG = "testing-release"


def release_shapes(cfg, img_size):
    """{key: shape} of the release's VisionTransformer state dict, at the widths of ``cfg``."""
    shapes = {}
    width = int(64 * cfg.resnet.width_factor)
    bottleneck, skips = 16 * width, (8 * width, 4 * width, width)
    text, positions = cfg.text_dim, (img_size // 16) ** 2
    decoder_out, head_channels = cfg.decoder_channels[-1], cfg.head.channels

    def affine(prefix, c):
        shapes.update({f"{prefix}.weight": (c,), f"{prefix}.bias": (c,)})

    def batch_norm(prefix, c):
        affine(prefix, c)
        shapes.update({f"{prefix}.running_mean": (c,), f"{prefix}.running_var": (c,),
                       f"{prefix}.num_batches_tracked": ()})

    def conv(prefix, cin, cout, kernel=1, bias=True):
        shapes[f"{prefix}.weight"] = (cout, cin, kernel, kernel)
        if bias:
            shapes[f"{prefix}.bias"] = (cout,)

    def linear(prefix, cin, cout, bias=True):
        shapes[f"{prefix}.weight"] = (cout, cin)
        if bias:
            shapes[f"{prefix}.bias"] = (cout,)

    def mlp(prefix, cin, hidden, cout):
        linear(f"{prefix}.fc1", cin, hidden)
        linear(f"{prefix}.fc2", hidden, cout)

    def fusion(prefix, c):
        conv(f"{prefix}.fusion_proj", 3 * c, c, bias=False)
        batch_norm(f"{prefix}.norm", c)

    def conv_bn(prefix, cin, cout):
        conv(f"{prefix}.0", cin, cout, 3, bias=False)
        batch_norm(f"{prefix}.1", cout)

    def encoder(prefix):
        conv(f"{prefix}.root.conv", 3, width, 7, bias=False)
        affine(f"{prefix}.root.gn", width)
        cin = width
        for stage, units in enumerate(cfg.resnet.num_layers):
            cmid = width * 2 ** stage
            for unit in range(units):
                name = f"{prefix}.body.block{stage + 1}.unit{unit + 1}"
                for index, (i, o, k) in enumerate(((cin, cmid, 1), (cmid, cmid, 3), (cmid, 4 * cmid, 1))):
                    conv(f"{name}.conv{index + 1}", i, o, k, bias=False)
                    affine(f"{name}.gn{index + 1}", o)
                if unit == 0:
                    conv(f"{name}.downsample", cin, 4 * cmid, bias=False)
                    affine(f"{name}.gn_proj", 4 * cmid)
                cin = 4 * cmid

    def decoder(prefix):
        conv_bn(f"{prefix}.conv_more", bottleneck, cfg.decoder_head_channels)
        block_in = (cfg.decoder_head_channels,) + tuple(cfg.decoder_channels[:-1])
        for index, (cin, cout) in enumerate(zip(block_in, cfg.decoder_channels)):
            skip = skips[index] if index < cfg.n_skip else 0
            conv_bn(f"{prefix}.blocks.{index}.conv1", cin + skip, cout)
            conv_bn(f"{prefix}.blocks.{index}.conv2", cout, cout)

    def head(prefix):
        conv(f"{prefix}.controller", cfg.head.context_dim + cfg.class_dim, head_channels ** 2 + 2 * head_channels + 1)
        for name, channels in (("Gap_64", skips[2]), ("GAP_256", skips[1]), ("GAP_512", skips[0])):
            affine(f"{prefix}.{name}.0", channels)
            conv(f"{prefix}.{name}.3", channels, cfg.head.context_dim)
        affine(f"{prefix}.precls_conv.0", decoder_out)
        conv(f"{prefix}.precls_conv.2", decoder_out, head_channels)

    def embeddings(prefix):
        for name, cin, cout in zip(("features64_to_64", "features256_to_128", "features512_to_256"),
                                   skips[::-1], cfg.contrast.dims):
            conv(f"{prefix}.{name}.0", cin, cout)
            conv(f"{prefix}.{name}.3", cout, cout)

    for m, name in enumerate(("cine", "psir", "t2w")):
        encoder(f"transformer{m + 1}.embeddings.hybrid_model")
        decoder(f"decoder{m + 1}")
        conv(f"GAP_{name}.1", bottleneck, cfg.cmfe.prior_dim)
        mlp(f"class_MLP_{name}", 2 * cfg.cmfe.prior_dim, cfg.cmfe.gate_hidden, positions)
        fusion(f"mix_{name}", bottleneck)
        linear(f"CBAMFeatureReducer_{name}.cbam.channel_att.mlp.0", bottleneck,
               bottleneck // cfg.cfm.cbam_reduction, bias=False)
        linear(f"CBAMFeatureReducer_{name}.cbam.channel_att.mlp.2", bottleneck // cfg.cfm.cbam_reduction,
               bottleneck, bias=False)
        conv(f"CBAMFeatureReducer_{name}.cbam.spatial_att.conv", 2, 1, 7, bias=False)
        conv(f"CBAMFeatureReducer_{name}.conv1x1", bottleneck, cfg.cfm.visual_dim, bias=False)
        linear(f"Class_Feature_Modulation_{name}.fc", cfg.cfm.style_dim, 2 * cfg.n_classes)
        mlp(f"class_MLP_dec_{name}", cfg.cfm.prior_dim + cfg.cfm.visual_dim, cfg.cfm.style_hidden, cfg.cfm.style_dim)
        embeddings(f"{name}_embed")
        head(f"forward_prediction_head{m + 1}")
    decoder("decoder4")
    embeddings("fusion_embed")
    head("forward_prediction_head")
    head("forward_prediction_head4")
    for s, c in enumerate(skips):
        fusion(f"feature_fusion.fusion{s + 1}", c)
    fusion("dec_output_fusion", decoder_out)
    for dim, scale in zip(cfg.contrast.dims, (64, 128, 256)):
        linear(f"text_to_{scale}.0", text, dim)
    linear("text_to_vision.0", text, cfg.class_dim)
    linear("modal_text_to_vision.0", text, cfg.cmfe.prior_dim)
    mlp("modal_text_to_weight.0", text, cfg.cfm.prior_hidden, cfg.cfm.prior_dim)
    for suffix in ("", "1", "2", "3"):
        conv(f"segmentation_head{suffix}.0", decoder_out, cfg.n_classes, 3)
    return shapes


def release_state_dict(seed=0, prefix="module."):
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in release_shapes(get_config(RELEASE_CONFIG), IMG_SIZE).items():
        if key.endswith("num_batches_tracked"):
            state[prefix + key] = torch.tensor(7)
        else:
            value = torch.randn(shape, generator=generator) * 0.3
            state[prefix + key] = value.abs() + 0.5 if key.endswith("running_var") else value
    return state


def random_priors(dim=None):
    cfg = get_config(RELEASE_CONFIG)
    generator = torch.Generator().manual_seed(1)
    dim = dim or cfg.text_dim
    return PriorEmbeddings(torch.randn(3, dim, generator=generator), torch.randn(4, dim, generator=generator),
                           {"origin": "random test priors"})


def converted_model(release_state):
    model, spec = target_model(random_priors(), IMG_SIZE, RELEASE_CONFIG)
    converted, dropped = convert_state_dict(release_state, model.state_dict(), spec["config"]["head"]["channels"])
    model.load_state_dict({**model.state_dict(), **converted})
    return model.eval(), converted, dropped


def write_release_checkpoint(tmp_path, state):
    path = tmp_path / "epoch_299.pth"
    torch.save(state, path)
    return path


def test_key_mapping_with_and_without_dataparallel_prefix():
    with_prefix, converted, dropped = converted_model(release_state_dict(prefix="module."))
    without_prefix, converted_plain, _ = converted_model(release_state_dict(prefix=""))
    assert converted.keys() == converted_plain.keys()
    assert all(torch.equal(converted[key], converted_plain[key]) for key in converted)
    release = release_state_dict(prefix="")
    assert torch.equal(converted["transformers.1.hybrid_model.body.block2.unit1.gn_proj.weight"],
                       release["transformer2.embeddings.hybrid_model.body.block2.unit1.gn_proj.weight"])
    assert torch.equal(converted["cmfe.gates.2.fc2.bias"], release["class_MLP_t2w.fc2.bias"])
    assert torch.equal(converted["fused_head.context.2.3.weight"], release["forward_prediction_head.Gap_64.3.weight"])
    assert torch.equal(converted["contrast_projections.0.projections.1.0.weight"],
                       release["cine_embed.features256_to_128.0.weight"])
    assert torch.equal(converted["cmfe.fuse.1.1.running_var"], release["mix_psir.norm.running_var"])
    images, _ = make_batch(2)
    assert torch.equal(with_prefix(images), without_prefix(images))


def test_unused_release_modules_are_dropped_and_listed(tmp_path, caplog):
    _, _, dropped = converted_model(release_state_dict())
    assert set(dropped) == set(DROPPED_MODULES)
    assert dropped["decoder4"] > 0 and dropped["forward_prediction_head4"] > 0
    text_dir = write_text_features(tmp_path)
    with caplog.at_level(logging.INFO, logger="convert_release"):
        convert(write_release_checkpoint(tmp_path, release_state_dict()), tmp_path / "out.pth",
                load_text_features(text_dir), IMG_SIZE, config_name=RELEASE_CONFIG)
    for module in DROPPED_MODULES:
        assert f"dropped {module} " in caplog.text


@pytest.mark.parametrize("damage", ["missing", "misshaped", "unknown"])
def test_a_key_that_does_not_fit_is_named_and_nothing_is_written(tmp_path, damage):
    state = release_state_dict()
    key = "module.forward_prediction_head2.precls_conv.2.weight"
    if damage == "missing":
        del state[key]
        expected = "modality_heads.1.precls.2.weight"
    elif damage == "misshaped":
        state[key] = torch.zeros(5, 8, 1, 1)
        expected = "forward_prediction_head2.precls_conv.2.weight (5, 8, 1, 1)"
    else:
        state["module.decoder9.conv_more.0.weight"] = torch.zeros(1)
        expected = "decoder9.conv_more.0.weight"
    out = tmp_path / "converted.pth"
    with pytest.raises(ReleaseCheckpointError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        convert(write_release_checkpoint(tmp_path, state), out, random_priors(), IMG_SIZE, config_name=RELEASE_CONFIG)
    assert not out.exists() and not list(tmp_path.glob(".converted.pth*"))


def write_text_features(tmp_path):
    """The release's text_features/ folder, with tensors of the testing text dimension."""
    directory = tmp_path / "text_features"
    directory.mkdir()
    priors = random_priors()
    torch.save(priors.intensity, directory / TEXT_FEATURE_FILES["intensity"])
    torch.save(priors.classes, directory / TEXT_FEATURE_FILES["classes"])
    return directory


def test_converted_checkpoint_loads_through_the_trainer(tmp_path):
    release_path = write_release_checkpoint(tmp_path, release_state_dict())
    out = tmp_path / "run" / "epoch_299.pth"
    convert(release_path, out, load_text_features(write_text_features(tmp_path)), IMG_SIZE,
            root_path=tmp_path / "Processed_data", config_name=RELEASE_CONFIG)
    checkpoint = load_checkpoint(out)
    assert checkpoint["train_state"]["epoch"] == 300
    assert checkpoint["args"]["root_path"] == str(tmp_path / "Processed_data")
    assert checkpoint["spec"]["config"]["name"] == RELEASE_CONFIG
    assert "embedding_MRI_information.pth" in checkpoint["priors"]["files"]
    assert checkpoint["preprocessing"]["settings"]["intensity"] == "released"
    model = model_from_spec(checkpoint["spec"], checkpoint["model"])
    load_model_state(model, checkpoint["model"], out)
    reference, _, _ = converted_model(release_state_dict())
    images, _ = make_batch(2)
    assert torch.equal(model.eval()(images), reference(images))
    assert torch.equal(model.intensity_priors, random_priors().intensity)


def test_command_line_with_a_prior_file(tmp_path):
    save_priors(random_priors(), tmp_path / "priors.pt")
    release_path = write_release_checkpoint(tmp_path, release_state_dict())
    out = tmp_path / "converted.pth"
    # the command converts to R50-only-release, whose shapes the testing-width state dict does not have
    assert main(["--checkpoint", str(release_path), "--out", str(out), "--prior_embeddings",
                 str(tmp_path / "priors.pt"), "--img_size", str(IMG_SIZE)]) == 1
    assert not out.exists()
    assert main(["--checkpoint", str(tmp_path / "absent.pth"), "--out", str(out), "--text_features",
                 str(tmp_path)]) == 1


def test_controller_rows_are_reordered_to_our_parameter_layout():
    c = 4
    release_rows = torch.arange(c * c + 2 * c + 1, dtype=torch.float32)  # [w1 0-15, w2 16-19, b1 20-23, b2 24]
    expected = list(range(16)) + [20, 21, 22, 23] + [16, 17, 18, 19] + [24]
    assert controller_to_ours(release_rows, c).tolist() == expected
    kernel = release_rows[:, None, None, None].expand(-1, 3, 1, 1)
    assert controller_to_ours(kernel, c)[:, 0].tolist() == expected


def test_switch_defaults_complete_an_older_spec(tiny_config):
    spec = {"model": "immseg", "modality": None, "img_size": IMG_SIZE, "num_classes": 4,
            "config": tiny_config.to_dict()}
    for dotted in SWITCH_DEFAULTS:
        group, name = dotted.split(".")
        del spec["config"][group][name]
    completed = with_switch_defaults(spec["config"])
    assert all(completed[d.split(".")[0]][d.split(".")[1]] == v for d, v in SWITCH_DEFAULTS.items())
    assert "pool_padding" not in spec["config"]["resnet"]
    model = make_model(tiny_config)
    rebuilt = model_from_spec(spec, model.state_dict())
    load_model_state(rebuilt, model.state_dict(), "an older checkpoint")
    images, _ = make_batch(2)
    assert torch.equal(rebuilt.eval()(images), model.eval()(images))


def test_resume_reads_an_older_spec_and_refuses_a_converted_checkpoint(workspace, tmp_path, caplog):
    run = workspace / "before_switches"
    assert train_script.main(train_args(workspace, run.name, "--max_epochs", "1", "--region_fusion_start_epoch",
                                        "0")) == 0
    checkpoint = load_checkpoint(run / "last.pth")
    for dotted in SWITCH_DEFAULTS:
        group, name = dotted.split(".")
        del checkpoint["spec"]["config"][group][name]
    torch.save(checkpoint, run / "last.pth")
    assert train_script.main(train_args(workspace, run.name, "--max_epochs", "2", "--resume", "auto")) == 0
    assert load_checkpoint(run / "last.pth")["train_state"]["epoch"] == 2
    converted = tmp_path / "converted.pth"
    convert(write_release_checkpoint(tmp_path, release_state_dict()), converted, random_priors(), IMG_SIZE,
            config_name=RELEASE_CONFIG)
    assert train_script.main(train_args(workspace, "from_release", "--max_epochs", "1", "--region_fusion_start_epoch",
                                        "0", "--resume", str(converted))) == 1
    assert "can be tested, not resumed" in caplog.text


def test_release_configuration_sets_every_switch():
    release, ours = get_config("R50-only-release"), get_config("R50-only")
    for dotted, value in RELEASE_SWITCHES.items():
        group, name = dotted.split(".")
        assert release[group][name] == value != ours[group][name] == SWITCH_DEFAULTS[dotted]
    assert release.resnet.num_layers == ours.resnet.num_layers and release.transformer.num_layers == 0


@pytest.mark.parametrize("switch, value", [("resnet.pool_padding", 0), ("resnet.projection_norm", "per_channel"),
                                           ("cmfe.gate_output", "gelu_sigmoid")])
def test_each_switch_changes_the_inference_output(tiny_config, switch, value):
    model = make_model(tiny_config).eval()
    group, name = switch.split(".")
    tiny_config[group][name] = value
    switched = make_model(tiny_config).eval()
    switched.load_state_dict(model.state_dict())
    images, _ = make_batch(2)
    assert not torch.allclose(switched(images), model(images), atol=1e-6)


def test_unpadded_pool_runs_the_stages_short_and_pads_the_skip():
    torch.manual_seed(0)
    resnet = ResNetV2((1, 1, 1), 0.125, norm_groups=4, pool_padding=0).eval()
    x, skips = resnet(torch.rand(2, 1, 64, 64))
    assert [tuple(s.shape[-2:]) for s in skips] == [(8, 8), (16, 16), (32, 32)] and x.shape[-1] == 4
    assert skips[1][..., -1, :].abs().sum() == 0 and skips[1][..., :, -1].abs().sum() == 0
    assert skips[1][..., :-1, :-1].abs().sum() > 0


def test_projection_norm_per_channel_is_groupnorm_c_c():
    resnet = ResNetV2((1, 1, 1), 0.125, norm_groups=4, projection_norm="per_channel")
    norm = resnet.body.block1.unit1.gn_proj
    assert norm.num_groups == norm.num_channels == 32 and norm.eps == 1e-5
    with pytest.raises(ValueError, match="projection_norm"):
        ResNetV2((1, 1, 1), 0.125, norm_groups=4, projection_norm="batch")


def test_repeated_input_is_the_three_channel_stem_on_a_repeated_image():
    torch.manual_seed(0)
    repeated = ResNetV2((1, 1, 1), 0.125, norm_groups=4, input_repeat=3).eval()
    three = ResNetV2((1, 1, 1), 0.125, in_channels=3, norm_groups=4).eval()
    three.load_state_dict(repeated.state_dict())
    assert repeated.root.conv.weight.shape[1] == 3
    image = torch.rand(2, 1, 64, 64)
    assert torch.equal(repeated(image)[0], three(image.repeat(1, 3, 1, 1))[0])


def test_mlp_output_activations_and_dropout():
    torch.manual_seed(0)
    mlp = Mlp(6, 5, 4, output="gelu_sigmoid", dropout=0.5)
    x = torch.randn(64, 6)
    expected = torch.sigmoid(F.gelu(mlp.fc2(F.gelu(mlp.fc1(x)))))
    assert torch.allclose(mlp.eval()(x), expected)
    trained = mlp.train()(x)
    assert (trained == 0).any() and torch.allclose(trained[trained != 0], 2 * expected[trained != 0])
    with pytest.raises(ValueError, match="gelu_sigmoid"):
        Mlp(6, 5, 4, output="tanh")


def test_release_dropouts_reach_the_modules():
    model, _ = target_model(random_priors(), IMG_SIZE, RELEASE_CONFIG)
    assert model.cmfe.gates[0].dropout.p == model.cfm.prior_mlp.dropout.p == model.cfm.style[2].dropout.p == 0.1
    assert model.transformers[0].output_dropout.p == 0.1
    ours = make_model(get_config("testing"))
    assert ours.cmfe.gates[0].dropout.p == ours.cfm.style[0].dropout.p == ours.transformers[0].output_dropout.p == 0


@pytest.mark.parametrize("average", [False, True])
def test_batch_averaged_cfm_couples_only_the_training_modality_heads(tiny_config, average):
    tiny_config.cfm.average_visual_over_batch = average
    model = make_model(tiny_config)
    images, _ = make_batch(2)
    other = images.clone()
    other[1] = torch.rand_like(other[1])
    model.eval()
    assert torch.allclose(model(images)[:1], model(other)[:1], atol=1e-6)
    # in training, BatchNorm couples the samples anyway: compare with its running statistics
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    first = model(images).modality_logits[0][0]
    second = model(other).modality_logits[0][0]
    assert torch.allclose(first, second, atol=1e-6) != average


def test_duplicated_anchors_give_each_anchor_a_positive():
    anchors = [torch.eye(4)[:2] * 3.0]  # two orthogonal class anchors, one scale
    features = [torch.randn(1, 4, 4, 4)]
    labels = torch.zeros(1, 4, 4, dtype=torch.long)  # every pixel of an ignored class: only anchors take part
    single = TextAnchoredContrastiveLoss((5,), temperature=1.0)
    double = TextAnchoredContrastiveLoss((5,), temperature=1.0, anchor_copies=2)
    assert single(features, labels, anchors, ignore_classes=(0,)).item() == 0
    # each anchor: its copy is the positive (cosine 1), the other class's two copies the negatives (cosine 0)
    expected = torch.log(1 + 2 * torch.exp(torch.tensor(-1.0)))
    assert torch.isclose(double(features, labels, anchors, ignore_classes=(0,)), expected)


def test_command_line_converts_a_release_checkpoint_that_test_py_scores(workspace, tmp_path, caplog):
    save_priors(random_priors(), tmp_path / "priors.pt")
    release_path = write_release_checkpoint(tmp_path, release_state_dict())
    run = tmp_path / "converted_run"
    assert main(["--checkpoint", str(release_path), "--out", str(run / "epoch_299.pth"), "--prior_embeddings",
                 str(tmp_path / "priors.pt"), "--img_size", str(IMG_SIZE), "--vit_name", RELEASE_CONFIG,
                 "--root_path", str(workspace / "data")]) == 0
    assert load_checkpoint(run / "epoch_299.pth")["train_state"]["epoch"] == 300
    # the converted checkpoint records the release's preprocessing; the phantom was preprocessed otherwise
    assert test_script.main(["--output_dir", str(run), "--checkpoint", "epoch_299", "--root_path",
                             str(workspace / "data"), "--allow_preprocessing_mismatch"]) == 0
    summary = json.loads((run / "test_test_vol_epoch_299" / "summary.json").read_text())
    assert summary["whole_myocardium"]["n"] >= 1
    assert main(["--checkpoint", str(release_path), "--out", str(tmp_path / "x.pth"), "--prior_embeddings",
                 str(tmp_path / "priors.pt"), "--vit_name", "no-such-configuration"]) == 1
    assert not (tmp_path / "x.pth").exists()
