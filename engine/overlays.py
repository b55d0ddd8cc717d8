"""The per-case overlay PNG of test.py and predict.py (--save_png): the three sequences side by side, then each
structure over the sequence that shows it best, the reference filled and the prediction outlined, on the slices
that hold myocardium, with a header (case, Dice per structure) and a legend naming every class.

Drawn with matplotlib's Agg canvas through a Figure of its own (no pyplot, no GUI, no global state).
"""
import math

import numpy as np

from datasets.vocabulary import MODALITIES
from utils import STRUCTURES, atomic_path

# class -> (name, Okabe-Ito colour, the sequence it is read on): colours that readers with a colour-vision deficiency
# tell apart. Normal myocardium is delineated on bSSFP (cine: dark muscle against bright blood), scar on LGE
# (enhancement) and edema on T2w (high signal), as the MyoPS annotators read them.
CLASS_STYLES = {1: ("normal myocardium", "#009E73", "bSSFP"),
                2: ("scar", "#D55E00", "LGE"),
                3: ("edema", "#56B4E9", "T2w")}
# class -> its structure in utils.STRUCTURES (the per-case metrics' names)
CLASS_STRUCTURES = {value: next(name for name, classes in STRUCTURES.items() if classes == (value,))
                    for value in CLASS_STYLES}
FILL_ALPHA = 0.45
PANEL_INCHES = 1.6
DPI = 100


def slices_with_myocardium(prediction, reference=None):
    """Indices of the slices (last axis) where the prediction or the reference holds a class above 0."""
    present = (np.asarray(prediction) > 0).any(axis=(0, 1))
    if reference is not None:
        present |= (np.asarray(reference) > 0).any(axis=(0, 1))
    return np.flatnonzero(present)


def field_of_view(prediction, reference=None, margin=0.3):
    """(rows, columns) slices of a square window around the myocardium of every slice, widened by ``margin`` of
    its size on each side and kept inside the image; the whole image where no slice holds myocardium."""
    mask = np.asarray(prediction) > 0
    if reference is not None:
        mask = mask | (np.asarray(reference) > 0)
    height, width = mask.shape[:2]
    rows, columns = np.flatnonzero(mask.any(axis=(1, 2))), np.flatnonzero(mask.any(axis=(0, 2)))
    if rows.size == 0:
        return slice(0, height), slice(0, width)
    side = max(rows[-1] - rows[0], columns[-1] - columns[0]) + 1
    side = min(int(round(side * (1 + 2 * margin))) + 2, height, width)
    windows = []
    for found, length in ((rows, height), (columns, width)):
        start = int(round((found[0] + found[-1] + 1) / 2 - side / 2))
        start = min(max(start, 0), length - side)
        windows.append(slice(start, start + side))
    return tuple(windows)


def class_dice(metrics):
    """{class name: Dice} for the header, from per-case metrics {structure: (dice, hd95)} (utils.case_metrics)."""
    return {name: metrics[CLASS_STRUCTURES[value]][0] for value, (name, _, _) in CLASS_STYLES.items()}


def header_text(case, dice=None, note=None):
    """``case · Dice normal myocardium 0.812, scar 0.653, edema n/a`` (Dice where a reference exists)."""
    text = str(case)
    if dice is not None:
        parts = [f"{name} {'n/a' if value is None or not math.isfinite(value) else f'{value:.3f}'}"
                 for name, value in dice.items()]
        text += " · Dice " + ", ".join(parts)
    return text + (f"\n{note}" if note else "")


