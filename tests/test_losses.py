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
    sampled, targets, valid = TextAnchoredContrastiveLoss.sample(features, labels, count=10, num_classes=4,
                                                                 ignore_classes=(0,))
    assert sampled.shape == (2 * 4 * 10, 3) and targets.shape == valid.shape == (2 * 4 * 10,)
    sampled, targets = sampled[valid], targets[valid]
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


def _compacted_contrast(loss_fn, embeddings, labels, anchors, ignore_classes):
    """The loss as the repository computed it up to f45b770: boolean compaction of the sampled pixels (one host
    synchronisation per scale and image set), kept here as the reference of the fixed-size implementation."""
    total = 0.0
    for features, anchor, count in zip(embeddings, anchors, loss_fn.samples_per_scale):
        batch, dim, height, width = features.shape
        num_classes = anchor.shape[0]
        small = F.interpolate(labels[:, None].float(), size=(height, width), mode="nearest")[:, 0].long().flatten(1)
        classes = torch.arange(num_classes)
        member = small[:, None, :] == classes[None, :, None]
        if ignore_classes:
            member[:, list(ignore_classes)] = False
        keys = torch.rand(small.shape)
        keyed = torch.where(member, keys[:, None, :], torch.full_like(keys[:, None, :], 2.0))
        count = min(count, small.shape[1])
        values, index = keyed.topk(count, dim=-1, largest=False)
        valid = (values < 2.0).view(batch, num_classes * count)
        flat = features.flatten(2).transpose(1, 2)
        gathered = torch.gather(flat, 1, index.view(batch, num_classes * count, 1).expand(-1, -1, dim))
        targets = classes.view(1, num_classes, 1).expand(batch, -1, count).reshape(batch, -1)
        sampled, targets = gathered[valid], targets[valid]
        anchor_classes = torch.arange(num_classes).repeat(loss_fn.anchor_copies)
        unit = F.normalize(torch.cat([sampled.float(), anchor.float().repeat(loss_fn.anchor_copies, 1)]), dim=1)
        targets = torch.cat([targets, anchor_classes])
        similarity = unit @ unit.t() / loss_fn.temperature
        similarity = similarity - similarity.max(dim=1, keepdim=True).values.detach()
        same = targets[:, None] == targets[None, :]
        positive = same & ~torch.eye(len(targets), dtype=torch.bool)
        exp = similarity.exp()
        log_prob = similarity - torch.log(exp + (exp * (~same)).sum(dim=1, keepdim=True))
        positives = positive.sum(dim=1)
        has_positive = positives > 0
        if not has_positive.any():
            total = total + unit.sum() * 0.0
            continue
        total = total - ((log_prob * positive).sum(dim=1)[has_positive] / positives[has_positive]).mean()
    return total


@pytest.mark.parametrize("fixed_size", [True, False], ids=["fixed size (GPU)", "compacted (CPU)"])
@pytest.mark.parametrize("seed", range(6))
def test_fixed_size_contrastive_loss_equals_the_compacted_one_on_fixed_seeds(seed, fixed_size):
    """Same random draws, same loss and gradients as the boolean-compaction implementation, also where classes have
    fewer pixels than asked for, are ignored or are absent (seed 5: a batch of background only); both the GPU's
    fixed-size sets with validity masks and the CPU's compaction."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.zeros(3, 32, 32, dtype=torch.long)
    if seed < 5:
        labels = torch.randint(0, 4, (3, 32, 32), generator=generator)
        labels[:, :, : 4 * seed] = 0  # fewer pixels of the other classes as the seed grows
        labels[0, (labels[0] == 2)] = 1  # class 2 absent from image 0
    loss_fn = TextAnchoredContrastiveLoss((20, 8, 3), anchor_copies=1 + seed % 2, fixed_size=fixed_size)
    embeddings = [torch.randn(3, 6, s, s, generator=generator, requires_grad=True) for s in (16, 8, 4)]
    anchors = [torch.randn(4, 6, generator=generator, requires_grad=True) for _ in range(3)]
    ignore = ((3,), (), (0, 2))[seed % 3]
    torch.manual_seed(seed)
    expected = _compacted_contrast(loss_fn, embeddings, labels, anchors, ignore)
    next_draw_after_reference = torch.rand(())
    expected_grads = torch.autograd.grad(expected, embeddings + anchors, allow_unused=True)
    torch.manual_seed(seed)
    found = loss_fn(embeddings, labels, anchors, ignore_classes=ignore)
    assert torch.rand(()) == next_draw_after_reference, "the same random draws, no more, no fewer"
    found_grads = torch.autograd.grad(found, embeddings + anchors, allow_unused=True)
    torch.testing.assert_close(found, torch.as_tensor(expected, dtype=found.dtype), rtol=1e-5, atol=1e-6)
    for got, want in zip(found_grads, expected_grads):
        torch.testing.assert_close(got if got is not None else torch.zeros(()),
                                   want if want is not None else torch.zeros(()), rtol=1e-4, atol=1e-6)
