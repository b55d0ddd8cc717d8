"""progress.png of a run folder: per epoch the training loss and its terms, the validation mean pathology Dice and
the learning rate, with the changes of the loss stages marked.

It is drawn from the run's history, a few numbers per epoch kept in TrainState (so in every checkpoint: a resumed
run draws the epochs before it), out of the losses the trainer has already read back from the device. The drawing
runs in a thread of its own, after the epoch's checkpoint is submitted; a failure to draw is logged and never stops
training.
"""
import copy
import logging
import math
import threading
from pathlib import Path

from utils import atomic_path

logger = logging.getLogger("trainer")

WEIGHT_NAMES = {"fused": "fused head", "modality": "modality heads", "contrast": "contrastive loss"}
# Okabe-Ito colours for the loss terms, in the order they first appear
TERM_COLOURS = ("#E69F00", "#56B4E9", "#009E73", "#D55E00", "#0072B2", "#CC79A7", "#F0E442")


def add_losses(partial, total, terms, learning_rate):
    """Add a step's losses, read back from the device, to the epoch's sums ``partial`` (TrainState.epoch_losses,
    saved in every checkpoint, so that an epoch interrupted and resumed counts all its steps): ``total`` and its
    ``terms`` ({name: value}; a stage change within the epoch changes them), and its learning rate."""
    sums, counts = partial.setdefault("sums", {}), partial.setdefault("counts", {})
    for name, value in (("loss", total), *terms.items()):
        sums[name] = sums.get(name, 0.0) + value
        counts[name] = counts.get(name, 0) + 1
    partial["lr"] = float(learning_rate)


def close_epoch(partial, epoch, weights, val_dice):
    """The epoch's entry of TrainState.history from its sums ``partial``, which start afresh: ``epoch`` counted from
    1, the mean loss and terms, the learning rate of its last step, ``val_dice`` (None where not validated) and the
    loss ``weights`` (a LossWeights) of its stage."""
    sums, counts = partial.pop("sums", {}), partial.pop("counts", {})
    means = {name: sums[name] / counts[name] for name in sums}
    return {"epoch": int(epoch), "loss": means.pop("loss", None), "terms": means, "lr": partial.pop("lr", None),
            "val_dice": val_dice, "weights": {name: float(value) for name, value in weights._asdict().items()}}


def defined(value):
    """NaN for a value the history does not have (None), for plotting."""
    return math.nan if value is None else value


def stage_changes(history):
    """[(epoch, description)] of the epochs whose loss weights differ from the epoch before's."""
    changes = []
    for before, entry in zip(history, history[1:]):
        if entry["weights"] == before["weights"]:
            continue
        words = [f"{WEIGHT_NAMES.get(name, name)} {'on' if value else 'off'}"
                 for name, value in entry["weights"].items()
                 if bool(value) != bool(before["weights"].get(name, 0.0))]
        changes.append((entry["epoch"], ", ".join(words) or "loss weights changed"))
    return changes


def progress_figure(history, title="training progress"):
    """The curves of ``history`` (TrainState.history) as a matplotlib Figure: loss and terms, validation Dice,
    learning rate, one panel each over the epochs, stage changes as dotted lines."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [entry["epoch"] for entry in history]
    figure = Figure(figsize=(8, 7.5), dpi=100, layout="constrained")
    loss_axes, dice_axes, lr_axes = figure.subplots(3, 1, sharex=True, height_ratios=(2, 1.3, 1))
    figure.suptitle(f"{title}: {len(history)} epochs", fontsize=11)

    loss_axes.plot(epochs, [defined(entry["loss"]) for entry in history], color="black", marker=".",
                   label="loss (weighted sum)")
    terms = list(dict.fromkeys(name for entry in history for name in entry["terms"]))
    for name, colour in zip(terms, TERM_COLOURS * (len(terms) // len(TERM_COLOURS) + 1)):
        loss_axes.plot(epochs, [entry["terms"].get(name, math.nan) for entry in history], color=colour,
                       linewidth=1, marker=".", markersize=4, label=name)
    values = [value for entry in history for value in (defined(entry["loss"]), *entry["terms"].values())
              if math.isfinite(value)]
    if values and min(values) > 0:
        loss_axes.set_yscale("log")
    loss_axes.set_ylabel("training loss\n(mean per epoch)")
    loss_axes.legend(fontsize=8, title="terms unweighted", title_fontsize=8, loc="upper left",
                     bbox_to_anchor=(1.01, 1))

    validated = [(entry["epoch"], entry["val_dice"]) for entry in history if entry.get("val_dice") is not None]
    if validated:
        dice_axes.plot(*zip(*validated), color="#0072B2", marker="o", markersize=4)
        best_epoch, best = max(validated, key=lambda point: point[1])
        dice_axes.plot([best_epoch], [best], marker="*", markersize=12, color="#D55E00", linestyle="none",
                       label=f"best {best:.4f} (epoch {best_epoch})")
        dice_axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    else:
        dice_axes.text(0.5, 0.5, "not validated yet", transform=dice_axes.transAxes, ha="center", va="center")
    dice_axes.set_ylim(-0.02, 1.02)
    dice_axes.set_ylabel("validation mean\npathology Dice")

    lr_axes.plot(epochs, [defined(entry["lr"]) for entry in history], color="#009E73")
    lr_axes.set_ylabel("learning rate\n(last step)")
    lr_axes.set_xlabel("epoch")
    lr_axes.xaxis.set_major_locator(MaxNLocator(integer=True))

    for epoch, description in stage_changes(history):
        for axes in (loss_axes, dice_axes, lr_axes):
            axes.axvline(epoch - 0.5, color="0.4", linestyle=":", linewidth=1)
        loss_axes.annotate(description, (epoch - 0.5, 0), xycoords=("data", "axes fraction"), xytext=(3, 3),
                           textcoords="offset points", va="bottom", fontsize=8, color="0.3", rotation=90)
    for axes in (loss_axes, dice_axes, lr_axes):
        axes.grid(alpha=0.3)
    return figure


def write_progress(path, history, title="training progress"):
    """:func:`progress_figure` written as a PNG, atomically."""
    figure = progress_figure(history, title)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")


class ProgressWriter:
    """Draws ``path`` from a copy of the history in a thread of its own, one drawing at a time; a failure is a
    warning in the log."""

    def __init__(self, path):
        self.path = Path(path)
        self._thread = None

    def submit(self, history):
        self.wait()
        self._thread = threading.Thread(target=self._draw, args=(copy.deepcopy(history),), name="progress-writer")
        self._thread.start()

    def _draw(self, history):
        try:
            write_progress(self.path, history, f"training progress of {self.path.parent.name}")
        except Exception as error:  # noqa: BLE001 - a figure that cannot be drawn must never stop training
            logger.warning("%s not drawn: %s: %s", self.path, type(error).__name__, error)

    def wait(self):
        if self._thread is not None:
            self._thread.join()
            self._thread = None
