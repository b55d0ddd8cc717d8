"""What the benchmark trains: the recipe (run C of benchmarks/results/notes/myops2020-short-cpu-runs.md), the
variants, the train.py flags of each, and the names under which a variant, its budget and its options are recorded."""
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.harness.records import BenchmarkError
from engine.options import PAPER_SCHEDULE, ROOT, RUN_DEFAULTS


DATASETS = ("MyoPS2020", "Phantom")  # preprocess_data.py's names whose train.py --dataset is the same

RECIPE_INPUT = {"spacing": 1.0, "crop_size": 176}

RECIPE_FLAGS = {"vit_name": "compact", "batch_size": 8, "augmentation": "strong"}

RECIPE_SWITCHES = ("--no_pretrain",)

PROMPTS = ROOT / "priors" / "prompts"


@dataclass(frozen=True)
class Variant:
    description: str
    flags: tuple = ()
    priors: str = None  # "biomedclip" (--biomedclip_priors), "offline" (the offline encoder), None (no text)
    prompts: str = "intensity.json"
    config: str = None  # the configuration it trains instead of the recipe's (--vit_name), None: the recipe's
    stage_of: str = None  # a subset stage (train.py --subsets_from) on this variant's run of the same fold and budget

    @property
    def serves_subsets(self):
        """Whether the variant's model segments a subset of the sequences with the others left out: a subset stage."""
        return self.stage_of is not None


VARIANTS = {
    "immseg": Variant("I-MMSeg, full", (), "biomedclip"),
    "immseg_half": Variant("I-MMSeg, half the ResNet and decoder widths", (), "biomedclip", config="compact-half"),
    "immseg_scar2": Variant("I-MMSeg, scar's soft Dice weighted 2 (0.5, 1, 2, 1)",
                            ("--dice_class_weights", "0.5,1,2,1"), "biomedclip"),
    "no_cmfe": Variant("I-MMSeg without CMFE", ("--no_cmfe",), "biomedclip"),
    "no_cfm": Variant("I-MMSeg without CFM", ("--no_cfm",), "biomedclip"),
    "no_contrast": Variant("I-MMSeg without the contrastive loss", ("--no_contrast",), "biomedclip"),
    "names_only": Variant("I-MMSeg, intensity-free prompts (names only)", (), "offline", "names_only.json"),
    "offline_priors": Variant("I-MMSeg, priors of the offline encoder", (), "offline"),
    "transunet_early": Variant("TransUNet, early fusion", ("--model", "transunet_early")),
    "transunet_single_lge": Variant("TransUNet, LGE only", ("--model", "transunet_single", "--modality", "LGE")),
    "transunet_single_t2w": Variant("TransUNet, T2w only", ("--model", "transunet_single", "--modality", "T2w")),
    "transunet_single_bssfp": Variant("TransUNet, bSSFP only", ("--model", "transunet_single", "--modality", "bSSFP")),
    "immseg_subsets": Variant("I-MMSeg's run frozen, with a subset stage (new parameters per proper subset of the "
                              "sequences) trained on it", (), "biomedclip", stage_of="immseg"),
    **{f"transunet_early_{'_'.join(pair).lower()}": Variant(
        f"TransUNet, early fusion of {' and '.join(pair)}", ("--model", "transunet_early", "--input_sequences",
                                                             ",".join(pair)))
       for pair in (("bSSFP", "LGE"), ("bSSFP", "T2w"), ("LGE", "T2w"))},
}


# Variants whose training mode has been removed (sequence dropout, replace and paired: documentation/
# missing_sequences.md), by their description: their records stay in benchmarks/results/missing_sequences/, and
# the tables rebuilt from those records name them so.
RECORDED_ONLY = {
    "immseg_seqdrop": "I-MMSeg, sequence dropout 0.5 (one model for any subset)",
    "immseg_seqdrop25": "I-MMSeg, sequence dropout 0.25",
    "immseg_seqdrop12": "I-MMSeg, sequence dropout 0.125",
    "immseg_seqpair": "I-MMSeg, sequence dropout 0.5 paired (every sample also seen complete)",
    "immseg_seqpair25": "I-MMSeg, sequence dropout 0.25 paired (every sample also seen complete)",
}


def described(name):
    """'<description> (<name>)' of a variant, defined or recorded only; a name known to neither as it is."""
    description = VARIANTS[name].description if name in VARIANTS else RECORDED_ONLY.get(name)
    return f"{description} ({name})" if description else name


def setting_label(mode, budget_minutes=None, iterations=None):
    """The budget as recorded and shown: 'time 42 min' or 'iterations 930'."""
    if mode == "time":
        return f"time {budget_minutes:g} min"
    return f"iterations {iterations}"


def with_amp(name, amp):
    """``name``, with ``+<amp>`` under mixed precision."""
    return name if amp == "none" else f"{name}+{amp}"


