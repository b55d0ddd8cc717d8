import pytest
import torch

from conftest import IMG_SIZE, make_batch, make_model, make_priors
from networks.inference import fuse_for_inference
from networks.vit_seg_configs import CONFIG_FACTORIES, get_config
from networks.vit_seg_modeling import CONFIGS, IMMSeg, SegmentationOutput, TransUNetBaseline
from utils import IMMSegLoss, loss_weights


def test_named_configurations_exist():
    for name in ("R50-ViT-B_16", "R50-only", "compact", "compact-half", "testing"):
        assert name in CONFIG_FACTORIES and name in CONFIGS
    compact, half = get_config("compact"), get_config("compact-half")
    assert half.resnet.width_factor == compact.resnet.width_factor / 2
    assert tuple(half.decoder_channels) == tuple(c // 2 for c in compact.decoder_channels)
    assert (half.hidden_size, tuple(half.contrast.dims)) == (compact.hidden_size, tuple(compact.contrast.dims))
    assert get_config("R50-only").transformer.num_layers == 0
    paper = get_config("R50-ViT-B_16")
    assert (paper.hidden_size, paper.transformer.num_layers, tuple(paper.resnet.num_layers)) == (768, 12, (3, 4, 9))
    with pytest.raises(ValueError, match="R50-ViT-B_16"):
        get_config("R50-ViT-B_32")


def test_compact_half_trains_a_step_with_half_the_widths():
    half, compact = make_model(get_config("compact-half"), img_size=32), make_model(get_config("compact"), img_size=32)
    widths = [model.transformers[0].hybrid_model.width for model in (half, compact)]
    assert widths == [8, 16]
    images, labels = make_batch(2, img_size=32)
    half.train()
    loss, _ = IMMSegLoss(4, half.config.contrast)(half(images), labels, loss_weights(epoch=150))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in half.fused_head.parameters())


def test_factories_return_independent_copies():
    first = get_config("compact")
    first.n_skip = 1
    assert get_config("compact").n_skip == 3


