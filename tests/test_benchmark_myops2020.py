"""benchmarks/myops2020.py on a small phantom with the tiny configuration: split, budget, schedule, results, report."""
import argparse
import gzip
import json
import os
import random
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

from benchmarks import myops2020 as benchmark
from benchmarks.harness import agreement, fit, planning, report, run, split, statistics, variants
from benchmarks.harness import records as result_files
from conftest import prepare_benchmark_phantom, write_test_priors
from datasets import dataset_writer
import test as test_script
import train as train_script
from engine.checkpoints import load_checkpoint
from engine.options import stage_fractions


@pytest.fixture(scope="module")
def single_thread():
    """The tiny model gains nothing from a second thread, which only spins when other work shares the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, single_thread):
    root = prepare_benchmark_phantom(tmp_path_factory.mktemp("benchmark"))
    write_test_priors(root)
    return root


def run_args(root, variant, fold, *budget):
    return ["run", "--data", str(root / "data"), "--out", str(root / "out"), "--variant", variant, "--fold",
            str(fold), *budget, "--biomedclip_priors", str(root / "priors.pt"), "--vit_name", "testing",
            "--batch_size", "8", "--num_workers", "0", "--device", "cpu", "--warmup_steps", "0", "--timed_steps", "1"]


def test_split_is_seeded_reused_and_a_different_one_refused(prepared, caplog):
    split_file = prepared / "split.json"
    written = json.loads(split_file.read_text())
    folds = written["folds"]
    assert len(folds) == 3 and all(len(fold) == 2 for fold in folds)
    assert sorted(c for fold in folds for c in fold) == [f"case{i:04d}" for i in range(1, 7)]
    assert folds == split.make_folds([c for fold in folds for c in fold], 3, 1234)
    assert split.make_folds(range(30), 3, 1) != split.make_folds(range(30), 3, 2)
    before = split_file.read_bytes()
    args = ["split", "--dataset", "Phantom", "--src", str(prepared / "raw"), "--split_file", str(split_file)]
    assert benchmark.main(args) == 0 and split_file.read_bytes() == before
    assert benchmark.main(args + ["--seed", "7"]) == 1
    assert "holds another split" in caplog.text and split_file.read_bytes() == before
    for fold, test_cases in enumerate(folds):
        dataset = json.loads((prepared / "data" / f"fold{fold}" / "dataset.json").read_text())
        assert dataset["split"]["test"] == test_cases and dataset["settings"]["crop_size"] == 64
        assert sorted(dataset["split"]["train"]) == sorted(set(sum(folds, [])) - set(test_cases))
    assert benchmark.main(["prepare", "--src", str(prepared / "raw"), "--split_file", str(split_file), "--data",
                           str(prepared / "data"), "--spacing", "2.0", "--crop_size", "48"]) == 1
    assert "with other settings" in caplog.text


def test_budget_to_iterations_and_schedule_fitting():
    assert planning.budget_to_iterations(42, 2.5) == 1008
    assert planning.budget_to_iterations(1, 61.0) == 1
    with pytest.raises(result_files.BenchmarkError):
        planning.budget_to_iterations(42, 0.0)
    assert variants.paper_schedule() == (300, 20, 100)
    # README's run C: 825 iterations at 11 per epoch were run as 75 epochs, contrast from 5, fused from 25
    assert planning.fit_schedule(825, 11) == {"max_epochs": 75, "max_iterations": 825, "start_contrast_epoch": 5,
                                               "region_fusion_start_epoch": 25}
    assert planning.fit_schedule(3000, 10) == {"max_epochs": 300, "max_iterations": 3000,
                                                "start_contrast_epoch": 20, "region_fusion_start_epoch": 100}
    assert planning.fit_schedule(9, 7) == {"max_epochs": 2, "max_iterations": 9, "start_contrast_epoch": 0,
                                            "region_fusion_start_epoch": 1}
    generator = random.Random(0)
    for _ in range(500):
        iterations, per_epoch = generator.randint(1, 5000), generator.randint(1, 40)
        schedule = planning.fit_schedule(iterations, per_epoch)
        assert (schedule["max_epochs"] - 1) * per_epoch < iterations <= schedule["max_epochs"] * per_epoch
        assert schedule["start_contrast_epoch"] <= schedule["region_fusion_start_epoch"] < schedule["max_epochs"]
        assert schedule["region_fusion_start_epoch"] * per_epoch < iterations, "the fused stage is always reached"
    stages = stage_fractions(20, 100, 300)
    assert [epoch for epoch, _ in stages] == [0, 20, 100]
    assert [fraction for _, fraction in stages] == pytest.approx([20 / 300, 80 / 300, 200 / 300])
    assert stage_fractions(0, 1, 2) == [(0, 0.5), (1, 0.5)]


def test_every_variant_is_a_set_of_train_py_flags(prepared):
    options = argparse.Namespace(dataset="Phantom", vit_name="testing", batch_size=8, device="cpu", num_workers=None,
                                 biomedclip_priors=prepared / "priors.pt", names_only_priors=None, augmentation="strong",
                                 amp="none", base_lr=None)
    parsed = {}
    for name in variants.VARIANTS:
        flags = variants.recipe_flags(name, prepared / "data" / "fold0", 64, options, prepared / "out")
        parsed[name] = train_script.parse_args(flags)
        assert (parsed[name].augmentation, parsed[name].no_pretrain, parsed[name].img_size) == ("strong", True, 64)
    assert [name for name, args in parsed.items() if args.model == "immseg"] == [
        "immseg", "immseg_half", "immseg_scar2", "no_cmfe", "no_cfm", "no_contrast", "names_only", "offline_priors",
        "immseg_subsets"]
    assert parsed["immseg_subsets"].subsets_from is None, "a stage's flags are those of the run it is trained on"
    assert [name for name, variant in variants.VARIANTS.items() if variant.stage_of] == ["immseg_subsets"]
    assert [name for name, variant in variants.VARIANTS.items() if variant.serves_subsets] == ["immseg_subsets"]
    assert not set(variants.RECORDED_ONLY) & set(variants.VARIANTS), "a removed training mode trains no variant"
    assert variants.described("immseg_seqpair") == ("I-MMSeg, sequence dropout 0.5 paired (every sample also seen "
                                                    "complete) (immseg_seqpair)")
    assert variants.described("immseg") == "I-MMSeg, full (immseg)" and variants.described("gone") == "gone"
    pair = parsed["transunet_early_bssfp_t2w"]
    assert (pair.model, pair.input_sequences) == ("transunet_early", ("bSSFP", "T2w"))
    assert parsed["transunet_early"].input_sequences is None
    assert parsed["no_cfm"].no_cfm and not parsed["immseg"].no_cfm and parsed["no_contrast"].no_contrast
    assert parsed["immseg_half"].vit_name == "compact-half" and parsed["immseg"].vit_name == "testing"
    assert parsed["immseg_scar2"].dice_class_weights == [0.5, 1, 2, 1] and parsed["immseg"].dice_class_weights is None
    single = parsed["transunet_single_t2w"]
    assert (single.model, single.modality) == ("transunet_single", "T2w")
    assert parsed["names_only"].prompts.name == "names_only.json" and parsed["names_only"].prior_encoder == "offline"
    assert parsed["immseg"].prior_embeddings == (prepared / "priors.pt").resolve()
    assert benchmark.parse_args(run_args(prepared, "immseg", 0)).augmentation == "strong"
    options.augmentation = "nnunet"
    flags = variants.recipe_flags("immseg", prepared / "data" / "fold0", 64, options, prepared / "out")
    assert train_script.parse_args(flags).augmentation == "nnunet"
    assert variants.training_name("immseg", "nnunet") == "immseg+nnunet_aug"
    assert variants.training_name("immseg", "strong") == "immseg", "the recipe's preset keeps the variant's name"
    assert variants.training_name("immseg", "nnunet", "bf16") == "immseg+nnunet_aug+bf16"
    assert "--base_lr" not in flags, "the recipe trains at train.py's default learning rate"
    options.base_lr = 0.001
    assert "--base_lr" not in variants.recipe_flags("immseg", prepared / "data" / "fold0", 64, options,
                                                     prepared / "out"), "the default rate is the recipe's, no flag"
    options.base_lr = 0.003
    flags = variants.recipe_flags("immseg", prepared / "data" / "fold0", 64, options, prepared / "out")
    assert train_script.parse_args(flags).base_lr == 0.003
    options.biomedclip_priors = None
    with pytest.raises(result_files.BenchmarkError, match="needs --biomedclip_priors"):
        variants.recipe_flags("no_cmfe", prepared / "data" / "fold0", 64, options, prepared / "out")


def test_run_refuses_contradicting_budget_flags_and_an_unknown_fold(prepared, caplog):
    assert benchmark.main(run_args(prepared, "immseg", 0, "--budget_minutes", "1", "--iterations", "5")) == 1
    assert "--budget_minutes goes with --mode time" in caplog.text
    assert benchmark.main(run_args(prepared, "immseg", 3, "--budget_minutes", "1")) == 1
    assert "has folds 0 to 2" in caplog.text
    assert benchmark.main(run_args(prepared, "immseg_half", 0, "--budget_minutes", "1")) == 1
    assert "--vit_name testing: immseg_half trains its own configuration, compact-half" in caplog.text
    assert not (prepared / "out" / "runs").exists()


def test_run_is_refused_while_another_process_trains_in_its_folder(prepared, caplog):
    variant_dir = prepared / "out" / "runs" / "data" / "no_cfm"
    run_dir = variant_dir / "iterations_4" / "fold2"
    run_dir.mkdir(parents=True)
    lock = run_dir / "train.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "earlier"}))
    assert benchmark.main(run_args(prepared, "no_cfm", 2, "--mode", "iterations", "--iterations", "4")) == 1
    assert f"{lock} names process {os.getpid()}" in caplog.text
    assert [path.name for path in run_dir.iterdir()] == ["train.lock"], "nothing timed or planned beside it"
    shutil.rmtree(variant_dir)


def test_run_appends_per_case_results_and_a_rerun_is_skipped(prepared, caplog):
    results = prepared / "out" / "results.jsonl"
    assert benchmark.main(run_args(prepared, "immseg", 0, "--mode", "iterations", "--iterations", "5")) == 0
    records = result_files.read_results(results)
    test_cases = json.loads((prepared / "split.json").read_text())["folds"][0]
    assert sorted({r["case"] for r in records}) == test_cases and len(records) == 2 * 5
    assert {r["structure"] for r in records} == set(result_files.STRUCTURE_NAMES)
    record = records[0]
    assert (record["variant"], record["fold"], record["mode"], record["setting"]) == (
        "immseg", 0, "iterations", "iterations 5")
    assert record["iterations"] == 5 and record["seconds_per_step"] > 0 and record["budget_minutes"] is None
    assert (record["max_epochs"], record["start_contrast_epoch"], record["region_fusion_start_epoch"]) == (2, 0, 1)
    assert all(r["dice"] is None or 0 <= r["dice"] <= 1 for r in records)
    machine = record["machine"]
    assert machine["cpu"] and machine["cpu_count"] == os.cpu_count() and machine["torch"] == torch.__version__
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert machine["cpu_bf16_kernels"] in (True, False), "whether bf16 autocast runs natively on this CPU"
    assert "gpu" not in machine, "a run on the CPU names no GPU"
    run_dir = prepared / "out" / "runs" / "data" / "immseg" / "iterations_5" / "fold0"
    last = run_dir / "last.pth"
    assert load_checkpoint(last)["train_state"]["iteration"] == 5
    checkpoint_args = load_checkpoint(last)["args"]
    assert checkpoint_args["region_fusion_start_epoch"] == 1 and checkpoint_args["augmentation"] == "strong"

    before, stamp = results.read_bytes(), last.stat().st_mtime_ns
    assert benchmark.main(run_args(prepared, "immseg", 0, "--mode", "iterations", "--iterations", "5")) == 0
    assert "already in" in caplog.text
    assert results.read_bytes() == before and last.stat().st_mtime_ns == stamp

    results.unlink()  # as if the first invocation had died after training: the plan is reused, training resumed
    assert benchmark.main(run_args(prepared, "immseg", 0, "--mode", "iterations", "--iterations", "5")) == 0
    assert "reusing the plan" in caplog.text and load_checkpoint(last)["train_state"]["iteration"] == 5
    again = result_files.read_results(results)
    assert [(r["case"], r["structure"], r["dice"], r["seconds_per_step"]) for r in again] == [
        (r["case"], r["structure"], r["dice"], r["seconds_per_step"]) for r in records]

    # the same training scored with flip averaging and post-processing: a variant of its own, not trained again
    assert benchmark.main(run_args(prepared, "immseg", 0, "--mode", "iterations", "--iterations", "5", "--tta",
                                   "--postprocess")) == 0
    assert last.stat().st_mtime_ns == stamp
    assert "is trained (its own run is in the results): not trained again" in caplog.text
    rescored = [r for r in result_files.read_results(results) if r["variant"] == "immseg+tta+pp"]
    assert len(rescored) == len(records) and {tuple(r["inference"]) for r in rescored} == {("tta", "pp")}
    assert {r["train_seconds"] for r in rescored} == {again[0]["train_seconds"]}
    info = json.loads((run_dir / "test_last_tta_pp" / "test_info.json").read_text())
    assert info["tta"] is True and info["postprocess"] is True

    assert benchmark.main(run_args(prepared, "transunet_early", 1, "--budget_minutes", "0.02")) == 0
    early = [r for r in result_files.read_results(results) if r["variant"] == "transunet_early"]
    plan = json.loads((prepared / "out" / "runs" / "data" / "transunet_early" / "time_0.02_min" / "fold1" /
                       "plan.json").read_text())
    assert len(plan["seconds_per_stage"]) == 1, "a baseline has one stage"
    assert early[0]["iterations"] == planning.budget_to_iterations(0.02, plan["seconds_per_step"])
    assert early[0]["setting"] == "time 0.02 min" and early[0]["budget_minutes"] == 0.02
    assert len(result_files.read_results(results)) == 30


def test_mixed_precision_trains_and_scores_under_its_own_name(prepared):
    assert benchmark.main(run_args(prepared, "immseg", 1, "--mode", "iterations", "--iterations", "3",
                                   "--amp", "bf16")) == 0
    records = [r for r in result_files.read_results(prepared / "out" / "results.jsonl") if r.get("amp") == "bf16"]
    assert {(r["variant"], r["fold"]) for r in records} == {("immseg+bf16", 1)} and len(records) == 2 * 5
    run_dir = prepared / "out" / "runs" / "data" / "immseg+bf16" / "iterations_3" / "fold1"
    assert load_checkpoint(run_dir / "last.pth")["args"]["amp"] == "bf16"
    assert "--amp" in json.loads((run_dir / "plan.json").read_text())["base_flags"], "timed as it trains"
    assert variants.ensemble_name(["immseg"] * 2, ["strong", "nnunet"], "bf16") == "immseg+ens2_strong1_nnunet1+bf16"
    assert variants.ensemble_name(["immseg"] * 2, ["strong"] * 2, "bf16") == "immseg+bf16+ens2"
    assert variants.ensemble_name(["immseg", "immseg_half"] * 2, ["strong", "strong", "nnunet", "nnunet"], "bf16") == (
        "immseg_x2+immseg_half_x2+ens4_strong2_nnunet2+bf16")


def test_members_share_the_budget_and_are_scored_as_one_ensemble(prepared, caplog):
    results = prepared / "out" / "results.jsonl"
    budget = ["--mode", "iterations", "--iterations", "6"]
    assert benchmark.main(run_args(prepared, "immseg", 2, *budget, "--members", "2")) == 0
    runs = prepared / "out" / "runs" / "data"
    members = [runs / "immseg" / "iterations_3" / "fold2", runs / "immseg+seed1235" / "iterations_3" / "fold2"]
    for member, seed in zip(members, (1234, 1235)):
        checkpoint = load_checkpoint(member / "last.pth")
        assert checkpoint["train_state"]["iteration"] == 3 and checkpoint["args"]["seed"] == seed
        assert json.loads((member / "training.json").read_text())["seed"] == seed
    plans = [json.loads((member / "plan.json").read_text()) for member in members]
    assert plans[0] == plans[1], "the members share one timing and schedule"
    info = json.loads((runs / "immseg+ens2" / "iterations_6" / "fold2" / "test_last" / "test_info.json").read_text())
    assert info["ensemble"] == [str(member / "last.pth") for member in members]
    records = [r for r in result_files.read_results(results) if r["variant"] == "immseg+ens2"]
    assert len(records) == 10 and {(r["setting"], r["fold"], r["iterations"], r["members"]) for r in records} == {
        ("iterations 6", 2, 6, 2)}
    assert records[0]["train_seconds"] == pytest.approx(sum(
        json.loads((member / "training.json").read_text())["train_seconds"] for member in members), abs=0.2)

    # member 0 is the variant's own run at the member budget: scoring it alone trains nothing
    stamp = (members[0] / "last.pth").stat().st_mtime_ns
    assert benchmark.main(run_args(prepared, "immseg", 2, "--mode", "iterations", "--iterations", "3")) == 0
    assert (members[0] / "last.pth").stat().st_mtime_ns == stamp and "is trained (" in caplog.text
    alone = [r for r in result_files.read_results(results) if (r["variant"], r["fold"]) == ("immseg", 2)]
    assert len(alone) == 10 and alone[0]["train_seconds"] == json.loads(
        (members[0] / "training.json").read_text())["train_seconds"]
    assert benchmark.main(run_args(prepared, "immseg", 2, *budget, "--members", "7")) == 1
    assert "each member needs an iteration" in caplog.text
    stranger = runs / "immseg+seed1235" / "iterations_2" / "fold2"
    stranger.mkdir(parents=True)
    (stranger / "plan.json").write_text(json.dumps({**plans[0], "iterations": 9}))
    assert benchmark.main(run_args(prepared, "immseg", 2, "--mode", "iterations", "--iterations", "4", "--members",
                                   "2")) == 1
    assert f"is not the plan of {runs / 'immseg' / 'iterations_2' / 'fold2' / 'plan.json'}" in caplog.text
    assert not (stranger / "last.pth").exists()
    assert not (runs / "immseg" / "iterations_2" / "fold2" / "last.pth").exists(), "no member trained"


def test_members_with_a_list_of_augmentations_train_each_preset_from_its_own_plan(prepared, caplog):
    runs = prepared / "out" / "runs" / "data"
    budget = ["--mode", "iterations", "--iterations", "6", "--members", "3"]
    for wrong, message in (("strong,nnunet", "2 presets for --members 3"), ("strong,flips,strong", "unknown preset")):
        assert benchmark.main(run_args(prepared, "immseg", 1, *budget, "--augmentation", wrong)) == 1
        assert message in caplog.text
    assert not (runs / "immseg" / "iterations_2" / "fold1").exists(), "nothing planned or trained"
    assert benchmark.main(run_args(prepared, "immseg", 1, *budget, "--augmentation", "strong,nnunet,strong")) == 0
    # seeds count up within each preset: the first member of each is that training's standalone run
    members = [(runs / "immseg" / "iterations_2" / "fold1", "strong", 1234),
               (runs / "immseg+nnunet_aug" / "iterations_2" / "fold1", "nnunet", 1234),
               (runs / "immseg+seed1235" / "iterations_2" / "fold1", "strong", 1235)]
    for member, augmentation, seed in members:
        arguments = load_checkpoint(member / "last.pth")["args"]
        assert (arguments["augmentation"], arguments["seed"]) == (augmentation, seed)
    plans = [json.loads((member / "plan.json").read_text()) for member, _, _ in members]
    assert plans[0] == plans[2] and plans[0]["base_flags"] != plans[1]["base_flags"]
    assert "nnunet" in plans[1]["base_flags"], "the nnunet member is timed with its own augmentation"
    info = json.loads((runs / "immseg+ens3_strong2_nnunet1" / "iterations_6" / "fold1" / "test_last" /
                       "test_info.json").read_text())
    assert info["ensemble"] == [str(member / "last.pth") for member, _, _ in members]
    records = [r for r in result_files.read_results(prepared / "out" / "results.jsonl")
               if r["variant"] == "immseg+ens3_strong2_nnunet1"]
    assert len(records) == 10 and records[0]["iterations"] == 6 and records[0]["member_runs"] == [
        {"variant": "immseg", "augmentation": augmentation, "seed": seed, "iterations": 2, "vit_name": "testing"}
        for _, augmentation, seed in members]
    # the nnunet member is the standalone nnunet run at the member budget: scoring that alone trains nothing
    stamp = (members[1][0] / "last.pth").stat().st_mtime_ns
    assert benchmark.main(run_args(prepared, "immseg", 1, "--mode", "iterations", "--iterations", "2",
                                   "--augmentation", "nnunet")) == 0
    assert (members[1][0] / "last.pth").stat().st_mtime_ns == stamp and "is trained (" in caplog.text


def test_members_of_different_variants_train_each_variant_from_its_own_plan(prepared, caplog):
    runs = prepared / "out" / "runs" / "data"
    budget = ["--mode", "iterations", "--iterations", "4", "--members", "2"]
    for wrong, message in (("immseg,immseg_scar2,immseg", "expected one variant per member (--members 2)"),
                           ("immseg_scar2,immseg", "the first being --variant immseg"),
                           ("immseg,immseg_wide", "unknown variant(s) ['immseg_wide']")):
        assert benchmark.main(run_args(prepared, "immseg", 0, *budget, "--member_variants", wrong)) == 1
        assert message in caplog.text
    assert benchmark.main(run_args(prepared, "immseg", 0, *budget, "--member_variants", "immseg,immseg_half")) == 1
    assert "immseg_half trains its own configuration" in caplog.text
    assert not (runs / "immseg" / "iterations_2" / "fold0").exists(), "nothing planned or trained"

    assert benchmark.main(run_args(prepared, "immseg", 0, *budget, "--member_variants", "immseg,immseg_scar2")) == 0
    members = [runs / "immseg" / "iterations_2" / "fold0", runs / "immseg_scar2" / "iterations_2" / "fold0"]
    arguments = [load_checkpoint(member / "last.pth")["args"] for member in members]
    assert [a["seed"] for a in arguments] == [1234, 1234], "each variant's first member is its standalone run"
    assert [a["dice_class_weights"] for a in arguments] == [None, [0.5, 1.0, 2.0, 1.0]]
    plans = [json.loads((member / "plan.json").read_text()) for member in members]
    assert "--dice_class_weights" in plans[1]["base_flags"] and "--dice_class_weights" not in plans[0]["base_flags"]
    name = "immseg_x1+immseg_scar2_x1+ens2_strong2"
    info = json.loads((runs / name / "iterations_4" / "fold0" / "test_last" / "test_info.json").read_text())
    assert info["ensemble"] == [str(member / "last.pth") for member in members]
    records = [r for r in result_files.read_results(prepared / "out" / "results.jsonl") if r["variant"] == name]
    assert len(records) == 10 and records[0]["member_runs"] == [
        {"variant": variant, "augmentation": "strong", "seed": 1234, "iterations": 2, "vit_name": "testing"}
        for variant in ("immseg", "immseg_scar2")]
    stamp = (members[1] / "last.pth").stat().st_mtime_ns
    assert benchmark.main(run_args(prepared, "immseg_scar2", 0, "--mode", "iterations", "--iterations", "2")) == 0
    assert (members[1] / "last.pth").stat().st_mtime_ns == stamp and "is trained (" in caplog.text


def test_a_member_of_its_own_configuration_is_recorded_with_it(prepared, monkeypatch):
    """As immseg_half trains compact-half beside the recipe's compact: here a variant of testing-release beside
    testing, so that the records say which configurations were trained, not the recipe's."""
    monkeypatch.setitem(variants.RECIPE_FLAGS, "vit_name", "testing")
    monkeypatch.setitem(variants.VARIANTS, "immseg_release",
                        variants.Variant("I-MMSeg, the review release's switches", (), "biomedclip",
                                          config="testing-release"))
    budget = ["--mode", "iterations", "--iterations", "4", "--members", "2"]
    assert benchmark.main(run_args(prepared, "immseg", 1, *budget, "--member_variants", "immseg,immseg_release")) == 0
    member = prepared / "out" / "runs" / "data" / "immseg_release" / "iterations_2" / "fold1"
    assert load_checkpoint(member / "last.pth")["args"]["vit_name"] == "testing-release"
    records = [r for r in result_files.read_results(prepared / "out" / "results.jsonl")
               if r["variant"] == "immseg_x1+immseg_release_x1+ens2_strong2"]
    assert len(records) == 10 and records[0]["vit_name"] == "testing,testing-release"
    assert [m["vit_name"] for m in records[0]["member_runs"]] == ["testing", "testing-release"]
    assert benchmark.main(run_args(prepared, "immseg_release", 1, "--mode", "iterations", "--iterations", "2")) == 0
    alone = [r for r in result_files.read_results(prepared / "out" / "results.jsonl") if r["variant"] == "immseg_release"]
    assert len(alone) == 10 and alone[0]["vit_name"] == "testing-release"


