"""networks.missing_sequences: the masks of the sequences a sample has, the proper subsets the subset stage serves
and their draw for its second view (documentation/missing_sequences.md)."""
import pytest
import torch

from conftest import make_batch, make_model
from datasets.vocabulary import MODALITIES
from engine.distributed import rng_state, set_rng_state
from networks.missing_sequences import draw_subset_views, present_mask, proper_subsets
from networks.subset_stage import SubsetIMMSeg


def test_the_proper_subsets_are_every_non_empty_subset_but_all_three():
    rows = proper_subsets().tolist()
    assert len(rows) == 6 and len({tuple(row) for row in rows}) == 6
    assert all(0 < sum(row) < 3 for row in rows)
    assert proper_subsets(device="meta").device.type == "meta"


def test_a_mask_names_the_sequences_of_each_sample():
    present = present_mask(("LGE", "bSSFP"), batch_size=3)
    assert present.dtype == torch.bool and present.tolist() == [[True, True, False]] * 3
    assert present_mask(("T2w",)).tolist() == [[False, False, True]]
    for bad in (("LGE", "T1"), ()):
        with pytest.raises(ValueError, match="non-empty selection"):
            present_mask(bad)


def test_bad_masks_are_refused(tiny_config):
    stage = SubsetIMMSeg(make_model(tiny_config)).eval()
    images, _ = make_batch(2)
    for bad, message in ((torch.ones(2, 3), "bool tensor"), (torch.ones(2, 2, dtype=torch.bool), r"shape \(2, 3\)"),
                         (torch.tensor([[True, False, False], [False] * 3]), "without any sequence")):
        with pytest.raises(ValueError, match=message):
            stage(images, present=bad)
    with pytest.raises(ValueError, match="second view for training"):
        stage(images, subset_view=present_mask(("LGE",), 2))
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        stage.train()(images, subset_view=torch.ones(3, 3, dtype=torch.bool))


def test_subset_views_are_proper_subsets_drawn_alike():
    torch.manual_seed(0)
    views = draw_subset_views(1200, proper_subsets())
    counts = torch.stack([(views == row).all(dim=1).sum() for row in proper_subsets()])
    assert counts.sum() == 1200 and counts.min() > 150, counts
    assert set(MODALITIES) == {name for row in views.tolist() for name, kept in zip(MODALITIES, row) if kept}


def test_the_draw_is_repeated_from_the_saved_random_state():
    state = rng_state()  # what a checkpoint keeps and --resume restores
    first = draw_subset_views(64, proper_subsets())
    set_rng_state(state)
    assert torch.equal(draw_subset_views(64, proper_subsets()), first)
