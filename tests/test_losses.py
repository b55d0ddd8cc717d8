import pytest
import torch
import torch.nn.functional as F

from utils import (BASELINE_WEIGHTS, DiceLoss, IMMSegLoss, LossWeights, SegmentationLoss,
                   TextAnchoredContrastiveLoss, loss_weights)


def one_hot_logits(labels, num_classes=4, scale=1e4):
    return F.one_hot(labels, num_classes).permute(0, 3, 1, 2).float() * scale


def test_dice_loss_is_zero_for_a_perfect_prediction():
    labels = torch.randint(0, 3, (2, 16, 16))  # class 3 absent from both
    assert DiceLoss(4)(one_hot_logits(labels), labels).item() == pytest.approx(0.0, abs=1e-6)


def test_dice_loss_weights_background_by_half():
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, :4] = 1
    swapped = torch.where(labels == 1, 0, 1)
    loss = DiceLoss(4)(one_hot_logits(swapped), labels)
    # background and class 1 fully wrong: (0.5 * 1 + 1 * 1) / 4; classes 2 and 3 empty and predicted empty
    assert loss.item() == pytest.approx(1.5 / 4, abs=1e-4)


def test_segmentation_loss_combines_cross_entropy_and_dice():
    logits = torch.randn(2, 4, 8, 8)
    labels = torch.randint(0, 4, (2, 8, 8))
    expected = 0.2 * F.cross_entropy(logits, labels) + 0.8 * DiceLoss(4)(logits, labels)
    torch.testing.assert_close(SegmentationLoss(4)(logits, labels), expected)


def test_sampling_respects_counts_ignored_classes_and_labels():
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[0, :2] = 1   # 16 pixels of class 1 in image 0
    labels[1, :, :1] = 2  # 8 pixels of class 2 in image 1
    features = torch.arange(8 * 8, dtype=torch.float32).view(1, 1, 8, 8).repeat(2, 3, 1, 1)
    features[1] += 1000
    sampled, targets = TextAnchoredContrastiveLoss.sample(features, labels, count=10, num_classes=4,
                                                          ignore_classes=(0,))
    assert (targets == 1).sum() == 10 and (targets == 2).sum() == 8 and (targets == 0).sum() == 0
    positions = sampled[:, 0].long()
    assert torch.all(labels[0].flatten()[positions[targets == 1]] == 1)
    assert torch.all(labels[1].flatten()[positions[targets == 2] - 1000] == 2)
    assert len(set(positions[targets == 1].tolist())) == 10, "sampling is without replacement"


def test_contrastive_loss_is_finite_with_missing_classes():
    loss_fn = TextAnchoredContrastiveLoss((5, 2, 1))
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    labels[:, 4:8, 4:8] = 1
    embeddings = [torch.randn(2, 6, s, s, requires_grad=True) for s in (8, 4, 2)]
    anchors = [torch.randn(4, 6, requires_grad=True) for _ in range(3)]
    loss = loss_fn(embeddings, labels, anchors, ignore_classes=(2, 3))
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert all(e.grad is not None for e in embeddings)


def test_contrastive_loss_without_valid_pixels_is_a_connected_zero():
    loss_fn = TextAnchoredContrastiveLoss((5, 2, 1))
    labels = torch.zeros(2, 16, 16, dtype=torch.long)  # only background, which is ignored
    embeddings = [torch.randn(2, 6, s, s, requires_grad=True) for s in (8, 4, 2)]
    anchors = [torch.randn(4, 6, requires_grad=True) for _ in range(3)]
    loss = loss_fn(embeddings, labels, anchors, ignore_classes=(0,))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert all(a.grad is not None and torch.all(a.grad == 0) for a in anchors)


def test_contrastive_loss_falls_when_features_move_to_their_anchors():
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (2, 16, 16))
    embeddings = [torch.randn(2, 8, s, s, requires_grad=True) for s in (8, 4, 2)]
    anchors = [torch.randn(4, 8) for _ in range(3)]
    loss_fn = TextAnchoredContrastiveLoss((5, 2, 1))
    optimizer = torch.optim.SGD(embeddings, lr=1.0)
    losses = []
    for _ in range(30):
        loss = loss_fn(embeddings, labels, anchors)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_schedule_stages():
    assert loss_weights(0) == LossWeights(fused=0.0, modality=1.0, contrast=0.0)
    assert loss_weights(19) == LossWeights(fused=0.0, modality=1.0, contrast=0.0)
    assert loss_weights(20) == LossWeights(fused=0.0, modality=1.0, contrast=0.1)
    assert loss_weights(99) == LossWeights(fused=0.0, modality=1.0, contrast=0.1)
    assert loss_weights(100) == LossWeights(fused=1.0, modality=0.5, contrast=0.05)
    assert loss_weights(150, start_contrast_epoch=200) == LossWeights(1.0, 0.5, 0.0)
    assert loss_weights(150, contrast_w=0.4, use_contrast=False).contrast == 0.0
    assert loss_weights(5, start_contrast_epoch=2, region_fusion_start_epoch=4, contrast_w=0.2) == (1.0, 0.5, 0.1)


def test_dice_class_weights_reach_every_head(tiny_config):
    from conftest import make_batch, make_model
    model = make_model(tiny_config).train()
    images, labels = make_batch(2)
    output = model(images)
    scar_twice = [0.5, 1.0, 2.0, 1.0]
    _, weighted = IMMSegLoss(4, tiny_config.contrast, dice_class_weights=scar_twice)(output, labels, loss_weights(150))
    _, default = IMMSegLoss(4, tiny_config.contrast)(output, labels, loss_weights(150))
    segmentation = SegmentationLoss(4, class_weights=scar_twice)
    torch.testing.assert_close(weighted["fused"], segmentation(output.fused_logits, labels).detach())
    torch.testing.assert_close(weighted["modality"],
                               sum(segmentation(logits, labels) for logits in output.modality_logits).detach())
    assert weighted["fused"] > default["fused"], "an imperfect scar prediction costs more with scar weighted twice"


def test_combined_loss_uses_only_the_weighted_terms(tiny_config):
    from conftest import make_batch, make_model
    model = make_model(tiny_config).train()
    images, labels = make_batch(2)
    criterion = IMMSegLoss(4, tiny_config.contrast)
    _, terms = criterion(model(images, fused=False, contrast=False), labels, loss_weights(0))
    assert set(terms) == {"modality"}
    total, terms = criterion(model(images), labels, loss_weights(150))
    expected = terms["fused"] + 0.5 * terms["modality"] + 0.05 * terms["contrast"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="no loss term"):
        criterion(model(images, fused=False), labels, BASELINE_WEIGHTS)
