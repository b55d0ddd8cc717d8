"""Ensembles for prediction: the models of one or several runs, checked to see the same input, their class
probabilities averaged; the preprocessing a run's model expects; the heart locator (a coarse run's model).

test.py, predict.py and locate_heart.py predict through these."""
import argparse
import dataclasses
import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from datasets.preprocessing import PreprocessingSettings, preprocess_case
from datasets.preprocessing_record import read_preprocessing
from datasets.geometry import probabilities_to_original
from datasets.layouts import DataError, find_cases, load_case
from datasets.roi import heart_centre, write_centres
from datasets.vocabulary import MODALITIES
from engine.checkpoints import (CheckpointError, check_fused_head_trained, check_subset_trained, ensemble_checkpoints,
                                inference_model, load_checkpoint, resolve_checkpoint)
from engine.distributed import setup_distributed
from networks.inference import predict_volume
from networks.missing_sequences import SequenceSubset

logger = logging.getLogger("locate_heart")


def ensemble_probabilities(models, image, img_size, batch_slices, device, amp="none", tta=False,
                           output_device="cpu"):
    """Class probabilities (K, Z, H, W) on ``output_device`` of a preprocessed volume (M, Z, H, W), averaged over
    the models (each after its flip TTA with ``tta``); ``img_size``: the models' input size, or one per model."""
    sizes = [img_size] * len(models) if isinstance(img_size, int) else list(img_size)
    return sum(predict_volume(model, image, size, batch_slices, device, amp, tta=tta, output_device=output_device)
               for model, size in zip(models, sizes)) / len(models)


def run_preprocessing(checkpoint, checkpoint_path):
    """(sequence order, settings) of the run's training data: the checkpoint's record, else its dataset.json."""
    record = checkpoint.get("preprocessing")
    source = f"checkpoint {checkpoint_path}"
    if record is None:
        root = checkpoint.get("args", {}).get("root_path")
        record = read_preprocessing(root) if root else None
        source = f"{Path(root) / 'dataset.json'}" if root else source
        if record is None:
            raise CheckpointError(
                f"{checkpoint_path} does not record how its training data was preprocessed (sequence order, "
                f"spacing, crop size, intensity scaling), and its training data's dataset.json "
                f"{'(' + source + ') is not there' if root else 'is unknown (no root_path in its arguments)'}; "
                "copy that dataset.json to this path, or retrain with data written by preprocess_data.py")
    modalities = list(record["modalities"])
    if sorted(modalities) != sorted(MODALITIES):
        raise CheckpointError(f"{source} records the sequences {modalities}; predict.py reads {list(MODALITIES)}")
    return modalities, PreprocessingSettings.from_dataset_settings(record["settings"], source)


def stacked_sequences(prepared, modalities):
    """(M, Z, H, W) of a preprocessed case's sequences in the order ``modalities``; a sequence the case lacks is
    zeros (a subset stage leaves it out)."""
    blank = np.zeros_like(next(iter(prepared.images.values())))
    return np.stack([prepared.images.get(m, blank) for m in modalities])


def predict_case(models, volumes, modalities, settings, args, device, img_size, centre=None):
    """(labels 0-3 in the original grid, labels in the processed grid, the preprocessed case); the class
    probabilities of several models (an ensemble, each with its flip TTA) are averaged before the argmax."""
    prepared = preprocess_case(volumes, settings, centre)
    image = torch.from_numpy(stacked_sequences(prepared, modalities))
    probabilities = ensemble_probabilities(models, image, img_size, args.batch_slices, device, args.amp, args.tta)
    processed = probabilities.argmax(dim=0).numpy().astype(np.uint8)
    return probabilities_to_original(probabilities.numpy(), prepared.geometry), processed, prepared


