"""Cross-validated MyoPS 2020 benchmark: I-MMSeg, its ablations and the TransUNet baselines at equal compute.

    python benchmarks/myops2020.py split --src path/to/MyoPS2020 --split_file data/myops2020_split.json
    python benchmarks/myops2020.py prepare --src path/to/MyoPS2020 --split_file data/myops2020_split.json \
        --data data/myops2020_1mm_176
    python benchmarks/myops2020.py run --data data/myops2020_1mm_176 --out runs/myops2020_benchmark \
        --variant immseg --fold 0 --budget_minutes 42 --biomedclip_priors priors/embeddings/biomedclip_released.pt
    python benchmarks/myops2020.py report --out runs/myops2020_benchmark

split: seeded k-fold cross-validation over the case ids, written once and reused.
prepare: preprocess_data.py once per fold (the fold's held-out cases are its test set) into a folder named
by the user; one folder per input setting (spacing, crop size, further preprocess_data.py flags after --).
run: one variant on one fold. In --mode time, the variant's own training step (loader included, at the
recipe's batch size, each stage of its schedule) is timed first, and the wall-clock budget becomes
iterations; --mode iterations takes a fixed --iterations. The schedule is fitted to those iterations
(epochs, the poly learning rate's end, the contrastive and fused stages at the paper's 20/300 and
100/300 of the run, or the fused stage at E/300 with --fused_start_epoch E), train.py trains, test.py
scores the fold's test cases in the original image space, and the per-case results are appended to
<out>/results.jsonl. A (variant, fold) already in the results
for the same input and budget is skipped; an interrupted one resumes from its last checkpoint. With --members N,
the budget goes to N trainings of the variant that differ in their seed (and, with a list of --augmentation presets,
in their augmentation; with --member_variants, in their variant), scored as one ensemble (<variant>+ensN).
report: one Markdown table over all cases of all folds, with paired differences against a reference variant.
cases: two variants' per-case Dice in one structure, ordered by its volume in the labels (where does a gap sit?).
fit: one trained run scored on its fold's training cases and on its test cases (-> <out>/fit.jsonl and the table
<out>/fit.md): how much of what a run learnt carries over to cases it did not see.
subsets: per subset of the sequences, with --stage_variant a subset stage against paired sequence dropout (recorded)
and TransUNet trained on the subset alone, read from several results files at their own budgets; without, a recorded
I-MMSeg trained with sequence dropout (a training mode since removed) against the recipe given the subset zero-filled
and TransUNet trained on the subset alone (-> <out>/subsets.md).
A subset stage variant (immseg_subsets) runs its complete variant (immseg) on the fold at the budget first, as run
does (reused when recorded), then trains the stage on that run's last checkpoint (train.py --subsets_from, as many
iterations as the complete run unless --stage_iterations) and records it with the stage's own training time.
agreement: each member of a recorded ensemble scored alone and the mean Dice between every two members' predictions
(-> <out>/agreement.jsonl and the table <out>/agreement.md): how much an ensemble gains over its members, and why.
"""
import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.harness.agreement import agreement  # noqa: E402
from benchmarks.harness.fit import fit  # noqa: E402
from benchmarks.harness.prepare import prepare  # noqa: E402
from benchmarks.harness.records import STRUCTURE_NAMES  # noqa: E402
from benchmarks.harness.report import compare_cases, report  # noqa: E402
from benchmarks.harness.run import run  # noqa: E402
from benchmarks.harness.split import write_split  # noqa: E402
from benchmarks.harness.subset_stage import run_subset_stage  # noqa: E402
from benchmarks.harness.subsets import subsets_report  # noqa: E402
from benchmarks.harness.variants import DATASETS, RECIPE_FLAGS, RECIPE_INPUT, VARIANTS  # noqa: E402
from datasets.dataset_myops import AUGMENTATIONS  # noqa: E402
from datasets.vocabulary import MODALITIES  # noqa: E402
from engine.evaluation import head_list  # noqa: E402
from engine.options import sequence_list  # noqa: E402
from engine.runs import configure_logging  # noqa: E402
from priors import EncoderUnavailableError  # noqa: E402

