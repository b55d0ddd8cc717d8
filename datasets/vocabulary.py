"""The dataset vocabulary shared by the data, prior and model code: sequence names and order, classes, label maps.

Pure data; it imports nothing, so that ``datasets``, ``priors`` and ``networks`` can all
depend on it without depending on each other.
"""

# The order of the three sequences everywhere: image channels, encoders, prompts, folder names.
MODALITIES = ("bSSFP", "LGE", "T2w")
# Class index -> name; "edema" excludes scar (MyoPS convention).
CLASS_NAMES = ("background", "myocardium", "scar", "edema")
# Raw label code -> class index, per raw dataset (see datasets/layouts.py for the file layouts).
LABEL_MAPS = {
    "MyoPS380": {0: 0, 1: 1, 2: 2, 3: 3},
    "MyoPS2020": {0: 0, 200: 1, 500: 0, 600: 0, 1220: 3, 2221: 2},
}


def dataset_name(myops380):
    """An argparse type that reads the MyoPS380 dataset under either of its names (train.py and test.py call it
    Myops, as the released scripts did; preprocess_data.py MyoPS380) as ``myops380``; other names as typed."""
    def read(text):
        return myops380 if text.lower() in ("myops", "myops380") else text
    return read