def test_a_plan_made_in_another_checkout_is_reused_and_one_with_other_flags_refused(tmp_path):
    here = [str(variants.PROMPTS / "intensity.json"), "--batch_size", "8"]
    elsewhere = ["/elsewhere/clone/priors/prompts/intensity.json", "--batch_size", "8"]
    plan = {"base_flags": elsewhere, "iterations": 5}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert planning.plan_run(None, here, tmp_path) == plan, "reused without timing"
    for other in (["/elsewhere/clone/priors/prompts/names_only.json", "--batch_size", "8"],
                  [here[0], "--batch_size", "4"]):
        with pytest.raises(result_files.BenchmarkError, match="was planned with other train.py flags"):
            planning.plan_run(None, other, tmp_path)


def test_an_earlier_fused_stage_is_scaled_to_the_run_and_trained_under_its_own_name(prepared, caplog):
    assert planning.fit_schedule(825, 11, paper_fusion=50) == {
        "max_epochs": 75, "max_iterations": 825, "start_contrast_epoch": 5, "region_fusion_start_epoch": 13}
    assert planning.fit_schedule(825, 11, paper_fusion=0)["start_contrast_epoch"] == 0, "contrast never after fusion"
    assert variants.schedule_name("immseg", 100, 100) == "immseg" and variants.schedule_name("immseg", None, 100) == (
        "immseg")
    assert variants.schedule_name("immseg", 50, 100, 0.003) == "immseg+fused50+lr0.003"
    for variant, epoch, message in (("transunet_early", 50, "transunet_early has no fused head"),
                                    ("immseg", 300, "expected an epoch of the paper's schedule, 0 to 299")):
        assert benchmark.main(run_args(prepared, variant, 2, "--mode", "iterations", "--iterations", "30",
                                       "--fused_start_epoch", str(epoch))) == 1
        assert message in caplog.text
    runs = prepared / "out" / "runs" / "data"
    assert not (runs / "transunet_early+fused50").exists() and not (runs / "immseg+fused300").exists()

    assert benchmark.main(run_args(prepared, "immseg", 2, "--mode", "iterations", "--iterations", "30",
                                   "--fused_start_epoch", "0")) == 0
    run_dir = runs / "immseg+fused0" / "iterations_30" / "fold2"
    plan = json.loads((run_dir / "plan.json").read_text())
    paper = planning.fit_schedule(30, plan["iterations_per_epoch"])
    assert paper["region_fusion_start_epoch"] > 0, "the phantom's run is long enough to tell the schedules apart"
    assert plan["schedule"] == {**paper, "start_contrast_epoch": 0, "region_fusion_start_epoch": 0}
    assert load_checkpoint(run_dir / "last.pth")["args"]["region_fusion_start_epoch"] == 0
    records = [r for r in result_files.read_results(prepared / "out" / "results.jsonl") if r["variant"] == "immseg+fused0"]
    assert len(records) == 10 and {(r["region_fusion_start_epoch"], r["fold"]) for r in records} == {(0, 2)}

    # the same training scored with three heads averaged: recorded apart, not trained again; a baseline is refused
    stamp = (run_dir / "last.pth").stat().st_mtime_ns
    assert benchmark.main(run_args(prepared, "immseg", 2, "--mode", "iterations", "--iterations", "30",
                                   "--fused_start_epoch", "0", "--heads", "fused,LGE,T2w")) == 0
    assert (run_dir / "last.pth").stat().st_mtime_ns == stamp
    rescored = [r for r in result_files.read_results(prepared / "out" / "results.jsonl")
                if r["variant"] == "immseg+fused0+heads_fused_LGE_T2w"]
    assert len(rescored) == 10 and rescored[0]["inference"] == ["heads_fused_LGE_T2w"]
    assert json.loads((run_dir / "test_last_heads_fused_LGE_T2w" / "test_info.json").read_text())["heads"] == [
        "fused", "LGE", "T2w"]
    assert benchmark.main(run_args(prepared, "transunet_early", 2, "--mode", "iterations", "--iterations", "30",
                                   "--heads", "fused,LGE")) == 1
    assert "transunet_early has one head" in caplog.text


