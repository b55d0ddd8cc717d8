"""What a subset of the sequences cannot measure: the one table of structures whose figures a prediction from that
subset must not report. predict.py leaves their volumes empty with the reason (volumes.csv's not_measurable) and
says so in its log; test.py marks them in its table and test_info.json. documentation/missing_sequences.md gives
the rule and the measurements it rests on; a new measurement changes the figures here, and nowhere else."""
from datasets.vocabulary import MODALITIES

# The measurement the figures below come from: MyoPS 2020 3-fold cross-validation (30 cases), I-MMSeg trained with
# sequence dropout 0.5, paired (a training mode since removed; benchmark variant immseg_seqpair), at 900 iterations
# (benchmarks/results/missing_sequences/subsets_pair_900.md).
MEASUREMENT = "MyoPS 2020 cross-validation, documentation/missing_sequences.md"

# Mean Dice (%) of each structure below from all three sequences in that measurement.
COMPLETE_DICE = {"scar": 57.25, "edema": 37.02}

# subset -> {structure: its mean Dice (%) from that subset}. The rule: a structure is not measurable from a subset
# that lacks the sequence showing it (scar: LGE; edema: T2w) when its Dice there stays under 30 %, about half of the
# complete cases' or less. Every subset without LGE or without T2w meets it; from LGE and T2w both are kept (scar
# 56.16, edema 37.89). On 15 unseen MyoPS 2020 cases the same model found scar without LGE at 1-8 % and edema
# without T2w at 10-17 %.
NOT_MEASURABLE = {
    ("bSSFP", "LGE"): {"edema": 19.40},
    ("bSSFP", "T2w"): {"scar": 29.09},
    ("bSSFP",): {"scar": 22.09, "edema": 7.75},
    ("LGE",): {"edema": 19.03},
    ("T2w",): {"scar": 24.30},
}


def not_measurable(sequences):
    """{structure: reason} of the structures a prediction from ``sequences`` cannot measure (empty for all three)."""
    subset = tuple(name for name in MODALITIES if name in sequences)
    return {structure: (f"{structure} not measurable from {'+'.join(subset)}: Dice {dice:.1f} % against "
                        f"{COMPLETE_DICE[structure]:.1f} % from all three ({MEASUREMENT})")
            for structure, dice in NOT_MEASURABLE.get(subset, {}).items()}
