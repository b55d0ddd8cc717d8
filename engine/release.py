"""A checkpoint of this project from the review release's: the converted weights with the specification, priors
provenance, preprocessing and arguments that test.py reads, written atomically (nothing when a key does not fit)."""
import datetime
import logging
from dataclasses import asdict
from pathlib import Path

from engine.checkpoints import CHECKPOINT_FORMAT, TrainState
from engine.runs import git_commit
from datasets.preprocessing_record import RELEASE_PREPROCESSING
from networks.convert_release import (DROPPED_MODULES, TARGET_CONFIG, ReleaseCheckpointError,
                                      convert_state_dict, epochs_from_name, file_sha256, load_release_state,
                                      target_model)
from utils import atomic_torch_save

logger = logging.getLogger("convert_release")


def convert(checkpoint_path, out_path, priors, img_size=128, root_path="MyoPS380_dataset/Processed_data", epochs=None,
            config_name=TARGET_CONFIG):
    """Convert and write; returns the written checkpoint. Nothing is written when any key does not fit."""
    epochs = epochs if epochs is not None else epochs_from_name(checkpoint_path)
    if epochs is None:
        raise ReleaseCheckpointError(f"{checkpoint_path} is not named epoch_N.pth: give --epochs_trained")
    release_state = load_release_state(checkpoint_path)
    model, spec = target_model(priors, img_size, config_name)
    head_channels = spec["config"]["head"]["channels"]
    converted, dropped = convert_state_dict(release_state, model.state_dict(), head_channels)
    model.load_state_dict(converted, strict=False)
    for module, count in sorted(dropped.items()):
        logger.info("dropped %s (%d tensors): %s", module, count, DROPPED_MODULES[module])
    checkpoint = {
        "format": CHECKPOINT_FORMAT, "model": model.state_dict(), "spec": spec,
        "train_state": asdict(TrainState(epoch=epochs)), "priors": priors.provenance,
        "preprocessing": RELEASE_PREPROCESSING,
        "args": {"model": "immseg", "vit_name": spec["config"]["name"], "img_size": img_size, "n_skip": 3,
                 "num_classes": spec["num_classes"], "root_path": str(root_path)},
        "converted_from": {"path": str(Path(checkpoint_path).resolve()), "sha256": file_sha256(checkpoint_path),
                           "dropped": {module: DROPPED_MODULES[module] for module in sorted(dropped)}},
        "git_commit": git_commit(),
        "saved": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_torch_save(checkpoint, out_path)
    logger.info("converted %d tensors of %s (%d epochs) into %s (%s, %.1f M parameters)", len(converted),
                checkpoint_path, epochs, out_path, spec["config"]["name"],
                sum(p.numel() for p in model.parameters()) / 1e6)
    return checkpoint