def test_another_learning_rate_is_trained_and_recorded_under_its_own_name(prepared, caplog):
    budget = ("--mode", "iterations", "--iterations", "10")
    assert benchmark.main(run_args(prepared, "transunet_early", 1, *budget, "--base_lr", "0")) == 1
    assert "--base_lr 0: expected a positive learning rate" in caplog.text
    runs = prepared / "out" / "runs" / "data"
    assert not (runs / "transunet_early+lr0").exists()

    assert benchmark.main(run_args(prepared, "transunet_early", 1, *budget, "--base_lr", "0.003")) == 0
    run_dir = runs / "transunet_early+lr0.003" / "iterations_10" / "fold1"
    assert load_checkpoint(run_dir / "last.pth")["args"]["base_lr"] == 0.003
    records = [r for r in result_files.read_results(prepared / "out" / "results.jsonl")
               if r["variant"] == "transunet_early+lr0.003"]
    assert len(records) == 10 and {(r["base_lr"], r["fold"]) for r in records} == {(0.003, 1)}


def test_another_batch_size_is_trained_and_recorded_under_its_own_name(prepared):
    assert variants.schedule_name("immseg", None, 100, 0.004, 8) == "immseg+lr0.004", "the recipe's batch: no suffix"
    args = run_args(prepared, "transunet_early", 1, "--mode", "iterations", "--iterations", "10")
    args[args.index("--batch_size") + 1] = "4"
    assert benchmark.main(args) == 0
    runs = prepared / "out" / "runs" / "data"
    run_dir = runs / "transunet_early+bs4" / "iterations_10" / "fold1"
    assert load_checkpoint(run_dir / "last.pth")["args"]["batch_size"] == 4
    assert not (runs / "transunet_early" / "iterations_10" / "fold1").exists()
    records = [r for r in result_files.read_results(prepared / "out" / "results.jsonl") if r["fold"] == 1
               and r["setting"] == "iterations 10" and r["variant"].startswith("transunet_early+bs")]
    assert len(records) == 10 and {(r["variant"], r["batch_size"]) for r in records} == {("transunet_early+bs4", 4)}


