"""Issue 38: one I-MMSeg model for any non-empty subset of the sequences (``present``, --sequence_dropout)."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import train as train_script
from conftest import IMG_SIZE, TINY_TRAIN_FLAGS, make_batch, make_model, train_tiny_run, write_phantom_training_data
from datasets.vocabulary import MODALITIES
from engine.checkpoints import load_checkpoint, trained_sequence_dropout
from engine.distributed import rng_state, set_rng_state, setup_distributed
from engine.options import resolve_device_defaults
from networks.inference import fuse_for_inference
from networks.missing_sequences import (draw_present, draw_subset_views, hide_sequences, present_mask,
                                        proper_subsets, split_views)
from networks.vit_seg_configs import get_config
from networks.vit_seg_modeling import SegmentationOutput, TransUNetBaseline
from utils import IMMSegLoss, SegmentationLoss, loss_weights

SUBSETS = [tuple(MODALITIES[m] for m in range(3) if row[m]) for row in proper_subsets().tolist()]
ALL_SUBSETS = SUBSETS + [MODALITIES]


def subset_id(names):
    return "+".join(names)


@pytest.fixture(scope="module")
def trained():
    """The testing model after two SGD steps on samples with random subsets (BatchNorm statistics not the initial
    ones), in eval mode."""
    config = get_config("testing")
    model = make_model(config).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    criterion = IMMSegLoss(4, config.contrast)
    torch.manual_seed(0)
    for step in range(2):
        images, labels = make_batch(4, seed=step)
        present = draw_present(4, 0.75, proper_subsets())
        images = hide_sequences(images, present)
        total, _ = criterion(model(images, present=present), labels, loss_weights(epoch=150), present)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    return model.eval()


def original_cmfe(cmfe, features, intensity_priors):
    """CMFE as method.md states it and the model computed it before subsets existed (no mask anywhere)."""
    batch = features[0].shape[0]
    priors = cmfe.prior_proj(intensity_priors)
    masked = []
    for m, feature in enumerate(features):
        visual = cmfe.visual_proj[m](feature.mean(dim=(2, 3), keepdim=True)).flatten(1)
        gate = cmfe.gates[m](torch.cat([priors[m].expand(batch, -1), visual], dim=1))
        masked.append(feature.flatten(2) * gate.unsqueeze(1))
    unit = [F.normalize(x, dim=1, eps=1e-8) for x in masked]
    enhanced = []
    for m, feature in enumerate(features):
        affinities = [torch.bmm(unit[m].transpose(1, 2), unit[o]).abs().softmax(dim=-1)
                      for o in range(len(features)) if o != m]
        parts = [feature] + [torch.bmm(masked[m], a.transpose(1, 2)).view_as(feature) for a in affinities]
        enhanced.append(cmfe.fuse[m](parts))
    return enhanced


def original_fused_logits(model, images):
    """The fused logits of the forward path before subsets existed, from the model's own submodules."""
    encoded = [transformer(images[:, m:m + 1]) for m, transformer in enumerate(model.transformers)]
    bottlenecks = original_cmfe(model.cmfe, [x for x, _ in encoded], model.intensity_priors)
    skips = [s for _, s in encoded]
    decoded = [decoder(x, s) for decoder, x, s in zip(model.decoders, bottlenecks, skips)]
    fused_skips = [fusion(list(scale)) for fusion, scale in zip(model.skip_fusions, zip(*skips))]
    return model.fused_head(fused_skips, model.class_proj(model.class_embeddings), model.decoder_fusion(decoded))


# (a) no mask, or every sequence present: the method's outputs, bit for bit ------------------------------------

