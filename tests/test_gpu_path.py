"""The GPU's training path on the CPU: its defaults (--log_every 25, --deterministic 0, channels_last, fixed-size
contrastive sampling, the background writer) across the schedule's stages, with validation, resume and test.py;
resuming across --amp, devices and process counts; --amp auto's choice; what a checkpoint write holds on to."""
import gc
import logging
import types
import weakref

import pytest
import torch

import test as test_script
import train as train_script
import trainer
from conftest import TINY_TRAIN_FLAGS, preprocess_phantom, write_test_priors
from engine import checkpoint_writer, distributed, options
from engine.checkpoints import load_checkpoint
from engine.options import GPU_PATH
from utils import LossWeights


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """Preprocessed phantom with validation volumes (64 px) and random priors."""
    root = tmp_path_factory.mktemp("gpu_path")
    preprocess_phantom(root, 5, 21, "--test_every", "5", "--val_fraction", "0.25")
    return root, write_test_priors(root)


def train(phantom, run, *extra):
    root, priors = phantom
    return train_script.main([*TINY_TRAIN_FLAGS, "--root_path", str(root / "data"), "--prior_embeddings", str(priors),
                              "--output_dir", str(root / run), *extra])


@pytest.fixture
def gpu_path(monkeypatch):
    """The trainer takes the GPU's path on the CPU."""
    monkeypatch.setattr(trainer, "device_path", lambda device: GPU_PATH)


# The GPU's defaults, three stages: modality heads, + contrast (epoch 2), fused (epoch 3), validated every epoch.
GPU_DEFAULTS = ("--log_every", "25", "--deterministic", "0", "--max_epochs", "3", "--start_contrast_epoch", "1",
                "--region_fusion_start_epoch", "2", "--val_every", "1", "--save_every", "1")


def test_the_gpu_path_trains_across_its_stages_validates_resumes_and_tests(phantom, gpu_path, monkeypatch):
    root, _ = phantom
    layouts = []
    original = trainer.Trainer.forward_backward

    def recording(self, network, images, *args):
        layouts.append((images.is_contiguous(memory_format=torch.channels_last),
                        self.model.transformers[0].hybrid_model.root.conv.weight.is_contiguous(
                            memory_format=torch.channels_last), self.criterion.contrast.fixed_size))
        return original(self, network, images, *args)

    monkeypatch.setattr(trainer.Trainer, "forward_backward", recording)
    assert train(phantom, "gpu_straight", *GPU_DEFAULTS) == 0
    assert set(layouts) == {(True, True, True)}, "channels_last images and weights, fixed-size contrastive sampling"
    log = (root / "gpu_straight" / "log.txt").read_text()
    assert "'deterministic': 0" in log and "'log_every': 25" in log and log.count("validation mean pathology") == 1
    straight = load_checkpoint(root / "gpu_straight" / "last.pth")
    assert straight["train_state"]["epoch"] == 3 and (root / "gpu_straight" / "best.pth").is_file()

    assert train(phantom, "gpu_resumed", *GPU_DEFAULTS, "--resume", str(root / "gpu_straight" / "epoch_0.pth")) == 0
    resumed = load_checkpoint(root / "gpu_resumed" / "last.pth")
    assert all(torch.equal(straight["model"][key], resumed["model"][key]) for key in straight["model"]), \
        "resumed across the stage changes, the weights of the uninterrupted run"
    assert test_script.main(["--output_dir", str(root / "gpu_straight"), "--checkpoint", "last", "--no_save_nii"]) == 0
    assert (root / "gpu_straight" / "test_test_vol_last" / "metrics.csv").is_file()


def test_losses_of_steps_in_different_stages_are_read_together():
    """--log_every 25 on a GPU: one read spans a stage change, where the loss terms change."""
    logged = []
    fake = types.SimpleNamespace(
        pending_losses=[(1, 0.1, torch.tensor(2.0), {"modality": torch.tensor(1.5)}),
                        (2, 0.09, torch.tensor(3.0), {"fused": torch.tensor(1.0), "modality": torch.tensor(1.25),
                                                      "contrast": torch.tensor(7.0)})],
        ctx=distributed.DistributedContext(), state=trainer.TrainState(), run_dir="run", last_losses=None,
        writer=types.SimpleNamespace(add_scalar=lambda *row: logged.append(row)))
    trainer.Trainer.read_losses(fake)
    assert fake.last_losses == (3.0, {"fused": 1.0, "modality": 1.25, "contrast": 7.0})
    assert ("loss/modality", 1.5, 1) in logged and ("loss/contrast", 7.0, 2) in logged
    assert not any(name == "loss/fused" and step == 1 for name, _, step in logged)


