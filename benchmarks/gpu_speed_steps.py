"""The timings of benchmarks/gpu_speed.sh that benchmarks/speed.py does not make; each appends one JSON record
(``"step": NAME``) to ``--results``.

    python benchmarks/gpu_speed_steps.py benchmark_step --name immseg --checkout . --results r.jsonl -- TRAIN_FLAGS
    python benchmarks/gpu_speed_steps.py loader --data data/Phantom224 --results r.jsonl

``benchmark_step``: the MyoPS 2020 benchmark's own timing of a training iteration (3 warm-up and 8 timed steps
per stage of the schedule, plus the checkpoint save spread over the epoch) with the code of ``--checkout``: this
repository, or an earlier commit checked out elsewhere (``git worktree add ../base f45b770``), whose timing
function is found where that commit kept it. ``loader``: seconds per batch of the training loader alone (a
224 px, batch 24 epoch of ``--data`` by default, after one epoch that starts the workers), to set against the
training step.
"""
import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path


def timing_function(checkout):
    """``time_training_step`` of ``checkout``: benchmarks/harness/planning.py since the benchmark became a
    package, benchmarks/myops2020.py before (the f45b770 baseline)."""
    checkout = Path(checkout).resolve()
    os.chdir(checkout)  # the flags' relative paths (prompt files) are the checkout's
    sys.path.insert(0, str(checkout))
    if (checkout / "benchmarks" / "harness" / "planning.py").is_file():
        return importlib.import_module("benchmarks.harness.planning").time_training_step
    sys.argv = ["benchmarks/myops2020.py"]  # that version read its own name at import
    return importlib.import_module("benchmarks.myops2020").time_training_step


def benchmark_step(args):
    import torch

    time_training_step = timing_function(args.checkout)
    start = time.perf_counter()
    seconds, per_stage, per_epoch = time_training_step(
        args.train_flags + ["--output_dir", str(Path(args.scratch) / f"bench_{args.name}")], args.warmup_steps,
        args.timed_steps)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else None
    return {"checkout": str(args.checkout), "flags": args.train_flags, "s_per_iteration": seconds,
            "per_stage": per_stage, "iterations_per_epoch": per_epoch, "wall_s": time.perf_counter() - start,
            "peak_cuda_mb": peak}


def loader(args):
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from datasets.dataset_myops import MyoPSDataset
    from engine.distributed import setup_distributed
    from engine.options import loader_workers
    from trainer import training_loader

    data = MyoPSDataset(args.data, args.data, "train")
    ctx = setup_distributed("cuda" if torch.cuda.is_available() else "cpu")
    workers = loader_workers(ctx.device.type == "cuda") if args.num_workers is None else args.num_workers
    settings = argparse.Namespace(img_size=args.img_size, augmentation="paper", batch_size=args.batch_size,
                                  num_workers=workers, seed=1234)
    _, batches = training_loader(data, settings, ctx)  # the loader train.py builds
    if len(batches) == 0:
        raise SystemExit(f"{args.data} has {len(data)} training slices: fewer than one batch of {args.batch_size}")
    for _ in batches:  # the first epoch starts the workers
        pass
    start = time.perf_counter()
    count = sum(1 for _ in batches)
    return {"s_per_batch": (time.perf_counter() - start) / count, "workers": workers, "batches": count,
            "img_size": args.img_size, "batch_size": args.batch_size}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    step = commands.add_parser("benchmark_step", help="the benchmark's timing of a training iteration")
    step.add_argument("--checkout", type=Path, required=True, help="the repository whose code is timed")
    step.add_argument("--scratch", type=Path, default=Path("/tmp"),
                      help="where the timing's run folder goes (default: /tmp)")
    step.add_argument("--warmup_steps", type=int, default=3)
    step.add_argument("--timed_steps", type=int, default=8)
    step.add_argument("train_flags", nargs=argparse.REMAINDER, help="-- then train.py's flags")
    load = commands.add_parser("loader", help="the training loader's seconds per batch")
    load.add_argument("--data", type=Path, required=True, help="a folder written by preprocess_data.py")
    load.add_argument("--img_size", type=int, default=224)
    load.add_argument("--batch_size", type=int, default=24)
    load.add_argument("--num_workers", type=int, default=None, help="default: train.py's on this device")
    for command in (step, load):
        command.add_argument("--name", default=None, help="the record's step (default: the command)")
        command.add_argument("--results", type=Path, required=True, help="JSON lines file to append to")
    args = parser.parse_args(argv)
    if args.command == "benchmark_step":
        args.train_flags = args.train_flags[1:] if args.train_flags[:1] == ["--"] else args.train_flags
    args.name = args.name or args.command
    return args


def main(argv=None):
    args = parse_args(argv)
    results = args.results.resolve()  # before benchmark_step changes directory
    record = {"step": args.name, "status": "ok", **(benchmark_step if args.command == "benchmark_step" else loader)(args)}
    print(json.dumps(record))
    with open(results, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