def test_without_a_mask_or_with_every_sequence_the_outputs_are_the_original_ones(trained):
    images, _ = make_batch(3, seed=4)
    everything = torch.ones(3, 3, dtype=torch.bool)
    with torch.no_grad():
        original = original_fused_logits(trained, images)
        assert torch.equal(trained(images), original)
        assert torch.equal(trained(images, present=everything), original)
        assert torch.equal(trained(images, present=everything[0]), original), "an (M,) mask serves every sample"
        plain, masked = trained.head_logits(images), trained.head_logits(images, present=everything)
    assert list(masked) == ["fused", *MODALITIES]
    assert all(torch.equal(plain[name], masked[name]) for name in plain)
    assert torch.equal(plain["fused"], original)


# (b) every non-empty subset trains and predicts -----------------------------------------------------------------

@pytest.mark.parametrize("names", ALL_SUBSETS, ids=subset_id)
def test_a_training_step_and_inference_run_on_every_subset(tiny_config, names):
    model = make_model(tiny_config).train()
    images, labels = make_batch(2, seed=1)
    present = present_mask(names, batch_size=2)
    images = hide_sequences(images, present)
    total, terms = IMMSegLoss(4, tiny_config.contrast)(model(images, present=present), labels,
                                                       loss_weights(epoch=150), present)
    assert set(terms) == {"fused", "modality", "contrast"} and torch.isfinite(total)
    total.backward()
    for m, transformer in enumerate(model.transformers):
        gradients = [p.grad for p in transformer.parameters() if p.grad is not None]
        reached = any(g.abs().sum() > 0 for g in gradients)
        assert all(torch.isfinite(g).all() for g in gradients)
        assert reached == (MODALITIES[m] in names), f"{MODALITIES[m]}'s encoder learns only when it is present"
    model.eval()
    with torch.no_grad():
        logits = model(images, present=present)
    assert logits.shape == (2, 4, IMG_SIZE, IMG_SIZE) and torch.isfinite(logits).all()


# (c) a hidden sequence never reaches the fused output nor the heads of the sequences present --------------------

@pytest.mark.parametrize("names", SUBSETS, ids=subset_id)
def test_a_hidden_sequence_never_reaches_the_fused_logits_or_the_present_heads(trained, names):
    images, _ = make_batch(2, seed=2)
    present = torch.stack([present_mask(names)[0], torch.ones(3, dtype=torch.bool)])  # sample 1 has all three
    hidden = [m for m in range(3) if MODALITIES[m] not in names]
    generator = torch.Generator().manual_seed(3)
    noisy, nan = images.clone(), images.clone()
    noisy[0, hidden] = 5 * torch.randn(len(hidden), IMG_SIZE, IMG_SIZE, generator=generator)
    nan[0, hidden] = math.nan
    with torch.no_grad():
        heads = trained.head_logits(images, present=present)
        for replaced in (noisy, nan):
            changed = trained.head_logits(replaced, present=present)
            assert torch.equal(changed["fused"], heads["fused"])
            assert torch.equal(trained(replaced, present=present), heads["fused"])
            for name in names:
                assert torch.equal(changed[name], heads[name]), f"{name}'s head saw the hidden sequence"
            assert all(torch.equal(changed[name][1], heads[name][1]) for name in heads), "sample 1 is its own"
        noise_reaches_its_own_head = trained.head_logits(noisy, present=present)[MODALITIES[hidden[0]]][0]
        assert not torch.equal(noise_reaches_its_own_head, heads[MODALITIES[hidden[0]]][0])
        assert not torch.equal(trained(noisy), trained(images)), "without the mask the noise would reach the output"


def test_the_inference_copy_and_a_name_selection_run_on_a_subset(trained):
    images, _ = make_batch(3, seed=6)
    present = present_mask(("bSSFP", "LGE"), batch_size=3)
    assert present.tolist() == [[True, True, False]] * 3
    with torch.no_grad():
        expected = trained(images, present=present)
        torch.testing.assert_close(fuse_for_inference(trained)(images.contiguous(memory_format=torch.channels_last),
                                                               present=present), expected, rtol=1e-4, atol=1e-4)
    assert not torch.equal(expected, trained(images)), "leaving T2w out changes the prediction"


