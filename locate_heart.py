"""Find the heart in cases without labels with a coarse model, for a region-of-interest crop around it.

    python locate_heart.py --input_dir IN --run weights/<coarse run> --output centres.json [--cases A B ...]

IN holds raw cases in a layout that predict.py reads (labels, where present, are not read). Each case
is segmented by the coarse run as predict.py would, and the heart centre is the middle of the bounding box
of the largest connected myocardium (normal myocardium, scar and edema) in the original grid. The centres
file (x, y in voxel indices per case) is what `preprocess_data.py --crop_centre heart --heart_centres`
reads for validation and test cases, and what predict.py uses for a heart-centred run. A case where the
coarse model finds no myocardium is reported and left out; the exit code is then 1.
"""
import argparse
import logging
import sys
from pathlib import Path

from datasets.layouts import DataError
from engine.checkpoints import CheckpointError
from engine.predictor import locate_hearts
from engine.runs import configure_logging

logger = logging.getLogger("locate_heart")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_dir", type=Path, required=True, help="folder of raw cases")
    parser.add_argument("--run", type=Path, required=True, help="run folder of the coarse model (train.py)")
    parser.add_argument("--checkpoint", default=None, help="best, last, epoch_N or a file (default: best, else last)")
    parser.add_argument("--output", type=Path, required=True, help="centres file to write (JSON)")
    parser.add_argument("--cases", nargs="+", default=None, help="only these case ids (default: all)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    configure_logging()
    try:
        missed = locate_hearts(args.input_dir, args.run, args.output, args.cases, args.checkpoint, args.device)
    except (CheckpointError, DataError, ValueError) as error:
        logger.error("%s", error)
        return 1
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
