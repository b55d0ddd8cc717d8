"""nnU-Net v2's default trainer, shortened to a wall-clock budget (the MyoPS 2020 benchmark's nnU-Net rows).

Only the length of training changes. After the first training iterations (IMMSEG_NNUNET_TIMED_ITERATIONS,
default 25) are timed, the run gets as many iterations as end within IMMSEG_NNUNET_BUDGET_MINUTES, its last
epoch shortened, each epoch still ending with nnU-Net's validation and checkpoint. Until the first epoch's end
has been timed, it is assumed to cost one training iteration per validation iteration (validation does no
backward pass, so this errs towards fewer iterations); the budget is fitted again once it has been timed. nnU-Net's
poly learning rate schedule is stretched over exactly those iterations, stepped every iteration instead of every
epoch so that a run of a few epochs still follows the curve. Everything else (plans, augmentation, loss, network)
is nnU-Net's. The trainer writes what it did to wall_clock_budget.json in its fold folder.

nnU-Net finds it through its nnUNet_extTrainer environment variable pointing at this folder, as
benchmarks/nnunet_myops2020.py sets it; this file needs nnU-Net's environment, never the project's.
"""
import json
import math
import os
import time
from importlib.metadata import version

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_budget import RECORD_FILE, budget_settings, iterations_within_budget


class nnUNetTrainerWallClock(nnUNetTrainer):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.budget_minutes, self.timed_iterations, epoch = budget_settings(os.environ)
        self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = epoch
        self.total_iterations = None  # fitted once the first iterations are timed
        self.iterations_done = 0
        self.seconds_per_iteration = None
        self.seconds_per_epoch_end = None  # validation, logging and checkpoint of one epoch, once timed

    def run_training(self):
        """nnU-Net's epoch loop, with the iteration count fitted to the budget while it runs."""
        self.on_train_start()
        start = time.perf_counter()
        training_iterations_seconds = 0.0
        while self.current_epoch < self.num_epochs:
            epoch_start = time.perf_counter()
            self.on_epoch_start()
            self.on_train_epoch_start()
            losses = []
            while len(losses) < self._iterations_this_epoch():
                self.lr_scheduler.step(self.iterations_done / self.num_iterations_per_epoch)
                losses.append(self.train_step(next(self.dataloader_train)))
                self.iterations_done += 1
                if self.iterations_done == self.timed_iterations:
                    self._fit_to_budget(training_iterations_seconds + time.perf_counter() - epoch_start)
            self.on_train_epoch_end(losses)
            epoch_end = time.perf_counter()
            training_iterations_seconds += epoch_end - epoch_start
            with torch.no_grad():
                self.on_validation_epoch_start()
                self.on_validation_epoch_end([self.validation_step(next(self.dataloader_val))
                                              for _ in range(self.num_val_iterations_per_epoch)])
            self.on_epoch_end()  # its checkpoint and plot count towards the epoch's end
            if self.seconds_per_epoch_end is None:
                self.seconds_per_epoch_end = time.perf_counter() - epoch_end
                if self.total_iterations is not None:
                    self._fit_to_budget(training_iterations_seconds)
        training_seconds = time.perf_counter() - start
        self._write_record(training_seconds)
        self.on_train_end()

    def _iterations_this_epoch(self):
        if self.total_iterations is None:
            return self.num_iterations_per_epoch
        return min(self.num_iterations_per_epoch,
                   self.total_iterations - self.current_epoch * self.num_iterations_per_epoch)

    def _fit_to_budget(self, training_iterations_seconds):
        """Fit the run to the budget from the seconds its training iterations have taken so far."""
        self.seconds_per_iteration = training_iterations_seconds / self.iterations_done
        epoch_end = self.seconds_per_epoch_end
        if epoch_end is None:
            epoch_end = self.num_val_iterations_per_epoch * self.seconds_per_iteration
        self.total_iterations = iterations_within_budget(self.budget_minutes * 60.0, self.seconds_per_iteration,
                                                         epoch_end, self.num_iterations_per_epoch,
                                                         self.iterations_done)
        self.num_epochs = math.ceil(self.total_iterations / self.num_iterations_per_epoch)
        self.lr_scheduler.max_steps = self.total_iterations / self.num_iterations_per_epoch
        self.print_to_log_file(
            f"wall-clock budget {self.budget_minutes:g} min at {self.seconds_per_iteration:.2f} s per iteration and "
            f"{'an assumed ' if self.seconds_per_epoch_end is None else ''}{epoch_end:.1f} s per epoch's end: "
            f"{self.total_iterations} iterations in {self.num_epochs} epochs of up to {self.num_iterations_per_epoch}")

    def _write_record(self, training_seconds):
        record = {"budget_minutes": self.budget_minutes, "timed_iterations": self.timed_iterations,
                  "seconds_per_iteration_timed": self.seconds_per_iteration,
                  "seconds_per_epoch_end": self.seconds_per_epoch_end, "epochs": self.current_epoch,
                  "iterations_per_epoch": self.num_iterations_per_epoch,
                  "val_iterations_per_epoch": self.num_val_iterations_per_epoch,
                  "iterations": self.iterations_done,
                  "seconds_per_iteration": training_seconds / self.iterations_done,
                  "training_seconds": training_seconds, "batch_size": int(self.batch_size),
                  "patch_size": [int(size) for size in self.configuration_manager.patch_size],
                  "nnunet_version": version("nnunetv2")}
        path = os.path.join(self.output_folder, RECORD_FILE)
        with open(path + ".tmp", "w") as handle:
            json.dump(record, handle, indent=2)
        os.replace(path + ".tmp", path)