def test_output_shapes_in_train_and_eval(tiny_config):
    model = make_model(tiny_config)
    images, _ = make_batch(2)
    model.train()
    out = model(images)
    assert isinstance(out, SegmentationOutput)
    assert out.fused_logits.shape == (2, 4, IMG_SIZE, IMG_SIZE)
    assert len(out.modality_logits) == 3
    assert all(logits.shape == (2, 4, IMG_SIZE, IMG_SIZE) for logits in out.modality_logits)
    dims = tuple(tiny_config.contrast.dims)
    for per_modality in out.contrast_embeddings:
        sizes = [e.shape[-1] for e in per_modality]
        assert sizes == [IMG_SIZE // 2, IMG_SIZE // 4, IMG_SIZE // 8]
        assert tuple(e.shape[1] for e in per_modality) == dims
    assert tuple(a.shape for a in out.class_anchors) == tuple((4, d) for d in dims)

    partial = model(images, fused=False, contrast=False)
    assert partial.fused_logits is None and partial.contrast_embeddings is None

    model.eval()
    with torch.no_grad():
        logits = model(images)
    assert torch.is_tensor(logits) and logits.shape == (2, 4, IMG_SIZE, IMG_SIZE)


def test_every_parameter_gets_a_gradient_in_the_fused_stage(tiny_config):
    model = make_model(tiny_config).train()
    images, labels = make_batch(2)
    criterion = IMMSegLoss(4, tiny_config.contrast)
    total, terms = criterion(model(images), labels, loss_weights(epoch=150))
    assert set(terms) == {"fused", "modality", "contrast"}
    total.backward()
    dead = [name for name, p in model.named_parameters()
            if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert dead == []


def _trained_briefly(config, steps=2):
    model = make_model(config).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    criterion = IMMSegLoss(4, config.contrast)
    for step in range(steps):
        images, labels = make_batch(4, seed=step)
        total, _ = criterion(model(images), labels, loss_weights(epoch=150))
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    return model.eval()


def test_eval_prediction_of_a_slice_does_not_depend_on_its_batch(tiny_config):
    model = _trained_briefly(tiny_config)
    images, _ = make_batch(4, seed=7)
    others, _ = make_batch(4, seed=8)
    mixed = others.clone()
    mixed[1] = images[1]
    with torch.no_grad():
        in_batch = model(images)[1]
        alone = model(images[1:2])[0]
        with_others = model(mixed)[1]
    torch.testing.assert_close(in_batch, alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(in_batch, with_others, rtol=1e-4, atol=1e-5)


def test_class_modulation_is_per_sample(tiny_config):
    model = make_model(tiny_config).eval()
    features = [torch.randn(3, model.transformers[0].out_channels, 4, 4) for _ in range(3)]
    class_features = model.class_proj(model.class_embeddings)
    with torch.no_grad():
        full = model.cfm(features, model.intensity_priors, class_features)
        alone = model.cfm([f[:1] for f in features], model.intensity_priors, class_features)
    for batched, single in zip(full, alone):
        assert batched.shape == (3, 4, tiny_config.class_dim)
        torch.testing.assert_close(batched[:1], single)
    assert not torch.allclose(full[0][0], full[0][1])


def test_same_seed_gives_same_model_and_loss(tiny_config):
    images, labels = make_batch(2)
    results = []
    for _ in range(2):
        model = make_model(tiny_config, seed=3).train()
        torch.manual_seed(11)
        total, _ = IMMSegLoss(4, tiny_config.contrast)(model(images), labels, loss_weights(epoch=150))
        results.append((total.item(), [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


@pytest.mark.parametrize("switch, removed_prefixes", [
    ("use_cmfe", ("cmfe.",)),
    ("use_cfm", ("cfm.",)),
    ("use_contrast", ("contrast_projections.", "anchor_projections.")),
])
def test_ablation_removes_exactly_its_module(tiny_config, switch, removed_prefixes):
    full = {name for name, _ in make_model(tiny_config).named_parameters()}
    setattr(tiny_config, switch, False)
    ablated_model = make_model(tiny_config)
    ablated = {name for name, _ in ablated_model.named_parameters()}
    assert ablated < full
    assert all(name.startswith(removed_prefixes) for name in full - ablated)
    assert any(name.startswith(removed_prefixes) for name in full)

    images, labels = make_batch(2)
    ablated_model.train()
    out = ablated_model(images)
    total, terms = IMMSegLoss(4, tiny_config.contrast)(out, labels, loss_weights(
        epoch=150, use_contrast=tiny_config.use_contrast))
    total.backward()
    assert torch.isfinite(total)
    assert ("contrast" in terms) == tiny_config.use_contrast


def test_without_text_prior_the_embeddings_are_learned(tiny_config):
    with_prior = make_model(tiny_config)
    tiny_config.use_text_prior = False
    without = IMMSeg(tiny_config, IMG_SIZE, 4)
    names = dict(without.named_parameters())
    assert set(names) - {n for n, _ in with_prior.named_parameters()} == {"intensity_priors", "class_embeddings"}
    assert names["intensity_priors"].shape == with_prior.intensity_priors.shape
    assert names["class_embeddings"].shape == with_prior.class_embeddings.shape
    assert "intensity_priors" not in dict(without.named_buffers())
    images, labels = make_batch(2)
    total, _ = IMMSegLoss(4, tiny_config.contrast)(without.train()(images), labels, loss_weights(epoch=150))
    total.backward()
    assert names["intensity_priors"].grad.abs().sum() > 0


def test_text_dimension_follows_the_priors(tiny_config):
    intensity, classes = make_priors(tiny_config, dim=40)
    model = IMMSeg(tiny_config, IMG_SIZE, 4, intensity, classes)
    assert model.class_proj[0].in_features == 40
    assert torch.equal(model.intensity_priors, intensity)
    model.eval()(make_batch(1)[0])


def test_bad_priors_and_inputs_are_reported(tiny_config):
    intensity, classes = make_priors(tiny_config)
    with pytest.raises(ValueError, match="required"):
        IMMSeg(tiny_config, IMG_SIZE, 4)
    with pytest.raises(ValueError, match="shape"):
        IMMSeg(tiny_config, IMG_SIZE, 4, intensity[:2], classes)
    with pytest.raises(ValueError, match="differ in dimension"):
        IMMSeg(tiny_config, IMG_SIZE, 4, intensity, classes[:, :5])
    with pytest.raises(ValueError, match="multiple of 16"):
        IMMSeg(tiny_config, 60, 4, intensity, classes)
    model = make_model(tiny_config).eval()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(1, 1, IMG_SIZE, IMG_SIZE))
    with pytest.raises(ValueError, match="img_size"):
        model(torch.rand(1, 3, 2 * IMG_SIZE, 2 * IMG_SIZE))


def test_zero_layer_variant_runs(tiny_config):
    tiny_config.transformer.num_layers = 0
    model = make_model(tiny_config)
    assert not any(name.startswith("transformers.0.layer") for name, _ in model.named_parameters())
    assert model.transformers[0].out_channels == model.transformers[0].hybrid_model.out_channels
    images, labels = make_batch(2)
    total, _ = IMMSegLoss(4, tiny_config.contrast)(model.train()(images), labels, loss_weights(epoch=150))
    total.backward()
    assert model.eval()(images).shape == (2, 4, IMG_SIZE, IMG_SIZE)


@pytest.mark.parametrize("modalities", [(0,), (2,), (0, 1, 2)])
def test_transunet_baselines_run(tiny_config, modalities):
    torch.manual_seed(0)
    model = TransUNetBaseline(tiny_config, IMG_SIZE, 4, input_modalities=modalities)
    assert model.transformer.hybrid_model.root.conv.in_channels == len(modalities)
    images, labels = make_batch(2)
    out = model.train()(images)
    assert out.fused_logits.shape == (2, 4, IMG_SIZE, IMG_SIZE) and out.modality_logits == ()
    assert model.eval()(images).shape == (2, 4, IMG_SIZE, IMG_SIZE)


def test_single_sequence_baseline_sees_only_its_sequence(tiny_config):
    torch.manual_seed(0)
    model = TransUNetBaseline(tiny_config, IMG_SIZE, 4, input_modalities=(1,)).eval()
    images, _ = make_batch(1)
    changed = images.clone()
    changed[:, 0] = 0
    changed[:, 2] = 1
    with torch.no_grad():
        torch.testing.assert_close(model(images), model(changed))


def test_fused_inference_copy_matches_the_model(tiny_config):
    model = _trained_briefly(tiny_config)
    images, _ = make_batch(3, seed=5)
    fused = fuse_for_inference(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.decoders.modules())
    with torch.no_grad():
        torch.testing.assert_close(fused(images.contiguous(memory_format=torch.channels_last)), model(images),
                                   rtol=1e-4, atol=1e-4)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.decoders.modules())


def test_flip_averaging_at_inference(tiny_config):
    from networks.inference import predict_slices

    model = _trained_briefly(tiny_config)
    images, _ = make_batch(3, seed=9)
    plain = predict_slices(model, images, batch_slices=2)
    averaged = predict_slices(model, images, batch_slices=2, tta=True)
    with torch.no_grad():
        expected = sum(model(images.flip(d) if d else images).softmax(1).flip(d) if d else model(images).softmax(1)
                       for d in ((), (-1,), (-2,), (-2, -1))) / 4
    torch.testing.assert_close(averaged, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(plain.sum(1), torch.ones(3, IMG_SIZE, IMG_SIZE))
    assert not torch.allclose(plain, averaged)


def test_every_head_and_their_average_at_inference(tiny_config):
    from networks.inference import HeadAverage, predict_slices

    model = _trained_briefly(tiny_config)
    images, _ = make_batch(3, seed=11)
    model.train()
    torch.manual_seed(0)
    trained = model(images)
    torch.manual_seed(0)
    heads = model.head_logits(images)
    assert list(heads) == ["fused", "bSSFP", "LGE", "T2w"]
    torch.testing.assert_close(heads["fused"], trained.fused_logits)
    for name, logits in zip(("bSSFP", "LGE", "T2w"), trained.modality_logits):
        torch.testing.assert_close(heads[name], logits)
    model.eval()
    with torch.no_grad():
        heads = model.head_logits(images)
        torch.testing.assert_close(heads["fused"], model(images))
    assert not torch.allclose(heads["fused"], heads["LGE"]), "the heads differ: an average can tell them apart"

    expected = (heads["fused"].softmax(1) + heads["LGE"].softmax(1)) / 2
    torch.testing.assert_close(predict_slices(HeadAverage(model, ("fused", "LGE")), images), expected)
    torch.testing.assert_close(predict_slices(HeadAverage(fuse_for_inference(model), ("fused",)), images),
                               heads["fused"].softmax(1), rtol=1e-4, atol=1e-5)


def test_the_release_and_earlier_class_names_are_the_models():
    from networks import vit_seg_modeling

    assert vit_seg_modeling.VisionTransformer is IMMSeg and vit_seg_modeling.TransUNet is TransUNetBaseline
