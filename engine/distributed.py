"""Processes and randomness: the torchrun context, seeding and RNG state, the position-seeded sampler and
augmentation, and stop signals.

One process per device; under torchrun the processes form a DistributedDataParallel group (NCCL on GPUs, gloo on
CPUs). Augmentation is seeded by each sample's position in the run, so a resumed run continues the same stream
whatever the loader workers did.
"""
import datetime
import logging
import os
import random
import signal
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

logger = logging.getLogger("trainer")


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1

    def barrier(self):
        if self.distributed:
            dist.barrier()


def setup_distributed(device_flag):
    """Read torchrun's environment; pick the device; start the process group for several processes."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device_flag == "auto" else device_flag == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but no CUDA device is available")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return DistributedContext(rank, world_size, local_rank, device)


def seed_everything(seed, deterministic):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = bool(deterministic)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        # filling every new tensor with NaN only exposes reads of unwritten memory; results do not depend on it
        torch.utils.deterministic.fill_uninitialized_memory = False


def rng_state(device=None):
    """This process's random streams: Python's, NumPy's, the CPU generator's and, on a GPU, that GPU's (only this
    process's device: a checkpoint must not depend on how many GPUs the machine that wrote it could see)."""
    device = torch.device(device or "cpu")
    numpy_state = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                      "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])}}


def set_rng_state(state, device=None):
    """Restore ``state`` (of :func:`rng_state`) on this process. A GPU's stream comes from the state's GPU stream
    (a state written before it held one per visible GPU: the entry of this device's index); a GPU run resumed from a
    state without one (written on the CPU) restarts its GPU stream from the seed, and says so."""
    device = torch.device(device or "cpu")
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if device.type == "cuda":
        if isinstance(cuda, (list, tuple)):  # one state per GPU the writer could see
            index = device.index or 0
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is None:
            logger.warning("the saved random state has no stream for %s (written on the CPU or on fewer GPUs): its "
                           "random stream restarts from the seed", device)
        else:
            torch.cuda.set_rng_state(cuda, device)
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))


def all_rng_states(ctx):
    """Every process's :func:`rng_state`, in rank order (rank 0 saves them all)."""
    if not ctx.distributed:
        return [rng_state(ctx.device)]
    states = [None] * ctx.world_size
    dist.all_gather_object(states, rng_state(ctx.device))
    return states


class PositionSeededSampler(DistributedSampler):
    """DistributedSampler yielding (index, augmentation seed) pairs, from position ``start`` of the epoch on.

    The seed is (seed, epoch, rank, position in the epoch): what a sample's augmentation
    draws depends on where it stands in the run, not on which loader worker reads it or
    what that worker read before, so a resumed run continues the uninterrupted stream
    with any number of workers, also from the middle of an epoch.
    """

    def __init__(self, dataset, num_replicas, rank, seed):
        super().__init__(dataset, num_replicas, rank, shuffle=True, seed=seed)
        self.start = 0

    def __iter__(self):
        indices = list(super().__iter__())
        for position in range(self.start, len(indices)):
            yield indices[position], (self.seed, self.epoch, self.rank, position)

    def __len__(self):
        return self.num_samples - self.start


class SeededAugmentation(Dataset):
    """Training slices augmented with a generator seeded by the key that PositionSeededSampler gives."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        sample = self.dataset[index]
        augmented = self.transform({"image": sample["image"].numpy(), "label": sample["label"].numpy()},
                                   rng=np.random.default_rng(seed))
        augmented["case_name"] = sample["case_name"]
        return augmented


def leave_stop_signals_to_the_trainer(worker_id):
    """Loader workers ignore SIGINT and SIGTERM: the training process stops them after saving its position."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped between two steps on SIGINT or SIGTERM, after saving its exact position in last.pth."""

    def __init__(self, signal_number):
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number


class StopRequest:
    """While active, SIGINT and SIGTERM ask training (or scoring) to stop after the current step (``unit``).

    The trainer shares the request between ranks every step, so a signal on any rank
    stops all of them at the same step. A second signal interrupts at once, without saving.
    """

    def __init__(self, unit="step"):
        self.signal_number = 0
        self.previous = {}
        self.unit = unit

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.signal(number, self.handle) for number in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exception):
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def handle(self, number, frame):
        if self.signal_number:
            raise KeyboardInterrupt
        self.signal_number = number
        logger.warning("%s received: stopping after this %s (a second signal stops at once, without saving)",
                       signal.Signals(number).name, self.unit)
