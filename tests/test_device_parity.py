"""The GPU's code paths, run on the CPU before a GPU sees them: every tensor on the device of its inputs.

The ``meta`` device stands in for CUDA. Its tensors have shapes, dtypes and a device but no values, so a tensor made
on the CPU and mixed with them is an error (on CUDA a crash, or for an index a copy that waits for the device), and
so is reading any value (on CUDA a wait for the device). ``HostTensorWatch`` also flags an operation handed a CPU
tensor beside meta ones, which CUDA accepts for indices at the price of such a wait. What meta cannot see, an index
built from a Python list or a factory without a device, the static check at the end finds in the source.
"""
import ast
import contextlib
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import IMG_SIZE, ROOT, make_batch, make_model
from datasets.vocabulary import MODALITIES
from engine.options import GPU_PATH
from engine.predictor import EnsembleMember, ensemble_probabilities, member_models
from networks.inference import HeadAverage, fuse_for_inference, predict_volume
from networks.subset_stage import SubsetIMMSeg
from networks.missing_sequences import SequenceSubset, draw_subset_views, proper_subset_names, proper_subsets
from networks.vit_seg_modeling import build_model
from trainer import make_optimizer
from utils import BASELINE_WEIGHTS, IMMSegLoss, SubsetStageLoss, loss_weights

META = torch.device("meta")
SUBSETS = proper_subset_names()


class HostTensorWatch(TorchDispatchMode):
    """Records every operation that is handed a CPU tensor (other than a 0-d scalar) beside meta tensors."""

    def __init__(self):
        super().__init__()
        self.mixed = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [value for value in tree_leaves((args, kwargs)) if isinstance(value, torch.Tensor)]
        if any(tensor.is_meta for tensor in tensors):
            host = [tuple(tensor.shape) for tensor in tensors if tensor.device.type == "cpu" and tensor.dim() > 0]
            if host:
                self.mixed.append(f"{func} given CPU tensors of shapes {host}")
        return func(*args, **kwargs)


@contextlib.contextmanager
def device_tensors_only():
    with HostTensorWatch() as watch:
        yield
    assert not watch.mixed, "CPU tensors mixed into device work:\n" + "\n".join(watch.mixed)


def gpu_path_model(config, model_name="immseg", **kwargs):
    """The model as the trainer holds it on a GPU: on the device, channels_last."""
    if model_name == "immseg":
        model = make_model(config)
    else:
        model = build_model(model_name, config, IMG_SIZE, config.n_classes, **kwargs)
    return model.to(META).to(memory_format=torch.channels_last).train()


def meta_batch(batch=4):
    images, labels = make_batch(batch)
    return images.to(META).contiguous(memory_format=torch.channels_last), labels.to(META)


STAGES = {"modality heads": loss_weights(0, start_contrast_epoch=1, region_fusion_start_epoch=2),
          "with contrast": loss_weights(1, start_contrast_epoch=1, region_fusion_start_epoch=2),
          "fused": loss_weights(2, start_contrast_epoch=1, region_fusion_start_epoch=2)}


