"""Issue 10: inference copies that keep device and dtype, the released split, the schedule, one vocabulary,
lazy optional imports and the GPU check script (CPU)."""
import json
import logging
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import predict as predict_script
from datasets import dataset_writer
import test as test_script
import train as train_script
from conftest import ROOT, make_batch, make_model, preprocess_phantom, write_test_priors
from networks.inference import fuse_for_inference
from engine.checkpoints import load_checkpoint
from engine.options import filled, run_directory
from engine.runs import tensorboard_writer
from trainer import iteration_budget

PROJECT_PACKAGES = ("networks", "datasets", "priors")


def tensors(module):
    return list(module.named_parameters()) + list(module.named_buffers())


# 1. the inference copy ---------------------------------------------------------------------------------------
def test_inference_copy_of_a_meta_model_stays_on_meta(tiny_config):
    model = make_model(tiny_config).to("meta")
    fused = fuse_for_inference(model)
    misplaced = [name for name, tensor in tensors(fused) if tensor.device.type != "meta"]
    assert misplaced == []
    assert all(tensor.device.type == "meta" for _, tensor in tensors(model))


def test_inference_copy_of_a_float64_model_keeps_float64_and_its_outputs(tiny_config):
    model = make_model(tiny_config).double().eval()
    fused = fuse_for_inference(model)
    floating = [(name, tensor) for name, tensor in tensors(fused) if tensor.is_floating_point()]
    assert floating and [name for name, tensor in floating if tensor.dtype != torch.float64] == []
    images = make_batch(2, seed=3)[0].double()
    with torch.no_grad():
        torch.testing.assert_close(fused(images.contiguous(memory_format=torch.channels_last)), model(images),
                                   rtol=1e-9, atol=1e-9)


# 2. the released split ---------------------------------------------------------------------------------------
def test_test_every_five_gives_the_released_split_of_myops380():
    case_ids = [f"case{i:04d}" for i in range(380, 0, -1)]
    split = dataset_writer.split_cases(case_ids, test_every=5)
    expected = [f"case{i:04d}" for i in (1 + 5 * k for k in range(76))]
    assert split["test"] == expected
    assert expected[:3] == ["case0001", "case0006", "case0011"] and expected[-1] == "case0376"
    assert len(split["train"]) == 304 and not set(split["train"]) & set(split["test"])


def test_negative_test_every_is_refused():
    with pytest.raises(dataset_writer.DataError, match="--test_every"):
        dataset_writer.split_cases(["a", "b"], test_every=-2)


# 3. the schedule -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("protocol")
    preprocess_phantom(root, 4, 5)
    write_test_priors(root, dim=16)
    iterations_per_epoch = len((root / "data" / "train.txt").read_text().split()) // 4
    assert iterations_per_epoch >= 2
    return root, iterations_per_epoch


def train(root, run, *extra):
    return train_script.main(["--dataset", "Phantom", "--root_path", str(root / "data"), "--vit_name", "testing",
                              "--img_size", "64", "--no_pretrain", "--prior_embeddings", str(root / "priors.pt"),
                              "--batch_size", "4", "--start_contrast_epoch", "0", "--num_workers", "0",
                              "--progress", "0", "--output_dir", str(root / run), *extra])


def shortened_messages(caplog):
    return [r.getMessage() for r in caplog.records if "the run is shortened" in r.getMessage()]


def test_by_default_every_epoch_runs(phantom, caplog):
    root, per_epoch = phantom
    caplog.set_level(logging.INFO)
    assert train(root, "default", "--max_epochs", "2", "--region_fusion_start_epoch", "1") == 0
    checkpoint = load_checkpoint(root / "default" / "last.pth")
    assert checkpoint["train_state"]["epoch"] == 2 and checkpoint["train_state"]["iteration"] == 2 * per_epoch
    assert checkpoint["args"]["max_iterations"] is None and shortened_messages(caplog) == []


