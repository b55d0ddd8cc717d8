"""The wall-clock budget of nnUNetTrainerWallClock: settings passed through the environment, budget -> iterations.

Pure Python, so that the benchmark (the project's environment) and the trainer (nnU-Net's) share it.
"""
import math

BUDGET_MINUTES = "IMMSEG_NNUNET_BUDGET_MINUTES"
TIMED_ITERATIONS = "IMMSEG_NNUNET_TIMED_ITERATIONS"
ITERATIONS_PER_EPOCH = "IMMSEG_NNUNET_ITERATIONS_PER_EPOCH"
RECORD_FILE = "wall_clock_budget.json"  # written by the trainer into its fold folder
NNUNET_ITERATIONS_PER_EPOCH = 250  # nnU-Net's training and validation iterations per epoch
NNUNET_VAL_ITERATIONS_PER_EPOCH = 50
DEFAULT_TIMED_ITERATIONS = 25  # training iterations timed before the budget is fitted


def budget_environment(budget_minutes, timed_iterations=DEFAULT_TIMED_ITERATIONS, iterations_per_epoch=None):
    """Environment variables that carry the budget to the trainer."""
    environment = {BUDGET_MINUTES: repr(float(budget_minutes)), TIMED_ITERATIONS: str(int(timed_iterations))}
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
    """(budget minutes, timed iterations, (training, validation) iterations per epoch) from the environment.

    Without ITERATIONS_PER_EPOCH, nnU-Net's epoch (250 + 50); a shorter one (smoke tests) keeps its 5:1 ratio."""
    budget = _number(environment, BUDGET_MINUTES, float)
    timed = _number(environment, TIMED_ITERATIONS, int, DEFAULT_TIMED_ITERATIONS)
    per_epoch = _number(environment, ITERATIONS_PER_EPOCH, int, NNUNET_ITERATIONS_PER_EPOCH)
    validation = max(1, round(per_epoch * NNUNET_VAL_ITERATIONS_PER_EPOCH / NNUNET_ITERATIONS_PER_EPOCH))
    return budget, timed, (per_epoch, validation)


def iterations_within_budget(budget_seconds, seconds_per_iteration, seconds_per_epoch_end, iterations_per_epoch,
                              iterations_done):
    """Total training iterations of a run: as many as end within the budget when every training iteration takes
    ``seconds_per_iteration`` and every epoch, the last one possibly shortened, ends with ``seconds_per_epoch_end``
    of validation and checkpointing; never fewer than those done."""
    if min(budget_seconds, seconds_per_iteration, iterations_per_epoch) <= 0 or seconds_per_epoch_end < 0:
        raise ValueError(f"budget {budget_seconds} s, {seconds_per_iteration} s per iteration, "
                         f"{seconds_per_epoch_end} s per epoch's end, {iterations_per_epoch} iterations per epoch: "
                         "all must be positive, the epoch's end may be 0")
    full_epochs, rest = divmod(budget_seconds, iterations_per_epoch * seconds_per_iteration + seconds_per_epoch_end)
    last_epoch = min(iterations_per_epoch - 1, max(0, int((rest - seconds_per_epoch_end) // seconds_per_iteration)))
    return max(int(iterations_done), int(full_epochs) * iterations_per_epoch + last_epoch)