def overlay_figure(case, images, prediction, reference=None, dice=None, note=None, unused=()):
    """The overlay as a matplotlib Figure.

    ``images`` (M, H, W, Z) in [0, 1], sequences in the order of MODALITIES; ``prediction`` and ``reference``
    (H, W, Z) labels 0-3 (``reference`` None: prediction only); ``dice`` {structure name: Dice or NaN} for the
    header; ``note`` a second header line; ``unused`` the sequences the model was not given (titled so).
    Slices holding no myocardium in reference or prediction are left out (the middle one is drawn, said in the
    header, when none does); every panel shows the same window around the myocardium. The panels form one image
    on one Axes (a grid of Axes would take seconds per case).
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    images, prediction = np.asarray(images, dtype=np.float32), np.asarray(prediction)
    reference = None if reference is None else np.asarray(reference)
    rows = slices_with_myocardium(prediction, reference)
    if rows.size == 0:
        rows = np.asarray([prediction.shape[-1] // 2])
        note = "; ".join(filter(None, [note, "no slice holds myocardium: the middle slice is shown"]))
    window = field_of_view(prediction, reference)
    images, prediction = images[(slice(None), *window)], prediction[window]
    reference = None if reference is None else reference[window]
    # panels: (title, the sequence drawn, the class drawn over it or None)
    panels = [(f"{name}\n(not used)" if name in unused else name, index, None)
              for index, name in enumerate(MODALITIES)]
    panels += [(f"{name} on {sequence}", MODALITIES.index(sequence), value)
               for value, (name, _, sequence) in CLASS_STYLES.items()]
    mosaic, outlines, origins = panel_mosaic(images, prediction, reference, rows, panels)

    height, width = prediction.shape[:2]
    inches_per_pixel = PANEL_INCHES / max(height, width)
    left, right, top, bottom = 0.3, 0.1, 0.72 + 0.18 * bool(note), 0.45
    figure_width = left + right + mosaic.shape[1] * inches_per_pixel
    figure_height = top + bottom + mosaic.shape[0] * inches_per_pixel
    figure = Figure(figsize=(figure_width, figure_height), dpi=DPI)
    axes = figure.add_axes((left / figure_width, bottom / figure_height, 1 - (left + right) / figure_width,
                            1 - (top + bottom) / figure_height))
    axes.set_axis_off()
    axes.imshow(mosaic, interpolation="nearest")
    for value, mask in outlines.items():
        draw_outline(axes, mask, CLASS_STYLES[value][1])
    axes.set_xlim(-0.5, mosaic.shape[1] - 0.5)
    axes.set_ylim(mosaic.shape[0] - 0.5, -0.5)
    for (title, _, _), x in zip(panels, origins[1]):
        axes.text(x + (width - 1) / 2, -1, title, ha="center", va="bottom", fontsize=8)
    for z, y in zip(rows, origins[0]):
        axes.text(-1, y + (height - 1) / 2, f"slice {z}", ha="right", va="center", rotation=90, fontsize=8)
    figure.suptitle(header_text(case, dice, note), y=1 - 0.08 / figure_height, va="top", fontsize=10)

    handles = [Patch(facecolor=colour, edgecolor=colour, label=name) for name, colour, _ in CLASS_STYLES.values()]
    if reference is not None:
        handles.append(Patch(facecolor="0.5", alpha=FILL_ALPHA, label="reference: filled"))
    handles.append(Line2D([], [], color="0.6", linewidth=1.2, label="prediction: outline",
                          path_effects=outline_effects()))
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False,
                  bbox_to_anchor=(0.5, 0.04 / figure_height))
    return figure


def panel_mosaic(images, prediction, reference, rows, panels, gap=2):
    """(RGB mosaic of the panels, one row per slice in ``rows``, with the reference's class filled in the class
    panels; {class: mask of the prediction's class in its panels, mosaic-sized}; (row origins, column origins))."""
    from matplotlib.colors import to_rgb

    height, width = prediction.shape[:2]
    row_origins = [index * (height + gap) for index in range(len(rows))]
    column_origins = [index * (width + gap) for index in range(len(panels))]
    mosaic = np.ones((row_origins[-1] + height, column_origins[-1] + width, 3), dtype=np.float32)
    outlines = {}
    for z, y in zip(rows, row_origins):
        for (_, sequence, value), x in zip(panels, column_origins):
            tile = np.repeat(np.clip(images[sequence, :, :, z], 0, 1)[..., None], 3, axis=-1)
            if value is not None:
                if reference is not None:
                    filled = reference[:, :, z] == value
                    tile[filled] = (1 - FILL_ALPHA) * tile[filled] + FILL_ALPHA * np.asarray(
                        to_rgb(CLASS_STYLES[value][1]), dtype=np.float32)
                outlines.setdefault(value, np.zeros(mosaic.shape[:2], dtype=bool))
                outlines[value][y:y + height, x:x + width] = prediction[:, :, z] == value
            mosaic[y:y + height, x:x + width] = tile
    return mosaic, outlines, (row_origins, column_origins)


def outline_effects():
    """A dark edge under the prediction's outline, so that it stands out from the fill and the image."""
    from matplotlib.patheffects import Normal, Stroke

    return [Stroke(linewidth=2.4, foreground="black"), Normal()]


def draw_outline(axes, mask, colour):
    """The outline of ``mask`` (pixel centres at integer coordinates, as imshow's)."""
    if not mask.any():
        return
    height, width = mask.shape
    # padded by a pixel, so that a structure touching the border is closed
    outline = axes.contour(np.arange(-1, width + 1), np.arange(-1, height + 1), np.pad(mask, 1).astype(np.float32),
                           levels=[0.5], colors=[colour], linewidths=1.2)
    outline.set_path_effects(outline_effects())


def save_overlay(path, case, images, prediction, reference=None, dice=None, note=None, unused=()):
    """Write :func:`overlay_figure` as a PNG, atomically."""
    figure = overlay_figure(case, images, prediction, reference, dice, note, unused)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=DPI)
