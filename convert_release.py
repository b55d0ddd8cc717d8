"""Convert the review release's I-MMSeg checkpoint into a checkpoint of this project.

    python convert_release.py --checkpoint epoch_299.pth --out converted.pth \
        (--text_features DIR | --prior_embeddings FILE) [--img_size 128] [--root_path PATH]

(``python -m networks.convert_release`` with the same flags runs this too.) The weights
are mapped onto the ``R50-only-release`` configuration (networks/convert_release.py
says how); a key of the release that is missing, of another shape, or unknown is
named, and nothing is written. documentation/authors_checkpoint.md has the whole story.
"""
import argparse
import logging
import sys
from pathlib import Path

from engine.release import convert
from networks.convert_release import TARGET_CONFIG, ReleaseCheckpointError, load_text_features
from priors import PriorFileError, load_priors

logger = logging.getLogger("convert_release")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="the release's epoch_N.pth")
    parser.add_argument("--out", type=Path, required=True, help="the converted checkpoint to write")
    priors = parser.add_mutually_exclusive_group(required=True)
    priors.add_argument("--text_features", type=Path,
                        help="the release's text_features/ folder (embedding_MRI_information.pth, "
                             "embedding_class_information.pth)")
    priors.add_argument("--prior_embeddings", type=Path, help="a prior file of this project (python -m priors.encode)")
    parser.add_argument("--img_size", type=int, default=128,
                        help="input size the release was trained at (its CMFE gates fix it; default 128)")
    parser.add_argument("--root_path", type=Path, default=Path("MyoPS380_dataset/Processed_data"),
                        help="data folder recorded for test.py (default: the release's layout, "
                             "MyoPS380_dataset/Processed_data)")
    parser.add_argument("--vit_name", default=TARGET_CONFIG,
                        help=f"configuration the weights are mapped onto (default {TARGET_CONFIG}, the release's "
                             "function; another must carry the release's switches too)")
    parser.add_argument("--epochs_trained", type=int, default=None,
                        help="completed epochs (default: N + 1 from the file name epoch_N.pth)")
    return parser.parse_args(argv)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        priors = (load_text_features(args.text_features) if args.text_features is not None
                  else load_priors(args.prior_embeddings))
        convert(args.checkpoint, args.out, priors, args.img_size, args.root_path, args.epochs_trained,
                config_name=args.vit_name)
    except (ReleaseCheckpointError, PriorFileError, ValueError) as error:
        logger.error("%s; nothing written", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
