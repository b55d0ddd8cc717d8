"""Segment new patients: raw three-sequence NIfTI cases in, label volumes in each patient's own geometry out.

    python predict.py --input_dir IN --output_dir OUT --run weights/TU_MyoPS2020128/<run> [--checkpoint best] \
        [--tta] [--postprocess] [--save_png] [--label_values myops2020]
    python predict.py --input_dir IN --output_dir OUT --run <fold_0> <fold_1> <fold_2> ...    # an ensemble

IN holds cases in a layout that preprocess_data.py reads: MyoPS380 (Raw_data/{bSSFP,LGE,T2w}/<case>.nii.gz)
or MyoPS 2020 (flat myops_training_1XX_{C0,DE,T2}.nii.gz or myops_test_2XX_..., or per case
<case>/<case>_{C0,LGE or DE,T2}.nii.gz), files ending in .nii or .nii.gz. Labels are not needed and,
where present, not read. Each case is preprocessed as the run's training data was (the record in the
checkpoint, or the dataset.json of its training data), its slices are predicted in batches by the
inference copy of the model, and the class probabilities are mapped back to the original grid
(resampled linearly, then argmax), as test.py does. A run trained on heart-centred crops
(preprocess_data.py --crop_centre heart) needs --locator_run, a coarse run that finds the heart
first (locate_heart.py); its crop is then placed around that centre. Several runs (--run A B C) form
an ensemble: their class probabilities (each after its flip TTA with --tta) are averaged before the
argmax; they must share the preprocessing record, the sequence order and img_size. --postprocess keeps
only the largest connected myocardium in the final labels. A case without one or two of its sequences
(no file) is predicted from those it has when every run is a subset stage (train.py --subsets_from, see
documentation/missing_sequences.md), and skipped with the reason otherwise.

Outputs in OUT: <case>.nii.gz (0 background, 1 normal myocardium, 2 scar, 3 edema, or the challenge's
200, 2221, 1220 with --label_values myops2020) with the shape, affine and header of the input LGE (of the
first sequence present when it has no LGE); <case>.png with --save_png (processed grid: the three
sequences, then each class outlined over the sequence it is read on, with a legend); volumes.csv (per
case the sequences the prediction used, the mL of normal myocardium, scar, edema and whole myocardium,
scar and edema as % of the whole myocardium, the checkpoint or the ensemble's checkpoints, separated by
';'; for a case that failed, the reason in "error" and no volumes); index.html (the setting, the volumes
with the overlays and files linked, the failed cases with their reason: open it in a browser). A
structure that the sequences a case has cannot measure (scar without LGE, edema without T2w: the measured table of
engine/subset_limits.py) gets no volume: its columns stay empty, "not_measurable" and the log say why.
Cases are read, predicted and written one at a time, each file atomically. A case that fails at any stage
(a sequence missing for a model that needs it, sequences of different shape or orientation, an empty or
unreadable file, no heart found by the locator, an error in preprocessing,
inference or export) is reported with the reason and skipped, the others are predicted; the exit code
is then 1.
"""
import sys

from engine.prediction import parse_prediction_args, run_prediction


def parse_args(argv=None):
    """The flags (engine/prediction.py defines them; python predict.py --help lists them)."""
    return parse_prediction_args(argv, __doc__)


def main(argv=None):
    return run_prediction(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
