"""The wall-clock budget of nnUNetTrainerWallClock: settings passed through the environment, budget -> epochs.

Pure Python, so that the benchmark (the project's environment) and the trainer (nnU-Net's) share it.
"""
import math

BUDGET_MINUTES = "IMMSEG_NNUNET_BUDGET_MINUTES"
TIMED_EPOCHS = "IMMSEG_NNUNET_TIMED_EPOCHS"
ITERATIONS_PER_EPOCH = "IMMSEG_NNUNET_ITERATIONS_PER_EPOCH"
RECORD_FILE = "wall_clock_budget.json"  # written by the trainer into its fold folder
NNUNET_ITERATIONS_PER_EPOCH = 250  # nnU-Net's training and validation iterations per epoch
NNUNET_VAL_ITERATIONS_PER_EPOCH = 50


def budget_environment(budget_minutes, timed_epochs=1, iterations_per_epoch=None):
    """Environment variables that carry the budget to the trainer."""
    environment = {BUDGET_MINUTES: repr(float(budget_minutes)), TIMED_EPOCHS: str(int(timed_epochs))}
    if iterations_per_epoch is not None:
        environment[ITERATIONS_PER_EPOCH] = str(int(iterations_per_epoch))
    return environment


def _number(environment, name, kind, default=None):
    text = environment.get(name)
    if text is None:
        if default is None:
            raise ValueError(f"nnUNetTrainerWallClock needs the environment variable {name}")
        return default
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not a {kind.__name__}") from None
    if not value > 0 or (kind is float and not math.isfinite(value)):
        raise ValueError(f"environment variable {name}={text!r} must be positive")
    return value


def budget_settings(environment):
    """(budget minutes, timed epochs, (training, validation) iterations per epoch) from the environment.

    Without ITERATIONS_PER_EPOCH, nnU-Net's epoch (250 + 50); a shorter one (smoke tests) keeps its 5:1 ratio."""
    budget = _number(environment, BUDGET_MINUTES, float)
    timed = _number(environment, TIMED_EPOCHS, int, 1)
    per_epoch = _number(environment, ITERATIONS_PER_EPOCH, int, NNUNET_ITERATIONS_PER_EPOCH)
    validation = max(1, round(per_epoch * NNUNET_VAL_ITERATIONS_PER_EPOCH / NNUNET_ITERATIONS_PER_EPOCH))
    return budget, timed, (per_epoch, validation)


def epochs_within_budget(budget_seconds, seconds_per_epoch, epochs_done):
    """Total epochs of a run whose epochs take ``seconds_per_epoch``: as many as end within the budget, counting
    those done, and never fewer than those done."""
    if budget_seconds <= 0 or seconds_per_epoch <= 0 or epochs_done < 1:
        raise ValueError(f"budget {budget_seconds} s, {seconds_per_epoch} s per epoch and {epochs_done} epochs done: "
                         "all must be positive")
    return max(int(epochs_done), int(budget_seconds // seconds_per_epoch))