def test_bad_masks_are_refused(trained, tiny_config):
    images, _ = make_batch(2)
    for bad, message in ((torch.ones(2, 3), "bool tensor"), (torch.ones(2, 2, dtype=torch.bool), r"shape \(2, 3\)"),
                         (torch.tensor([[True, False, False], [False] * 3]), "without any sequence")):
        with pytest.raises(ValueError, match=message):
            trained(images, present=bad)
    with pytest.raises(ValueError, match="non-empty selection"):
        present_mask(("LGE", "T1"))
    baseline = TransUNetBaseline(tiny_config, IMG_SIZE, 4, input_modalities=(0, 1, 2)).eval()
    with pytest.raises(ValueError, match="only I-MMSeg"):
        baseline(images, present=torch.ones(2, 3, dtype=torch.bool))


# (c') paired views: the complete view and a subset view from the same encoder outputs -------------------------

def frozen_training_mode(model):
    """``model`` computing its training outputs with BatchNorm's running statistics and no dropout, so that a view's
    outputs do not depend on the other samples of the batch."""
    model.eval()
    model.training = True
    return model


def test_a_paired_forward_is_the_complete_forward_beside_the_subset_forward(trained):
    model = frozen_training_mode(copy.deepcopy(trained))
    images, _ = make_batch(3, seed=8)
    subset_view = torch.tensor([[True, False, False], [True, True, False], [False, True, True]])
    with torch.no_grad():
        paired = model(images, subset_view=subset_view)
        complete, subset = split_views(paired, 3)
        expected_complete = model(images)
        expected_subset = model(images, present=subset_view, contrast=False)
        generator = torch.Generator().manual_seed(9)
        noisy = torch.where(subset_view[:, :, None, None], images, 5 * torch.randn(images.shape, generator=generator))
        noisy_subset = split_views(model(noisy, subset_view=subset_view), 3)[1]
    assert paired.fused_logits.shape[0] == 6 and complete.fused_logits.shape[0] == 3
    for got, expected in ((complete, expected_complete), (subset, expected_subset)):
        torch.testing.assert_close(got.fused_logits, expected.fused_logits, rtol=1e-5, atol=1e-5)
        for m in range(3):
            torch.testing.assert_close(got.modality_logits[m], expected.modality_logits[m], rtol=1e-5, atol=1e-5)
    for got, expected in zip(complete.contrast_embeddings, expected_complete.contrast_embeddings):
        assert all(torch.equal(g, e) for g, e in zip(got, expected)), "the embeddings of the encoders, once"
    assert subset.contrast_embeddings is None and subset.class_anchors is None
    torch.testing.assert_close(noisy_subset.fused_logits, subset.fused_logits, rtol=1e-5, atol=1e-5)
    for m in range(3):
        kept = subset_view[:, m]
        torch.testing.assert_close(noisy_subset.modality_logits[m][kept], subset.modality_logits[m][kept],
                                   rtol=1e-5, atol=1e-5)
    assert not torch.allclose(subset.fused_logits, complete.fused_logits), "the subset view hides sequences"


def test_a_paired_view_is_for_training_and_needs_a_valid_mask(trained):
    images, _ = make_batch(2)
    with pytest.raises(ValueError, match="second view for training"):
        trained(images, subset_view=torch.ones(2, 3, dtype=torch.bool))
    model = frozen_training_mode(copy.deepcopy(trained))
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        model(images, subset_view=torch.ones(3, 3, dtype=torch.bool))


def test_subset_views_are_proper_subsets_drawn_alike():
    torch.manual_seed(0)
    views = draw_subset_views(1200, proper_subsets())
    counts = torch.stack([(views == row).all(dim=1).sum() for row in proper_subsets()])
    assert counts.sum() == 1200 and counts.min() > 150, counts


