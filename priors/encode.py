"""Encode prompt sets into prior files, import embeddings computed elsewhere, or show a file's provenance.

    python -m priors.encode --encoder biomedclip --prompts priors/prompts/intensity.json --out priors/embeddings/biomedclip_intensity.pt
    python -m priors.encode --encoder offline --prompts priors/prompts/intensity.json --out priors/embeddings/offline_intensity.pt
    python -m priors.encode --import path/to/embeddings.pt --encoder biomedclip \
        --origin "BiomedCLIP features of the review release's prompts" --out priors/embeddings/biomedclip_released.pt
    python -m priors.encode --show priors/embeddings/offline_intensity.pt
"""
import argparse
import json
import logging
import sys
from pathlib import Path

from .encoders import EncoderUnavailableError
from .store import PriorFileError, encode_prompts, import_embeddings, load_priors, save_priors
from .text import DEFAULT_PROMPTS, PromptFileError, load_prompts

logger = logging.getLogger("priors.encode")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m priors.encode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default=None,
                        help="biomedclip (the default), offline, hf-hub:ORG/REPO, local-dir:PATH or "
                             "open_clip:MODEL[:PRETRAINED]; with --import, the encoder that produced the file")
    parser.add_argument("--prompts", type=Path, default=None,
                        help="prompt set JSON (default: priors/prompts/intensity.json); with --import, "
                             "the prompts the file was encoded from, if known")
    parser.add_argument("--out", type=Path, help="prior file to write")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--import", dest="import_path", type=Path, default=None,
                        help="a dict of 'modality' (3 x D) and 'class' (4 x D) tensors computed elsewhere")
    parser.add_argument("--origin", default="", help="with --import: where the embeddings come from")
    parser.add_argument("--show", type=Path, default=None, help="print the provenance of a prior file")
    args = parser.parse_args(argv)
    if args.show is None and args.out is None:
        parser.error("--out is required (or use --show FILE)")
    if args.out is not None and args.out.is_dir():
        parser.error(f"--out {args.out} is a folder; give the prior file's name, such as {args.out / 'priors.pt'}")
    return args


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        if args.show is not None:
            priors = load_priors(args.show)
            print(json.dumps(priors.provenance, indent=2, ensure_ascii=False))
            return 0
        if args.import_path is not None:
            prompts = load_prompts(args.prompts) if args.prompts else None
            priors = import_embeddings(args.import_path, args.origin, args.encoder or "imported", prompts)
        else:
            priors = encode_prompts(args.encoder or "biomedclip", load_prompts(args.prompts or DEFAULT_PROMPTS),
                                    args.device)
        save_priors(priors, args.out)
    except (PriorFileError, PromptFileError, EncoderUnavailableError, ValueError) as error:
        logger.error("%s", error)
        return 1
    logger.info("wrote %s: intensity priors %s, class embeddings %s, encoder %s", args.out,
                tuple(priors.intensity.shape), tuple(priors.classes.shape), priors.provenance["encoder"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
