"""Recompute a run's BatchNorm running statistics from its training slices, every sequence present.

    python benchmarks/batchnorm_statistics.py --run RUN --root_path data/MyoPS2020 --output_dir RUN_recomputed \
        [--checkpoint last] [--passes 2] [--amp bf16]
    python test.py --output_dir RUN_recomputed --root_path data/MyoPS2020 --checkpoint last ...

A diagnostic for models trained with ``--sequence_dropout``: their running statistics average the batches
they trained on, where many samples hid one or two sequences, while a complete case at inference has all
three. The copy written to ``--output_dir`` (the run's checkpoint with only the BatchNorm buffers replaced,
and its config.json, so test.py scores it as the run) holds statistics of complete, unaugmented training
slices: the cumulative average over ``--passes`` shuffled passes, the model otherwise in eval mode (no
dropout, no parameter changes). Scoring both copies on the same test cases separates what the statistics
cost from what training did (benchmarks/results/notes/2026-12-05_missing-sequences-900-iterations.md).
"""
import argparse
import logging
import shutil
import sys
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datasets.dataset_myops import MyoPSDataset  # noqa: E402
from engine.checkpoints import (CheckpointError, load_checkpoint, load_model_state, model_from_spec,  # noqa: E402
                                resolve_checkpoint)
from engine.runs import configure_logging  # noqa: E402
from networks.inference import autocast_context  # noqa: E402
from utils import atomic_path  # noqa: E402

logger = logging.getLogger("batchnorm_statistics")


def recompute_batchnorm_statistics(model, dataset, passes=2, batch_size=8, amp="none", seed=0):
    """Replace the running statistics of every BatchNorm2d of ``model`` (on the CPU) by their cumulative average
    over ``passes`` shuffled passes of ``dataset``, all sequences present; the number of layers."""
    layers = [module for module in model.modules() if isinstance(module, torch.nn.BatchNorm2d)]
    if not layers:
        return 0
    model.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average of the batches, not an exponential one
        layer.train()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    try:
        model.training = True  # the top module's training branch computes every head, so every layer sees data
        with torch.no_grad(), autocast_context("cpu", amp):
            for _ in range(passes):
                for batch in tqdm(loader, desc="BatchNorm statistics", leave=False):
                    model(batch["image"], fused=True, contrast=False)
    finally:
        model.eval()
    return len(layers)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a run folder written by train.py")
    parser.add_argument("--root_path", type=Path, required=True,
                        help="the preprocessed dataset the run trained on (its train.txt slices are used)")
    parser.add_argument("--output_dir", type=Path, required=True, help="new folder: the run's copy")
    parser.add_argument("--checkpoint", default="last", help="the run's checkpoint: last, best or a file name")
    parser.add_argument("--passes", type=int, default=2, help="passes over the training slices")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--amp", choices=("none", "bf16"), default="none", help="autocast precision on the CPU")
    parser.add_argument("--seed", type=int, default=0, help="seed of the slices' order")
    args = parser.parse_args(argv)
    if args.passes < 1 or args.batch_size < 1:
        parser.error("--passes and --batch_size must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    configure_logging()
    try:
        source = resolve_checkpoint(args.run, args.checkpoint)
        checkpoint = load_checkpoint(source)
        if checkpoint["spec"]["model"] != "immseg":
            raise CheckpointError(f"{source} is a {checkpoint['spec']['model']} checkpoint, expected an I-MMSeg one")
        if args.output_dir.exists():
            raise FileExistsError(f"{args.output_dir} exists: give a new folder")
        model = model_from_spec(checkpoint["spec"], checkpoint["model"])
        load_model_state(model, checkpoint["model"], source)
        dataset = MyoPSDataset(args.root_path, split="train")
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as error:
        logger.error("%s", error)
        return 1
    layers = recompute_batchnorm_statistics(model, dataset, args.passes, args.batch_size, args.amp, args.seed)
    checkpoint["model"] = model.state_dict()
    args.output_dir.mkdir(parents=True)
    shutil.copy(args.run / "config.json", args.output_dir / "config.json")
    with atomic_path(args.output_dir / source.name) as temporary:
        torch.save(checkpoint, temporary)
    logger.info("%d BatchNorm layers recomputed over %d pass(es) of %d slices of %s: %s", layers, args.passes,
                len(dataset), args.root_path, args.output_dir / source.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
