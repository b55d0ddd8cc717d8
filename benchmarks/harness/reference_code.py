"""The review release's model code (a checkout of it), imported beside this repository's for the benchmarks that
compare the two (speed.py, check_release_conversion.py)."""
import importlib
import sys
import types


def import_reference(torch, reference_dir, device):
    """The released model's module, imported under a private package name; its GPU transfers are redirected
    to ``device``."""
    package = types.ModuleType("released_networks")
    package.__path__ = [str(reference_dir / "networks")]
    sys.modules["released_networks"] = package
    if device != "cuda":
        torch.Tensor.cuda = lambda self, *a, **k: self.to(device)
    return importlib.import_module("released_networks.vit_seg_modeling")