class HeartLocator:
    """A coarse run's model that returns the heart centre of a loaded case (None if it finds no myocardium)."""

    def __init__(self, run, checkpoint=None, device="auto", batch_slices=16):
        self.device = setup_distributed(device).device
        self.member = load_member(resolve_checkpoint(run, checkpoint), self.device)
        self.checkpoint_path = self.member.checkpoint_path
        if self.member.settings.crop_centre != "image":
            raise CheckpointError(f"{self.checkpoint_path} was trained on heart-centred crops; a locator must see "
                                  "the whole image (a run on data preprocessed with --crop_centre image)")
        self.options = argparse.Namespace(batch_slices=batch_slices, amp="none", tta=False)

    def __call__(self, volumes):
        member = self.member
        with torch.inference_mode():
            prediction, _, _ = predict_case(member_models([member], volumes.images), volumes, member.modalities,
                                            member.settings, self.options, self.device, member.img_size)
        return heart_centre(prediction, largest_component=True)


def locate_hearts(input_dir, run, output, case_ids=None, checkpoint=None, device="auto"):
    """Write the centres file of the raw cases under ``input_dir`` (only ``case_ids`` if given), found by the coarse
    ``run``; returns the cases where it finds no myocardium (left out of the file)."""
    cases = find_cases(input_dir, labelled=False)
    if case_ids is not None:
        unknown = sorted(set(case_ids) - {case.case_id for case in cases})
        if unknown:
            raise DataError(f"--cases {unknown} are not under {input_dir}")
        cases = [case for case in cases if case.case_id in set(case_ids)]
    locator = HeartLocator(run, checkpoint, device)
    centres, missed = {}, []
    for case in tqdm(cases, desc="cases", unit="case"):
        centre = locator(load_case(case))
        if centre is None:
            logger.error("%s: the coarse model finds no myocardium; no centre written", case.case_id)
            missed.append(case.case_id)
        else:
            centres[case.case_id] = centre
    write_centres(output, centres, f"locate_heart.py, checkpoint {locator.checkpoint_path}")
    logger.info("%d heart centres -> %s", len(centres), output)
    return missed


class EnsembleMember(NamedTuple):
    checkpoint_path: Path
    epoch: int
    modalities: list
    settings: PreprocessingSettings
    img_size: int
    model: torch.nn.Module
    trained_as: dict  # the checkpoint's spec and args: whether it serves a subset (check_subset_trained)


def load_member(checkpoint_path, device):
    checkpoint = load_checkpoint(checkpoint_path, map_location="cpu")
    check_fused_head_trained(checkpoint, checkpoint_path)
    modalities, settings = run_preprocessing(checkpoint, checkpoint_path)
    return EnsembleMember(checkpoint_path, checkpoint["train_state"]["epoch"], modalities, settings,
                          checkpoint["spec"]["img_size"], inference_model(checkpoint, checkpoint_path, device),
                          {key: checkpoint.get(key) for key in ("spec", "args")})


def member_models(members, sequences):
    """The members' models for a case that has ``sequences``: as they are when it has all three, else each run on
    that subset by its subset stage (a member that is no subset stage refuses, naming what the case lacks)."""
    sequences = [name for name in MODALITIES if name in sequences]
    if len(sequences) == len(MODALITIES):
        return [member.model for member in members]
    for member in members:
        try:
            check_subset_trained(member.trained_as, member.checkpoint_path, sequences)
        except CheckpointError as error:
            raise DataError(str(error)) from None
    return [SequenceSubset(member.model, sequences) for member in members]


def member_input(member):
    """What members must share for their probabilities to lie on one grid: the preprocessing and img_size."""
    return {"sequence order": member.modalities, "img_size": member.img_size, **dataclasses.asdict(member.settings)}


def load_ensemble(runs, checkpoint_name, device):
    """The model of each run of --run (one, or several for an ensemble), all held on ``device`` at once."""
    members = []
    for run, path in zip(runs, ensemble_checkpoints(runs, checkpoint_name, "--run")):
        member = load_member(path, device)
        if members:
            first, other = member_input(members[0]), member_input(member)
            differences = [f"{key} {first[key]!r} in {members[0].checkpoint_path}, {other[key]!r} in "
                           f"{member.checkpoint_path}" for key in first if first[key] != other[key]]
            if differences:
                raise CheckpointError(
                    f"the runs {runs[0]} and {run} cannot be averaged: their models see differently prepared "
                    "input (" + "; ".join(differences) + "). Ensemble members must be trained on data "
                    "preprocessed alike (all heart-centred or none), with the same sequence order and img_size")
        members.append(member)
    return members
