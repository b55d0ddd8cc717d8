"""benchmarks/batchnorm_statistics.py: a run's BatchNorm running statistics recomputed from complete training
slices, everything else of the checkpoint unchanged."""
import sys
from pathlib import Path

import torch

from conftest import train_tiny_run, write_phantom_training_data
from datasets.dataset_myops import MyoPSDataset
from engine.checkpoints import load_checkpoint, model_from_spec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import batchnorm_statistics  # noqa: E402


def test_running_statistics_become_those_of_the_data_and_nothing_else_changes(tmp_path):
    priors = write_phantom_training_data(tmp_path, cases=4, seed=5)
    assert train_tiny_run(tmp_path / "data", priors, tmp_path / "run", "--max_epochs", "1",
                          "--sequence_dropout", "0.5") == 0
    out = tmp_path / "recomputed"
    assert batchnorm_statistics.main(["--run", str(tmp_path / "run"), "--root_path", str(tmp_path / "data"),
                                      "--output_dir", str(out), "--passes", "1", "--batch_size", "1000"]) == 0
    before, after = load_checkpoint(tmp_path / "run" / "last.pth"), load_checkpoint(out / "last.pth")
    assert (out / "config.json").is_file()
    statistics = {name for name in before["model"] if name.endswith(("running_mean", "running_var"))}
    assert statistics, "the testing configuration has BatchNorm layers"
    for name, tensor in before["model"].items():
        if name in statistics:
            assert not torch.equal(tensor, after["model"][name]), name
        elif not name.endswith("num_batches_tracked"):
            assert torch.equal(tensor, after["model"][name]), f"{name} changed"
    assert before["train_state"] == after["train_state"] and before["spec"] == after["spec"]

    # One batch holding every slice: each layer's running mean is the mean of what it saw in that batch.
    model = model_from_spec(before["spec"], before["model"])
    model.load_state_dict(before["model"])
    layer_name, layer = next((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen = []
    layer.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].detach().mean(dim=(0, 2, 3))))
    batchnorm_statistics.recompute_batchnorm_statistics(model, MyoPSDataset(tmp_path / "data"), passes=1,
                                                        batch_size=1000)
    assert len(seen) == 1 and not model.training and not layer.training
    torch.testing.assert_close(layer.running_mean, seen[0])
    torch.testing.assert_close(after["model"][f"{layer_name}.running_mean"], seen[0])

    written = (out / "last.pth").stat().st_mtime_ns
    assert batchnorm_statistics.main(["--run", str(tmp_path / "run"), "--root_path", str(tmp_path / "data"),
                                      "--output_dir", str(out)]) == 1, "an existing output folder is refused"
    assert (out / "last.pth").stat().st_mtime_ns == written


def test_a_folder_without_the_checkpoint_is_named(tmp_path, caplog):
    code = batchnorm_statistics.main(["--run", str(tmp_path), "--root_path", str(tmp_path), "--output_dir",
                                      str(tmp_path / "out")])
    assert code == 1 and f"{tmp_path / 'last.pth'} does not exist" in caplog.text
    assert not (tmp_path / "out").exists()
