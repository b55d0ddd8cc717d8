"""The subset stage's training (train.py --subsets_from; documentation/missing_sequences.md): the Trainer's loop,
budget, learning-rate schedule, checkpoints, resume and logging, with the stage's model (the complete run frozen
inside networks.subset_stage.SubsetIMMSeg), step, loss and validation."""
import logging

import numpy as np

from engine.subset_stage import (check_stage_data, complete_run_identity, load_complete_run, stage_spec,
                                 subset_stage_model)
from networks.missing_sequences import SequenceSubset, draw_subset_views, proper_subset_names, proper_subsets
from networks.subset_stage import adapter_parameters_per_subset
from trainer import Trainer, fit_in, mean_pathology_dice, train
from utils import LossWeights, SubsetStageLoss

logger = logging.getLogger("trainer")

STAGE_WEIGHTS = LossWeights(fused=1.0, modality=0.0, contrast=0.0)  # one stage: the subset view's fused head


class SubsetStageTrainer(Trainer):
    """The Trainer on a SubsetIMMSeg: the optimizer holds the subset parameters alone (the complete model's have no
    gradient), every step sees each sample complete and with one proper subset drawn uniformly on the device (its
    second view), and validation scores the mean over the 6 subsets of the mean pathology Dice. Its checkpoints
    record the complete run (``complete_run``)."""

    def __init__(self, args, ctx, model, spec, run_dir, priors_provenance, complete_run):
        super().__init__(args, ctx, model, spec, run_dir, priors_provenance)
        self.complete_run = complete_run
        self.criterion = SubsetStageLoss(args.num_classes, args.soft_target_weight,
                                         args.dice_class_weights).to(ctx.device)
        self.subsets = proper_subsets(model.config.n_modalities, ctx.device)  # on the device: drawn without a wait
        per_subset, complete = adapter_parameters_per_subset(model)
        logger.info("subset stage on %s (frozen, %d parameters): %d new parameters per proper subset (%.2f %%), "
                    "%d subsets; loss: labels + %g x the complete view's probabilities", complete_run["checkpoint"],
                    complete, per_subset, 100.0 * per_subset / complete, len(self.subsets),
                    args.soft_target_weight)

    def weights_for(self, epoch):
        return STAGE_WEIGHTS

    def draw_subset_view(self, batch_size):
        return draw_subset_views(batch_size, self.subsets)

    def step_loss(self, network, images, labels, weights, subset_view):
        """The stage's loss (SubsetStageLoss) on the subset view, with the frozen complete view's probabilities."""
        output = network(images, subset_view=subset_view)
        loss, terms = self.criterion(output, labels)
        return output, loss, terms

    def validation_score(self, should_stop):
        scores = []
        for sequences in proper_subset_names(self.model.config.n_modalities):
            score = mean_pathology_dice(SequenceSubset(self.model, sequences), self.val_set, self.args,
                                        self.ctx.device, should_stop, channels_last=self.path.channels_last)
            if score is None:
                return None
            scores.append(score)
        return float(np.mean(scores))

    def checkpoint(self, rng_states, interrupted=False):
        return {**super().checkpoint(rng_states, interrupted), "complete_run": self.complete_run}


def train_subset_stage_in(run_dir, args, ctx):
    """Build the stage on the complete run of --subsets_from, resume if asked, and train in ``run_dir``."""
    path, checkpoint = load_complete_run(args.subsets_from)
    check_stage_data(args.root_path, checkpoint, path)
    identity = complete_run_identity(path, checkpoint)
    model = subset_stage_model(checkpoint, path)
    trainer = SubsetStageTrainer(args, ctx, model, stage_spec(checkpoint["spec"], identity["sha256"]), run_dir,
                                 checkpoint.get("priors"), identity)
    fit_in(run_dir, args, ctx, trainer, {"complete_run": identity})


def train_subset_stage(args):
    """trainer.train for a subset stage (``args`` from parse_training_args with --subsets_from): its exit code."""
    return train(args, train_subset_stage_in)
