"""Training-step and inference speed of a model configuration, optionally beside the released review code.

    python benchmarks/speed.py --vit_name R50-only --img_size 128 --batch_size 4 --device cpu \
        [--reference_dir /path/to/I_MMSeg] [--json speed.json]

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
import importlib
import json
import logging
import multiprocessing
import resource
import statistics
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("speed")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vit_name", default="R50-only")
    parser.add_argument("--img_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=4, help="training batch")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--amp", default="none", choices=["none", "fp16", "bf16"])
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


def _time_training(torch, args, forward, optimizer, criterion, output_adapter):
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

    for _ in range(args.warmup):
        step()
    return _median_time(torch, args.device, step, args.steps)


def build_ours(torch, args):
    """Our model, its training forward, loss and optimizer on ``args.device``, set up as trainer.py does."""
    from networks.vit_seg_configs import get_config
    from networks.vit_seg_modeling import VisionTransformer
    from trainer import make_optimizer
    from utils import IMMSegLoss

    config = get_config(args.vit_name)
    model = VisionTransformer(config, args.img_size, config.n_classes,
                              torch.randn(config.n_modalities, config.text_dim),
                              torch.randn(config.n_classes, config.text_dim)).to(args.device).train()
    memory_format = torch.channels_last if args.device == "cuda" else torch.contiguous_format  # as trainer.py
    model = model.to(memory_format=memory_format)
    criterion = IMMSegLoss(config.n_classes, config.contrast).to(args.device)
    optimizer = make_optimizer(model.parameters(), 1e-3, 1e-4, torch.device(args.device))
    return model, lambda x: model(x.contiguous(memory_format=memory_format)), criterion, optimizer


def measure_ours(args):
    torch = _setup(args)
    from networks.inference import cpu_features, fuse_for_inference, predict_slices, warn_if_bf16_is_emulated

    warn_if_bf16_is_emulated(args.device, args.amp, logger)
    model, forward, criterion, optimizer = build_ours(torch, args)
    figures = {"model": f"ours {args.vit_name}",
               "params": sum(p.numel() for p in model.parameters()), **cpu_features()}
    figures["train_step_s"] = _time_training(torch, args, forward, optimizer, criterion, lambda out: out)

    inference_model = fuse_for_inference(model)
    volume = torch.rand(args.slices, 3, args.img_size, args.img_size)
    predict = lambda: predict_slices(inference_model, volume, args.batch_slices, args.device, args.amp)  # noqa: E731
    predict()
    figures["infer_slice_s"] = _median_time(torch, args.device, predict, args.infer_repeats) / args.slices
    figures.update(_peak_memory(torch, args.device))
    return figures


def check_reference_text_features(reference_dir):
    features = reference_dir / "text_features"
    for name in ("embedding_MRI_information.pth", "embedding_class_information.pth"):
        if not (features / name).is_file():
            raise FileNotFoundError(f"{features / name} is missing: the released model loads its text "
                                    "features there at construction (3 x 512 and 4 x 512 tensors)")


def import_reference(torch, reference_dir, device):
    """The released model's module, imported under a private package name; its GPU transfers are redirected
    to ``device``."""
    package = types.ModuleType("released_networks")
    package.__path__ = [str(reference_dir / "networks")]
    sys.modules["released_networks"] = package
    if device != "cuda":
        torch.Tensor.cuda = lambda self, *a, **k: self.to(device)
    return importlib.import_module("released_networks.vit_seg_modeling")


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
    figures["train_step_s"] = _time_training(torch, args, forward, optimizer, criterion,
                                             lambda out: SegmentationOutput(out[0], out[1], out[2], out[3]))
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
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(function, (args,))


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    results = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    logger.info("measuring %s ...", args.vit_name)
    results.update(_in_child(measure_ours, args))
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
                    row["infer_slice_s"], row["peak_rss_mb"], f" {row['peak_cuda_mb']:13.0f}" if cuda else "")
    if "reference" in results:
        logger.info("ours vs released: training step %.2fx faster, inference per slice %.2fx faster",
                    results["train_speedup"], results["infer_speedup"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
