"""Evaluate a trained run: per-case Dice and HD95 (mm), NIfTI predictions in the original geometry, a summary.

    python test.py <the train.py flags of the run>            # finds the run folder the same way; the flags
                                                              # testing does not use are ignored (logged)
    python test.py --output_dir weights/TU_MyoPS2020128/<run> --checkpoint best --save_png
    python test.py --output_dir <run> --checkpoint last --ensemble <run_2> <run_3>   # probabilities averaged
    python test.py --output_dir <run> --heads fused,LGE,T2w   # I-MMSeg: average the fused and two modality heads

The model configuration comes from the checkpoint; a flag given here that
contradicts it is an error, and so is test data preprocessed with other settings
than the training data (unless --allow_preprocessing_mismatch). When a test volume
carries its preprocessing geometry, predictions are mapped back (probabilities
resampled linearly, then argmax) and written in the original geometry; they are
scored against the original label at the original spacing when that label is
readable, otherwise in the processed grid (summary.json says which). Undefined
values (a structure absent from prediction or reference) follow utils.dice_hd95:
NaN, left out of the means, and counted.

Outputs in --test_save_dir (default <run>/test_<split>_<checkpoint>, with _ensemble<N>, _tta, _heads-...,
_postprocess, _released for the options that change the figures; a folder holding another setting's results is
refused unless --overwrite):
metrics.csv, summary.json, test_info.json, <case>_pred.nii.gz, index.html (the setting, the summary and the
cases worst first, with their overlays and files linked: open it in a browser), and with --save_png <case>.png
(the three sequences, then reference and prediction of each class over the sequence it is read on).
With --protocol released, the processed-grid predictions are also scored as the
review release's test.py scores them (utils.released_dice_hd95: HD95 in pixels,
its rule for empty structures, plain means): summary_released_protocol.json and
metrics_released_protocol.csv.
"""
import sys

from engine.evaluation import parse_evaluation_args, run_evaluation


def parse_args(argv=None):
    """The flags (engine/evaluation.py defines them; python test.py --help lists them)."""
    return parse_evaluation_args(argv, __doc__)


def main(argv=None):
    return run_evaluation(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
