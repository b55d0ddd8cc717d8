"""Train I-MMSeg (or a TransUNet baseline) on a dataset written by preprocess_data.py.

One device:
    python train.py --dataset MyoPS2020 --root_path data/MyoPS2020 --vit_name compact --no_pretrain \
        --prior_encoder offline --batch_size 8 --max_epochs 200
Several GPUs, or several nodes (torchrun's rendezvous flags):
    torchrun --nproc_per_node 4 train.py --dataset Myops --batch_size 24 --amp bf16
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 train.py ...
Resume (also after Ctrl-C or SIGTERM, which save the exact position in the epoch):
    python train.py <the same flags> --resume auto
The subset stage on a finished I-MMSeg run (documentation/missing_sequences.md): the run frozen, new parameters
for the proper subsets of the sequences trained beside it, into <run>_subsets unless --output_dir:
    python train.py --subsets_from weights/TU_MyoPS2020128/<run> --max_iterations 900 [--resume auto]
A run folder that holds an earlier run's checkpoints is refused unless --resume or --overwrite, and one where
another process trains (its train.lock) is refused.
"""
import sys

from engine.training import parse_training_args
from subset_trainer import train_subset_stage
from trainer import train


def parse_args(argv=None):
    """The flags (engine/training.py defines them; python train.py --help lists them)."""
    return parse_training_args(argv, __doc__)


def main(argv=None):
    args = parse_args(argv)
    return train_subset_stage(args) if args.subsets_from else train(args)


if __name__ == "__main__":
    sys.exit(main())
