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

from tqdm import tqdm

from datasets.layouts import DataError, find_cases, load_case
from datasets.roi import write_centres
from engine.checkpoints import CheckpointError
from engine.predictor import HeartLocator
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


def locate(args):
    """Write the centres file; returns the cases where no heart was found."""
    cases = find_cases(args.input_dir, labelled=False)
    if args.cases is not None:
        unknown = sorted(set(args.cases) - {case.case_id for case in cases})
        if unknown:
            raise DataError(f"--cases {unknown} are not under {args.input_dir}")
        cases = [case for case in cases if case.case_id in set(args.cases)]
    locator = HeartLocator(args.run, args.checkpoint, args.device)
    centres, missed = {}, []
    for case in tqdm(cases, desc="cases", unit="case"):
        centre = locator(load_case(case))
        if centre is None:
            logger.error("%s: the coarse model finds no myocardium; no centre written", case.case_id)
            missed.append(case.case_id)
        else:
            centres[case.case_id] = centre
    write_centres(args.output, centres, f"locate_heart.py, checkpoint {locator.checkpoint_path}")
    logger.info("%d heart centres -> %s", len(centres), args.output)
    return missed


def main(argv=None):
    args = parse_args(argv)
    configure_logging()
    try:
        missed = locate(args)
    except (CheckpointError, DataError, ValueError) as error:
        logger.error("%s", error)
        return 1
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
