"""Checkpoints written in the background, so that saving a large training state does not stall training.

At an epoch boundary the state is snapshotted (tensors cloned on their device, a
few milliseconds on a GPU; copied to host memory where the device has no room for
the copy) and a thread moves the snapshot to host memory and writes it. Every file
is written to a temporary name and renamed into place, so a kill at any moment
leaves the previous file whole. One serialisation serves every name of a save
(``last.pth``, ``best.pth``, ``epoch_N.pth``): the others are hard links to the
written file (copies where the file system has no links), renamed into place too.
"""
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import torch

from utils import atomic_path

logger = logging.getLogger(__name__)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (no space left, a read-only folder, ...); earlier files are intact."""


def _map_tensors(tree, function):
    if isinstance(tree, torch.Tensor):
        return function(tree)
    if isinstance(tree, dict):
        return {key: _map_tensors(value, function) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        mapped = [_map_tensors(value, function) for value in tree]
        return type(tree)(mapped) if not hasattr(tree, "_fields") else type(tree)(*mapped)
    return tree


def tensor_bytes(tree, device_type=None):
    """Bytes held by the tensors of a nested state (only those on ``device_type`` when given)."""
    total = 0

    def count(tensor):
        nonlocal total
        if device_type is None or tensor.device.type == device_type:
            total += tensor.numel() * tensor.element_size()
        return tensor

    _map_tensors(tree, count)
    return total


def cuda_bytes_available(device):
    """Bytes a new tensor can take on ``device``: what the driver has free plus what PyTorch's caching allocator
    holds unused (``torch.cuda.mem_get_info`` counts the latter as taken)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def snapshot(state):
    """A copy of ``state`` that later training steps cannot change: tensors cloned on their own device when it has
    room for them (CUDA: twice their size available), else copied to host memory."""
    on_cuda = tensor_bytes(state, "cuda")
    to_host = on_cuda > 0 and cuda_bytes_available(_cuda_device(state)) < 2 * on_cuda

    def copy(tensor):
        tensor = tensor.detach()
        return tensor.to("cpu", copy=True) if to_host and tensor.is_cuda else tensor.clone()

    return _map_tensors(state, copy)


def _cuda_device(state):
    devices = set()
    _map_tensors(state, lambda tensor: devices.add(tensor.device) if tensor.is_cuda else None)
    if len(devices) > 1:
        raise ValueError(f"a checkpoint's tensors lie on several GPUs: {sorted(map(str, devices))}")
    return devices.pop() if devices else None


def _on_host(state, ready):
    """``state`` with every tensor in host memory. Device copies wait for the ``ready`` event (recorded after the
    snapshot) and run on a side stream, so that they overlap the training kernels queued meanwhile."""
    device = _cuda_device(state)
    if device is None:
        return state
    with torch.cuda.device(device):
        stream = torch.cuda.Stream(device)
        stream.wait_event(ready)
        with torch.cuda.stream(stream):
            host = _map_tensors(state, lambda tensor: tensor.to("cpu") if tensor.is_cuda else tensor)
        stream.synchronize()
    return host


def _link_or_copy(source, target):
    """``target`` replaced atomically by a hard link to ``source`` (a copy where links are not possible)."""
    with atomic_path(target) as temporary:
        temporary.unlink()
        try:
            os.link(source, temporary)
        except OSError:
            shutil.copyfile(source, temporary)


def remove_interrupted_writes(folder):
    """Delete the temporary files of checkpoint writes that a killed process left in ``folder`` (call it only while
    holding the folder's run lock, when no other process writes there). Returns the deleted paths."""
    stale = sorted(Path(folder).glob(".*.pth.*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


class BackgroundCheckpointWriter:
    """Writes one checkpoint at a time in a thread; ``wait`` returns once it is on disk (or raises its error).

    ``submit`` waits for the write in flight first, unless ``skip_if_busy`` (then the save
    is dropped and False returned: for ``last.pth`` alone, whose next save comes an
    epoch later).
    """

    def __init__(self):
        self._thread = None
        self._error = None
        self.last_write_seconds = None

    @property
    def busy(self):
        return self._thread is not None and self._thread.is_alive()

    def submit(self, state, paths, skip_if_busy=False):
        if skip_if_busy and self.busy:
            return False
        self.wait()
        paths = [Path(path) for path in paths]
        copy = snapshot(state)
        ready, device = None, _cuda_device(copy)
        if device is not None:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(device))
        # not a daemon: the interpreter lets a write in flight finish before it exits. The snapshot travels in a
        # list that the thread empties, so that its device copies are freed once in host memory, not held (in the
        # thread's arguments) until the file is written
        self._thread = threading.Thread(target=self._write, args=([copy], paths, ready), name="checkpoint-writer")
        del copy
        self._thread.start()
        return True

    def _write(self, holder, paths, ready=None):
        start = time.perf_counter()
        try:
            state = _on_host(holder.pop(), ready)
            with atomic_path(paths[0]) as temporary:
                torch.save(state, temporary)
            for path in paths[1:]:
                _link_or_copy(paths[0], path)
        except BaseException as error:  # reported by wait() in the training thread
            self._error = CheckpointWriteError(f"could not write checkpoint {paths[0]}: {error}; the previous "
                                               f"files in {paths[0].parent} are intact")
            self._error.__cause__ = error
        self.last_write_seconds = time.perf_counter() - start

    def wait(self):
        """Block until the write in flight is done; raise CheckpointWriteError if it (or an earlier one) failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
