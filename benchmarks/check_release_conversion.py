"""Check networks.convert_release against the review release's own model.

    python benchmarks/check_release_conversion.py --reference_dir /path/to/I_MMSeg [--img_size 128] \
        [--batch_size 2] [--seed 0]

The release's ``VisionTransformer`` is imported from a checkout of its public code
(``--reference_dir``; nothing of it is copied here) and built on the CPU with random
text features, which this script writes to a temporary folder that the release's
constructor reads instead of its own ``text_features/``. It is initialised randomly
with the seed; every normalisation layer also gets random affine parameters and every
BatchNorm random running statistics, and every bias a random offset, so that no
wrongly mapped parameter can hide behind a default value. Its state dict, with
DataParallel's ``module.`` prefixes, is converted with ``networks.convert_release``
and both models run on the same random input:

- eval mode: the fused output (what both test scripts use), also through the folded
  inference copy that our test.py runs;
- training mode with dropout off: the fused output, the modality heads, the contrast
  embeddings and the class anchors.

Prints the largest absolute difference of each beside the largest absolute value of
the release's output; exits with 1 when the eval-mode fused output differs by 1e-4 or
more. ``--float64`` runs both models in double precision, where rounding no longer
hides small differences of function.
"""
import argparse
import logging
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.harness.reference_code import import_reference  # noqa: E402
from networks.convert_release import (TEXT_FEATURE_FILES, convert_state_dict, load_text_features,  # noqa: E402
                                      target_model)
from networks.inference import fuse_for_inference  # noqa: E402

logger = logging.getLogger("check_release_conversion")

TOLERANCE = 1e-4
# Gains on the initial weights: wider gate and MLP pre-activations, so that their output activations matter, and
# logits of order one, so that the absolute tolerance means something.
LINEAR_GAIN = 3.0
CONTROLLER_GAIN = 10.0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference_dir", type=Path, required=True, help="checkout of the I_MMSeg review release")
    parser.add_argument("--img_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--float64", action="store_true", help="compare in double precision")
    return parser.parse_args(argv)


def write_text_features(directory, generator):
    """Random 3 x 512 and 4 x 512 features with norms near the release's (about 5)."""
    directory.mkdir(parents=True)
    rows = {"intensity": 3, "classes": 4}
    for name, file_name in TEXT_FEATURE_FILES.items():
        torch.save(torch.randn(rows[name], 512, generator=generator) * 0.22, directory / file_name)


@torch.no_grad()
def randomise(model, generator):
    """Random affine parameters of the norms, BatchNorm running statistics and bias offsets."""
    def uniform(tensor, low, high):
        tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)

    def normal(tensor, std):
        tensor.add_(torch.randn(tensor.shape, generator=generator) * std)

    for module in model.modules():
        if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            uniform(module.weight, 0.5, 1.5)
        if isinstance(module, nn.BatchNorm2d):
            normal(module.running_mean, 0.2)
            uniform(module.running_var, 0.5, 2.0)
        bias = getattr(module, "bias", None)
        if isinstance(bias, nn.Parameter):
            normal(bias, 0.05)
        if isinstance(module, nn.Linear):
            module.weight.mul_(LINEAR_GAIN)
    for name, parameter in model.named_parameters():
        if name.endswith("controller.weight"):
            parameter.mul_(CONTROLLER_GAIN)


def largest_difference(reference, ours):
    """(largest absolute difference, largest absolute value of the reference)."""
    return (reference - ours).abs().max().item(), reference.abs().max().item()


def largest_of(pairs):
    differences = [largest_difference(reference, ours) for reference, ours in pairs]
    return max(d for d, _ in differences), max(s for _, s in differences)


def build_release(reference_dir, features_root, img_size):
    released = import_reference(torch, reference_dir, "cpu")
    released.PROJECT_ROOT = features_root  # its constructor reads PROJECT_ROOT/text_features/*.pth
    config = released.CONFIGS["R50-ViT-B_16"]
    config.n_classes, config.n_skip = 4, 3
    config.patches.grid = (img_size // 16, img_size // 16)
    return released.VisionTransformer(config, img_size=img_size, num_classes=4)


def set_dropout(model, p):
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p


@torch.no_grad()
def compare(args):
    generator = torch.Generator().manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as temporary:
        features_root = Path(temporary)
        write_text_features(features_root / "text_features", generator)
        torch.manual_seed(args.seed)
        release = build_release(args.reference_dir, features_root, args.img_size)
        priors = load_text_features(features_root / "text_features")
    randomise(release, generator)
    if args.float64:
        torch.set_default_dtype(torch.float64)  # the release pads its skips with tensors of the default dtype
        release.double()
        release.class_embedding, release.modal_embedding = (release.class_embedding.double(),
                                                            release.modal_embedding.double())
        priors.intensity, priors.classes = priors.intensity.double(), priors.classes.double()
    release_state = {f"module.{key}": value for key, value in release.state_dict().items()}
    ours, spec = target_model(priors, args.img_size)
    converted, dropped = convert_state_dict(release_state, ours.state_dict(), spec["config"]["head"]["channels"])
    ours.load_state_dict(converted, strict=False)
    ours.to(release.class_embedding.dtype)
    logger.info("release: %.1f M parameters; converted %d tensors into %s (%.1f M parameters); dropped %s",
                sum(p.numel() for p in release.parameters()) / 1e6, len(converted), spec["config"]["name"],
                sum(p.numel() for p in ours.parameters()) / 1e6,
                ", ".join(f"{module} ({count})" for module, count in sorted(dropped.items())))

    images = torch.rand(args.batch_size, 3, args.img_size, args.img_size, generator=generator,
                        dtype=release.class_embedding.dtype)
    sequences = [images[:, m:m + 1] for m in range(3)]
    release.eval()
    ours.eval()
    reference = release(*sequences)
    results = {"eval: fused output": largest_difference(reference, ours(images)),
               "eval: fused output, folded inference copy": largest_difference(reference,
                                                                               fuse_for_inference(ours)(images))}

    set_dropout(release, 0.0)
    set_dropout(ours, 0.0)
    release.train()
    ours.train()
    fused, modality, embeddings, anchors = release(*sequences, True)
    output = ours(images, fused=True, contrast=True)
    results["training: fused output"] = largest_difference(fused, output.fused_logits)
    results["training: modality heads"] = largest_of(zip(modality, output.modality_logits))
    results["training: contrast embeddings"] = largest_of(
        pair for per_release, per_ours in zip(embeddings, output.contrast_embeddings)
        for pair in zip(per_release, per_ours))
    results["training: class anchors"] = largest_of(zip(anchors, output.class_anchors))
    return results


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    results = compare(args)
    logger.info("img_size %d, batch %d, seed %d, %s: largest absolute difference (largest absolute value of the "
                "release's output)", args.img_size, args.batch_size, args.seed,
                "float64" if args.float64 else "float32")
    for name, (difference, scale) in results.items():
        logger.info("  %-45s %.3e (%.3g)", name, difference, scale)
    passed = results["eval: fused output"][0] < TOLERANCE
    logger.info("%s: eval-mode fused output %s %.0e", "PASS" if passed else "FAIL", "<" if passed else ">=", TOLERANCE)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