def test_a_cap_that_shortens_the_run_is_logged_once_with_its_last_epoch(phantom, caplog):
    root, per_epoch = phantom
    caplog.set_level(logging.INFO)
    assert train(root, "capped", "--max_epochs", "3", "--region_fusion_start_epoch", "1",
                 "--max_iterations", str(per_epoch + 1)) == 0
    messages = shortened_messages(caplog)
    assert len(messages) == 1
    assert f"--max_iterations {per_epoch + 1} ends training in epoch 2 of 3 ({per_epoch} iterations per epoch" \
        in messages[0]
    state = load_checkpoint(root / "capped" / "last.pth")["train_state"]
    assert state["epoch"] == 2 and state["iteration"] == per_epoch + 1


def test_a_cap_that_ends_before_the_fused_stage_is_refused_with_the_numbers(phantom, caplog):
    root, per_epoch = phantom
    assert train(root, "refused", "--max_epochs", "4", "--region_fusion_start_epoch", "2",
                 "--max_iterations", str(2 * per_epoch)) == 1
    message = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert f"ends training in epoch 2 of 4 ({per_epoch} iterations per epoch" in message
    assert "starts training in epoch 3 (--region_fusion_start_epoch 2" in message
    assert not list((root / "refused").glob("*.pth"))