# (d) the per-sample draw ---------------------------------------------------------------------------------------

def test_at_probability_one_every_sample_hides_one_or_two_sequences_of_every_subset_alike():
    torch.manual_seed(0)
    masks = draw_present(1200, 1.0, proper_subsets())
    kept = masks.sum(dim=1)
    assert ((kept == 1) | (kept == 2)).all(), "never all three, never none"
    rows, counts = masks.unique(dim=0, return_counts=True)
    assert len(rows) == 6 and counts.min() > 150 and counts.max() < 250, counts
    torch.manual_seed(0)
    half = draw_present(1200, 0.5, proper_subsets())
    assert 500 < (half.sum(dim=1) == 3).sum() < 700


def test_the_draw_is_repeated_from_the_saved_random_state():
    state = rng_state()  # what a checkpoint keeps and --resume restores
    first = draw_present(64, 0.5, proper_subsets())
    set_rng_state(state)
    assert torch.equal(draw_present(64, 0.5, proper_subsets()), first)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("missing_sequences")
    return root, write_phantom_training_data(root, cases=4, seed=3)


def tiny_trainer(phantom, *extra):
    from engine.training import build
    from trainer import Trainer

    root, priors = phantom
    args = train_script.parse_args([*TINY_TRAIN_FLAGS, "--root_path", str(root / "data"), "--prior_embeddings",
                                    str(priors), "--output_dir", str(root / "unused"), *extra])
    ctx = setup_distributed("cpu")
    resolve_device_defaults(args, ctx.device)
    model, spec, _ = build(args, ctx)
    return Trainer(args, ctx, model, spec, root / "unused")


def recorded_calls(trainer, monkeypatch):
    """The images and ``present`` that each train_step gives the model."""
    calls = []
    model_forward = type(trainer.model).forward

    def recording(model, images, *args, present=None, **kwargs):
        calls.append((images.clone(), present))
        return model_forward(model, images, *args, present=present, **kwargs)

    monkeypatch.setattr(type(trainer.model), "forward", recording)
    return calls


def test_at_probability_zero_the_step_is_the_plain_one(phantom, monkeypatch):
    trainer = tiny_trainer(phantom)
    assert trainer.args.sequence_dropout == 0.0 and trainer.sequence_subsets is None
    batch = next(iter(trainer.loader))
    weights = loss_weights(epoch=150)
    before = copy.deepcopy(trainer.model)
    calls = recorded_calls(trainer, monkeypatch)
    torch.manual_seed(5)
    _, loss, terms, _ = trainer.train_step(trainer.model, batch, weights)
    after_step = torch.rand(())
    assert len(calls) == 1 and calls[0][1] is None and torch.equal(calls[0][0], batch["image"])
    torch.manual_seed(5)
    output = before(batch["image"], fused=True, contrast=True)
    expected, expected_terms = trainer.criterion(output, batch["label"], weights)
    assert torch.equal(loss, expected.detach()) and terms.keys() == expected_terms.keys()
    assert torch.rand(()) == after_step, "no random number drawn beyond the plain step's"


def test_at_probability_one_each_sample_hides_one_or_two_sequences_zero_filled(phantom, monkeypatch):
    trainer = tiny_trainer(phantom, "--sequence_dropout", "1")
    calls = recorded_calls(trainer, monkeypatch)
    batch = next(iter(trainer.loader))
    torch.manual_seed(0)
    for _ in range(3):
        trainer.train_step(trainer.model, batch, loss_weights(epoch=150))
    for images, present in calls:
        assert present.shape == (4, 3) and present.dtype == torch.bool
        assert ((present.sum(dim=1) == 1) | (present.sum(dim=1) == 2)).all()
        assert torch.equal(images, torch.where(present[:, :, None, None], batch["image"], 0))
    assert not all(torch.equal(calls[0][1], present) for _, present in calls), "drawn anew each step"


