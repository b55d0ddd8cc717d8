"""load_from on npz files written here with the key names and layouts of Google's R50+ViT-B/16 release."""
import numpy as np
import pytest
import torch

from conftest import make_model
from networks.npz_weights import PretrainedWeightsError
from networks.vit_seg_modeling import TransUNetBaseline


def google_style_npz(config, grid, with_transformer=True, seed=0):
    """Random arrays under the release's key names, with its Flax layouts (HWIO kernels, per-head attention)."""
    rng = np.random.default_rng(seed)
    weights = {}

    def put(key, *shape):
        weights[key] = rng.standard_normal(shape).astype(np.float32)

    width = int(64 * config.resnet.width_factor)
    put("conv_root/kernel", 7, 7, 3, width)
    put("gn_root/scale", width)
    put("gn_root/bias", width)
    cin = width
    for b, units in enumerate(config.resnet.num_layers):
        cmid, cout = width * 2 ** b, width * 2 ** b * 4
        for u in range(units):
            unit_in = cin if u == 0 else cout
            prefix = f"block{b + 1}/unit{u + 1}"
            put(f"{prefix}/conv1/kernel", 1, 1, unit_in, cmid)
            put(f"{prefix}/conv2/kernel", 3, 3, cmid, cmid)
            put(f"{prefix}/conv3/kernel", 1, 1, cmid, cout)
            for gn, channels in (("gn1", cmid), ("gn2", cmid), ("gn3", cout)):
                put(f"{prefix}/{gn}/scale", channels)
                put(f"{prefix}/{gn}/bias", channels)
            if u == 0:
                put(f"{prefix}/conv_proj/kernel", 1, 1, unit_in, cout)
                put(f"{prefix}/gn_proj/scale", cout)
                put(f"{prefix}/gn_proj/bias", cout)
        cin = cout
    if with_transformer:
        hidden, heads = config.hidden_size, config.transformer.num_heads
        mlp = config.transformer.mlp_dim
        put("embedding/kernel", 1, 1, cin, hidden)
        put("embedding/bias", hidden)
        put("cls", 1, 1, hidden)
        put("Transformer/posembed_input/pos_embedding", 1, 1 + grid * grid, hidden)
        for i in range(config.transformer.num_layers):
            block = f"Transformer/encoderblock_{i}"
            for norm in ("LayerNorm_0", "LayerNorm_2"):
                put(f"{block}/{norm}/scale", hidden)
                put(f"{block}/{norm}/bias", hidden)
            for name in ("query", "key", "value"):
                put(f"{block}/MultiHeadDotProductAttention_1/{name}/kernel", hidden, heads, hidden // heads)
                put(f"{block}/MultiHeadDotProductAttention_1/{name}/bias", heads, hidden // heads)
            put(f"{block}/MultiHeadDotProductAttention_1/out/kernel", heads, hidden // heads, hidden)
            put(f"{block}/MultiHeadDotProductAttention_1/out/bias", hidden)
            put(f"{block}/MlpBlock_3/Dense_0/kernel", hidden, mlp)
            put(f"{block}/MlpBlock_3/Dense_0/bias", mlp)
            put(f"{block}/MlpBlock_3/Dense_1/kernel", mlp, hidden)
            put(f"{block}/MlpBlock_3/Dense_1/bias", hidden)
        put("Transformer/encoder_norm/scale", hidden)
        put("Transformer/encoder_norm/bias", hidden)
        put("head/kernel", hidden, 10)
    return weights


def save_npz(tmp_path, weights):
    path = tmp_path / "R50-ViT-B_16.npz"
    np.savez(path, **weights)
    return np.load(path)


def expected_encoder_tensors(weights, config, in_channels=1):
    """Parameter name inside one encoder -> the tensor the release's key should give, converted by hand."""
    t = {k: torch.from_numpy(v) for k, v in weights.items()}
    hwio = lambda k: t[k].permute(3, 2, 0, 1)  # noqa: E731
    root = hwio("conv_root/kernel")
    expected = {"hybrid_model.root.conv.weight": root.sum(1, keepdim=True) if in_channels == 1 else root,
                "hybrid_model.root.gn.weight": t["gn_root/scale"], "hybrid_model.root.gn.bias": t["gn_root/bias"]}
    for b, units in enumerate(config.resnet.num_layers):
        for u in range(units):
            key, name = f"block{b + 1}/unit{u + 1}", f"hybrid_model.body.block{b + 1}.unit{u + 1}"
            for i in (1, 2, 3):
                expected[f"{name}.conv{i}.weight"] = hwio(f"{key}/conv{i}/kernel")
                expected[f"{name}.gn{i}.weight"] = t[f"{key}/gn{i}/scale"]
                expected[f"{name}.gn{i}.bias"] = t[f"{key}/gn{i}/bias"]
            if u == 0:
                expected[f"{name}.downsample.weight"] = hwio(f"{key}/conv_proj/kernel")
                expected[f"{name}.gn_proj.weight"] = t[f"{key}/gn_proj/scale"]
                expected[f"{name}.gn_proj.bias"] = t[f"{key}/gn_proj/bias"]
    if "embedding/kernel" not in t:
        return expected
    hidden = config.hidden_size
    expected["patch_embeddings.weight"] = hwio("embedding/kernel")
    expected["patch_embeddings.bias"] = t["embedding/bias"]
    for i in range(config.transformer.num_layers):
        key, name = f"Transformer/encoderblock_{i}", f"layer.{i}"
        expected[f"{name}.attention_norm.weight"] = t[f"{key}/LayerNorm_0/scale"]
        expected[f"{name}.attention_norm.bias"] = t[f"{key}/LayerNorm_0/bias"]
        expected[f"{name}.ffn_norm.weight"] = t[f"{key}/LayerNorm_2/scale"]
        expected[f"{name}.ffn_norm.bias"] = t[f"{key}/LayerNorm_2/bias"]
        attention = f"{key}/MultiHeadDotProductAttention_1"
        for proj in ("query", "key", "value"):
            expected[f"{name}.attn.{proj}.weight"] = t[f"{attention}/{proj}/kernel"].reshape(hidden, hidden).t()
            expected[f"{name}.attn.{proj}.bias"] = t[f"{attention}/{proj}/bias"].reshape(hidden)
        expected[f"{name}.attn.out.weight"] = t[f"{attention}/out/kernel"].reshape(hidden, hidden).t()
        expected[f"{name}.attn.out.bias"] = t[f"{attention}/out/bias"]
        for fc, dense in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            expected[f"{name}.ffn.{fc}.weight"] = t[f"{key}/MlpBlock_3/{dense}/kernel"].t()
            expected[f"{name}.ffn.{fc}.bias"] = t[f"{key}/MlpBlock_3/{dense}/bias"]
    expected["encoder_norm.weight"] = t["Transformer/encoder_norm/scale"]
    expected["encoder_norm.bias"] = t["Transformer/encoder_norm/bias"]
    return expected


def test_load_from_copies_every_encoder_tensor(tiny_config, tmp_path):
    grid = 4  # img_size 64 / 16: no resizing
    weights = google_style_npz(tiny_config, grid)
    model = make_model(tiny_config, img_size=64)
    others_before = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("transformers.")}
    model.load_from(save_npz(tmp_path, weights))
    expected = expected_encoder_tensors(weights, tiny_config)
    expected["position_embeddings"] = torch.from_numpy(
        weights["Transformer/posembed_input/pos_embedding"][:, 1:])
    for encoder in model.transformers:
        params = dict(encoder.named_parameters())
        assert set(params) == set(expected), "every encoder parameter must come from the file"
        for name, value in expected.items():
            torch.testing.assert_close(params[name].detach(), value, msg=name)
    for name, param in model.named_parameters():
        if name in others_before:
            assert torch.equal(param, others_before[name]), f"{name} is not an encoder tensor and must not change"


def test_position_embeddings_are_resized_to_the_grid(tiny_config, tmp_path):
    weights = google_style_npz(tiny_config, grid=4)
    hidden = tiny_config.hidden_size
    ramp = np.linspace(-1, 1, 4, dtype=np.float32)
    grid = np.broadcast_to(ramp[None, :, None], (4, 4, hidden)) + 3.0
    weights["Transformer/posembed_input/pos_embedding"] = np.concatenate(
        [np.full((1, 1, hidden), 100.0, np.float32), grid.reshape(1, 16, hidden)], axis=1)
    model = make_model(tiny_config, img_size=128)
    model.load_from(save_npz(tmp_path, weights))
    posemb = model.transformers[0].position_embeddings.detach().reshape(8, 8, hidden)
    assert posemb.shape == (8, 8, hidden)
    assert posemb.max() < 100, "the class token must be dropped"
    rows_equal = torch.allclose(posemb, posemb[:1].expand_as(posemb))
    assert rows_equal, "a ramp along one axis stays constant along the other"
    columns = posemb[0, :, 0]
    assert torch.all(columns[1:] > columns[:-1]) and columns.min() >= 2.0 and columns.max() <= 4.0


def test_missing_and_misshaped_keys_are_named_and_nothing_is_copied(tiny_config, tmp_path):
    weights = google_style_npz(tiny_config, grid=4)
    del weights["block2/unit1/conv2/kernel"]
    weights["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"] = np.zeros((3, 3), np.float32)
    model = make_model(tiny_config, img_size=64)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(PretrainedWeightsError) as error:
        model.load_from(save_npz(tmp_path, weights))
    message = str(error.value)
    assert "missing key block2/unit1/conv2/kernel" in message
    assert "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel" in message and "(3, 3)" in message
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_zero_layer_encoder_loads_the_resnet_only(tiny_config, tmp_path):
    tiny_config.transformer.num_layers = 0
    weights = google_style_npz(tiny_config, grid=4, with_transformer=False)
    model = make_model(tiny_config, img_size=64)
    assert model.load_from(save_npz(tmp_path, weights)) > 0
    expected = expected_encoder_tensors(weights, tiny_config)
    params = dict(model.transformers[2].named_parameters())
    assert set(params) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(params[name].detach(), value, msg=name)


def test_transformer_keys_are_required_when_the_model_has_layers(tiny_config, tmp_path):
    weights = google_style_npz(tiny_config, grid=4, with_transformer=False)
    with pytest.raises(PretrainedWeightsError, match="embedding/kernel"):
        make_model(tiny_config, img_size=64).load_from(save_npz(tmp_path, weights))


def test_early_fusion_baseline_keeps_the_rgb_stem(tiny_config, tmp_path):
    weights = google_style_npz(tiny_config, grid=4)
    model = TransUNetBaseline(tiny_config, 64, 4, input_modalities=(0, 1, 2))
    model.load_from(save_npz(tmp_path, weights))
    expected = expected_encoder_tensors(weights, tiny_config, in_channels=3)
    torch.testing.assert_close(model.transformer.hybrid_model.root.conv.weight.detach(),
                               expected["hybrid_model.root.conv.weight"])
