import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The suite runs in one process per core (pytest-xdist, the Makefile's -n): one thread each; alone, the cores.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))
THREADS = max(1, min(2, os.cpu_count() or 1) // WORKERS)
torch.set_num_threads(THREADS)
os.environ["OMP_NUM_THREADS"] = str(THREADS)  # the scripts the tests start compute alike (bitwise comparisons)

from networks.vit_seg_configs import get_config  # noqa: E402
from networks.vit_seg_modeling import IMMSeg  # noqa: E402

IMG_SIZE = 64


@pytest.fixture
def tiny_config():
    return get_config("testing")


def make_priors(config, seed=0, dim=None):
    generator = torch.Generator().manual_seed(seed)
    dim = dim or config.text_dim
    return (torch.randn(config.n_modalities, dim, generator=generator),
            torch.randn(config.n_classes, dim, generator=generator))


def make_model(config, seed=0, img_size=IMG_SIZE):
    torch.manual_seed(seed)
    intensity, classes = make_priors(config)
    return IMMSeg(config, img_size, config.n_classes, intensity, classes)


def make_batch(batch=2, img_size=IMG_SIZE, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, img_size, img_size, generator=generator)
    labels = torch.randint(0, 4, (batch, img_size, img_size), generator=generator)
    return images, labels


def write_test_priors(folder, name="priors.pt", seed=0, dim=24):
    """A prior file of random embeddings (``folder/name``), imported from ``folder/plain_<name>`` as a user would."""
    from priors import import_embeddings, save_priors

    generator = torch.Generator().manual_seed(seed)
    plain = Path(folder) / f"plain_{name}"
    torch.save({"modality": torch.randn(3, dim, generator=generator),
                "class": torch.randn(4, dim, generator=generator)}, plain)
    save_priors(import_embeddings(plain, "random test priors"), Path(folder) / name)
    return Path(folder) / name


TINY_TRAIN_FLAGS = ["--dataset", "Phantom", "--vit_name", "testing", "--img_size", "64", "--no_pretrain",
                    "--batch_size", "4", "--start_contrast_epoch", "0", "--region_fusion_start_epoch", "0",
                    "--num_workers", "0", "--progress", "0", "--device", "cpu"]


def train_tiny_run(data, priors, output_dir, *extra):
    """train.py's exit code for the testing configuration on preprocessed phantom ``data`` (64 px)."""
    import train as train_script

    return train_script.main([*TINY_TRAIN_FLAGS, "--root_path", str(data), "--prior_embeddings", str(priors),
                              "--output_dir", str(output_dir), *extra])


def preprocess_phantom(root, cases, seed, *split_flags):
    """A phantom of ``cases`` under root/raw, preprocessed at 2 mm and 64 px into root/data with ``split_flags``
    (--test_every, --val_fraction); returns root/data."""
    import preprocess_data
    from datasets.phantom import write_phantom

    root = Path(root)
    write_phantom(root / "raw", cases=cases, seed=seed)
    assert preprocess_data.main(["--dataset", "Phantom", "--src_path", str(root / "raw"), "--dst_path",
                                 str(root / "data"), "--spacing", "2.0", "--crop_size", "64", *split_flags]) == 0
    return root / "data"


def write_phantom_training_data(root, cases, seed, training_cases=3):
    """A phantom of ``cases`` under root/raw; its first ``training_cases`` copied to root/training_raw and
    preprocessed (2 mm, 64 px, every third case a test case) into root/data; random priors root/priors.pt."""
    import shutil

    import preprocess_data
    from datasets.phantom import write_phantom

    root = Path(root)
    write_phantom(root / "raw", cases=cases, seed=seed)
    for folder in ("bSSFP", "LGE", "T2w", "label"):
        (root / "training_raw" / "Raw_data" / folder).mkdir(parents=True)
        for path in sorted((root / "raw" / "Raw_data" / folder).iterdir())[:training_cases]:
            shutil.copy(path, root / "training_raw" / "Raw_data" / folder)
    assert preprocess_data.main(["--dataset", "Phantom", "--src_path", str(root / "training_raw"), "--dst_path",
                                 str(root / "data"), "--spacing", "2.0", "--crop_size", "64", "--test_every", "3"]) == 0
    return write_test_priors(root)


def prepare_benchmark_phantom(root):
    """benchmarks/myops2020.py's split and prepare (2 mm, 64 px) of a 6-case phantom under ``root``."""
    from benchmarks import myops2020 as benchmark
    from datasets.phantom import write_phantom

    write_phantom(root / "raw", cases=6, seed=5)
    assert benchmark.main(["split", "--dataset", "Phantom", "--src", str(root / "raw"), "--split_file",
                           str(root / "split.json")]) == 0
    assert benchmark.main(["prepare", "--src", str(root / "raw"), "--split_file", str(root / "split.json"),
                           "--data", str(root / "data"), "--spacing", "2.0", "--crop_size", "64"]) == 0
    return root