def test_a_compilation_failure_under_ddp_stops_the_run_and_out_of_memory_is_no_compilation_failure():
    steps = []

    def failing(self, *args):
        steps.append(self.ctx.world_size)
        raise RuntimeError("inductor: no C++ compiler")

    fake = types.SimpleNamespace(ctx=distributed.DistributedContext(rank=1, world_size=2), compile_mode="on",
                                 compiled_stages=set())
    fake.forward_backward = lambda *args: failing(fake, *args)
    weights = LossWeights(1.0, 0.5, 0.05)
    with pytest.raises(trainer.CompilationFailed, match="rank 1 .*no C\\+\\+ compiler.*--compile off"):
        trainer.Trainer.first_compiled_step(fake, None, torch.zeros(1), None, weights, None)
    assert steps == [2], "no eager retry under DDP"

    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    fake.ctx, fake.forward_backward = distributed.DistributedContext(), out_of_memory
    with pytest.raises(torch.cuda.OutOfMemoryError):
        trainer.Trainer.first_compiled_step(fake, None, torch.zeros(1), None, weights, None)


# Resume across --amp, devices and process counts ---------------------------------------------------------------

def test_a_run_continues_under_another_amp(phantom, caplog):
    root, _ = phantom
    one_epoch = ("--max_epochs", "1", "--region_fusion_start_epoch", "0", "--save_every", "1")
    assert train(phantom, "amp_none", *one_epoch) == 0
    two_epochs = ("--max_epochs", "2", "--region_fusion_start_epoch", "0")
    with caplog.at_level(logging.WARNING):
        assert train(phantom, "amp_to_fp16", *two_epochs, "--amp", "fp16", "--resume",
                     str(root / "amp_none" / "last.pth")) == 0
    assert "was trained with --amp none; it continues with --amp fp16" in caplog.text
    fp16 = load_checkpoint(root / "amp_to_fp16" / "last.pth")
    assert fp16["train_state"]["epoch"] == 2 and fp16["scaler"], "fp16's grad scaler, started afresh, is saved"
    caplog.clear()
    assert train(phantom, "amp_back", "--max_epochs", "3", "--region_fusion_start_epoch", "0", "--resume",
                 str(root / "amp_to_fp16" / "last.pth")) == 0
    assert "was trained with --amp fp16; it continues with --amp none" in caplog.text


@pytest.mark.parametrize("fused", [False, True])
def test_optimizer_moments_take_their_parameters_layout(fused):
    """A checkpoint written on the CPU (contiguous moments) resumed on the GPU's channels_last parameters, and the
    reverse: the moments must be laid out as the parameters are, or the fused update mixes up their elements."""
    if fused and not hasattr(torch, "_fused_adamw_"):
        pytest.skip("this PyTorch has no fused AdamW on the CPU")
    generator = torch.Generator().manual_seed(0)
    weight, gradient = torch.randn(4, 3, 3, 3, generator=generator), torch.randn(4, 3, 3, 3, generator=generator)

    def two_steps(saved_layout, parameter_layout):
        parameter = torch.nn.Parameter(weight.clone().contiguous(memory_format=parameter_layout))
        optimizer = torch.optim.AdamW([parameter], lr=0.1, fused=fused)
        parameter.grad = gradient.clone().contiguous(memory_format=parameter_layout)
        optimizer.step()
        state = optimizer.state_dict()
        for key in ("exp_avg", "exp_avg_sq"):  # as another device's checkpoint holds them
            state["state"][0][key] = state["state"][0][key].contiguous(memory_format=saved_layout)
        resumed = torch.optim.AdamW([parameter], lr=0.1, fused=fused)
        resumed.load_state_dict(state)
        trainer.match_parameter_layouts(resumed)
        parameter.grad = (2 * gradient).contiguous(memory_format=parameter_layout)
        resumed.step()
        return parameter.detach().contiguous()

    plain, channels_last = torch.contiguous_format, torch.channels_last
    expected = two_steps(plain, plain)
    assert torch.equal(two_steps(plain, channels_last), expected), "CPU checkpoint, GPU parameters"
    assert torch.equal(two_steps(channels_last, plain), expected), "GPU checkpoint, CPU parameters"


def test_random_state_keeps_this_gpus_stream_and_resumes_on_fewer_gpus(monkeypatch, caplog):
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor([device.index or 0]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((int(state), device)))
    state = distributed.rng_state("cuda:1")
    assert int(state["cuda"]) == 1, "only this process's GPU, however many the machine shows"
    distributed.set_rng_state(state, "cuda:0")
    old = dict(state, cuda=[torch.tensor([10 + i]) for i in range(8)])  # written with one state per visible GPU
    distributed.set_rng_state(old, "cuda:1")
    assert restored == [(1, torch.device("cuda:0")), (11, torch.device("cuda:1"))]
    with caplog.at_level(logging.WARNING):
        distributed.set_rng_state(dict(state, cuda=None), "cuda:0")  # a state written on the CPU
        distributed.set_rng_state(old, "cuda:9")
    assert caplog.text.count("restarts from the seed") == 2 and len(restored) == 2
    assert distributed.rng_state("cpu")["cuda"] is None, "a CPU run keeps no GPU stream"


