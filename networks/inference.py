"""Inference helpers: an evaluation copy of a model with folded normalisation, and batched slice prediction."""
import contextlib
import copy
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from .vit_seg_modeling_resnet_skip import StdConv2d

logger = logging.getLogger(__name__)


def _standardised_conv(conv):
    """A plain Conv2d holding the standardised kernel of a StdConv2d, on the source's device and in its dtype."""
    plain = nn.utils.skip_init(nn.Conv2d, conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                               conv.padding, conv.dilation, conv.groups, bias=conv.bias is not None,
                               padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
    var, mean = torch.var_mean(conv.weight, dim=(1, 2, 3), keepdim=True, unbiased=False)
    plain.weight.data.copy_((conv.weight - mean) / (var + conv.eps).sqrt())
    if conv.bias is not None:
        plain.bias.data.copy_(conv.bias)
    return plain


def _fold_batch_norm(conv, bn):
    """Fold an eval-mode BatchNorm2d into the convolution before it."""
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight.data.mul_(scale[:, None, None, None])
    conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)


@torch.no_grad()
def fuse_for_inference(model, channels_last=True):
    """An eval-mode copy that computes the same function with fewer passes over memory.

    Weight-standardised kernels are standardised once, BatchNorm layers that
    follow a convolution inside an ``nn.Sequential`` are folded into it, and
    (optionally) tensors use the channels-last layout that oneDNN and cuDNN
    convolutions prefer. The model passed in is left unchanged, and every tensor of
    the copy keeps the device and dtype of the tensor it was made from.
    """
    fused = copy.deepcopy(model).eval()
    for module in list(fused.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, StdConv2d):
                setattr(module, name, _standardised_conv(child))
    for module in fused.modules():
        if isinstance(module, nn.Sequential):
            children = list(module.children())
            for index, (first, second) in enumerate(zip(children, children[1:])):
                if isinstance(first, nn.Conv2d) and isinstance(second, nn.BatchNorm2d):
                    _fold_batch_norm(first, second)
                    module[index + 1] = nn.Identity()
    fused.requires_grad_(False)
    if channels_last:
        fused = fused.to(memory_format=torch.channels_last)
    return fused


def autocast_context(device, amp):
    """torch.autocast for ``amp`` in {'none', 'fp16', 'bf16'} on ``device``."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[amp]
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def cpu_has_bf16_kernels():
    """Whether oneDNN runs bf16 kernels natively on this CPU (x86: AVX-512 or newer; Arm: bf16 instructions);
    None where this PyTorch does not say."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return None if check is None else bool(check())


def cpu_features():
    """What this CPU offers PyTorch, for records of speed: its capability (e.g. AVX2, AVX512) and bf16 kernels."""
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_bf16_kernels": cpu_has_bf16_kernels()}


def cuda_has_bf16_kernels(device="cuda"):
    """Whether the GPU computes bf16 natively: compute capability 8.0 or newer (A100, H100, RTX 30 and later);
    V100, T4 and older emulate it (``torch.cuda.is_bf16_supported()`` counts that emulation as support). None where
    no GPU is visible."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device) >= (8, 0)


def has_bf16_kernels(device):
    """cpu_has_bf16_kernels or cuda_has_bf16_kernels for ``device``."""
    device = torch.device(device)
    return cuda_has_bf16_kernels(device) if device.type == "cuda" else cpu_has_bf16_kernels()


def warn_if_bf16_is_emulated(device, amp, log=logger):
    """Log a warning when bf16 autocast is asked for on a device that emulates it: it still runs, with every bf16
    operation emulated, slower than float32 (a training step of `compact`, 8.8 times on an AVX2 CPU)."""
    device = torch.device(device)
    if amp == "bf16" and has_bf16_kernels(device) is False:
        where = (f"a GPU of compute capability {'.'.join(map(str, torch.cuda.get_device_capability(device)))}"
                 if device.type == "cuda" else
                 f"a CPU without bf16 kernels (PyTorch's CPU capability: {torch.backends.cpu.get_cpu_capability()})")
        log.warning("--amp bf16 on %s: bf16 is emulated and several times slower than float32 here; use --amp %s "
                    "on this machine", where, "fp16 or none" if device.type == "cuda" else "none")


class HeadAverage(nn.Module):
    """I-MMSeg with the class probabilities of several of its heads averaged (``heads``: names of its
    ``head_logits``, e.g. ("fused", "LGE")). It returns the log of the mean probabilities, so a softmax of its
    output, as ``predict_slices`` takes, is that mean."""

    def __init__(self, model, heads):
        super().__init__()
        self.model = model
        self.heads = tuple(heads)

    def forward(self, images):
        logits = self.model.head_logits(images)
        mean = torch.stack([logits[name].float().softmax(dim=1) for name in self.heads]).mean(dim=0)
        return mean.clamp_min(torch.finfo(mean.dtype).tiny).log()


FLIPS = ((), (-1,), (-2,), (-2, -1))


@torch.inference_mode()
def predict_slices(model, images, batch_slices=16, device="cpu", amp="none", channels_last=True, tta=False,
                   output_device="cpu"):
    """Class probabilities (S, K, H, W) on ``output_device`` for slices ``images`` (S, M, H, W), predicted in
    batches on ``device``.

    With ``tta`` the probabilities are averaged over the four horizontal/vertical flips.
    """
    model.eval()
    outputs = []
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    flips = FLIPS if tta else FLIPS[:1]
    for start in range(0, images.shape[0], batch_slices):
        batch = images[start:start + batch_slices].to(device, non_blocking=True)
        probabilities = 0
        for dims in flips:
            flipped = batch.flip(dims) if dims else batch
            with autocast_context(device, amp):
                logits = model(flipped.contiguous(memory_format=memory_format))
            softmax = logits.float().softmax(dim=1)
            probabilities = probabilities + (softmax.flip(dims) if dims else softmax)
        outputs.append((probabilities / len(flips)).to(output_device))
    return torch.cat(outputs)


def predict_volume(model, volume, img_size, batch_slices=16, device="cpu", amp="none", channels_last=True,
                   tta=False, output_device="cpu"):
    """Class probabilities (K, H, W, D) on ``output_device`` for a volume (M, H, W, D), its slices resized to
    ``img_size`` and back."""
    slices = volume.permute(3, 0, 1, 2).float()
    size = tuple(slices.shape[-2:])
    resize = size != (img_size, img_size)
    if resize:
        slices = F.interpolate(slices, size=(img_size, img_size), mode="bicubic", align_corners=False).clamp(0, 1)
    probabilities = predict_slices(model, slices, batch_slices, device, amp, channels_last, tta, output_device)
    if resize:
        probabilities = F.interpolate(probabilities, size=size, mode="bilinear", align_corners=False)
    return probabilities.permute(1, 2, 3, 0)
