"""The training loop: the Trainer, its iteration budget and learning-rate schedule, validation, compilation, and
:func:`train`, a whole run as train.py starts it.

Rank 0 alone logs, writes TensorBoard and saves; the checkpoint format is engine.checkpoints', run folders
engine.runs', processes, seeding and stop signals engine.distributed's.
"""
import contextlib
import datetime
import logging
import math
import signal
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets.dataset_myops import MyoPSDataset, RandomGenerator
from datasets.preprocessing_record import read_preprocessing
from engine.checkpoint_writer import BackgroundCheckpointWriter, CheckpointWriteError
from engine.checkpoints import (CHECKPOINT_FORMAT, CheckpointError, TrainState, load_checkpoint, load_model_state,
                                newest_epoch_checkpoint, spec_differences)
from engine.distributed import (PositionSeededSampler, SeededAugmentation, StopRequest, TrainingInterrupted,
                                all_rng_states, leave_stop_signals_to_the_trainer, rng_state, seed_everything,
                                set_rng_state, setup_distributed)
from engine.options import device_path, resolve_device_defaults, run_directory
from engine.progress import ProgressWriter, add_losses, close_epoch
from engine.runs import (check_run_folder, configure_logging, git_commit, plain_values, run_folder_lock,
                         tensorboard_writer, write_run_config)
from engine.training import build, open_run_folder
from networks.npz_weights import PretrainedWeightsError
from networks.inference import autocast_context, predict_volume, warn_if_bf16_is_emulated
from networks.vit_seg_configs import with_switch_defaults
from networks.vit_seg_modeling import compile_regions
from priors import EncoderUnavailableError, PriorFileError, PromptFileError
from priors.store import embeddings_sha256
from utils import BASELINE_WEIGHTS, PATHOLOGY, IMMSegLoss, case_metrics, loss_weights

logger = logging.getLogger("trainer")


def iteration_budget(args, iterations_per_epoch, model_name):
    """Iterations of the run: ``max_epochs`` epochs, cut by ``--max_iterations`` if that is smaller.

    Epochs or a cap that would end I-MMSeg training before its fused head (the inference output)
    starts training are refused; a cap that shortens the run is logged with the epoch it ends in.
    """
    planned = args.max_epochs * iterations_per_epoch
    if model_name == "immseg" and args.max_epochs <= args.region_fusion_start_epoch:
        raise ValueError(f"--max_epochs {args.max_epochs} ends training before the fused head, the only one used at "
                         f"inference, starts training in epoch {args.region_fusion_start_epoch + 1} "
                         f"(--region_fusion_start_epoch {args.region_fusion_start_epoch}, counted from 0): raise "
                         f"--max_epochs above {args.region_fusion_start_epoch} or lower --region_fusion_start_epoch "
                         "(left unset, it is fitted to a short run)")
    if args.max_iterations is None or args.max_iterations >= planned:
        return planned
    if args.max_iterations < 1:
        raise ValueError(f"--max_iterations must be positive, got {args.max_iterations}")
    last_epoch = math.ceil(args.max_iterations / iterations_per_epoch)  # counted from 1
    described = (f"--max_iterations {args.max_iterations} ends training in epoch {last_epoch} of "
                 f"{args.max_epochs} ({iterations_per_epoch} iterations per epoch, {planned} for all epochs)")
    if model_name == "immseg" and last_epoch <= args.region_fusion_start_epoch:
        raise ValueError(f"{described}, before the fused head, the only one used at inference, starts training "
                         f"in epoch {args.region_fusion_start_epoch + 1} (--region_fusion_start_epoch "
                         f"{args.region_fusion_start_epoch}, counted from 0): raise or drop --max_iterations, or "
                         "lower --region_fusion_start_epoch")
    logger.info("%s: the run is shortened", described)
    return args.max_iterations


def poly_lr(base_lr, iteration, max_iterations):
    return base_lr * (1.0 - iteration / max_iterations) ** 0.9


