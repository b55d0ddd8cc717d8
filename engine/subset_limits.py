"""What a subset of the sequences cannot measure: the one table of structures whose figures a prediction from that
subset must not report. predict.py leaves their volumes empty with the reason (volumes.csv's not_measurable) and
says so in its log; test.py marks them in its table and test_info.json. documentation/missing_sequences.md gives
the rule and the measurements it rests on; a new measurement changes the figures here, and nowhere else."""
from datasets.vocabulary import MODALITIES

# The measurement the figures below come from: MyoPS 2020 3-fold cross-validation (30 cases), the subset stage
# (train.py --subsets_from, --base_lr 0.005) on the recipe's run, 300 iterations each
# (benchmarks/results/missing_sequences/subsets_stage_300.md).
MEASUREMENT = "MyoPS 2020 cross-validation of the subset stage, documentation/missing_sequences.md"

# Mean Dice (%) of each structure below from all three sequences in that measurement (the complete run's).
COMPLETE_DICE = {"scar": 55.44, "edema": 33.06}

# subset -> {structure: its mean Dice (%) from that subset}. The rule: a structure is not measurable from a subset
# that lacks the sequence showing it (scar: LGE; edema: T2w) when its Dice there stays under 30 %. Every subset
# without LGE or without T2w meets it (9.8-23.2 %); from LGE and T2w both are kept (scar 53.85, edema 33.57).
# Paired sequence dropout, measured alike at 900 iterations, gave 7.8-29.1 % for the same cells; on 15 MyoPS 2020
# cases never seen in development it found scar without LGE at 1-8 % and edema without T2w at 10-17 %.
NOT_MEASURABLE = {
    ("bSSFP", "LGE"): {"edema": 18.38},
    ("bSSFP", "T2w"): {"scar": 23.16},
    ("bSSFP",): {"scar": 18.53, "edema": 9.83},
    ("LGE",): {"edema": 14.84},
    ("T2w",): {"scar": 15.57},
}


def not_measurable(sequences):
    """{structure: reason} of the structures a prediction from ``sequences`` cannot measure (empty for all three)."""
    subset = tuple(name for name in MODALITIES if name in sequences)
    return {structure: (f"{structure} not measurable from {'+'.join(subset)}: Dice {dice:.1f} % against "
                        f"{COMPLETE_DICE[structure]:.1f} % from all three ({MEASUREMENT})")
            for structure, dice in NOT_MEASURABLE.get(subset, {}).items()}