def test_a_bf16_run_on_a_cpu_without_bf16_kernels_warns(prepared, monkeypatch, caplog):
    import networks.inference as inference

    monkeypatch.setattr(inference, "cpu_has_bf16_kernels", lambda: False)
    assert benchmark.main(run_args(prepared, "transunet_early", 2, "--mode", "iterations", "--iterations", "10",
                                   "--amp", "bf16")) == 0
    assert "bf16 is emulated and several times slower than float32" in caplog.text


def _dice_by_case(metrics):
    return {(case, structure): dice for case, per_structure in metrics.items()
            for structure, (dice, _) in per_structure.items()}


def test_fit_scores_a_run_on_its_training_cases_as_test_py_scores_them_where_they_are_test_cases(
        prepared, tmp_path, caplog):
    out = prepared / "out"
    assert benchmark.main(run_args(prepared, "immseg", 2, "--mode", "iterations", "--iterations", "3")) == 0
    run_dir = out / "runs" / "data" / "immseg" / "iterations_3" / "fold2"
    args = ["fit", "--data", str(prepared / "data"), "--out", str(out), "--variant", "immseg", "--setting",
            "iterations 3", "--fold", "2", "--device", "cpu"]
    assert benchmark.main(args) == 0
    records = result_files.read_results(out / "fit.jsonl")
    folds = json.loads((prepared / "split.json").read_text())["folds"]
    nan = float("nan")
    scored = {cases: {(r["case"], r["structure"]): nan if r["dice"] is None else r["dice"]
                      for r in records if r["cases"] == cases} for cases in ("training", "test")}
    assert sorted({case for case, _ in scored["training"]}) == sorted(folds[0] + folds[1])
    assert {r["iterations"] for r in records} == {3} and {r["amp"] for r in records} == {"none"}
    for other in (0, 1):  # each training case scored directly in the fold where it is a test case
        direct = tmp_path / f"fold{other}"
        assert test_script.main(["--output_dir", str(run_dir), "--root_path", str(prepared / "data" / f"fold{other}"),
                                 "--checkpoint", "last", "--test_save_dir", str(direct), "--no_save_nii",
                                 "--device", "cpu"]) == 0
        expected = _dice_by_case(run.read_metrics(direct / "metrics.csv", folds[other]))
        assert {key: scored["training"][key] for key in expected} == pytest.approx(expected, nan_ok=True)
    recorded = {(r["case"], r["structure"]): nan if r["dice"] is None else r["dice"]
                for r in result_files.read_results(out / "results.jsonl")
                if (r["variant"], r["setting"], r["fold"]) == ("immseg", "iterations 3", 2)}
    assert scored["test"] == pytest.approx(recorded, nan_ok=True), "the test cases as run scored them"
    table = (out / "fit.md").read_text()
    assert "| immseg | data | iterations | 2 | 3 |" in table

    before = (out / "fit.jsonl").read_bytes()
    assert benchmark.main(args) == 0 and "already in" in caplog.text
    assert (out / "fit.jsonl").read_bytes() == before
    untrained = args[:args.index("iterations 3")] + ["iterations 99"] + args[args.index("iterations 3") + 1:]
    assert benchmark.main(untrained) == 1 and "holds no trained run" in caplog.text
    assert (out / "fit.jsonl").read_bytes() == before