def mean_pathology_dice(model, dataset, args, device, should_stop=lambda: False, channels_last=False):
    """Mean over validation volumes of the mean of scar and edema Dice, in the processed grid; None when
    ``should_stop()`` turned true after a volume (a stop signal). ``channels_last``: the model's layout."""
    scores = []
    for index in range(len(dataset)):
        if index and should_stop():
            return None
        volume = dataset[index]
        probabilities = predict_volume(model, volume["image"], args.img_size, args.batch_slices, device, args.amp,
                                       channels_last=channels_last)
        prediction = probabilities.argmax(dim=0).numpy()
        metrics = case_metrics(prediction, volume["label"].numpy(), spacing=None)
        dice = np.asarray([metrics[name][0] for name in PATHOLOGY], dtype=np.float64)
        # a volume without scar and edema in reference and prediction has no defined pathology Dice
        scores.append(dice[np.isfinite(dice)].mean() if np.isfinite(dice).any() else math.nan)
    scores = np.asarray(scores, dtype=np.float64)
    return float(np.nanmean(scores)) if np.isfinite(scores).any() else 0.0


def training_loader(train_set, args, ctx):
    """(sampler, loader) of the training slices as train.py feeds them: position-seeded order, augmentation
    ``args.augmentation`` at ``args.img_size``, ``args.batch_size`` per process, ``args.num_workers`` workers."""
    sampler = PositionSeededSampler(train_set, ctx.world_size, ctx.rank, args.seed)
    augmented = SeededAugmentation(train_set, RandomGenerator((args.img_size, args.img_size), args.augmentation))
    # The loader's own generator keeps its worker seeds off the global stream that the model draws from.
    loader = DataLoader(augmented, args.batch_size, sampler=sampler, drop_last=True, num_workers=args.num_workers,
                        pin_memory=ctx.device.type == "cuda", persistent_workers=args.num_workers > 0,
                        worker_init_fn=leave_stop_signals_to_the_trainer,
                        generator=torch.Generator().manual_seed(args.seed))
    return sampler, loader