logger = logging.getLogger("benchmark")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    split = commands.add_parser("split", help="seeded k-fold split of the cases, written once and reused")
    split.add_argument("--src", type=Path, required=True, help="raw MyoPS 2020 folder")
    split.add_argument("--dataset", default="MyoPS2020", choices=DATASETS, help="raw layout (Phantom: MyoPS380's)")
    split.add_argument("--split_file", type=Path, required=True)
    split.add_argument("--folds", type=int, default=3)
    split.add_argument("--seed", type=int, default=1234)

    prep = commands.add_parser("prepare", help="preprocess every fold (flags after -- go to preprocess_data.py)")
    prep.add_argument("--src", type=Path, required=True, help="raw folder the split was made from")
    prep.add_argument("--split_file", type=Path, required=True)
    prep.add_argument("--data", type=Path, required=True, help="output folder for this input setting")
    prep.add_argument("--spacing", type=float, default=RECIPE_INPUT["spacing"], help="in-plane mm (recipe: 1.0)")
    prep.add_argument("--crop_size", type=int, default=RECIPE_INPUT["crop_size"], help="pixels (recipe: 176)")
    prep.add_argument("--locator", type=Path, default=None,
                      help="crop around the heart: folder of a coarse run per fold (<out>/runs/<input>/<variant>/"
                           "<budget>, holding fold0, fold1, ...) that locates each fold's test cases")

    go = commands.add_parser("run", help="time, train, test and record one variant on one fold")
    go.add_argument("--data", type=Path, required=True, help="folder written by prepare")
    go.add_argument("--out", type=Path, required=True, help="benchmark folder: results.jsonl, runs/, priors/")
    go.add_argument("--variant", required=True, choices=list(VARIANTS),
                    help="; ".join(f"{name}: {variant.description}" for name, variant in VARIANTS.items()))
    go.add_argument("--fold", type=int, required=True)
    go.add_argument("--mode", default="time", choices=["time", "iterations"],
                    help="time: --budget_minutes of training; iterations: a fixed --iterations")
    go.add_argument("--budget_minutes", type=float, default=None)
    go.add_argument("--iterations", type=int, default=None)
    go.add_argument("--biomedclip_priors", type=Path, default=None,
                    help="BiomedCLIP prior file (python -m priors.encode) for the I-MMSeg variants")
    go.add_argument("--names_only_priors", type=Path, default=None,
                    help="prior file of priors/prompts/names_only.json (default: encoded by the offline encoder)")
    go.add_argument("--vit_name", default=RECIPE_FLAGS["vit_name"], help="configuration (recipe: compact)")
    go.add_argument("--batch_size", type=int, default=RECIPE_FLAGS["batch_size"],
                    help="train.py's --batch_size (recipe: 8); another is recorded as <variant>+bs<N>")
    go.add_argument("--augmentation", default=RECIPE_FLAGS["augmentation"], metavar="{" + ",".join(AUGMENTATIONS) + "}",
                    help="train.py --augmentation (recipe: strong); another preset is recorded as variant "
                         "<variant>+<preset>_aug. With --members, one preset for all or a comma-separated list with "
                         "one per member (e.g. strong,strong,strong,nnunet: <variant>+ens4_strong3_nnunet1)")
    go.add_argument("--num_workers", type=int, default=None, help="train.py's loader processes (its default)")
    go.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    go.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"],
                    help="train.py's and test.py's --amp (recipe: none); bf16 is also faster on CPUs with bf16 "
                         "instructions. Recorded as variant <variant>+<amp>")
    go.add_argument("--members", type=int, default=1,
                    help="train N runs of the variant (seeds differ), each with 1/N of the budget, and score their "
                         "ensemble (probabilities averaged): recorded as <variant>+ensN at the whole budget")
    go.add_argument("--member_variants", default=None, metavar="VARIANT,...",
                    help="with --members N, one variant per member, the first being --variant (e.g. "
                         "immseg,immseg,immseg,immseg_half,immseg_half,immseg_half); each (variant, augmentation) is "
                         "timed and planned once, its seeds count up, and the ensemble is recorded as "
                         "<variant>_x<count>+...+ensN_<preset><count>...")
    go.add_argument("--tta", action="store_true",
                    help="score with test.py --tta (flip averaging); recorded as variant <variant>+tta, the training "
                         "reused if the plain variant is already recorded")
    go.add_argument("--postprocess", action="store_true",
                    help="score with test.py --postprocess (one connected myocardium); recorded as <variant>+pp")
    go.add_argument("--heads", default=("fused",), type=head_list,
                    help="score with test.py --heads (I-MMSeg heads averaged, e.g. fused,LGE,T2w); recorded as "
                         "<variant>+heads_<names>, the training reused")
    go.add_argument("--sequences", default=MODALITIES, type=sequence_list,
                    help="score with test.py --sequences (a subset, the others hidden); recorded as "
                         "<variant>+seq_<names>, the training reused")
    go.add_argument("--missing", default="leave_out", choices=["leave_out", "zero_fill"],
                    help="with --sequences, test.py --missing (zero_fill: recorded as <variant>+seq_<names>_zerofill)")
    go.add_argument("--fused_start_epoch", type=int, default=None,
                    help="epoch of the paper's 300 at which the fused head starts training, scaled to the run like "
                         "the paper's 100 (the default); recorded as <variant>+fused<E>")
    go.add_argument("--base_lr", type=float, default=None,
                    help="train.py's base learning rate (its default: 0.001); another is recorded as <variant>+lr<rate>")
    go.add_argument("--stage_iterations", type=int, default=None,
                    help="a subset stage variant (immseg_subsets): the stage's iterations (default: the complete "
                         "run's); recorded as <variant>+stage<N>")
    go.add_argument("--stage_base_lr", type=float, default=None,
                    help="a subset stage variant: the stage's --base_lr (default: train.py's for a stage); recorded "
                         "as <variant>+stagelr<rate>")
    go.add_argument("--warmup_steps", type=int, default=6, help="untimed steps per stage before timing")
    go.add_argument("--timed_steps", type=int, default=20,
                    help="timed steps per stage from an epoch's start (at most an epoch; the save is added)")

    rep = commands.add_parser("report", help="the Markdown table of <out>/results.jsonl")
    rep.add_argument("--out", type=Path, required=True)
    rep.add_argument("--reference", default="immseg", help="variant the paired differences are taken against")
    rep.add_argument("--reference_setting", default=None,
                     help="the reference's budget, e.g. 'time 38 min' when a heart-centred input's fine runs got "
                          "the budget less the locator's minutes (default: each row's own budget)")
    rep.add_argument("--pool_budgets", action="store_true",
                     help="one row per variant and mode over its budgets when each fold has one (e.g. equal "
                          "iterations fitted per fold), paired with the reference's row (--reference_setting: the "
                          "one at that budget, as labelled in the table)")
    rep.add_argument("--report_file", type=Path, default=None, help="default: <out>/report.md")

    fit_parser = commands.add_parser("fit", help="Dice of one trained run on its fold's training cases against its "
                                                 "test cases (-> <out>/fit.jsonl, <out>/fit.md)")
    fit_parser.add_argument("--data", type=Path, required=True, help="folder written by prepare")
    fit_parser.add_argument("--out", type=Path, required=True, help="benchmark folder the run trained in")
    fit_parser.add_argument("--variant", required=True,
                            help="a trained run's name under <out>/runs/<input>, e.g. immseg+bf16")
    fit_parser.add_argument("--setting", required=True, help="its budget as recorded, e.g. 'time 6 min'")
    fit_parser.add_argument("--fold", type=int, required=True)
    fit_parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])

    agree = commands.add_parser("agreement", help="each member of a recorded ensemble scored alone, and how far the "
                                                  "members' predictions agree (-> <out>/agreement.jsonl, .md)")
    agree.add_argument("--data", type=Path, required=True, help="folder written by prepare")
    agree.add_argument("--out", type=Path, required=True, help="benchmark folder the ensemble was scored in")
    agree.add_argument("--variant", required=True,
                       help="an ensemble's recorded name, e.g. immseg+ens3_strong2_nnunet1+bf16")
    agree.add_argument("--setting", required=True, help="its budget as recorded, e.g. 'time 36 min'")
    agree.add_argument("--fold", type=int, required=True)
    agree.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])

    cases = commands.add_parser("cases", help="per-case Dice of two variants in one structure, by its label volume")
    cases.add_argument("--out", type=Path, required=True)
    cases.add_argument("--variant", required=True)
    cases.add_argument("--reference", required=True)
    cases.add_argument("--structure", default="scar", choices=list(STRUCTURE_NAMES))
    cases.add_argument("--src", type=Path, required=True, help="raw folder the split was made from (the labels)")
    cases.add_argument("--dataset", default="MyoPS2020", choices=DATASETS, help="raw layout (Phantom: MyoPS380's)")

    subsets = commands.add_parser("subsets", help="per subset of the sequences: a subset stage, paired dropout and "
                                                  "TransUNet trained on it; or a recorded dropout model, the recipe "
                                                  "zero-filled and TransUNet trained on it (-> <out>/subsets.md)")
    subsets.add_argument("--out", type=Path, required=True)
    subsets.add_argument("--setting", required=True, help="the budget as recorded, e.g. 'iterations 300'")
    subsets.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="the runs' --amp")
    subsets.add_argument("--table_file", type=Path, default=None, help="default: <out>/subsets.md")
    subsets.add_argument("--dropout_variant", default="immseg_seqdrop",
                         help="a recorded sequence-dropout variant shown as (a), e.g. immseg_seqdrop25 (a training "
                              "mode since removed: its tables are rebuilt from benchmarks/results/missing_sequences/)")
    subsets.add_argument("--stage_variant", default=None,
                         help="a subset stage shown as (a) (e.g. immseg_subsets), against (b) --paired_variant and "
                              "(c) TransUNet trained on the subset alone")
    subsets.add_argument("--paired_variant", default="immseg_seqpair",
                         help="with --stage_variant: (b), a recorded variant")
    subsets.add_argument("--paired_setting", default=None,
                         help="with --stage_variant: (b)'s budget (default --setting)")
    subsets.add_argument("--alone_setting", default=None, help="with --stage_variant: (c)'s budget (default --setting)")
    subsets.add_argument("--compared_amp", default=None, choices=["none", "bf16", "fp16"],
                         help="with --stage_variant: the --amp (b) and (c) were trained with (default --amp)")
    subsets.add_argument("--compare_results", type=Path, nargs="+", default=[],
                         help="further results files read with <out>/results.jsonl (e.g. the committed records of "
                              "benchmarks/results/missing_sequences/results.jsonl.gz)")

    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "prepare":
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    args.preprocess_flags = [flag for flag in extra if flag != "--"]
    return args



def main(argv=None):
    configure_logging()
    args = parse_args(argv)
    try:
        if args.command == "split":
            write_split(args.dataset, args.src, args.split_file, args.folds, args.seed)
        elif args.command == "prepare":
            prepare(args.src, args.split_file, args.data, args.spacing, args.crop_size, args.preprocess_flags,
                    args.locator)
        elif args.command == "run":
            return run_subset_stage(args) if VARIANTS[args.variant].stage_of else run(args)
        elif args.command == "fit":
            return fit(args)
        elif args.command == "agreement":
            return agreement(args)
        elif args.command == "subsets":
            subsets_report(args.out, args.setting, args.amp, args.table_file, args.dropout_variant,
                           args.stage_variant, args.compare_results, args.paired_variant, args.paired_setting,
                           args.alone_setting, args.compared_amp)
        elif args.command == "cases":
            compare_cases(args.out, args.variant, args.reference, args.structure, args.src, args.dataset)
        else:
            report(args.out, args.reference, args.report_file, args.reference_setting, args.pool_budgets)
    except (ValueError, FileNotFoundError, EncoderUnavailableError) as error:  # the project's errors name the cause
        logger.error("%s", error)
        return 1
    return 0



if __name__ == "__main__":
    sys.exit(main())
