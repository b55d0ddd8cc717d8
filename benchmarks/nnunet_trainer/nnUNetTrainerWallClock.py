"""nnU-Net v2's default trainer, shortened to a wall-clock budget (the MyoPS 2020 benchmark's nnU-Net rows).

Only the length of training changes: after the first epoch(s) (IMMSEG_NNUNET_TIMED_EPOCHS, default 1) are
timed, the number of epochs becomes as many as end within IMMSEG_NNUNET_BUDGET_MINUTES, and the poly learning
rate schedule is stretched over exactly those epochs. Everything else (plans, augmentation, loss, network) is
nnU-Net's. The trainer writes what it did to wall_clock_budget.json in its fold folder.

nnU-Net finds it through its nnUNet_extTrainer environment variable pointing at this folder, as
benchmarks/nnunet_myops2020.py sets it; this file needs nnU-Net's environment, never the project's.
"""
import json
import os
import time
from importlib.metadata import version

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_budget import RECORD_FILE, budget_settings, epochs_within_budget


class nnUNetTrainerWallClock(nnUNetTrainer):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.budget_minutes, self.timed_epochs, epoch = budget_settings(os.environ)
        self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = epoch
        self.seconds_per_epoch = None

    def run_training(self):
        """nnU-Net's epoch loop, with the epoch count read before every epoch so that fitting it takes effect."""
        self.on_train_start()
        start = time.perf_counter()
        while self.current_epoch < self.num_epochs:
            self.on_epoch_start()
            self.on_train_epoch_start()
            losses = [self.train_step(next(self.dataloader_train)) for _ in range(self.num_iterations_per_epoch)]
            self.on_train_epoch_end(losses)
            with torch.no_grad():
                self.on_validation_epoch_start()
                self.on_validation_epoch_end([self.validation_step(next(self.dataloader_val))
                                              for _ in range(self.num_val_iterations_per_epoch)])
            self.on_epoch_end()  # its checkpoint and plot count towards the epoch's time
            if self.seconds_per_epoch is None and self.current_epoch == self.timed_epochs:
                self._fit_to_budget((time.perf_counter() - start) / self.timed_epochs)
        training_seconds = time.perf_counter() - start
        self._write_record(training_seconds)
        self.on_train_end()

    def _fit_to_budget(self, seconds_per_epoch):
        self.seconds_per_epoch = seconds_per_epoch
        self.num_epochs = epochs_within_budget(self.budget_minutes * 60.0, seconds_per_epoch, self.timed_epochs)
        self.lr_scheduler.max_steps = self.num_epochs
        self.print_to_log_file(f"wall-clock budget {self.budget_minutes:g} min at {seconds_per_epoch:.1f} s per "
                               f"epoch: {self.num_epochs} epochs of {self.num_iterations_per_epoch} iterations")

    def _write_record(self, training_seconds):
        epochs = self.current_epoch
        record = {"budget_minutes": self.budget_minutes, "timed_epochs": self.timed_epochs,
                  "seconds_per_epoch": self.seconds_per_epoch, "epochs": epochs,
                  "iterations_per_epoch": self.num_iterations_per_epoch,
                  "val_iterations_per_epoch": self.num_val_iterations_per_epoch,
                  "iterations": epochs * self.num_iterations_per_epoch,
                  "seconds_per_iteration": training_seconds / (epochs * self.num_iterations_per_epoch),
                  "training_seconds": training_seconds, "batch_size": int(self.batch_size),
                  "patch_size": [int(size) for size in self.configuration_manager.patch_size],
                  "nnunet_version": version("nnunetv2")}
        path = os.path.join(self.output_folder, RECORD_FILE)
        with open(path + ".tmp", "w") as handle:
            json.dump(record, handle, indent=2)
        os.replace(path + ".tmp", path)
