"""Training speed of a model configuration: the bare step, the real training loop, FLOPs and utilisation.

    python benchmarks/speed.py --vit_name R50-only --img_size 128 --batch_size 4 --device cpu \
        [--reference_dir /path/to/I_MMSeg] [--json speed.json]
    python benchmarks/speed.py --vit_name R50-ViT-B_16 --img_size 176 --batch_size 8 --device cuda \
        --loop_data data/Phantom176 [--compile on] [--deterministic 0] [--profile profile.txt]

``--loop_data`` (a folder written by preprocess_data.py) adds the training loop as
train.py runs it (loader, losses, optimizer, read-back of the losses, end-of-epoch
checkpoint in the background): for each stage of the schedule (modality heads;
+ contrast; fused head) ``--loop_warmup_epochs`` epochs, then ``--loop_epochs`` timed
ones; ``loop_s`` weighs the stages by their share of the paper's 300 epochs. The
training step's FLOPs (forward and backward, ``torch.utils.flop_counter``) over its
time give the model FLOP utilisation against the device's datasheet peak (PEAK_TFLOPS),
and, with ``--measure_peak``, against a large matrix product measured on the device.
``--profile FILE`` writes the top kernels of a few profiled loop steps and the share
of the time the device was busy.

Each model is measured in a fresh child process, so that ``peak_rss_mb`` is its
own. ``train_step_s`` is the median over timed steps (after warm-up) of forward,
backward and optimiser step with all loss terms of the fused stage;
``infer_slice_s`` is the median time per slice when a volume of ``--slices``
slices is predicted in batches of ``--batch_slices`` (the path test.py uses).
On CUDA, ``peak_cuda_mb`` is torch.cuda.max_memory_allocated over both.
``cpu_capability`` and ``cpu_bf16_kernels`` say what the CPU offers PyTorch
(e.g. AVX2 without bf16 kernels: ``--amp bf16`` is emulated there, and slow).
With ``--reference_dir`` (a checkout of the I_MMSeg review release with its
``text_features/*.pth``), its model is timed the way its own scripts run it:
the same training step, and inference one slice at a time.
"""
import argparse
import concurrent.futures
import json
import logging
import multiprocessing
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.harness.reference_code import import_reference  # noqa: E402
from engine.options import PAPER_SCHEDULE, stage_fractions  # noqa: E402