class Trainer:
    """Trains one model on one preprocessed dataset; see train.py for the flags."""

    def __init__(self, args, ctx, model, spec, run_dir, priors_provenance=None):
        self.args, self.ctx, self.spec, self.run_dir = args, ctx, spec, run_dir
        self.priors_provenance = priors_provenance
        self.path = device_path(ctx.device)
        self.model = model.to(ctx.device)
        if self.path.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.preprocessing = read_preprocessing(args.root_path)
        self.train_set = MyoPSDataset(args.root_path, args.list_dir, "train")
        val_list = Path(args.list_dir) / "val.txt"
        self.val_set = (MyoPSDataset(args.root_path, args.list_dir, "val")
                        if val_list.is_file() and val_list.read_text().strip() else None)
        if len(self.train_set) < args.batch_size * ctx.world_size:
            raise ValueError(f"{len(self.train_set)} training slices in {args.list_dir / 'train.txt'} are fewer than "
                             f"one global batch ({args.batch_size} x {ctx.world_size} processes)")
        self.sampler, self.loader = training_loader(self.train_set, args, ctx)
        self.max_iterations = iteration_budget(args, len(self.loader), spec["model"])
        trainable = [parameter for parameter in self.model.parameters() if parameter.requires_grad]
        self.optimizer = make_optimizer(trainable, args.base_lr, args.weight_decay, ctx.device)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=args.amp == "fp16")
        warn_if_bf16_is_emulated(ctx.device, args.amp, logger)
        self.criterion = IMMSegLoss(args.num_classes, model.config.contrast, args.dice_class_weights,
                                    self.path.fixed_size_contrast).to(ctx.device)
        self.state = TrainState()
        self.stop = StopRequest()
        self.writer = None
        self.git_commit = git_commit()
        self.checkpoint_writer = BackgroundCheckpointWriter()
        self.pending_losses = []  # (iteration, lr, loss, terms) of the steps whose losses are still on the device
        self.last_losses = None  # (loss, {term: value}) of the last step read back
        self.progress = ProgressWriter(run_dir / "progress.png")
        self.compile_mode = getattr(args, "compile", "off") or "off"
        self.compiled_stages = set()  # loss weights whose compiled step has run once
        if self.compile_mode != "off" and not compile_in_place(self.model, self.criterion, self.compile_mode):
            self.compile_mode = "off"

    # checkpoints -------------------------------------------------------------------------------------------
    def checkpoint(self, rng_states, interrupted=False):
        return {"format": CHECKPOINT_FORMAT, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "train_state": asdict(self.state), "interrupted": interrupted,
                "rng": rng_states, "spec": self.spec, "args": plain_values(vars(self.args)),
                "priors": self.priors_provenance, "preprocessing": self.preprocessing, "git_commit": self.git_commit,
                "saved": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

    def save(self, names, interrupted=False, wait=False):
        """Write the training state under ``names`` in the background (``wait``: before returning). The losses
        of the steps since the last read are checked first, so a non-finite loss never reaches a checkpoint.
        A save of last.pth alone is skipped while the previous save is still being written (the next epoch's
        comes soon); every other save waits for it."""
        self.read_losses()
        rng_states = all_rng_states(self.ctx)
        if not self.ctx.is_main:
            return
        paths = [self.run_dir / name for name in names]
        optional = names == ["last.pth"] and not interrupted and not wait
        if self.checkpoint_writer.submit(self.checkpoint(rng_states, interrupted), paths, skip_if_busy=optional):
            logger.info("saving %s (epoch %d, iteration %d)", ", ".join(names), self.state.epoch,
                        self.state.iteration)
        else:
            logger.info("last.pth of epoch %d skipped: the previous checkpoint is still being written",
                        self.state.epoch)
        if wait:
            self.checkpoint_writer.wait()

    def resume(self, path):
        # On the CPU: the RNG states must stay CPU tensors; weights and optimizer state are copied to the
        # device of the parameters they are loaded into.
        try:
            checkpoint = load_checkpoint(path, map_location="cpu")
        except CheckpointError as error:
            older = newest_epoch_checkpoint(Path(path).parent, exclude=Path(path))
            if older is None:
                raise
            raise CheckpointError(f"{error}\nThe newest epoch checkpoint of the run is {older}: continue from it "
                                  f"with --resume {older}") from None
        if "optimizer" not in checkpoint:
            raise CheckpointError(f"{path} holds weights without a training state (a converted checkpoint): "
                                  "it can be tested, not resumed")
        # switches added since the checkpoint was written take the values it was trained with
        found = dict(checkpoint["spec"], config=with_switch_defaults(checkpoint["spec"]["config"]).to_dict())
        differences = spec_differences(self.spec, found)
        if differences:
            raise CheckpointError(f"{path} was trained with another configuration:\n  " + "\n  ".join(differences))
        self.check_priors(checkpoint, path)
        self.check_epoch_position(checkpoint, path)
        load_model_state(self.model, checkpoint["model"], path)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        match_parameter_layouts(self.optimizer)
        self.resume_scaler(checkpoint, path)
        self.state = TrainState(**checkpoint["train_state"])
        states = checkpoint["rng"]
        if len(states) == self.ctx.world_size:
            set_rng_state(states[self.ctx.rank], self.ctx.device)
        else:
            logger.warning("%s was saved by %d processes, this run has %d: random streams restart from the seed",
                           path, len(states), self.ctx.world_size)
        logger.info("resumed from %s at epoch %d, iteration %d%s", path, self.state.epoch, self.state.iteration,
                    f" (interrupted after step {self.state.epoch_iteration} of epoch {self.state.epoch + 1}: "
                    "it continues from there)" if checkpoint["interrupted"] else "")

    def resume_scaler(self, checkpoint, path):
        """fp16's grad scaler state, where both the checkpoint's run and this one use it. A run may continue under
        another --amp (on another GPU, say): the scaler then starts afresh (to fp16) or is dropped (from fp16)."""
        saved_amp = checkpoint["args"].get("amp")
        if saved_amp not in (None, self.args.amp):
            logger.warning("%s was trained with --amp %s; it continues with --amp %s%s", path, saved_amp, self.args.amp,
                           {"fp16": " (fp16's grad scaler starts from its initial scale)"}.get(self.args.amp, ""))
        if self.scaler.is_enabled() and checkpoint["scaler"]:
            self.scaler.load_state_dict(checkpoint["scaler"])

    def check_epoch_position(self, checkpoint, path):
        """A checkpoint saved mid-epoch counts its position in steps of its own global batch: continuing it with
        another batch size or number of processes would skip or repeat samples."""
        steps = checkpoint["train_state"].get("epoch_iteration", 0)
        saved = (checkpoint["args"].get("batch_size"), len(checkpoint["rng"]))
        here = (self.args.batch_size, self.ctx.world_size)
        if steps and saved != here:
            raise CheckpointError(
                f"{path} was interrupted after step {steps} of an epoch at --batch_size {saved[0]} on {saved[1]} "
                f"process(es); this run has --batch_size {here[0]} on {here[1]}: resume it with the same batch size "
                "and processes, or from the last end-of-epoch checkpoint (epoch_N.pth)")

    def check_priors(self, checkpoint, path):
        """The prior file in use must hold the checkpoint's embeddings, encoded from the same prompts.

        Resuming restores the checkpoint's prior buffers, so another file would be recorded but not used.
        """
        if self.priors_provenance is None:
            return
        recorded, state = checkpoint.get("priors") or {}, checkpoint["model"]
        found = {"embeddings_sha256": recorded.get("embeddings_sha256"), "prompt_sha256": recorded.get("prompt_sha256")}
        if found["embeddings_sha256"] is None and "intensity_priors" in state:  # checkpoints that predate the hash
            found["embeddings_sha256"] = embeddings_sha256(state["intensity_priors"], state["class_embeddings"])
        differences = [f"{key}: {value} in the checkpoint, {self.priors_provenance.get(key)} in the prior file"
                       for key, value in found.items() if value != self.priors_provenance.get(key)]
        if differences:
            raise CheckpointError(
                f"{path} was trained with other text priors ({recorded.get('origin', 'origin not recorded')}) than "
                f"--prior_embeddings {self.args.prior_embeddings}:\n  " + "\n  ".join(differences)
                + "\nResume with the run's prior file (config.json: args.prior_embeddings), or start a new run")

    # training ----------------------------------------------------------------------------------------------
    def weights_for(self, epoch):
        if self.spec["model"] != "immseg":
            return BASELINE_WEIGHTS
        return loss_weights(epoch, self.args.start_contrast_epoch, self.args.region_fusion_start_epoch,
                            self.args.contrast_w, use_contrast=not self.args.no_contrast)

    def draw_subset_view(self, batch_size):
        """(B, M) the sequences of each sample's second view in the step, for a trainer that trains on one (the subset
        stage, subset_trainer.py); None here: each sample is seen once, with every sequence, and nothing is drawn."""
        return None

    def step_loss(self, network, images, labels, weights, subset_view):
        """(output, loss, {term: value}) of a step's batch; ``subset_view``: draw_subset_view's (None here)."""
        output = network(images, fused=weights.fused > 0, contrast=weights.contrast > 0)
        loss, terms = self.criterion(output, labels, weights)
        return output, loss, terms

    def forward_backward(self, network, images, labels, weights, subset_view=None):
        with autocast_context(images.device, self.args.amp):
            output, loss, terms = self.step_loss(network, images, labels, weights, subset_view)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        return output, loss.detach(), {name: value.detach() for name, value in terms.items()}

    def train_step(self, network, batch, weights):
        """One optimisation step. The loss stays on the device (read_losses reads it every --log_every steps), so
        the host never waits for the device within a step (except fp16's grad scaler)."""
        device = self.ctx.device
        images = batch["image"].to(device, non_blocking=True)
        subset_view = self.draw_subset_view(images.shape[0])
        if self.path.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = batch["label"].to(device, non_blocking=True)
        lr = poly_lr(self.args.base_lr, self.state.iteration, self.max_iterations)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        first_compiled_step = self.compile_mode != "off" and weights not in self.compiled_stages
        if first_compiled_step:
            output, loss, terms = self.first_compiled_step(network, images, labels, weights, subset_view)
        else:
            output, loss, terms = self.forward_backward(network, images, labels, weights, subset_view)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.state.iteration += 1
        self.state.epoch_iteration += 1
        self.pending_losses.append((self.state.iteration, lr, loss, terms))
        if len(self.pending_losses) >= getattr(self.args, "log_every", 1):
            self.read_losses()
        return output, loss, terms, lr

    def first_compiled_step(self, network, images, labels, weights, subset_view):
        """The first step of a stage under --compile on, which compiles what the stage runs (its time is logged).
        Where compilation fails, the step is redone eagerly from the same random state and training goes on without
        compilation; under DDP, where a failure in backward leaves the gradient reduction half done, the run stops
        instead (CompilationFailed: rerun with --compile off). Running out of memory is not a compilation failure."""
        device = images.device
        random_state = rng_state(device)
        start = time.perf_counter()
        failure = None
        try:
            output, loss, terms = self.forward_backward(network, images, labels, weights, subset_view)
        except Exception as error:  # noqa: BLE001 - any failure of compilation falls back to the eager step
            if isinstance(error, torch.cuda.OutOfMemoryError) or isinstance(error.__cause__,
                                                                             torch.cuda.OutOfMemoryError):
                raise
            failure = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:500]}"
        self.compiled_stages.add(weights)
        if failure is None:
            logger.info("--compile %s: the first step of the stage %s took %.1f s (compilation included)",
                        self.compile_mode, weights_described(weights), time.perf_counter() - start)
            return output, loss, terms
        # redone here, outside the except block, so that the failed attempt's tensors and traceback are freed first
        if self.ctx.distributed:
            raise CompilationFailed(f"torch.compile failed on rank {self.ctx.rank} ({failure}); under DDP training "
                                    "cannot fall back to eager steps safely: rerun with --compile off")
        logger.warning("torch.compile failed (%s); training continues without compilation, as with --compile off",
                       failure)
        self.compile_mode = "off"
        torch.compiler.set_stance("force_eager")
        set_rng_state(random_state, device)
        return self.forward_backward(network, images, labels, weights, subset_view)

    def stop_if_requested(self):
        """Raise TrainingInterrupted on every rank once any rank has received SIGINT or SIGTERM. Under DDP the ranks
        share the request every --log_every steps (a collective and a wait for the device), all at the same steps."""
        number = self.stop.signal_number
        if self.ctx.distributed:
            if self.state.iteration % self.args.log_every:
                return
            shared = torch.tensor(number, device=self.ctx.device)
            dist.all_reduce(shared, op=dist.ReduceOp.MAX)
            number = int(shared.item())
        if number:
            raise TrainingInterrupted(number)

    def read_losses(self):
        """Read the losses of the steps since the last read from the device in one transfer: stop at the first
        non-finite one (on any rank), else log them to TensorBoard and keep the newest for the progress bar. Each step
        keeps its own terms: the schedule's stages change them between two reads."""
        pending, self.pending_losses = self.pending_losses, []
        if not pending:
            return
        totals = torch.stack([loss.float() for _, _, loss, _ in pending])
        finite = torch.isfinite(totals).float()
        if self.ctx.distributed:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        values = torch.cat([finite, totals] + [terms[name].float().reshape(1) for _, _, _, terms in pending
                                               for name in terms]).cpu().tolist()
        steps = len(pending)
        finite, totals, term_values = values[:steps], values[steps:2 * steps], iter(values[2 * steps:])
        for (iteration, lr, _, terms), total, ok in zip(pending, totals, finite):
            step_terms = {name: next(term_values) for name in terms}
            if not ok:
                described = (", ".join(f"{name} {value:.4g}" for name, value in step_terms.items())
                             if not math.isfinite(total) else "on another process")
                raise FloatingPointError(f"non-finite loss at epoch {self.state.epoch + 1}, iteration {iteration} "
                                         f"({described}); the last good checkpoint is kept "
                                         f"in {self.run_dir}")
            if self.writer is not None:
                self.writer.add_scalar("info/lr", lr, iteration)
                self.writer.add_scalar("loss/total", total, iteration)
                for name, value in step_terms.items():
                    self.writer.add_scalar(f"loss/{name}", value, iteration)
            self.last_losses = (total, step_terms)
            add_losses(self.state.epoch_losses, total, step_terms, lr)

    def log_images(self, output, batch):
        step = self.state.iteration
        if self.writer is not None and step % self.args.image_every == 0:
            logits = output.fused_logits if output.fused_logits is not None else output.modality_logits[0]
            prediction = logits[0].detach().float().argmax(dim=0).cpu() / (self.args.num_classes - 1)
            label = batch["label"][0].float() / (self.args.num_classes - 1)
            grid = torch.cat([*batch["image"][0].float(), prediction, label], dim=1)
            self.writer.add_image("train/bSSFP_LGE_T2w_prediction_label", grid[None], step)

    def fused_head_trained(self):
        """Validation scores the fused head, which I-MMSeg trains only from region_fusion_start_epoch on."""
        return self.spec["model"] != "immseg" or self.state.epoch > self.args.region_fusion_start_epoch

    def validation_score(self, should_stop):
        """The mean pathology Dice of the validation volumes (None: ``should_stop()`` cut it short)."""
        return mean_pathology_dice(self.model, self.val_set, self.args, self.ctx.device, should_stop,
                                   channels_last=self.path.channels_last)

    def validate(self):
        """The validation score, or None when a stop signal cut validation short (after the current volume)."""
        with eager_if_compiled(self.compile_mode):  # evaluation graphs are not worth their compilation
            score = self.validation_score(should_stop=lambda: self.stop.signal_number != 0)
        self.model.train()
        if self.writer is not None and score is not None:
            self.writer.add_scalar("val/mean_pathology_dice", score, self.state.iteration)
        return score

    def fit(self):
        ctx, args = self.ctx, self.args
        network = (DistributedDataParallel(self.model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda"
                                           else None, find_unused_parameters=True)
                   if ctx.distributed else self.model)
        if ctx.is_main:
            self.writer = tensorboard_writer(self.run_dir / "log")
        logger.info("%d training slices, %d iterations per epoch, %d iterations in all, %s validation volumes",
                    len(self.train_set), len(self.loader), self.max_iterations,
                    len(self.val_set) if self.val_set else "no")
        network.train()
        start_time, start_iteration = time.perf_counter(), self.state.iteration
        try:
            with self.stop:
                try:
                    while self.state.epoch < args.max_epochs and self.state.iteration < self.max_iterations:
                        self.train_epoch(network)
                        self.end_epoch()
                except TrainingInterrupted as interruption:
                    logger.warning("%s: stopped in epoch %d after %d of its %d steps (iteration %d); saving "
                                   "last.pth, from which --resume auto continues with the next step", interruption,
                                   self.state.epoch + 1, self.state.epoch_iteration,
                                   self.sampler.num_samples // args.batch_size, self.state.iteration)
                    self.save(["last.pth"], interrupted=True, wait=True)
                    self.ctx.barrier()  # under torchrun, a rank that exits early gets the others killed
                    raise
                self.checkpoint_writer.wait()  # a stop signal meanwhile lets the last write finish
        except KeyboardInterrupt as interruption:
            if not isinstance(interruption, TrainingInterrupted):
                logger.warning("interrupted within a step: nothing saved, last.pth holds the state of its last "
                               "completed save")
            raise
        finally:
            self.finish_writing()
            self.stop_loader_workers()
            if self.writer is not None:
                self.writer.close()
        logger.info("training finished: %d epochs, %d iterations; best mean pathology Dice %s", self.state.epoch,
                    self.state.iteration, f"{self.state.best_metric:.4f} at epoch {self.state.best_epoch}"
                    if self.state.best_epoch >= 0 else "n/a (no validation set)")
        done, seconds = self.state.iteration - start_iteration, time.perf_counter() - start_time
        peak = (f"; peak GPU memory {torch.cuda.max_memory_allocated(ctx.device) / 2 ** 20:.0f} MiB"
                if ctx.device.type == "cuda" else "")
        logger.info("%d iterations in %.1f s: %.3f s per iteration (with data loading, validation and saving)%s",
                    done, seconds, seconds / max(done, 1), peak)
        return self.state

    def train_epoch(self, network):
        epoch = self.state.epoch
        self.sampler.set_epoch(epoch)
        self.sampler.start = self.state.epoch_iteration * self.args.batch_size
        weights = self.weights_for(epoch)
        progress = tqdm(self.loader, desc=f"epoch {epoch + 1}/{self.args.max_epochs}", leave=False,
                        disable=not self.ctx.is_main or not self.args.progress, dynamic_ncols=True)
        for batch in progress:
            self.stop_if_requested()
            output, _, _, lr = self.train_step(network, batch, weights)
            if self.ctx.is_main:
                if self.last_losses is not None:
                    progress.set_postfix(loss=f"{self.last_losses[0]:.4f}", lr=f"{lr:.2e}", refresh=False)
                self.log_images(output, batch)
            if self.state.iteration >= self.max_iterations:
                break
        progress.close()
        self.read_losses()
        loss, terms = self.last_losses or (math.nan, {})
        logger.info("epoch %d: iteration %d, loss %.4f (%s), weights %s", epoch + 1, self.state.iteration, loss,
                    ", ".join(f"{k} {v:.4f}" for k, v in terms.items()), tuple(weights))

    def stop_loader_workers(self):
        """End the loader's persistent worker processes now. They ignore SIGINT and SIGTERM (stop signals are the
        trainer's to handle), so the interpreter's exit, which ends its children with SIGTERM, could not end them if
        anything still held the loader then (an exception's traceback kept by a logging handler, say)."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            self.loader._iterator = None

    def finish_writing(self):
        """Wait for a checkpoint write and a drawing of progress.png in flight; a failed write is logged (an error
        being raised takes precedence)."""
        self.progress.wait()
        try:
            self.checkpoint_writer.wait()
        except CheckpointWriteError as error:
            logger.error("%s", error)

    def end_epoch(self):
        self.state.epoch += 1
        self.state.epoch_iteration = 0
        args, names = self.args, ["last.pth"]
        finished = self.state.epoch >= args.max_epochs or self.state.iteration >= self.max_iterations
        score = None
        if self.val_set is not None and self.fused_head_trained() and (self.state.epoch % args.val_every == 0
                                                                       or finished):
            score = self.validate() if self.ctx.is_main else None
            stopped = self.stop.signal_number if score is None else 0
            if self.ctx.distributed:
                shared = [score, stopped]
                dist.broadcast_object_list(shared, src=0)
                score, stopped = shared
            if stopped:
                logger.warning("%s during the validation of epoch %d: validation stopped after the current volume; "
                               "this epoch is not scored", signal.Signals(stopped).name, self.state.epoch)
                raise TrainingInterrupted(stopped)
            logger.info("epoch %d: validation mean pathology Dice %.4f", self.state.epoch, score)
            if score > self.state.best_metric:
                self.state.best_metric, self.state.best_epoch = score, self.state.epoch
                names.append("best.pth")
        if self.state.epoch % args.save_every == 0 or finished:
            names.append(f"epoch_{self.state.epoch - 1}.pth")
        self.state.history.append(close_epoch(self.state.epoch_losses, self.state.epoch,
                                              self.weights_for(self.state.epoch - 1), score))
        self.save(names)
        if self.ctx.is_main and (score is not None or finished):
            self.progress.submit(self.state.history)


# torch.compile's backends for the model's regions and the loss; the tests compile the regions with "aot_eager"
# (inductor's C++ code generation of every region takes minutes on a small CPU) and the loss with inductor
COMPILE_BACKENDS = {"regions": "inductor", "loss": "inductor"}


def compile_in_place(model, criterion, mode):
    """Compile the model's regions (compile_regions) and the loss in place for --compile on; parameters, state dict
    and module names stay as they are. Random draws (dropout, contrast sampling) come from the eager generator, so
    a compiled run draws what an eager one draws. False (with a warning) where this PyTorch cannot."""
    import torch._inductor.config as inductor_config

    if not hasattr(torch.compiler, "set_stance"):
        logger.warning("--compile %s needs PyTorch 2.6 or newer (this is %s): training runs without compilation",
                       mode, torch.__version__)
        return False
    inductor_config.fallback_random = True
    regions = compile_regions(model)
    for module in regions:
        module.compile(backend=COMPILE_BACKENDS["regions"])
    criterion.compile(backend=COMPILE_BACKENDS["loss"])
    logger.info("--compile %s: %d regions of the model and the loss, compiled at their first calls", mode,
                len(regions))
    return True


class CompilationFailed(RuntimeError):
    """torch.compile failed where training cannot fall back to eager steps (several processes)."""


def weights_described(weights):
    """'fused 1, modality 0.5, contrast 0.05': a stage of the schedule as the logs name it."""
    return ", ".join(f"{name} {value:g}" for name, value in weights._asdict().items())


def eager_if_compiled(mode):
    """A context in which compiled modules run eagerly (no compilation of evaluation graphs)."""
    if mode == "off":
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")


def match_parameter_layouts(optimizer):
    """Give the optimizer's per-parameter state (AdamW's moments) its parameter's memory layout. A checkpoint keeps
    the layout it was written in: on GPUs the convolutions are channels_last, on CPUs not, and the fused AdamW update
    walks a parameter and its moments as flat memory, so moments of another layout would be applied to the wrong
    elements, silently."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            state = optimizer.state.get(parameter, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == parameter.shape and value.stride() != parameter.stride():
                    state[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)