def test_agreement_scores_each_member_as_run_scores_it_and_compares_their_predictions(prepared, caplog):
    out, results = prepared / "out", prepared / "out" / "results.jsonl"
    command = ["agreement", "--data", str(prepared / "data"), "--out", str(out), "--fold", "1", "--device", "cpu"]
    assert benchmark.main(command + ["--variant", "immseg+ens2", "--setting", "iterations 4"]) == 1
    assert "holds no records of immseg+ens2 (iterations 4" in caplog.text
    assert benchmark.main(run_args(prepared, "immseg", 1, "--mode", "iterations", "--iterations", "2")) == 0
    assert benchmark.main(command + ["--variant", "immseg", "--setting", "iterations 2"]) == 1
    assert "scores one run, not an ensemble" in caplog.text
    assert not (out / agreement.AGREEMENT_RESULTS).exists(), "nothing written"

    assert benchmark.main(run_args(prepared, "immseg", 1, "--mode", "iterations", "--iterations", "4", "--members",
                                   "2")) == 0
    assert benchmark.main(command + ["--variant", "immseg+ens2", "--setting", "iterations 4"]) == 0
    records = result_files.read_results(out / agreement.AGREEMENT_RESULTS)
    runs = out / "runs" / "data"
    assert records[0]["members"] == [str(runs / name / "iterations_2" / "fold1") for name in ("immseg",
                                                                                            "immseg+seed1235")]
    recorded = result_files.read_results(results)
    alone = {(r["case"], r["structure"]): r["dice"] for r in recorded
             if (r["variant"], r["setting"], r["fold"]) == ("immseg", "iterations 2", 1)}
    together = {(r["case"], r["structure"]): r["dice"] for r in recorded
                if (r["variant"], r["setting"], r["fold"]) == ("immseg+ens2", "iterations 4", 1)}
    assert len(records) == len(together) == len(alone)
    for record in records:
        key = record["case"], record["structure"]
        assert (record["member_dice"][0] is None and alone[key] is None) or record["member_dice"][0] == pytest.approx(
            alone[key]), "member 0 scored as run scored it alone"
        assert record["ensemble_dice"] == together[key]
        assert record["agreement"] is None or 0 <= record["agreement"] <= 1
    size = (out / agreement.AGREEMENT_RESULTS).stat().st_size
    assert benchmark.main(command + ["--variant", "immseg+ens2", "--setting", "iterations 4"]) == 0
    assert (out / agreement.AGREEMENT_RESULTS).stat().st_size == size and "is already in" in caplog.text
    assert "| immseg+ens2 | data | iterations 4 | 1 | 2 |" in (out / "agreement.md").read_text()

    scar = np.zeros((2, 4), dtype=np.uint8)
    first, second, empty = scar.copy(), scar.copy(), scar.copy()
    first[0, :] = 2
    second[0, :2], second[1, :2] = 2, 2
    assert agreement.pairwise_agreement([first, second], "scar") == pytest.approx(0.5)
    assert agreement.pairwise_agreement([first, second, first], "scar") == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert agreement.pairwise_agreement([empty, empty], "scar") is None
    assert agreement.pairwise_agreement([first, empty], "whole_myocardium") == pytest.approx(0.0)
    table = agreement.agreement_table([
        {"input": "x", "variant": "e", "setting": "time 1 min", "fold": 0, "members": ["a", "b"], "case": case,
         "structure": "scar", "member_dice": members, "ensemble_dice": ensemble, "agreement": agreed}
        for case, members, ensemble, agreed in (("c1", [0.4, 0.6], 0.6, 0.5), ("c2", [0.8, None], 0.9, None))])
    assert "| e | x | time 1 min | 0 | 2 | - | 65.00 / 75.00 (+10.00); 50.00 |" in table


def test_fit_table_pools_the_folds_and_refuses_a_case_scored_twice_on_one_fold():
    """Each case is a training case of every fold but its own: the table pools those scorings; two iterations-mode
    settings of one run name on one fold would score a case twice there and are refused."""
    def scored(fold, setting, cases, case, dice):
        return {"input": "in", "variant": "immseg+bf16", "setting": setting, "fold": fold, "iterations": 10 + fold,
                "cases": cases, "case": case, "structure": "scar", "dice": dice, "hd95": 1.0}

    folds = [["a"], ["b"], ["c"]]
    records = []
    for fold, test_cases in enumerate(folds):
        training = [case for other, cases in enumerate(folds) if other != fold for case in cases]
        records += [scored(fold, f"iterations {10 + fold}", "training", case, 0.9) for case in training]
        records += [scored(fold, f"iterations {10 + fold}", "test", case, 0.5 + 0.1 * fold) for case in test_cases]
    rows = [line for line in fit.fit_table(records).splitlines() if line.startswith("| immseg+bf16 |")]
    assert len(rows) == 1
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert cells[2:5] == ["iterations", "0,1,2", "10-12"]
    assert cells[5:] == ["-", "90.00 / 60.00 (30.00)", "-", "-", "-"], "training cases pooled over the folds"
    with pytest.raises(result_files.BenchmarkError, match="scores a case twice on one fold"):
        fit.fit_table(records + [scored(0, "iterations 99", "test", "a", 0.4)])


def hand_made(variant, fold, case, scar, edema):
    return [{"input": "in", "variant": variant, "setting": "time 42 min", "fold": fold, "case": case,
             "structure": structure, "dice": dice, "hd95": None if dice is None else 10 * (1 - dice),
             "iterations": 100 + fold, "seconds_per_step": 2.0, "train_seconds": 60.0 * (3 + fold), "date": "2026-11-29T00:00:00+00:00",
             "git_commit": "abc"} for structure, dice in (("scar", scar), ("edema", edema))]