def test_in_paired_mode_a_step_adds_the_weighted_loss_of_a_subset_view_to_the_plain_one(phantom, monkeypatch):
    trainer = tiny_trainer(phantom, "--sequence_dropout", "0.25", "--sequence_dropout_mode", "paired")
    batch = next(iter(trainer.loader))
    weights = loss_weights(epoch=150)
    before = copy.deepcopy(trainer.model)
    calls = []
    model_forward = type(trainer.model).forward

    def recording(model, images, *args, **kwargs):
        calls.append((images.clone(), kwargs))
        return model_forward(model, images, *args, **kwargs)

    monkeypatch.setattr(type(trainer.model), "forward", recording)
    torch.manual_seed(5)
    output, loss, terms, _ = trainer.train_step(trainer.model, batch, weights)
    assert len(calls) == 1 and torch.equal(calls[0][0], batch["image"]), "complete images, one forward"
    subset_view = calls[0][1]["subset_view"]
    assert calls[0][1].get("present") is None and subset_view.shape == (4, 3)
    assert ((subset_view.sum(dim=1) == 1) | (subset_view.sum(dim=1) == 2)).all()
    assert output.fused_logits.shape[0] == 4, "the complete view is the step's output"
    torch.manual_seed(5)
    assert torch.equal(draw_subset_views(4, trainer.sequence_subsets), subset_view)
    complete, subset = split_views(model_forward(before, batch["image"], subset_view=subset_view), 4)
    complete_loss, complete_terms = trainer.criterion(complete, batch["label"], weights)
    subset_loss, subset_terms = trainer.criterion(subset, batch["label"], weights._replace(contrast=0.0), subset_view)
    torch.testing.assert_close(loss, (complete_loss + 0.25 * subset_loss).detach())
    assert set(terms) == {"fused", "modality", "contrast", "subset_fused", "subset_modality"}
    torch.testing.assert_close(terms["subset_fused"], subset_terms["fused"])
    torch.testing.assert_close(terms["fused"], complete_terms["fused"])


# (e) the losses leave hidden sequences out --------------------------------------------------------------------

def random_output(batch=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = [torch.randn(batch, 4, 16, 16, generator=generator, requires_grad=True) for _ in range(4)]
    embeddings = tuple(tuple(torch.randn(batch, d, s, s, generator=generator) for d, s in ((6, 8), (6, 4), (6, 2)))
                       for _ in range(3))
    anchors = tuple(torch.randn(4, 6, generator=generator) for _ in range(3))
    return SegmentationOutput(logits[0], tuple(logits[1:]), embeddings, anchors)


def with_garbage(output, present):
    """``output`` with every hidden (sample, sequence) pair's logits and embeddings replaced by garbage."""
    modality_logits = [logits.detach().clone() for logits in output.modality_logits]
    embeddings = [[e.clone() for e in per_scale] for per_scale in output.contrast_embeddings]
    for b, m in (~present).nonzero().tolist():
        modality_logits[m][b] = 1e4 * torch.randn_like(modality_logits[m][b])
        modality_logits[m][b, 0, 0, 0] = math.inf
        for e in embeddings[m]:
            e[b] = 100 * torch.randn_like(e[b])
    return output._replace(modality_logits=tuple(modality_logits),
                           contrast_embeddings=tuple(tuple(e) for e in embeddings))


@pytest.mark.parametrize("fixed_size", [True, False], ids=["fixed size (GPU)", "compacted (CPU)"])
def test_the_losses_ignore_the_outputs_of_hidden_sequences(tiny_config, fixed_size):
    criterion = IMMSegLoss(4, tiny_config.contrast)
    criterion.contrast.fixed_size = fixed_size
    labels = torch.randint(0, 4, (3, 16, 16), generator=torch.Generator().manual_seed(1))
    present = torch.tensor([[True, False, True], [False, True, False], [True, True, True]])
    output, weights = random_output(), loss_weights(epoch=150)
    garbage = with_garbage(output, present)
    torch.manual_seed(2)
    _, terms = criterion(output, labels, weights, present)
    torch.manual_seed(2)
    _, garbage_terms = criterion(garbage, labels, weights, present)
    assert all(torch.equal(terms[name], garbage_terms[name]) for name in terms), (terms, garbage_terms)
    torch.manual_seed(2)
    _, unmasked = criterion(garbage, labels, weights)
    assert not torch.equal(unmasked["modality"], terms["modality"]) and not torch.equal(unmasked["contrast"],
                                                                                       terms["contrast"])


def test_a_masked_segmentation_loss_is_that_of_the_present_samples_and_zero_without_any():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 4, 16, 16, generator=generator, requires_grad=True)
    labels = torch.randint(0, 4, (4, 16, 16), generator=generator)
    loss = SegmentationLoss(4)
    mask = torch.tensor([True, False, True, True])
    torch.testing.assert_close(loss(logits, labels, mask), loss(logits[mask], labels[mask]))
    torch.testing.assert_close(loss(logits, labels, torch.ones(4, dtype=torch.bool)), loss(logits, labels))
    nothing = loss(logits, labels, torch.zeros(4, dtype=torch.bool))
    assert nothing.item() == 0.0
    nothing.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0), "a zero still connected to the graph"


