"""test.py --sequences and predict.py on cases without a sequence (documentation/missing_sequences.md): a subset
stage segments from a subset; a complete run refuses, saying what serves it, and so does a run of the removed
sequence-dropout training."""
import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

import predict
import test as test_script
import train as train_script
from conftest import make_batch, make_model, train_tiny_run, write_phantom_training_data
from engine.checkpoints import load_checkpoint
from engine.options import sequence_list
from networks.missing_sequences import SequenceSubset
from networks.subset_stage import SubsetIMMSeg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A one-epoch complete run of the testing configuration on 3 phantom cases ("plain"), a one-epoch subset stage
    on it ("stage"), and 6 unlabelled cases."""
    root = tmp_path_factory.mktemp("subsets")
    priors = write_phantom_training_data(root, cases=6, seed=31)
    assert train_tiny_run(root / "data", priors, root / "plain", "--max_epochs", "1") == 0
    assert train_script.main(["--subsets_from", str(root / "plain"), "--output_dir", str(root / "stage"),
                              "--max_epochs", "1", "--num_workers", "0", "--progress", "0", "--device", "cpu"]) == 0
    for sequence in ("bSSFP", "LGE", "T2w"):
        shutil.copytree(root / "raw" / "Raw_data" / sequence, root / "unlabelled" / "Raw_data" / sequence)
    return root


def score(run, out, *extra):
    return test_script.main(["--output_dir", str(run), "--checkpoint", "last", "--test_save_dir", str(out),
                             "--no_save_nii", "--device", "cpu", *extra])


def test_sequence_list_keeps_the_sequence_order_and_refuses_bad_names():
    assert sequence_list("T2w,bSSFP") == ("bSSFP", "T2w")
    for bad in ("", "LGE,LGE", "LGE,PD"):
        with pytest.raises(Exception, match="expected distinct names"):
            sequence_list(bad)


def test_test_py_scores_a_subset_with_a_subset_stage_and_records_it(runs, monkeypatch):
    from engine import evaluation

    seen = []

    class SpiedSubset(SequenceSubset):
        def forward(self, images):
            seen.append(self.sequences)
            return super().forward(images)

    monkeypatch.setattr(evaluation, "SequenceSubset", SpiedSubset)
    out = runs / "stage" / "scored_bssfp_lge"
    assert score(runs / "stage", out, "--sequences", "LGE,bSSFP") == 0
    assert seen and set(seen) == {("bSSFP", "LGE")}, "every batch went through the subset"
    seen.clear()
    info = json.loads((out / "test_info.json").read_text())
    assert info["sequences"] == ["bSSFP", "LGE"]
    full = runs / "stage" / "scored_full"
    assert score(runs / "stage", full) == 0
    assert json.loads((full / "test_info.json").read_text())["sequences"] == ["bSSFP", "LGE", "T2w"]
    assert not seen, "all three sequences: the model as it is"
    subset_rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [row["case"] for row in subset_rows] == [row["case"] for row in csv.DictReader(open(full / "metrics.csv"))]
    assert score(runs / "stage", out) == 1, "the folder holds another setting's results (the subset)"

    default = runs / "stage"
    assert test_script.main(["--output_dir", str(default), "--checkpoint", "last", "--no_save_nii", "--device", "cpu",
                             "--sequences", "bSSFP,LGE"]) == 0
    assert (default / "test_test_vol_last_sequences-bSSFP-LGE" / "metrics.csv").is_file()


def test_test_py_refuses_a_subset_for_a_complete_run(runs, caplog):
    assert score(runs / "plain", runs / "plain" / "refused", "--sequences", "bSSFP,LGE") == 1
    assert "is a complete run and needs all of bSSFP, LGE, T2w; it cannot segment without T2w" in caplog.text
    assert "train a subset stage on it (train.py --subsets_from RUN)" in caplog.text
    assert not (runs / "plain" / "refused" / "metrics.csv").exists()


def test_a_run_of_the_removed_sequence_dropout_training_is_refused_a_subset_like_a_complete_run(runs, caplog):
    """A checkpoint whose args say it was trained with sequence dropout (a training mode since removed) still
    segments complete cases; a subset is refused with what serves it now."""
    old = runs / "old_dropout"
    shutil.copytree(runs / "plain", old, ignore=shutil.ignore_patterns("test_*"))
    checkpoint = load_checkpoint(old / "last.pth", map_location="cpu")
    checkpoint["args"].update(sequence_dropout=0.5, sequence_dropout_mode="paired")
    torch.save(checkpoint, old / "last.pth")
    assert score(old, old / "refused", "--sequences", "LGE,T2w") == 1
    assert ("was trained with --sequence_dropout, a training mode that has been removed, and needs all of "
            "bSSFP, LGE, T2w; it cannot segment without bSSFP: train a subset stage on it (train.py --subsets_from "
            "RUN)") in caplog.text
    assert not (old / "refused" / "metrics.csv").exists()
    assert score(old, old / "complete") == 0, "complete cases are scored as before"


def test_test_py_refuses_the_head_of_a_hidden_sequence(runs):
    with pytest.raises(SystemExit):
        score(runs / "stage", runs / "stage" / "heads", "--sequences", "bSSFP,LGE", "--heads", "fused,T2w")


def test_predict_py_predicts_a_case_without_t2w_from_the_others_with_a_subset_stage(runs, caplog):
    src = runs / "without_t2w"
    shutil.copytree(runs / "unlabelled", src)
    (src / "Raw_data" / "T2w" / "case0002.nii.gz").unlink()
    (src / "Raw_data" / "LGE" / "case0003.nii.gz").unlink()
    out = runs / "predicted_subsets"
    assert predict.main(["--input_dir", str(src), "--output_dir", str(out), "--run", str(runs / "stage"),
                         "--checkpoint", "last", "--device", "cpu", "--save_png"]) == 0
    rows = {row["case"]: row for row in csv.DictReader(open(out / "volumes.csv"))}
    assert rows["case0002"]["sequences"] == "bSSFP;LGE" and rows["case0002"]["error"] == ""
    assert rows["case0003"]["sequences"] == "bSSFP;T2w"
    assert rows["case0001"]["sequences"] == "bSSFP;LGE;T2w"
    assert "case0002: " in caplog.text and "from bSSFP, LGE," in caplog.text
    written = nib.load(str(out / "case0003.nii.gz"))  # no LGE: the header of bSSFP
    source = nib.load(str(src / "Raw_data" / "bSSFP" / "case0003.nii.gz"))
    assert written.shape == source.shape
    np.testing.assert_array_equal(written.affine, source.affine)


def test_the_case_without_a_sequence_is_predicted_as_the_model_on_that_subset(runs):
    """What predict.py writes for a case without T2w is the model's prediction with T2w hidden: the same labels
    whatever the T2w file held (here: the case's own T2w, which the subset model never sees)."""
    src = runs / "one_case"
    for sequence in ("bSSFP", "LGE", "T2w"):
        (src / "Raw_data" / sequence).mkdir(parents=True)
        shutil.copy(runs / "unlabelled" / "Raw_data" / sequence / "case0004.nii.gz", src / "Raw_data" / sequence)
    with_t2w, without = runs / "with_t2w", runs / "without"
    import engine.predictor

    original = engine.predictor.member_models

    def always_without_t2w(members, sequences):
        return original(members, [name for name in sequences if name != "T2w"])

    engine.prediction.member_models = always_without_t2w
    try:
        assert predict.main(["--input_dir", str(src), "--output_dir", str(with_t2w), "--run", str(runs / "stage"),
                             "--checkpoint", "last", "--device", "cpu"]) == 0
    finally:
        engine.prediction.member_models = original
    (src / "Raw_data" / "T2w" / "case0004.nii.gz").unlink()
    assert predict.main(["--input_dir", str(src), "--output_dir", str(without), "--run", str(runs / "stage"),
                         "--checkpoint", "last", "--device", "cpu"]) == 0
    labels = np.asarray(nib.load(str(without / "case0004.nii.gz")).dataobj)
    assert len(np.unique(labels)) > 1, "the model predicts more than one class: the comparison can fail"
    np.testing.assert_array_equal(np.asarray(nib.load(str(with_t2w / "case0004.nii.gz")).dataobj), labels)


def test_predict_py_skips_a_case_without_a_sequence_for_a_complete_run(runs, caplog):
    src = runs / "plain_without_t2w"
    shutil.copytree(runs / "unlabelled", src)
    (src / "Raw_data" / "T2w" / "case0002.nii.gz").unlink()
    out = runs / "plain_predicted"
    assert predict.main(["--input_dir", str(src), "--output_dir", str(out), "--run", str(runs / "plain"),
                         "--checkpoint", "last", "--device", "cpu"]) == 1
    rows = {row["case"]: row for row in csv.DictReader(open(out / "volumes.csv"))}
    assert "missing T2w file" in rows["case0002"]["error"]
    assert "is a complete run" in rows["case0002"]["error"] and "--subsets_from" in rows["case0002"]["error"]
    assert rows["case0001"]["sequences"] == "bSSFP;LGE;T2w" and not (out / "case0002.nii.gz").exists()


def test_a_subset_of_a_stage_zero_fills_and_hides_what_it_does_not_use(tiny_config):
    stage = SubsetIMMSeg(make_model(tiny_config)).eval()
    subset = SequenceSubset(stage, ("LGE", "bSSFP")).eval()
    images, _ = make_batch()
    noisy = images.clone()
    noisy[:, 2] = torch.rand_like(noisy[:, 2]) * 100
    with torch.no_grad():
        torch.testing.assert_close(subset(images), subset(noisy), rtol=0, atol=0)
        assert not torch.equal(stage(images), stage(noisy)), "without the subset the T2w channel matters"
        with pytest.raises(ValueError, match="serves the fused head alone"):
            subset.head_logits(images)
    with pytest.raises(ValueError, match="a proper subset"):
        SequenceSubset(stage, ("bSSFP", "LGE", "T2w"))


def test_zero_filled_scoring_serves_any_model_and_is_recorded_as_such(runs):
    out = runs / "plain" / "zero_filled"
    assert score(runs / "plain", out, "--sequences", "bSSFP,LGE", "--missing", "zero_fill") == 0
    info = json.loads((out / "test_info.json").read_text())
    assert (info["sequences"], info["missing"]) == (["bSSFP", "LGE"], "zero_fill")
    assert test_script.main(["--output_dir", str(runs / "plain"), "--checkpoint", "last", "--no_save_nii",
                             "--device", "cpu", "--sequences", "bSSFP,LGE", "--missing", "zero_fill"]) == 0
    assert (runs / "plain" / "test_test_vol_last_sequences-bSSFP-LGE-zerofill" / "metrics.csv").is_file()


def test_a_zero_filling_subset_gives_any_model_zeros_and_leaves_out_only_with_a_stage(tiny_config):
    model = make_model(tiny_config).eval()
    images, _ = make_batch()
    zeroed = images.clone()
    zeroed[:, 2] = 0
    zero_filled = SequenceSubset(model, ("bSSFP", "LGE"), leave_out=False)
    with torch.no_grad():
        torch.testing.assert_close(zero_filled(images), model(zeroed), rtol=0, atol=0)
        heads = zero_filled.head_logits(images)
        assert set(heads) == {"fused", "bSSFP", "LGE", "T2w"}
        torch.testing.assert_close(heads["LGE"], model.head_logits(zeroed)["LGE"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="no subset path to leave sequences out"):
        SequenceSubset(model, ("bSSFP", "LGE"))


def test_early_fusion_trains_and_scores_on_a_subset_of_the_sequences(runs):
    run = runs / "early_bssfp_lge"
    priors = runs / "priors.pt"
    assert train_tiny_run(runs / "data", priors, run, "--max_epochs", "1", "--model", "transunet_early",
                          "--input_sequences", "LGE,bSSFP") == 0
    checkpoint = load_checkpoint(run / "last.pth", map_location="cpu")
    assert checkpoint["spec"]["input_sequences"] == ["bSSFP", "LGE"]
    assert checkpoint["model"]["transformer.hybrid_model.root.conv.weight"].shape[1] == 2, "two input channels"
    assert score(run, run / "scored") == 0


def test_input_sequences_is_refused_for_other_models(runs, capsys):
    with pytest.raises(SystemExit):
        train_tiny_run(runs / "data", runs / "priors.pt", runs / "refused", "--input_sequences", "bSSFP,LGE")
    assert "--input_sequences goes with --model transunet_early" in capsys.readouterr().err
    assert not (runs / "refused").exists()
