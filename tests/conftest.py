import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

torch.set_num_threads(min(2, os.cpu_count() or 1))

from networks.vit_seg_configs import get_config  # noqa: E402
from networks.vit_seg_modeling import VisionTransformer  # noqa: E402

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
    return VisionTransformer(config, img_size, config.n_classes, intensity, classes)


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