def test_every_sequence_present_gives_the_unmasked_losses(tiny_config):
    criterion, output = IMMSegLoss(4, tiny_config.contrast), random_output()
    labels = torch.randint(0, 4, (3, 16, 16), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    _, masked = criterion(output, labels, loss_weights(epoch=150), torch.ones(3, 3, dtype=torch.bool))
    torch.manual_seed(2)
    _, plain = criterion(output, labels, loss_weights(epoch=150))
    for name in plain:
        torch.testing.assert_close(masked[name], plain[name])


# (f) train.py: the flag's range, the models that honour it, and its record -----------------------------------------

@pytest.mark.parametrize("flags, message", [
    (("--sequence_dropout", "-0.1"), "--sequence_dropout must be a probability between 0 and 1, got -0.1"),
    (("--sequence_dropout", "1.5"), "between 0 and 1, got 1.5"),
    (("--sequence_dropout", "nan"), "between 0 and 1, got nan"),
    (("--sequence_dropout", "0.5", "--model", "transunet_early"), "--model transunet_early feeds its sequences"),
    (("--sequence_dropout", "0.5", "--model", "transunet_single"), "cannot leave one out"),
    (("--sequence_dropout_mode", "paired"), "--sequence_dropout_mode paired needs --sequence_dropout above 0"),
])
def test_train_refuses_a_sequence_dropout_it_cannot_honour(flags, message, capsys):
    with pytest.raises(SystemExit):
        train_script.parse_args([*TINY_TRAIN_FLAGS, *flags])
    assert message in capsys.readouterr().err
    assert train_script.parse_args([*TINY_TRAIN_FLAGS, "--model", "transunet_early"]).sequence_dropout == 0.0


@pytest.mark.parametrize("mode", ["replace", "paired"])
def test_a_run_with_sequence_dropout_trains_and_records_it(phantom, mode):
    root, priors = phantom
    run = root / f"dropout_run_{mode}"
    assert train_tiny_run(root / "data", priors, run, "--max_epochs", "1", "--sequence_dropout", "0.5",
                          "--sequence_dropout_mode", mode) == 0
    checkpoint = load_checkpoint(run / "last.pth")
    config = json.loads((run / "config.json").read_text())
    assert trained_sequence_dropout(checkpoint) == trained_sequence_dropout(config) == 0.5
    assert checkpoint["args"]["sequence_dropout_mode"] == config["args"]["sequence_dropout_mode"] == mode
    assert trained_sequence_dropout({"args": {"batch_size": 4}}) == 0.0, "runs before the flag saw every sequence"