@pytest.mark.parametrize("stage", STAGES)
def test_the_training_step_of_every_stage_stays_on_the_device(tiny_config, stage):
    weights = STAGES[stage]
    model = gpu_path_model(tiny_config)
    criterion = IMMSegLoss(4, tiny_config.contrast, fixed_size_contrast=GPU_PATH.fixed_size_contrast).to(META)
    optimizer = make_optimizer(model.parameters(), 1e-3, 1e-4, META)
    images, labels = meta_batch()
    with device_tensors_only():
        flags = {"fused": weights.fused > 0, "contrast": weights.contrast > 0}
        loss, terms = criterion(model(images, **flags), labels, weights)
        assert all(value.is_meta for value in terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert loss.is_meta and all(p.grad is None or p.grad.is_meta for p in model.parameters())


@pytest.mark.parametrize("model_name, kwargs", [("transunet_single", {"modality": "T2w"}),
                                                ("transunet_early", {"input_sequences": ("bSSFP", "T2w")})])
def test_the_baselines_training_step_stays_on_the_device(tiny_config, model_name, kwargs):
    model = gpu_path_model(tiny_config, model_name, **kwargs)
    criterion = IMMSegLoss(4, tiny_config.contrast, fixed_size_contrast=True).to(META)
    images, labels = meta_batch()
    with device_tensors_only():
        loss, _ = criterion(model(images), labels, BASELINE_WEIGHTS)
        loss.backward()
    assert loss.is_meta


def test_the_subset_stages_training_step_stays_on_the_device(tiny_config):
    stage = SubsetIMMSeg(make_model(tiny_config)).to(META).to(memory_format=torch.channels_last).train()
    criterion = SubsetStageLoss(4, 0.5).to(META)
    optimizer = make_optimizer([p for p in stage.parameters() if p.requires_grad], 1e-3, 1e-4, META)
    images, labels = meta_batch()
    with device_tensors_only():
        loss, _ = criterion(stage(images, subset_view=draw_subset_views(4, proper_subsets(device=META))), labels)
        loss.backward()
        optimizer.step()
    assert loss.is_meta and all(p.grad.is_meta for p in stage.adapters.parameters())


def inference_models(config):
    """Every wrapper that test.py, predict.py and the heart locator put around an inference copy on the device."""
    stage = fuse_for_inference(SubsetIMMSeg(make_model(config)).to(META))
    fused = fuse_for_inference(make_model(config).to(META))  # as engine.checkpoints.inference_model
    wrapped = {"inference copy": fused, "heads fused+LGE": HeadAverage(fused, ("fused", "LGE"))}
    wrapped["LGE zero-filled"] = SequenceSubset(fused, ("LGE",), leave_out=False)
    for names in SUBSETS:
        wrapped[f"subset stage from {'+'.join(names)}"] = SequenceSubset(stage, names)
    wrapped["subset stage, every sequence"] = stage
    trained_as = {"spec": {"subset_stage": {"design": "as networks.subset_stage"}}, "args": {}}
    member = EnsembleMember(Path("run/best.pth"), 1, list(MODALITIES), None, IMG_SIZE, stage, trained_as)
    wrapped["ensemble member without T2w"] = member_models([member], ("bSSFP", "LGE"))[0]
    wrapped["heads fused+LGE, T2w zero-filled"] = HeadAverage(SequenceSubset(fused, ("bSSFP", "LGE"), leave_out=False),
                                                             ("fused", "LGE"))
    return wrapped


def test_every_inference_wrapper_runs_on_the_device(tiny_config):
    images, _ = meta_batch(batch=2)
    for name, model in inference_models(tiny_config).items():
        with device_tensors_only(), torch.inference_mode():
            logits = model(images)
        assert logits.is_meta and logits.shape == (2, 4, IMG_SIZE, IMG_SIZE), name


def test_the_volume_helpers_predict_on_the_device_with_tta_and_resizing(tiny_config):
    """A volume of another in-plane size (resized to the model's and back), with flip TTA, an ensemble of two."""
    models = list(inference_models(tiny_config).values())[:2]
    volume = torch.rand(3, 80, 80, 3)  # (M, H, W, D) on the host, as a preprocessed case
    with device_tensors_only():
        single = predict_volume(models[0], volume, IMG_SIZE, 2, META, output_device=META)
        averaged = ensemble_probabilities(models, volume, IMG_SIZE, 3, META, tta=True, output_device=META)
    assert single.shape == averaged.shape == (4, 80, 80, 3) and averaged.is_meta


# Static check -------------------------------------------------------------------------------------------------

# The code the device-parity tests stand for: model, losses, inference wrappers and helpers, the training step.
DEVICE_CODE = ["networks", "utils.py", "trainer.py", "engine/predictor.py"]
FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "full", "empty", "arange", "rand", "randn", "randint",
             "randperm", "eye", "linspace"}
# Where a tensor may be made on the host, and why.
ALLOWED = {
    ("networks/vit_seg_modeling.py", "_register_text"): "learned text parameters, made at construction (__init__ "
                                                        "calls it) and moved with the module",
}


def host_tensor_sites(path):
    """(function, line, what) of each factory call without ``device=`` and each index built from a Python list,
    outside ``__init__`` (parameters and buffers made at construction move with their module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    sites = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if inner == "__init__":
                continue
            if (isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute)
                    and isinstance(child.func.value, ast.Name) and child.func.value.id == "torch"
                    and child.func.attr in FACTORIES and not any(k.arg == "device" for k in child.keywords)):
                sites.append((inner, child.lineno, f"torch.{child.func.attr} without device="))
            if isinstance(child, ast.Subscript):
                parts = child.slice.elts if isinstance(child.slice, ast.Tuple) else [child.slice]
                if any(isinstance(part, (ast.List, ast.ListComp)) or (isinstance(part, ast.Call) and isinstance(
                        part.func, ast.Name) and part.func.id in ("list", "tuple")) for part in parts):
                    sites.append((inner, child.lineno, "an index built from a Python list"))
            visit(child, inner)

    visit(tree, None)
    return sites


def test_no_tensor_is_made_on_the_host_in_the_device_code():
    paths = [path for entry in DEVICE_CODE for path in
             (sorted((ROOT / entry).glob("*.py")) if (ROOT / entry).is_dir() else [ROOT / entry])]
    found = [f"{path.relative_to(ROOT)}:{line} in {function}: {what}" for path in paths
             for function, line, what in host_tensor_sites(path)
             if (str(path.relative_to(ROOT)), function) not in ALLOWED]
    assert not found, "tensors made on the host in device code:\n" + "\n".join(found)


def test_the_static_check_finds_what_it_looks_for(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text("import torch\n"
                      "class M:\n"
                      "    def __init__(self):\n        self.w = torch.zeros(3)\n"
                      "    def forward(self, x, classes):\n"
                      "        x[:, list(classes)] = 0\n"
                      "        return x + torch.arange(3) + torch.ones(3, device=x.device)\n")
    assert host_tensor_sites(source) == [("forward", 6, "an index built from a Python list"),
                                         ("forward", 7, "torch.arange without device=")]