def make_optimizer(parameters, lr, weight_decay, device):
    """AdamW, with the fused (single-kernel) update where this PyTorch build has one for the device."""
    fused = device.type == "cuda" or (device.type == "cpu" and hasattr(torch, "_fused_adamw_"))
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))


def prior_provenance(priors):
    """The prior file's provenance and the SHA-256 of its embeddings, which a resumed run must match."""
    if priors is None:
        return None
    return {**priors.provenance, "embeddings_sha256": embeddings_sha256(priors.intensity, priors.classes)}


def train_in(run_dir, args, ctx):
    """Build, resume if asked, and train in ``run_dir`` (whose lock this process holds)."""
    model, spec, priors = build(args, ctx)
    fit_in(run_dir, args, ctx, Trainer(args, ctx, model, spec, run_dir, prior_provenance(priors)))


def fit_in(run_dir, args, ctx, trainer, record=None):
    """Resume ``trainer`` if asked, open ``run_dir``, write its config.json (with the entries of ``record``) and
    train."""
    resume = run_dir / "last.pth" if args.resume == "auto" else args.resume
    if args.resume == "auto" and not resume.is_file():
        logger.info("--resume auto: no %s yet, starting from scratch", resume)
        resume = None
    elif resume:
        trainer.resume(Path(resume))
    open_run_folder(run_dir, args.overwrite, ctx)
    logger.info("run folder %s; %d process(es) on %s; %s; arguments %s", run_dir, ctx.world_size, ctx.device,
                f"continuing {resume} at epoch {trainer.state.epoch}, iteration {trainer.state.iteration}"
                if resume else "from scratch", vars(args))
    if ctx.is_main:
        write_run_config(run_dir, args, trainer.spec, trainer.priors_provenance, trainer.preprocessing, record)
    trainer.fit()