def test_the_issue_example_is_refused():
    args = SimpleNamespace(max_epochs=300, max_iterations=30000, region_fusion_start_epoch=100)
    with pytest.raises(ValueError, match=r"epoch 92 of 300 \(328 iterations per epoch.*epoch 101"):
        iteration_budget(args, 1970 // 6, "immseg")
    assert iteration_budget(args, 1970 // 6, "transunet_early") == 30000
    args.max_iterations = None
    assert iteration_budget(args, 328, "immseg") == 300 * 328


def test_epochs_that_end_before_the_fused_stage_are_refused_with_the_flag_to_change(phantom, caplog):
    root, _ = phantom
    assert train(root, "too_short", "--max_epochs", "2", "--region_fusion_start_epoch", "2") == 1
    message = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert "--max_epochs 2 ends training before the fused head" in message
    assert "starts training in epoch 3 (--region_fusion_start_epoch 2" in message and "raise --max_epochs" in message
    assert not list((root / "too_short").glob("*.pth"))


def test_a_short_run_without_stage_flags_gets_the_papers_fractions_and_says_so_once(phantom, caplog):
    root, per_epoch = phantom
    caplog.set_level(logging.INFO)
    assert train(root, "fitted", "--max_epochs", "2") == 0  # the defaults (fused head from epoch 101) fitted
    fitted = [r.getMessage() for r in caplog.records if "its stages are fitted" in r.getMessage()]
    assert len(fitted) == 1 and "--max_epochs 2 is shorter than the paper's schedule" in fitted[0]
    args = load_checkpoint(root / "fitted" / "last.pth")["args"]
    assert args["region_fusion_start_epoch"] == 1 and args["start_contrast_epoch"] == 0, "typed flags are kept"
    for epochs, contrast, fusion in ((300, 20, 100), (150, 20, 100), (100, 7, 33), (30, 2, 10), (3, 0, 1), (1, 0, 0)):
        parsed = train_script.parse_args(["--max_epochs", str(epochs)])
        assert (parsed.start_contrast_epoch, parsed.region_fusion_start_epoch) == (contrast, fusion), epochs
    baseline = train_script.parse_args(["--max_epochs", "30", "--model", "transunet_early"])
    assert baseline.region_fusion_start_epoch == 100 and baseline.fitted_stages is None


def test_test_and_predict_refuse_a_checkpoint_whose_fused_head_never_trained(phantom, caplog):
    root, _ = phantom
    assert train(root, "stopped_early", "--max_epochs", "3", "--region_fusion_start_epoch", "1",
                 "--save_every", "1") == 0
    run = root / "stopped_early"
    assert test_script.main(["--output_dir", str(run), "--checkpoint", "epoch_0", "--root_path",
                             str(root / "data")]) == 1
    assert "before its fused head, the one used for prediction, started training in epoch 2" in caplog.text
    assert "--resume auto and a --max_epochs above 1" in caplog.text
    caplog.clear()
    assert predict_script.main(["--input_dir", str(root / "raw"), "--output_dir", str(root / "predicted"), "--run",
                                str(run), "--checkpoint", "epoch_0"]) == 1
    assert "before its fused head, the one used for prediction, started training" in caplog.text
    assert test_script.main(["--output_dir", str(run), "--checkpoint", "epoch_1", "--root_path",
                             str(root / "data"), "--test_save_dir", str(root / "scored")]) == 0


def test_run_folder_names_follow_the_cap_and_test_finds_the_training_folder():
    released = run_directory(train_script.parse_args([]))
    assert released.name == "TU_pretrain_R50-ViT-B_16_skip3_epo300_bs24_lr0.001_128"
    assert run_directory(filled(test_script.parse_args([]))) == released
    capped = run_directory(train_script.parse_args(["--max_iterations", "20000"]))
    assert capped.name == "TU_pretrain_R50-ViT-B_16_skip3_20k_epo300_bs24_lr0.001_128"
    assert run_directory(filled(test_script.parse_args(["--max_iterations", "20000"]))) == capped
    assert run_directory(train_script.parse_args(["--max_iterations", "1500"])).name.startswith(
        "TU_pretrain_R50-ViT-B_16_skip3_1500it_")
    early_pair = ["--model", "transunet_early", "--input_sequences", "bSSFP,LGE", "--augmentation", "strong"]
    trained = run_directory(train_script.parse_args(early_pair))
    assert trained.name.endswith("_transunet_early-bSSFP-LGE")
    assert run_directory(filled(test_script.parse_args(early_pair))) == trained, "test.py finds it by the same flags"


# 4. one vocabulary ---------------------------------------------------------------------------------------------
def project_modules_after_importing(modules):
    code = ("import importlib, json, sys\n"
            f"for name in {modules!r}:\n    importlib.import_module(name)\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {PROJECT_PACKAGES!r})))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def test_data_and_prior_code_do_not_import_the_model_package():
    modules = [f"{package}.{path.stem}" for package in ("datasets", "priors")
               for path in sorted((ROOT / package).glob("*.py")) if path.stem != "__init__"] + ["priors"]
    assert "datasets.vocabulary" in modules and "priors.store" in modules
    loaded = project_modules_after_importing(modules)
    assert [m for m in loaded if m.split(".")[0] == "networks"] == []
    assert set(modules) <= set(loaded)


def test_the_vocabulary_imports_none_of_the_packages():
    assert project_modules_after_importing(["datasets.vocabulary"]) == ["datasets", "datasets.vocabulary"]


def test_networks_datasets_and_priors_share_one_vocabulary():
    from datasets import layouts, vocabulary
    from networks import vit_seg_configs
    from priors import text

    assert vit_seg_configs.MODALITIES is vocabulary.MODALITIES is layouts.MODALITIES is text.MODALITIES
    assert vit_seg_configs.CLASS_NAMES is vocabulary.CLASS_NAMES is text.CLASS_NAMES
    assert dataset_writer.DATASETS["MyoPS2020"][1] is vocabulary.LABEL_MAPS["MyoPS2020"]


# 5. optional packages and the GPU check ------------------------------------------------------------------------
def test_train_and_test_import_no_optional_package():
    code = ("import json, sys\nimport numpy as np\nimport preprocess_data, test, train, utils\n"
            "labels = np.zeros((8, 8, 2), np.uint8); labels[2:5, 2:5] = 1\n"
            "utils.case_metrics(labels, labels, spacing=None)\n"
            "print(json.dumps([m for m in ('open_clip', 'transformers', 'medpy', 'tensorboardX', 'PIL', "
            "'matplotlib') if m in sys.modules]))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == []


def test_contrastive_loss_under_fp16_autocast_is_finite_and_equals_float32():
    from utils import TextAnchoredContrastiveLoss

    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[:, :, 4:] = 1
    features = torch.randn(2, 6, 8, 8).half()
    features[:, :, :, 4:] = 0  # e.g. after a ReLU: zero vectors must not normalise to NaN
    anchors = [torch.randn(2, 6)]
    loss = TextAnchoredContrastiveLoss(samples_per_scale=(5,))

    def value(amp):
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.float16, enabled=amp):
            return loss([features], labels, anchors)

    assert torch.isfinite(value(True)) and value(True).dtype == torch.float32
    torch.testing.assert_close(value(True), value(False))


def test_training_without_tensorboardx_writes_no_events_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    assert tensorboard_writer(tmp_path / "log") is None
    assert "tensorboardX is not installed" in caplog.text and not (tmp_path / "log").exists()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_script_parses_and_stops_without_a_gpu(tmp_path):
    script = ROOT / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(script), str(tmp_path / "out")], capture_output=True, text=True,
                            env=environment, timeout=120)
    assert result.returncode == 2
    assert "no CUDA GPU is visible to PyTorch" in result.stderr and "nothing was checked" in result.stderr
    assert not (tmp_path / "out").exists()


STAND_IN_PYTHON = """#!/usr/bin/env bash
# The interpreter gpu_check.sh is given, standing in for one GPU that holds a training batch of at most $FITS.
case "$*" in
  *device_count*) echo 1 ;;
  *torch.__version__*) echo "PyTorch (stand-in), GPU 0: a small card" ;;
  *benchmarks/speed.py*)
    batch=$(echo "$*" | sed -E 's/.*--batch_size ([0-9]+).*/\\1/')
    json=$(echo "$*" | sed -E 's/.*--json ([^ ]+).*/\\1/')
    if [ "$batch" -gt "$FITS" ]; then echo "torch.OutOfMemoryError: CUDA out of memory" >&2; exit 1; fi
    echo "{{\\"train_step_s\\": 0.1, \\"infer_slice_s\\": 0.001, \\"peak_cuda_mb\\": 100,
           \\"settings\\": {{\\"batch_size\\": $batch}}}}" > "$json" ;;
  *preprocess_data.py*|*priors.encode*) exit 1 ;;
  *) exec {python} "$@" ;;
esac
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("fits, expected", [(6, "| speed_R50-ViT-B_16 | pass |"),
                                            (0, "| speed_R50-ViT-B_16 | skipped (out of GPU memory even at batch 1)")])
def test_gpu_check_sizes_the_speed_step_to_the_cards_memory(tmp_path, fits, expected):
    stand_in = tmp_path / "python"
    stand_in.write_text(STAND_IN_PYTHON.format(python=sys.executable))
    stand_in.chmod(0o755)
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHON": str(stand_in), "FITS": str(fits)})
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert expected in table, result.stdout[-3000:]
    if fits:
        assert "at batch 6" in table and "again at batch 12" in result.stdout and "again at batch 6" in result.stdout
    assert table.count("speed_R50-ViT-B_16") == 1, "an attempt that ran out of memory is not a row"


RECORDING_PYTHON = """#!/usr/bin/env bash
# The interpreter gpu_check.sh is given, standing in for one GPU: it records every command (one argument a line,
# then a line ----) and leaves what the script checks afterwards; the table at the end runs for real.
case "$*" in
  -\\ *) exec {python} "$@" ;;
