"""Turn multi-sequence NIfTI volumes into the training slices and test volumes that train.py and test.py read.

    python preprocess_data.py --dataset MyoPS2020 --src_path path/to/MyoPS2020 --dst_path data/MyoPS2020
    python preprocess_data.py --dataset MyoPS380 --src_path path/to/MyoPS380_dataset --dst_path data/MyoPS380 --test_every 5
    python preprocess_data.py --dataset Phantom --src_path data/phantom_raw --dst_path data/Phantom --phantom_cases 24

Per case: check that the three sequences and the label share shape and geometry,
map the labels to 0-3, resample in-plane to --spacing (images cubic, labels
nearest), crop or pad to --crop_size around the image centre (the same at training
and test time) or, with --crop_centre heart, around the heart (a region of interest:
training cases centred on their label, validation and test cases on the centres that
locate_heart.py found with a coarse model, never on their own label), and map each
sequence to [0, 1] by the percentiles of its field of view (padding excluded): they
vary less between cases than whole-volume ones.
With --intensity released, intensities are instead clipped to [0, 255] and divided
by 255, as the review release does for its MyoPS380 volumes (already in [0, 255]).

Output (the released code's layout), under --dst_path:
    {bSSFP,LGE,T2w}/train_npz/<case>_sliceNNN.npz   image (C x C, float32 in [0, 1]), label (uint8)
    {bSSFP,LGE,T2w}/test_vol_h5/<case>.npy.h5       image, label (C x C x D) and the geometry to undo it
    train.txt (slices), val.txt and test_vol.txt (cases), dataset.json (settings and summary)
Validation and test cases get volumes, training cases slices. Everything is
written to a staging folder first and moved into place only when all cases
succeeded, so an error leaves the destination as it was. A previous output is
replaced only if it holds nothing but what that run wrote; staging folders of
killed runs are removed once their process is gone.
"""
import sys

from datasets.dataset_writer import parse_preprocessing_args, run_preprocessing


def parse_args(argv=None):
    """The flags (datasets/dataset_writer.py defines them; python preprocess_data.py --help lists them)."""
    return parse_preprocessing_args(argv, __doc__)


def main(argv=None):
    return run_preprocessing(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