def test_report_paired_differences_on_a_hand_made_results_file(tmp_path):
    rows = (hand_made("immseg", 0, "a", 0.60, 0.40) + hand_made("immseg", 0, "b", 0.50, None)
            + hand_made("immseg", 1, "c", 0.70, 0.30)
            + hand_made("no_cfm", 0, "a", 0.65, 0.30) + hand_made("no_cfm", 0, "b", 0.40, 0.20)
            + hand_made("no_cfm", 1, "c", 0.90, 0.30))
    result_files.append_results(tmp_path / "results.jsonl", rows[:6])
    result_files.append_results(tmp_path / "results.jsonl", rows[6:])
    assert len(result_files.read_results(tmp_path / "results.jsonl")) == len(rows)
    text = report.report(tmp_path)
    assert (tmp_path / "report.md").read_text() == text
    table = {(cells[0], cells[4]): cells for cells in
             ([c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| "))}
    scar = table[("no_cfm", "scar")]
    # per case: +0.05, -0.10, +0.20 -> mean +0.05 (5 points), better in 2 of 3; HD95 = 10 (1 - Dice)
    assert scar[6] == "65.00 ± 20.41" and scar[8] == "100-101" and scar[9] == "2.000" and scar[10] == "3.0-4.0"
    assert (scar[11], scar[13], float(scar[15])) == ("+5.00", "2/3", pytest.approx(-0.5))
    # 27 equally likely resamples of 3 cases: the lowest (-0.10) and highest (+0.20) mean each have 1/27 > 2.5%
    assert scar[12] == "-10.00 to +20.00"
    # signed ranks 1 (+), 2 (-), 3 (+): W- = 2, and 3 of the 8 sign patterns have W <= 2 -> two-sided p = 0.75
    assert scar[14] == "0.750"
    # edema: case b undefined for immseg -> pairs a (-0.10) and c (0.00); no case better
    edema = table[("no_cfm", "edema")]
    assert (edema[11], edema[13]) == ("-5.00", "0/2")
    immseg_edema = table[("immseg", "edema")]
    assert immseg_edema[5] == "3" and immseg_edema[6] == "35.00 ± 5.00" and immseg_edema[11:16] == [""] * 5
    assert table[("immseg", "normal myocardium")][6] == "n/a"
    assert table[("no_cfm", "normal myocardium")][11:16] == ["n/a", "n/a", "0/0", "n/a", "n/a"]
    assert np.allclose(statistics.paired_differences(rows[6:], rows[:6], "scar", "dice"), [0.05, -0.10, 0.20])
    assert statistics.bootstrap_interval([0.03] * 7) == pytest.approx((0.03, 0.03))
    assert statistics.signed_rank_p([0.0, 0.0]) == 1.0


def test_report_pairs_with_the_reference_at_another_budget(tmp_path):
    shorter = [{**row, "setting": "time 38 min"} for row in hand_made("immseg", 0, "a", 0.60, 0.40)]
    rows = shorter + hand_made("immseg", 0, "a", 0.10, 0.10) + hand_made("nnunet_own", 0, "a", 0.50, 0.45)
    result_files.append_results(tmp_path / "results.jsonl", rows)
    text = report.report(tmp_path, reference_setting="time 38 min")
    assert "against immseg on the same input at time 38 min" in text
    table = {(cells[0], cells[2], cells[4]): cells for cells in
             ([c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| "))}
    assert table[("nnunet_own", "time 42 min", "scar")][11] == "-10.00", "paired with I-MMSeg at 38, not at 42 min"
    assert table[("immseg", "time 42 min", "scar")][11] == "-50.00"
    assert table[("immseg", "time 38 min", "scar")][11] == "", "the reference itself has no difference"
    default = report.report_table(result_files.read_results(tmp_path / "results.jsonl"))
    assert "| nnunet_own | in | time 42 min | 0 | scar | 1 | 50.00 ± 0.00 |" in default and "+40.00" in default


def test_report_pools_a_variants_budgets_matched_fold_by_fold(tmp_path):
    reference = hand_made("immseg", 0, "a", 0.60, 0.40) + hand_made("immseg", 1, "c", 0.70, 0.30)
    matched = ([{**row, "setting": "iterations 100"} for row in hand_made("offline_priors", 0, "a", 0.70, 0.40)]
               + [{**row, "setting": "iterations 101"} for row in hand_made("offline_priors", 1, "c", 0.50, 0.30)])
    result_files.append_results(tmp_path / "results.jsonl", reference + matched)
    per_budget = report.report(tmp_path)
    assert "+10.00" not in per_budget, "without pooling each fold's row has no reference at its own budget"
    text = report.report(tmp_path, pool_budgets=True)
    assert "against immseg on the same input at its budget(s), pooled" in text
    table = {(cells[0], cells[4]): cells for cells in
             ([c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| "))}
    scar = table[("offline_priors", "scar")]
    assert (scar[2], scar[3], scar[5], scar[8]) == ("iterations 100 + iterations 101", "0,1", "2", "100-101")
    assert (scar[11], scar[13]) == ("-5.00", "1/2"), "per case +0.10 and -0.20"
    assert table[("immseg", "scar")][11] == ""
    named = {(cells[0], cells[4]): cells for cells in
             ([c.strip() for c in line.strip("|").split("|")] for line in report.report(
                 tmp_path, reference_setting="time 42 min", pool_budgets=True).splitlines() if line.startswith("| "))}
    assert named[("offline_priors", "scar")][11] == "-5.00", "pooled, paired with the reference's named budget"
    timed = hand_made("offline_priors", 0, "a", 0.20, 0.40)  # the same fold in the other mode: a row of its own
    result_files.append_results(tmp_path / "results.jsonl", timed)
    table = {(cells[0], cells[2], cells[4]): cells for cells in
             ([c.strip() for c in line.strip("|").split("|")] for line in report.report(
                 tmp_path, pool_budgets=True).splitlines() if line.startswith("| "))}
    assert table[("offline_priors", "time 42 min", "scar")][11] == "-40.00"
    assert table[("offline_priors", "iterations 100 + iterations 101", "scar")][11] == "-5.00"
    with pytest.raises(result_files.BenchmarkError, match="has rows at several budgets .* name one with --reference_"):
        report.report(tmp_path, reference="offline_priors", pool_budgets=True)
    against = {(cells[0], cells[2], cells[4]): cells for cells in
               ([c.strip() for c in line.strip("|").split("|")] for line in report.report(
                   tmp_path, reference="offline_priors", reference_setting="iterations 100 + iterations 101",
                   pool_budgets=True).splitlines() if line.startswith("| "))}
    assert against[("immseg", "time 42 min", "scar")][11] == "+5.00"
    twice = [{**row, "setting": "iterations 102"} for row in hand_made("offline_priors", 0, "a", 0.20, 0.40)]
    result_files.append_results(tmp_path / "results.jsonl", twice)
    rows = {(cells[0], cells[2]) for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in report.report(
                tmp_path, pool_budgets=True).splitlines() if line.startswith("| "))}
    assert {budget for variant, budget in rows if variant == "offline_priors"} == {
        "time 42 min", "iterations 100", "iterations 101", "iterations 102"}, "two budgets on fold 0: not pooled"


def test_cases_orders_the_paired_dice_by_the_structure_volume_in_the_labels(tmp_path, capsys):
    from datasets.phantom import write_phantom
    from datasets.layouts import load_case
    from datasets.vocabulary import LABEL_MAPS

    write_phantom(tmp_path / "raw", cases=4, seed=3)
    found = {case.case_id: case for case in dataset_writer.DATASETS["Phantom"][0](tmp_path / "raw")}
    scar_ml = {}
    for case_id, case in found.items():
        volumes = load_case(case, LABEL_MAPS["MyoPS380"])
        scar_ml[case_id] = (volumes.label == 2).sum() * np.prod(volumes.spacing) / 1000
    assert len(set(scar_ml.values())) == 4 and min(scar_ml.values()) > 0, "the phantom's scars must differ in size"
    ids = sorted(found)
    ours, theirs = [0.5, 0.6, 0.7, 0.8], [0.6, 0.5, 0.7, 0.6]
    rows = [row for case, a, b in zip(ids, ours, theirs)
            for row in hand_made("immseg", 0, case, a, 0.3) + hand_made("transunet_early", 0, case, b, 0.3)]
    result_files.append_results(tmp_path / "out" / "results.jsonl", rows)
    assert benchmark.main(["cases", "--out", str(tmp_path / "out"), "--variant", "immseg", "--reference",
                           "transunet_early", "--src", str(tmp_path / "raw"), "--dataset", "Phantom"]) == 0
    text = capsys.readouterr().out
    table = [cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
                                 if line.startswith("| ")) if cells[0] in ids]
    by_size = sorted(ids, key=scar_ml.get)
    assert by_size != ids, "ordered by size, not by name"
    assert [cells[0] for cells in table] == by_size
    difference = {case: 100 * (a - b) for case, a, b in zip(ids, ours, theirs)}
    for cells in table:
        assert float(cells[2]) == pytest.approx(scar_ml[cells[0]], abs=0.005)
        assert float(cells[5]) == pytest.approx(difference[cells[0]], abs=0.005)
    smaller = np.mean([difference[c] for c in by_size[:2]])
    assert f"- smaller 2 ({scar_ml[by_size[0]]:.2f}-{scar_ml[by_size[1]]:.2f} ml): Δ {smaller:+.2f}" in text
    rho = scipy.stats.spearmanr([scar_ml[c] for c in by_size], [difference[c] for c in by_size])[0]
    assert f"Spearman correlation of Δ with the volume: {rho:+.2f}" in text
    assert benchmark.main(["cases", "--out", str(tmp_path / "out"), "--variant", "immseg", "--reference",
                           "no_cfm", "--src", str(tmp_path / "raw"), "--dataset", "Phantom"]) == 1, "no records of it"


def test_a_results_file_kept_compressed_is_read_and_appended_as_the_plain_one(tmp_path):
    records = [{"input": "x", "variant": "v", "setting": "iterations 3", "fold": f, "case": "a"} for f in range(3)]
    plain, kept = tmp_path / "plain" / "results.jsonl", tmp_path / "kept" / "results.jsonl"
    result_files.append_results(plain, records[:2])
    kept.parent.mkdir()
    (kept.parent / "results.jsonl.gz").write_bytes(gzip.compress(plain.read_bytes()))
    assert result_files.stored_results(kept) == kept.parent / "results.jsonl.gz"
    assert result_files.read_results(kept) == result_files.read_results(plain) == records[:2]
    result_files.append_results(kept, records[2:])
    result_files.append_results(plain, records[2:])
    assert not kept.exists(), "appended to the compressed file, not beside it"
    assert gzip.decompress((kept.parent / "results.jsonl.gz").read_bytes()) == plain.read_bytes()
    kept.write_text("")
    with pytest.raises(result_files.BenchmarkError, match="both exist"):
        result_files.read_results(kept)


def test_committed_results_hold_whole_folds_of_the_committed_split_and_make_the_report():
    """README's benchmark tables are regenerated from benchmarks/results: every recorded run must score each test case
    of its fold, and only those, in every structure, and the report must pair the rows it compares."""
    folder = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    folds = split.read_split(folder / "split.json")["folds"]
    records = result_files.read_results(folder / "results.jsonl")
    assert records, "benchmarks/results/results.jsonl holds no records"
    runs = {}
    for record in records:
        runs.setdefault(result_files.run_key(record), []).append((record["case"], record["structure"]))
    for (input_name, variant, setting, fold), scored in runs.items():
        expected = sorted((case, structure) for case in folds[fold] for structure in result_files.STRUCTURE_NAMES)
        assert sorted(scored) == expected, f"{variant} ({input_name}, {setting}) fold {fold}: not its fold's cases"
    ours, early = ([r for r in records if r["variant"] == f"{pipeline}+ens6_strong4_nnunet2+bf16"]
                   for pipeline in ("immseg", "transunet_early"))
    both = {r["fold"] for r in ours} & {r["fold"] for r in early}
    assert both, "README's six-member comparison is not in the records"
    ours = [r for r in ours if r["fold"] in both]
    for structure in result_files.STRUCTURE_NAMES:
        defined = [r for r in ours if r["structure"] == structure and r["dice"] is not None]
        assert len(statistics.paired_differences(ours, early, structure, "dice")) == len(defined), "a case unpaired"
    fits = result_files.read_results(folder / "fit.jsonl")
    assert fits, "README's training-against-test table is not in the records"
    fitted = {}
    for record in fits:
        fitted.setdefault(result_files.run_key(record), []).append((record["cases"], record["case"], record["structure"]))
    for (input_name, variant, setting, fold), scored in fitted.items():
        case_sets = {"training": [case for other, cases in enumerate(folds) if other != fold for case in cases],
                     "test": folds[fold]}
        expected = sorted((name, case, structure) for name, cases in case_sets.items() for case in cases
                          for structure in result_files.STRUCTURE_NAMES)
        assert sorted(scored) == expected, f"fit of {variant} ({input_name}, {setting}) fold {fold}: not its cases"
    assert fit.fit_table(fits).count("| immseg+bf16 |") == 2
    agreements = result_files.read_results(folder / agreement.AGREEMENT_RESULTS)
    assert agreements, "README's agreement table is not in the records"
    ensemble_dice = {result_files.run_key(r) + (r["case"], r["structure"]): r["dice"] for r in records}
    agreed = {}
    for record in agreements:
        key = result_files.run_key(record)
        agreed.setdefault(key, []).append((record["case"], record["structure"]))
        assert record["ensemble_dice"] == ensemble_dice[key + (record["case"], record["structure"])], (
            f"agreement of {key}: the ensemble's Dice is not its record's")
        assert len(record["member_dice"]) == len(record["members"]) >= 2
    for (input_name, variant, setting, fold), scored in agreed.items():
        expected = sorted((case, structure) for case in folds[fold] for structure in result_files.STRUCTURE_NAMES)
        assert sorted(scored) == expected, f"agreement of {variant} ({input_name}, {setting}) fold {fold}: not its cases"
    table = report.report_table(records, reference="transunet_early+ens6_strong4_nnunet2+bf16")
    assert sum(line.startswith("| immseg+ens6_strong4_nnunet2+bf16 |") for line in table.splitlines()) == len(
        result_files.STRUCTURE_NAMES)


def test_the_committed_records_still_report_the_committed_tables(tmp_path):
    """benchmarks/results/{report,fit,agreement}.md were written from the records beside them before the benchmark
    became a package (commit 68cf5d8): the records must still give the same tables, to the byte."""
    committed = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    out = tmp_path / "results"
    out.mkdir()
    for name in ("results.jsonl", "fit.jsonl", "agreement.jsonl"):
        (out / name).symlink_to(committed / name)
    report.report(out)
    fit.fit_report(out)
    agreement.agreement_report(out)
    for table in ("report.md", "fit.md", "agreement.md"):
        made = (out / table).read_text().replace(str(out), "benchmarks/results")
        assert made == (committed / table).read_text(), f"{table} differs from the committed one"


def test_a_subset_is_scored_from_one_training_and_recorded_by_its_sequences(prepared, caplog):
    out, results = prepared / "out", prepared / "out" / "results.jsonl"
    budget = ("--mode", "iterations", "--iterations", "2")
    assert benchmark.main(run_args(prepared, "immseg", 2, *budget, "--sequences", "bSSFP,LGE")) == 1
    assert "immseg was not trained to leave a sequence out (only the subset stages are: immseg_subsets)" in caplog.text
    assert benchmark.main(run_args(prepared, "immseg", 2, *budget)) == 0
    for sequences, name in (("bSSFP,LGE", "immseg+seq_bSSFP_LGE_zerofill"), ("T2w", "immseg+seq_T2w_zerofill")):
        assert benchmark.main(run_args(prepared, "immseg", 2, *budget, "--sequences", sequences,
                                       "--missing", "zero_fill")) == 0
        records = [r for r in result_files.read_results(results) if r["variant"] == name]
        assert records and {tuple(r["inference"]) for r in records} == {(name.split("+", 1)[1],)}
    run_dir = out / "runs" / "data" / "immseg" / "iterations_2" / "fold2"
    assert json.loads((run_dir / "test_last_seq_T2w_zerofill" / "test_info.json").read_text())["missing"] == \
        "zero_fill"
    assert caplog.text.count("is trained (") >= 2, "the subsets reuse the one training"


def test_the_subset_table_pairs_each_subset_s_three_models_per_case(tmp_path):
    from benchmarks.harness import subsets

    def rows(variant, fold, case, scar):
        return [{**row, "setting": "iterations 300", "variant": variant} for row in hand_made(variant, fold, case,
                                                                                               scar, 0.5)]

    records = []
    for case, fold, (a, b, c) in (("a", 0, (0.6, 0.4, 0.5)), ("b", 1, (0.7, 0.5, 0.6))):
        for name, scar in zip(subsets.subset_variants(("bSSFP", "LGE"), "bf16"), (a, b, c)):
            records += rows(name, fold, case, scar)
    assert subsets.subset_variants(("LGE",)) == ("immseg_seqdrop+seq_LGE", "immseg+seq_LGE_zerofill",
                                                 "transunet_single_lge")
    assert subsets.subset_variants(subsets.MODALITIES, "bf16")[2] == "transunet_early+bf16"
    table = subsets.subset_table(records, "iterations 300", "bf16")
    scar, = [line for line in table.splitlines() if line.startswith("| bSSFP,LGE | scar |")]
    cells = [cell.strip() for cell in scar.strip("|").split("|")]
    assert cells[2:7] == ["0,1", "2", "65.00", "45.00", "55.00"]
    assert cells[7].startswith("+20.00") and cells[8].startswith("+10.00")
    assert "| LGE |" not in table, "a subset without records is left out"
    with pytest.raises(result_files.BenchmarkError, match="no records at the budget"):
        subsets.subset_table(records, "iterations 5")
    result_files.append_results(tmp_path / "results.jsonl", records)
    assert benchmark.main(["subsets", "--out", str(tmp_path), "--setting", "iterations 300", "--amp", "bf16"]) == 0
    assert "| bSSFP,LGE | scar |" in (tmp_path / "subsets.md").read_text()
    # another dropout model as (a), named by its description; one without records refused
    other = [{**row, "variant": row["variant"].replace("immseg_seqdrop", "immseg_seqdrop25"),
              "dice": 0.1 if row["dice"] is not None else None}
             for row in records if row["variant"].startswith("immseg_seqdrop")]
    result_files.append_results(tmp_path / "results.jsonl", other)
    assert benchmark.main(["subsets", "--out", str(tmp_path), "--setting", "iterations 300", "--amp", "bf16",
                           "--dropout_variant", "immseg_seqdrop25", "--table_file", str(tmp_path / "p25.md")]) == 0
    text = (tmp_path / "p25.md").read_text()
    assert "sequence dropout 0.25 (immseg_seqdrop25)" in text
    assert "| bSSFP,LGE | scar | 0,1 | 2 | 10.00 | 45.00 | 55.00 |" in text
    assert benchmark.main(["subsets", "--out", str(tmp_path), "--setting", "iterations 300", "--amp", "bf16",
                           "--dropout_variant", "immseg_seqdrop_gone"]) == 1


def test_a_subset_stage_trains_on_the_recipes_run_of_its_fold_and_budget(prepared, caplog):
    out, results = prepared / "out", prepared / "out" / "results.jsonl"
    budget = ("--mode", "iterations", "--iterations", "2")
    assert benchmark.main(run_args(prepared, "immseg_subsets", 1, *budget, "--members", "2")) == 1
    assert "is a subset stage on one run" in caplog.text
    assert benchmark.main(run_args(prepared, "immseg_subsets", 1, *budget, "--sequences", "bSSFP,LGE")) == 0
    records = result_files.read_results(results)
    complete = [r for r in records if (r["variant"], r["setting"], r["fold"]) == ("immseg", "iterations 2", 1)]
    stage = [r for r in records if r["variant"] == "immseg_subsets+seq_bSSFP_LGE"]
    assert complete and len(stage) == len(complete), "the complete run trained, scored and recorded first"
    assert {(r["stage_iterations"], r["complete_variant"], r["inference"][0]) for r in stage} == {
        (2, "immseg", "seq_bSSFP_LGE")}
    assert {r["train_seconds"] for r in stage} == {round(complete[0]["train_seconds"] + stage[0]["stage_train_seconds"],
                                                         1)}
    complete_dir = out / "runs" / "data" / "immseg" / "iterations_2" / "fold1"
    stage_dir = out / "runs" / "data" / "immseg_subsets" / "iterations_2" / "fold1"
    checkpoint = load_checkpoint(stage_dir / "last.pth")
    assert checkpoint["complete_run"]["checkpoint"] == str(complete_dir / "last.pth")
    assert checkpoint["train_state"]["iteration"] == 2
    info = json.loads((stage_dir / "test_last_seq_bSSFP_LGE" / "test_info.json").read_text())
    assert info["sequences"] == ["bSSFP", "LGE"] and list(info["not_measurable"]) == ["edema"]

    caplog.clear()
    assert benchmark.main(run_args(prepared, "immseg_subsets", 1, *budget)) == 0
    assert f"{stage_dir} is trained" in caplog.text and "already in" in caplog.text, "both runs reused"
    plain = [r for r in result_files.read_results(results) if r["variant"] == "immseg_subsets" and r["fold"] == 1]
    assert [(r["case"], r["structure"], r["dice"], r["hd95"]) for r in plain] == [
        (r["case"], r["structure"], r["dice"], r["hd95"]) for r in complete], "complete cases: the complete run's"
    assert {r["stage_train_seconds"] for r in plain} == {stage[0]["stage_train_seconds"]}


def test_the_stage_table_compares_each_model_at_its_own_budget_across_results_files(tmp_path):
    from benchmarks.harness import subsets

    def rows(variant, setting, fold, case, scar, **extra):
        return [{**row, "setting": setting, "variant": variant, **extra} for row in hand_made(variant, fold, case,
                                                                                               scar, 0.5)]

    stage_fields = {"stage_iterations": 300, "stage_train_seconds": 90.0, "complete_train_seconds": 180.0,
                    "complete_variant": "immseg+bf16"}
    ours, committed = [], []
    for case, fold, (a, b, c) in (("a", 0, (0.6, 0.4, 0.5)), ("b", 1, (0.7, 0.5, 0.6))):
        for subset in (subsets.MODALITIES, ("bSSFP", "LGE")):
            stage, paired, alone = subsets.stage_variants(subset, "bf16")
            ours += rows(stage, "iterations 300", fold, case, a, **stage_fields)
            committed += rows(paired, "iterations 900", fold, case, b) + rows(alone, "iterations 300", fold, case, c)
    assert subsets.stage_variants(("LGE",), "bf16") == ("immseg_subsets+bf16+seq_LGE", "immseg_seqpair+bf16+seq_LGE",
                                                        "transunet_single_lge+bf16")
    result_files.append_results(tmp_path / "results.jsonl", ours)
    result_files.append_results(tmp_path / "committed.jsonl", committed)
    flags = ["subsets", "--out", str(tmp_path), "--setting", "iterations 300", "--amp", "bf16", "--stage_variant",
             "immseg_subsets", "--paired_setting", "iterations 900",
             "--compare_results", str(tmp_path / "committed.jsonl")]
    assert benchmark.main(flags) == 0
    text = (tmp_path / "subsets.md").read_text()
    assert "| bSSFP,LGE | scar | 0,1 | 2 | 65.00 | 45.00 | 55.00 | +20.00" in text
    assert "| bSSFP,LGE,T2w | scar | 0,1 | 2 | 65.00 | 45.00 | 55.00 |" in text
    assert "fold 0 300 iterations in 90 s" in text and "adds 0.50 times the complete run's training time" in text
    assert benchmark.main(flags[:-2]) == 0, "without the other file (b) and (c) are missing"
    assert "| bSSFP,LGE | scar | 0,1 | 2 | 65.00 | n/a | n/a | n/a | n/a |" in (tmp_path / "subsets.md").read_text()
    assert benchmark.main(flags + [str(tmp_path / "results.jsonl")]) == 1, "a run read twice is refused"