logger = logging.getLogger("speed")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vit_name", default="R50-only")
    parser.add_argument("--model", default="immseg", choices=["immseg", "transunet_single", "transunet_early"])
    parser.add_argument("--img_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=4, help="training batch")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--amp", default="none", choices=["none", "fp16", "bf16"])
    parser.add_argument("--deterministic", type=int, default=None, choices=[0, 1],
                        help="train.py's --deterministic (default: its default for the device)")
    parser.add_argument("--compile", default="off", choices=["auto", "off", "on"],
                        help="train.py's --compile, for the bare step and the loop")
    parser.add_argument("--loop_data", type=Path, default=None,
                        help="preprocessed dataset: also time the training loop as train.py runs it")
    parser.add_argument("--loop_warmup_epochs", type=int, default=1)
    parser.add_argument("--loop_epochs", type=int, default=2, help="timed epochs per stage")
    parser.add_argument("--num_workers", type=int, default=None, help="train.py's --num_workers (its default)")
    parser.add_argument("--prior_embeddings", type=Path, default=None,
                        help="prior file for the loop (default: random 512-d priors written to a temporary file)")
    parser.add_argument("--profile", type=Path, default=None, help="write a profile of 5 loop steps here")
    parser.add_argument("--measure_peak", action="store_true",
                        help="time an 8192^3 matrix product in the training precision as the device's peak")
    parser.add_argument("--skip_inference", action="store_true", help="time training only")
    parser.add_argument("--trace_losses", type=int, default=None, metavar="STEPS",
                        help="instead of timing: the losses of the first STEPS steps of the fused stage on "
                             "--loop_data from the seed (compare two runs, e.g. --compile off and on)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    parser.add_argument("--slices", type=int, default=16, help="slices in the timed volume")
    parser.add_argument("--batch_slices", type=int, default=16, help="slices per inference batch")
    parser.add_argument("--infer_repeats", type=int, default=3)
    parser.add_argument("--reference_dir", type=Path, default=None,
                        help="checkout of the released review code to time side by side")
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    return parser.parse_args(argv)


def _setup(args):
    import torch

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # in the child process
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return torch


def _synthetic_batch(torch, batch, img_size, device):
    images = torch.rand(batch, 3, img_size, img_size, device=device)
    labels = torch.randint(0, 4, (batch, img_size, img_size), device=device)
    return images, labels


def _peak_memory(torch, device):
    figures = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device == "cuda":
        figures["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return figures


def _median_time(torch, device, function, repeats):
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# Dense tensor-core and plain float32 peaks in TFLOP/s from the vendors' datasheets (SXM parts where there are two),
# matched by the first name that occurs in torch.cuda.get_device_name(). "amp" is bf16/fp16 with float32 accumulation.
PEAK_TFLOPS = {
    "H200": {"amp": 989.4, "fp32": 66.9},
    "H100": {"amp": 989.4, "fp32": 66.9},
    "A100": {"amp": 312.0, "fp32": 19.5},
    "L40S": {"amp": 362.1, "fp32": 91.6},
    "A10": {"amp": 125.0, "fp32": 31.2},
    "RTX 4090": {"amp": 165.2, "fp32": 82.6},
    "V100": {"amp": 125.0, "fp32": 15.7},
}


def datasheet_peak(torch, device, amp):
    """(TFLOP/s, source) of the device's datasheet peak for the precision, or (None, reason)."""
    if device != "cuda":
        return None, "no datasheet peak for CPUs"
    name = torch.cuda.get_device_name()
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            kind = "fp32" if amp == "none" else "amp"
            return peaks[kind], f"{key} datasheet, dense {'float32' if kind == 'fp32' else amp}"
    return None, f"{name} is not in benchmarks/speed.py's PEAK_TFLOPS"


def measured_peak(torch, device, amp, size=8192, repeats=10):
    """TFLOP/s of a size^3 matrix product in the training precision on random data (median of ``repeats``)."""
    dtype = {"none": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    seconds = _median_time(torch, device, lambda: a @ b, repeats)
    return 2 * size ** 3 / seconds / 1e12


def step_flops(torch, step):
    """FLOPs of one call of ``step`` (forward and backward), counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def make_step(torch, args, forward, optimizer, criterion, output_adapter):
    """One training step on a fixed synthetic batch: forward, all loss terms of the fused stage, backward, update."""
    from networks.inference import autocast_context
    from utils import loss_weights

    scaler = torch.amp.GradScaler(args.device, enabled=args.amp == "fp16")
    images, labels = _synthetic_batch(torch, args.batch_size, args.img_size, args.device)
    weights = loss_weights(epoch=10 ** 6)

    def step():
        with autocast_context(args.device, args.amp):
            total, _ = criterion(output_adapter(forward(images)), labels, weights)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def _time_training(torch, args, step):
    """(median seconds of a step after the warm-up, seconds of the warm-up: compilation included)."""
    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    if args.device == "cuda":
        torch.cuda.synchronize()
    warmup_seconds = time.perf_counter() - start
    return _median_time(torch, args.device, step, args.steps), warmup_seconds


def build_ours(torch, args):
    """Our model, its training forward, loss and optimizer on ``args.device``, set up as trainer.py does."""
    from engine.options import device_path
    from networks.vit_seg_configs import get_config
    from networks.vit_seg_modeling import build_model
    from trainer import make_optimizer
    from utils import IMMSegLoss

    config = get_config(args.vit_name)
    model = build_model(args.model, config, args.img_size, config.n_classes,
                        torch.randn(config.n_modalities, config.text_dim),
                        torch.randn(config.n_classes, config.text_dim)).to(args.device).train()
    path = device_path(args.device)  # as trainer.py
    memory_format = torch.channels_last if path.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    criterion = IMMSegLoss(config.n_classes, config.contrast, fixed_size_contrast=path.fixed_size_contrast
                           ).to(args.device)
    optimizer = make_optimizer(model.parameters(), 1e-3, 1e-4, torch.device(args.device))
    return model, lambda x: model(x.contiguous(memory_format=memory_format)), criterion, optimizer


def _settings_on(torch, args):
    from engine.distributed import seed_everything
    from engine.options import CUDA_DEFAULTS

    if args.deterministic is None:
        args.deterministic = CUDA_DEFAULTS["deterministic"] if args.device == "cuda" else 1  # as train.py
    if args.compile == "auto":
        args.compile = CUDA_DEFAULTS["compile"] if args.device == "cuda" else "off"
    seed_everything(0, args.deterministic)


def measure_ours(args):
    torch = _setup(args)
    from networks.inference import cpu_features, fuse_for_inference, predict_slices, warn_if_bf16_is_emulated
    from trainer import compile_in_place

    _settings_on(torch, args)
    warn_if_bf16_is_emulated(args.device, args.amp, logger)
    model, forward, criterion, optimizer = build_ours(torch, args)
    figures = {"model": f"ours {args.model} {args.vit_name}",
               "params": sum(p.numel() for p in model.parameters()), **cpu_features()}
    step = make_step(torch, args, forward, optimizer, criterion, lambda out: out)
    flops = step_flops(torch, step)  # eager, before any compilation
    if args.compile == "on":
        compile_in_place(model, criterion, args.compile)
    seconds, warmup = _time_training(torch, args, step)
    figures.update(train_step_s=seconds, train_step_tflop=flops / 1e12, warmup_s=warmup)
    figures.update(utilisation(torch, args, flops, seconds))
    if not args.skip_inference:
        inference_model = fuse_for_inference(model)
        volume = torch.rand(args.slices, 3, args.img_size, args.img_size)
        predict = lambda: predict_slices(inference_model, volume, args.batch_slices, args.device,  # noqa: E731
                                         args.amp)
        predict()
        figures["infer_slice_s"] = _median_time(torch, args.device, predict, args.infer_repeats) / args.slices
    figures.update(_peak_memory(torch, args.device))
    return figures


def utilisation(torch, args, flops, seconds):
    """Model FLOP utilisation of ``flops`` done in ``seconds`` against the datasheet (and measured) peak."""
    peak, source = datasheet_peak(torch, args.device, args.amp)
    figures = {"peak_tflops": peak, "peak_source": source,
               "mfu": flops / seconds / (peak * 1e12) if peak else None}
    if args.measure_peak and args.device == "cuda":
        measured = measured_peak(torch, args.device, args.amp)
        figures.update(measured_peak_tflops=measured, mfu_measured_peak=flops / seconds / (measured * 1e12))
    return figures


def loop_stages(model_name):
    """(first epoch, share of the paper's epochs) of each stage of the schedule: one for the baselines."""
    if model_name != "immseg":
        return [(0, 1.0)]
    return stage_fractions(PAPER_SCHEDULE["start_contrast_epoch"], PAPER_SCHEDULE["region_fusion_start_epoch"],
                           PAPER_SCHEDULE["max_epochs"])


def random_prior_file(torch, folder, dim=512):
    from priors import import_embeddings, save_priors

    plain = Path(folder) / "plain_priors.pt"
    torch.save({"modality": torch.randn(3, dim), "class": torch.randn(4, dim)}, plain)
    save_priors(import_embeddings(plain, "random priors of benchmarks/speed.py"), Path(folder) / "priors.pt")
    return Path(folder) / "priors.pt"


def _synchronize(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_loop(args):
    """Seconds per iteration of train.py's loop on ``args.loop_data``, per stage and weighted as in the paper."""
    import tempfile

    torch = _setup(args)
    with tempfile.TemporaryDirectory() as folder:
        trainer = loop_trainer(torch, args, folder)
        ctx = trainer.ctx
        per_epoch = len(trainer.loader)
        figures = {"loop_iterations_per_epoch": per_epoch, "loop_settings": {
            name: getattr(trainer.args, name) for name in ("amp", "deterministic", "compile", "num_workers",
                                                            "log_every")}, "loop_stages": {}}
        total = 0.0
        stages = [(trainer.weights_for(first_epoch), share) for first_epoch, share in loop_stages(args.model)]
        for weights, share in stages:
            trainer.weights_for = lambda epoch, fixed=weights: fixed
            start = time.perf_counter()
            for _ in range(args.loop_warmup_epochs):
                trainer.train_epoch(trainer.model)
                trainer.end_epoch()
            _synchronize(torch, ctx.device)
            warmup = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(args.loop_epochs):
                trainer.train_epoch(trainer.model)
                trainer.end_epoch()
            _synchronize(torch, ctx.device)
            seconds = (time.perf_counter() - start) / (args.loop_epochs * per_epoch)
            name = ", ".join(f"{key} {value:g}" for key, value in weights._asdict().items())
            figures["loop_stages"][name] = {"s_per_iteration": seconds, "warmup_s": warmup, "share": share}
            total += share * seconds
            logger.info("loop, stage %s: %.4f s per iteration (warm-up %.1f s)", name, seconds, warmup)
        figures["loop_s"] = total
        figures["last_write_s"] = trainer.checkpoint_writer.last_write_seconds
        if args.profile is not None:
            try:
                figures["profile"] = profile_steps(torch, trainer, weights, args.profile)
            except Exception as error:  # noqa: BLE001 - the timings stand without the profile
                logger.exception("profiling failed: %s", error)
                figures["profile_error"] = repr(error)
        trainer.checkpoint_writer.wait()
        trainer.stop_loader_workers()
        figures.update(_peak_memory(torch, args.device))
    return figures


def trace_losses(args):
    """The total loss of each of the first ``args.trace_losses`` steps of the fused stage, from the seed."""
    import tempfile

    torch = _setup(args)
    with tempfile.TemporaryDirectory() as folder:
        trainer = loop_trainer(torch, args, folder, log_every=1)
        weights = trainer.weights_for(PAPER_SCHEDULE["region_fusion_start_epoch"])
        losses = []
        while len(losses) < args.trace_losses:
            for batch in trainer.loader:
                trainer.train_step(trainer.model, batch, weights)
                trainer.read_losses()
                losses.append(trainer.last_losses[0])
                if len(losses) == args.trace_losses:
                    break
            trainer.sampler.set_epoch(trainer.sampler.epoch + 1)
        trainer.stop_loader_workers()
    return {"losses": losses, "trace_settings": {"compile": trainer.args.compile, "amp": trainer.args.amp,
                                                 "deterministic": trainer.args.deterministic}}


def loop_trainer(torch, args, folder, log_every=None):
    """A Trainer set up as train.py sets it up for ``args`` on ``args.loop_data`` (no validation, no epoch files)."""
    from engine.distributed import seed_everything, setup_distributed
    from engine.options import resolve_device_defaults
    from engine.training import build, parse_training_args
    from trainer import Trainer

    priors = args.prior_embeddings or random_prior_file(torch, folder)
    flags = ["--dataset", "Phantom", "--root_path", str(args.loop_data), "--img_size", str(args.img_size),
             "--vit_name", args.vit_name, "--model", args.model, "--batch_size", str(args.batch_size),
             "--device", args.device, "--amp", args.amp, "--compile", args.compile, "--no_pretrain",
             "--prior_embeddings", str(priors), "--progress", "0", "--output_dir", str(Path(folder) / "run"),
             "--max_epochs", str(PAPER_SCHEDULE["max_epochs"]), "--val_every", "1000000",
             "--save_every", "1000000"]
    flags += [] if args.deterministic is None else ["--deterministic", str(args.deterministic)]
    flags += [] if args.num_workers is None else ["--num_workers", str(args.num_workers)]
    flags += [] if log_every is None else ["--log_every", str(log_every)]
    train_args = parse_training_args(flags)
    ctx = setup_distributed(train_args.device)
    resolve_device_defaults(train_args, ctx.device)
    seed_everything(train_args.seed, train_args.deterministic)
    model, spec, _ = build(train_args, ctx)
    trainer = Trainer(train_args, ctx, model, spec, Path(folder) / "run")
    trainer.run_dir.mkdir()
    trainer.model.train()
    return trainer


def profile_steps(torch, trainer, weights, path, steps=5):
    """Profile ``steps`` loop steps (batches from the loader) and write the top kernels and the device's busy share."""
    from torch.profiler import ProfilerActivity, profile

    device = trainer.ctx.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    batches = iter(trainer.loader)
    _synchronize(torch, device)
    with profile(activities=activities) as profiler:
        start = time.perf_counter()
        for _, batch in zip(range(steps), batches):
            trainer.train_step(trainer.model, batch, weights)
        _synchronize(torch, device)
        wall = time.perf_counter() - start
    averages = profiler.key_averages()
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = averages.table(sort_by=sort, row_limit=25, max_name_column_width=70)
    kernels = [event for event in profiler.events() if event.device_type.name == "CUDA"]
    busy_us = sum(event.time_range.elapsed_us() for event in kernels)
    summary = {"steps": steps, "wall_s": wall, "device_busy_share": busy_us / 1e6 / wall if kernels else None,
               "kernels_launched": len(kernels),
               "cpu_ops": sum(1 for event in profiler.events() if event.device_type.name == "CPU")}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(f"{steps} training steps in {wall:.3f} s; {summary}\n\n{table}\n")
    logger.info("profile of %d steps written to %s: %s", steps, path, summary)
    return summary


def check_reference_text_features(reference_dir):
    features = reference_dir / "text_features"
    for name in ("embedding_MRI_information.pth", "embedding_class_information.pth"):
        if not (features / name).is_file():
            raise FileNotFoundError(f"{features / name} is missing: the released model loads its text "
                                    "features there at construction (3 x 512 and 4 x 512 tensors)")


def measure_reference(args):
    torch = _setup(args)
    from networks.vit_seg_configs import get_config
    from networks.vit_seg_modeling import SegmentationOutput
    from utils import IMMSegLoss

    check_reference_text_features(args.reference_dir)
    released = import_reference(torch, args.reference_dir, args.device)
    config = released.CONFIGS["R50-ViT-B_16"]
    config.n_classes, config.n_skip = 4, 3
    config.patches.grid = (args.img_size // 16, args.img_size // 16)
    model = released.VisionTransformer(config, img_size=args.img_size, num_classes=4).to(args.device).train()
    criterion = IMMSegLoss(4, get_config("R50-only").contrast).to(args.device)
    figures = {"model": "released review code", "params": sum(p.numel() for p in model.parameters())}

    def forward(images):
        channels = [images[:, m:m + 1] for m in range(3)]
        return model(*channels, True)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)  # as its trainer.py
    step = make_step(torch, args, forward, optimizer, criterion,
                     lambda out: SegmentationOutput(out[0], out[1], out[2], out[3]))
    figures["train_step_s"] = _time_training(torch, args, step)[0]
    model.eval()
    volume = torch.rand(args.slices, 3, args.img_size, args.img_size)

    def predict():
        with torch.no_grad():
            for index in range(volume.shape[0]):
                slices = [volume[index:index + 1, m:m + 1].to(args.device) for m in range(3)]
                torch.argmax(torch.softmax(model(*slices), dim=1), dim=1).cpu().numpy()

    predict()
    figures["infer_slice_s"] = _median_time(torch, args.device, predict, args.infer_repeats) / args.slices
    figures.update(_peak_memory(torch, args.device))
    return figures


def _in_child(function, args):
    """``function(args)`` in a fresh (spawned, non-daemonic: its loader may start workers) process."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, args).result()


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    results = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    if args.trace_losses is not None:
        if args.loop_data is None:
            raise SystemExit("--trace_losses needs --loop_data")
        results.update(_in_child(trace_losses, args))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2))
        logger.info("losses of %d steps: first %.4f, last %.4f", len(results["losses"]), results["losses"][0],
                    results["losses"][-1])
        return results
    logger.info("measuring %s ...", args.vit_name)
    results.update(_in_child(measure_ours, args))
    if args.loop_data is not None:
        logger.info("timing the training loop on %s ...", args.loop_data)
        results.update(_in_child(measure_loop, args))
        if results.get("train_step_tflop"):
            results["loop_mfu"] = (results["train_step_tflop"] * 1e12 / results["loop_s"] / (results["peak_tflops"]
                                   * 1e12) if results.get("peak_tflops") else None)
    rows = [results]
    if args.reference_dir is not None:
        logger.info("measuring the released review code ...")
        reference = _in_child(measure_reference, args)
        results["reference"] = reference
        results["train_speedup"] = reference["train_step_s"] / results["train_step_s"]
        results["infer_speedup"] = reference["infer_slice_s"] / results["infer_slice_s"]
        rows.append(reference)
    cuda = args.device == "cuda"
    logger.info("%-28s %12s %14s %15s %12s%s", "model", "params", "train_step_s", "infer_slice_s", "peak_rss_mb",
                f" {'peak_cuda_mb':>13}" if cuda else "")
    for row in rows:
        logger.info("%-28s %12d %14.3f %15.4f %12.0f%s", row["model"], row["params"], row["train_step_s"],
                    row.get("infer_slice_s", float("nan")), row["peak_rss_mb"],
                    f" {row['peak_cuda_mb']:13.0f}" if cuda else "")
    if results.get("train_step_tflop") is not None:
        logger.info("training step: %.3f TFLOP; model FLOP utilisation %s (%s)%s", results["train_step_tflop"],
                    f"{results['mfu']:.2%}" if results.get("mfu") else "n/a", results["peak_source"],
                    f"; loop {results['loop_s']:.4f} s per iteration, utilisation "
                    f"{results['loop_mfu']:.2%}" if results.get("loop_mfu") else "")
    if "reference" in results:
        logger.info("ours vs released: training step %.2fx faster, inference per slice %.2fx faster",
                    results["train_speedup"], results["infer_speedup"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