def training_name(variant_name, augmentation, amp="none"):
    """The variant as trained: its name, with ``+<preset>_aug`` when the augmentation is not the recipe's and
    ``+<amp>`` under mixed precision."""
    name = variant_name if augmentation == RECIPE_FLAGS["augmentation"] else f"{variant_name}+{augmentation}_aug"
    return with_amp(name, amp)


def schedule_name(variant_name, fused_start_epoch, paper_fusion, base_lr=None, batch_size=None):
    """The variant with ``+fused<E>`` when its fused stage starts at epoch E of the paper's schedule instead of the
    paper's own (which keeps the plain name), ``+lr<rate>`` with a base learning rate ``base_lr`` (None: train.py's
    default) and ``+bs<N>`` with a batch size other than the recipe's (None: the recipe's)."""
    name = variant_name
    if fused_start_epoch is not None and fused_start_epoch != paper_fusion:
        name = f"{name}+fused{fused_start_epoch}"
    if base_lr is not None:
        name = f"{name}+lr{base_lr:g}"
    if batch_size is not None and batch_size != RECIPE_FLAGS["batch_size"]:
        name = f"{name}+bs{batch_size}"
    return name


def ensemble_name(variant_names, augmentations, amp="none"):
    """The recorded name of the members' variants (as trained, one per member) and augmentations: the variant as
    trained, with ``+ensN`` for an ensemble; members with different augmentations give
    ``<variant>+ensN_<preset><count>...`` (e.g. immseg+ens4_strong3_nnunet1); members of different variants give
    ``<variant>_x<count>+...+ensN_<preset><count>...`` (e.g. immseg_x3+immseg_half_x3+ens6_strong4_nnunet2)."""
    variants = list(dict.fromkeys(variant_names))
    counts = "_".join(f"{preset}{augmentations.count(preset)}" for preset in dict.fromkeys(augmentations))
    if len(variants) > 1:
        mixed = "+".join(f"{variant}_x{variant_names.count(variant)}" for variant in variants)
        return with_amp(f"{mixed}+ens{len(augmentations)}_{counts}", amp)
    if len(set(augmentations)) == 1:
        trained = training_name(variants[0], augmentations[0], amp)
        return trained if len(augmentations) == 1 else f"{trained}+ens{len(augmentations)}"
    return with_amp(f"{variants[0]}+ens{len(augmentations)}_{counts}", amp)


def paper_schedule():
    """The paper's schedule, train.py's defaults: (epochs, contrast start, fused start)."""
    return (PAPER_SCHEDULE["max_epochs"], PAPER_SCHEDULE["start_contrast_epoch"],
            PAPER_SCHEDULE["region_fusion_start_epoch"])


def custom_lr(options):
    """``--base_lr`` when it differs from train.py's default, else None (the recipe's rate, no flag)."""
    default = RUN_DEFAULTS["base_lr"]
    return None if options.base_lr is None or options.base_lr == default else options.base_lr


def machine_flags(options):
    """train.py's flags of how a run trains on this machine, but the device: precision, loader processes, learning
    rate."""
    flags = []
    on_gpu = options.device == "cuda" or (options.device == "auto" and torch.cuda.is_available())
    if options.amp != "none" or on_gpu:  # train.py's --amp auto is bf16 on a GPU
        flags += ["--amp", options.amp]
    if options.num_workers is not None:
        flags += ["--num_workers", str(options.num_workers)]
    if custom_lr(options) is not None:
        flags += ["--base_lr", f"{options.base_lr:g}"]
    return flags


def recipe_flags(variant_name, fold_dir, crop_size, options, out):
    """train.py flags of a variant before the schedule: the recipe, the variant's own, its priors."""
    variant = VARIANTS[variant_name]
    flags = ["--dataset", options.dataset, "--root_path", str(fold_dir.resolve()), "--img_size", str(crop_size),
             "--vit_name", variant.config or options.vit_name, "--batch_size", str(options.batch_size),
             "--device", options.device,
             "--augmentation", options.augmentation, *RECIPE_SWITCHES, *variant.flags, *machine_flags(options)]
    prompts = PROMPTS / variant.prompts
    if variant.priors == "biomedclip":
        if options.biomedclip_priors is None:
            raise BenchmarkError(f"variant {variant_name} needs --biomedclip_priors (a prior file made with "
                                 "python -m priors.encode)")
        flags += ["--prior_embeddings", str(options.biomedclip_priors.resolve()), "--prompts", str(prompts)]
    elif variant.priors == "offline":
        if variant_name == "names_only" and options.names_only_priors is not None:
            flags += ["--prior_embeddings", str(options.names_only_priors.resolve()), "--prompts", str(prompts)]
        else:
            prior_file = Path(out).resolve() / "priors" / f"offline_{prompts.stem}.pt"
            flags += ["--prior_encoder", "offline", "--prior_embeddings", str(prior_file), "--prompts", str(prompts)]
    return flags


def flag_value(flags, name):
    return flags[flags.index(name) + 1] if name in flags else None