def train(args, run_in=train_in):
    """Train as ``args`` (from :func:`parse_training_args`) say, on this process's share of the devices, with
    ``run_in(run_dir, args, ctx)`` in the locked run folder; the exit code: 0 done, 1 an error the log names,
    128 + N stopped by signal N (resumable), 130 interrupted."""
    ctx = setup_distributed(args.device)
    run_dir = Path(args.output_dir) if args.output_dir else run_directory(args)
    configure_logging(None, ctx.is_main)
    if args.n_gpu is not None and args.n_gpu != ctx.world_size:
        logger.warning("--n_gpu %d ignored: this run has %d process(es); start several with torchrun --nproc_per_node",
                       args.n_gpu, ctx.world_size)
    resolve_device_defaults(args, ctx.device)
    fitted_stages = vars(args).pop("fitted_stages", None)  # said once here, not recorded as an argument
    if fitted_stages:
        logger.info("%s", fitted_stages)
    logger.info("on %s: --amp %s, --deterministic %d, --compile %s, --num_workers %d, --log_every %d", ctx.device,
                args.amp, args.deterministic, args.compile, args.num_workers, args.log_every)
    seed_everything(args.seed + ctx.rank, args.deterministic)
    try:
        check_run_folder(run_dir, args.resume, args.overwrite)
        with run_folder_lock(run_dir, ctx.is_main):
            run_in(run_dir, args, ctx)
    except TrainingInterrupted as interruption:
        return 128 + interruption.signal_number
    except KeyboardInterrupt:
        return 130
    except (CheckpointError, PretrainedWeightsError, PriorFileError, PromptFileError, EncoderUnavailableError,
            FileNotFoundError, FloatingPointError, ValueError, CheckpointWriteError, CompilationFailed) as error:
        logger.error("%s", error)
        return 1
    finally:
        if ctx.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