@pytest.mark.parametrize("capability, expected", [((7, 0), "none"), ((7, 5), "none"), ((8, 0), "bf16"),
                                                  ((9, 0), "bf16")])
def test_amp_auto_takes_bf16_only_where_the_gpu_computes_it(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)  # counts emulation
    args = train_script.parse_args(["--dataset", "Phantom"])
    assert options.resolve_device_defaults(args, "cuda").amp == expected


# What a checkpoint write holds on to -----------------------------------------------------------------------------

def test_the_snapshot_is_released_once_in_host_memory(tmp_path, monkeypatch):
    """The device copies of a snapshot are freed once moved to the host, not held until the file is written."""
    alive_while_saving = []
    snapshots = []

    def to_host(state, ready):
        snapshots.append(weakref.ref(state["weights"]))
        return {"weights": state["weights"].clone()}

    def save(state, path):
        gc.collect()
        alive_while_saving.append(snapshots[-1]() is not None)
        path.write_bytes(b"checkpoint")

    monkeypatch.setattr(checkpoint_writer, "_on_host", to_host)
    monkeypatch.setattr(checkpoint_writer.torch, "save", save)
    writer = checkpoint_writer.BackgroundCheckpointWriter()
    writer.submit({"weights": torch.ones(8)}, [tmp_path / "last.pth"])
    writer.wait()
    assert alive_while_saving == [False]


def test_free_gpu_memory_counts_the_cache(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100, 1000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 500)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 200)
    assert checkpoint_writer.cuda_bytes_available("cuda:0") == 400, "free, plus reserved but unallocated"


# Several processes (gloo on the CPU, as NCCL on GPUs) -------------------------------------------------------------

def _ranks_worker(rank, world_size, port, results):
    """One rank: the stop check of 10 steps at --log_every 3, rank 1 signalled before step 4; then a loss read in
    which rank 1's second step is not finite."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    fake = types.SimpleNamespace(ctx=distributed.DistributedContext(rank, world_size), state=trainer.TrainState(),
                                 stop=types.SimpleNamespace(signal_number=0),
                                 args=types.SimpleNamespace(log_every=3))
    stopped = None
    for step in range(10):
        fake.state.iteration = step
        if rank == 1 and step == 4:
            fake.stop.signal_number = 15
        try:
            trainer.Trainer.stop_if_requested(fake)
        except distributed.TrainingInterrupted:
            stopped = step
            break
    second = float("nan") if rank == 1 else 2.0
    fake.pending_losses = [(1, 0.1, torch.tensor(1.0), {"modality": torch.tensor(1.0)}),
                           (2, 0.1, torch.tensor(second), {"modality": torch.tensor(second)})]
    fake.writer, fake.run_dir, fake.last_losses = None, "run", None
    try:
        trainer.Trainer.read_losses(fake)
        read = "no error"
    except FloatingPointError as error:
        read = str(error)
    (results / f"rank{rank}.txt").write_text(f"{stopped}\n{read}")
    dist.destroy_process_group()


def test_ranks_check_the_stop_request_together_every_log_every_steps_and_share_a_non_finite_loss(tmp_path):
    import os

    import torch.multiprocessing as mp

    mp.spawn(_ranks_worker, args=(2, 29000 + os.getpid() % 1000, tmp_path), nprocs=2)
    stops, reads = zip(*((tmp_path / f"rank{rank}.txt").read_text().split("\n", 1) for rank in range(2)))
    assert stops == ("6", "6"), "rank 1's signal before step 4 stops both ranks at the next shared check, step 6"
    assert all("non-finite loss at epoch 1, iteration 2" in read for read in reads)
    assert "on another process" in reads[0] and "modality nan" in reads[1]


def test_the_benchmarks_timing_of_the_step_runs_the_gpu_path_across_the_stages(phantom, gpu_path, tmp_path):
    """benchmarks/gpu_speed.sh's timing (planning.time_training_step) with the GPU's defaults: its loss reads span
    the stages (--log_every 25 lost the first stage's terms there once: KeyError 'fused')."""
    from benchmarks.harness import planning

    root, priors = phantom
    flags = [*TINY_TRAIN_FLAGS, "--root_path", str(root / "data"), "--prior_embeddings", str(priors),
             "--output_dir", str(tmp_path / "timed"), *GPU_DEFAULTS, "--log_every", "4"]  # reads within its 9 steps
    seconds, per_stage, per_epoch = planning.time_training_step(flags, 1, 2)
    assert seconds > 0 and per_epoch >= 2 and len(per_stage) == 3