esac
printf '%s\\n' "$@" ---- >> "$RECORD"
value() {{ echo "$*" | sed -E "s/.*$1 ([^ ]+).*/\\1/"; }}
case "$*" in
  *device_count*) echo 1 ;;
  *torch.__version__*) echo "PyTorch (stand-in), GPU 0: a recording" ;;
  *load_checkpoint*) echo "max weight difference to the uninterrupted run: 0" ;;
  *preprocess_data.py*) mkdir -p "$(value --src_path "$@")/Raw_data/"{{bSSFP,LGE,T2w}} ;;
  *train.py*)
    run=$(value --output_dir "$@"); mkdir -p "$run"; touch "$run"/{{last,epoch_1,best}}.pth
    echo "the first step of the stage fused 0 took 1.0 s; it continues with --amp fp16" > "$run/log.txt" ;;
  *predict.py*) out=$(value --output_dir "$@"); mkdir -p "$out"; echo "case,sequences" > "$out/volumes.csv"
    echo "case1,bSSFP;LGE" >> "$out/volumes.csv" ;;
  *benchmarks/speed.py*) echo '{{"train_step_s": 0.1, "infer_slice_s": 0.001, "settings": {{"batch_size": 24}}}}' \\
    > "$(value --json "$@")" ;;
esac
exit 0
"""


def recorded_commands(record):
    """[[arguments]] of the commands the recording interpreter saw."""
    commands, current = [], []
    for line in record.read_text().splitlines():
        if line == "----":
            commands.append(current)
            current = []
        else:
            current.append(line)
    return commands


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_every_command_of_the_gpu_check_parses_with_its_scripts_flags(tmp_path):
    """The check's plumbing on the CPU: each step runs (a recording stands in for the interpreter) and each command
    line it gives train.py, test.py, predict.py, preprocess_data.py and speed.py is one their parsers accept."""
    from benchmarks import speed
    from datasets.dataset_writer import parse_preprocessing_args
    from engine.evaluation import evaluation_parser
    from engine.prediction import prediction_parser
    from engine.training import training_parser

    stand_in = tmp_path / "python"
    stand_in.write_text(RECORDING_PYTHON.format(python=sys.executable))
    stand_in.chmod(0o755)
    record = tmp_path / "commands.txt"
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHON": str(stand_in), "RECORD": str(record)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    steps = ["data", "priors", "train_bf16", "train_fp16", "resume_bf16", "test_bf16", "test_fp16", "subsets_bf16",
             "predict_without_t2w", "resume_bf16_to_fp16", "compile", "speed_R50-ViT-B_16", "speed_R50-only"]
    rows = [line.split(" | ")[:2] for line in table.splitlines() if line.startswith("| ") and " | pass |" in line]
    assert [[f"| {name}", "pass"] for name in steps] == rows, table
    parsers = {"train.py": training_parser().parse_args, "test.py": lambda argv: evaluation_parser().parse_args(argv),
               "predict.py": prediction_parser().parse_args, "preprocess_data.py": parse_preprocessing_args,
               "benchmarks/speed.py": speed.parse_args}
    seen = set()
    for command in recorded_commands(record):
        script = next((word for word in command if word in parsers), None)
        if script is not None:
            parsers[script](command[command.index(script) + 1:])  # an unknown flag exits (SystemExit)
            seen.add(script)
    assert seen == set(parsers)
    flags = [" ".join(command) for command in recorded_commands(record)]
    for expected in ("--compile on", "--amp fp16 --output_dir", "--sequences bSSFP,LGE", "--subsets_from"):
        assert any(expected in line for line in flags), expected


def test_speed_benchmark_puts_the_model_and_the_loss_on_its_device():
    """Found on the first GPU run: the loss's class weights stayed on the CPU while the model was on CUDA."""
    from benchmarks import speed

    args = speed.parse_args(["--vit_name", "testing", "--img_size", "32", "--batch_size", "2", "--warmup", "0",
                             "--steps", "1"])
    args.device = "meta"
    model, forward, criterion, optimizer = speed.build_ours(torch, args)
    assert {tensor.device.type for _, tensor in tensors(model) + tensors(criterion)} == {"meta"}
    assert forward(torch.zeros(2, 3, 32, 32, device="meta")).fused_logits.device.type == "meta"
    assert {state.device.type for group in optimizer.param_groups for state in group["params"]} == {"meta"}


def test_speed_benchmark_records_the_cpus_capability_and_bf16_kernels():
    from benchmarks import speed

    args = speed.parse_args(["--vit_name", "testing", "--img_size", "32", "--batch_size", "2", "--warmup", "0",
                             "--steps", "1", "--slices", "2", "--batch_slices", "2", "--infer_repeats", "1"])
    figures = speed.measure_ours(args)
    assert figures["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert figures["cpu_bf16_kernels"] in (True, False)
    assert figures["train_step_s"] > 0 and figures["infer_slice_s"] > 0
