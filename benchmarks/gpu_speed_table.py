"""The table of benchmarks/gpu_speed.sh: reads its output folder, prints Markdown.

    python benchmarks/gpu_speed_table.py OUTPUT_DIR
"""
import json
import math
import sys
from pathlib import Path

PAPER_SLICES, PAPER_EPOCHS, PAPER_BATCH = 1970, 300, 24  # MyoPS380's training slices, the paper's schedule


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_records(out):
    records = {}
    path = Path(out) / "results.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        record = json.loads(line)
        records.setdefault(record["step"], record)
        if record.get("status") == "ok":
            records[record["step"]] = record
    return records


def seconds(value):
    return f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "not measured"


def ratio(baseline, value):
    if not all(isinstance(v, (int, float)) and v > 0 for v in (baseline, value)):
        return ""
    return f"{baseline / value:.1f}x"


def bench_rows(records):
    rows = []
    baseline = {"immseg": records.get("baseline_immseg", {}).get("s_per_iteration"),
                "early": records.get("baseline_early", {}).get("s_per_iteration")}
    labels = [("baseline_immseg", "I-MMSeg, baseline checkout (its defaults: deterministic, eager)", "immseg"),
              ("immseg_eager", "I-MMSeg, this checkout's GPU defaults, --compile off", "immseg"),
              ("immseg", "I-MMSeg, this checkout's GPU defaults, --compile on", "immseg"),
              ("immseg_deterministic", "I-MMSeg, --compile on --deterministic 1", "immseg"),
              ("baseline_early", "TransUNet early fusion, baseline checkout", "early"),
              ("early", "TransUNet early fusion, this checkout's GPU defaults, --compile on", "early")]
    for step, label, model in labels:
        record = records.get(step)
        if record is None:
            continue
        value = record.get("s_per_iteration")
        stages = "; ".join(f"{name}: {s:.4f}" for name, s in (record.get("per_stage") or {}).items())
        rows.append(f"| {label} | {seconds(value) if record.get('status') == 'ok' else record['status']} | "
                    f"{ratio(baseline[model], value) if not step.startswith('baseline') else ''} | {stages} |")
    return rows


def speed_rows(speed, label):
    if speed is None:
        return [f"| {label} | not measured | | |"]
    rows = []
    mfu = f"{speed['mfu']:.1%} of {speed['peak_tflops']} TFLOP/s ({speed['peak_source']})" if speed.get("mfu") else ""
    if speed.get("mfu_measured_peak"):
        mfu += f"; {speed['mfu_measured_peak']:.1%} of a measured {speed['measured_peak_tflops']:.0f} TFLOP/s"
    rows.append(f"| {label}: bare step | {seconds(speed.get('train_step_s'))} | | "
                f"{speed.get('train_step_tflop', float('nan')):.3f} TFLOP per step; utilisation {mfu}; warm-up "
                f"(compilation) {speed.get('warmup_s', float('nan')):.0f} s; peak {speed.get('peak_cuda_mb', 0):.0f} "
                f"MiB |")
    if "loop_s" in speed:
        stages = "; ".join(f"{name}: {stage['s_per_iteration']:.4f} (warm-up {stage['warmup_s']:.0f} s)"
                           for name, stage in speed["loop_stages"].items())
        loop_mfu = speed["train_step_tflop"] * 1e12 / speed["loop_s"] / (speed["peak_tflops"] * 1e12) \
            if speed.get("peak_tflops") else None
        rows.append(f"| {label}: training loop (stages weighted as in the paper) | {seconds(speed['loop_s'])} | | "
                    f"{stages}; utilisation {f'{loop_mfu:.1%}' if loop_mfu else 'n/a'}; "
                    f"{speed['loop_iterations_per_epoch']} iterations per epoch; settings {speed['loop_settings']}; "
                    f"a background write took {speed.get('last_write_s') or float('nan'):.1f} s |")
    if speed.get("profile"):
        profile = speed["profile"]
        share = profile.get("device_busy_share")
        rows.append(f"| {label}: profile of {profile['steps']} loop steps | {profile['wall_s'] / profile['steps']:.4f}"
                    f" | | device busy {f'{share:.0%}' if share else 'n/a'} of the time; "
                    f"{profile['kernels_launched'] / profile['steps']:.0f} kernels per step |")
    return rows


def paper_rows(paper):
    if paper is None or "loop_s" not in paper:
        return ["| paper's setting: not measured | | | |"]
    iterations = PAPER_EPOCHS * math.ceil(PAPER_SLICES / PAPER_BATCH)
    hours = paper["loop_s"] * iterations / 3600
    mfu = paper["train_step_tflop"] * 1e12 / paper["loop_s"] / (paper["peak_tflops"] * 1e12) \
        if paper.get("peak_tflops") else None
    return [f"| paper's setting (batch 24, 128 px): training loop | {seconds(paper['loop_s'])} | | "
            f"{iterations} iterations (300 epochs of {PAPER_SLICES} slices) -> {hours * 60:.0f} minutes; utilisation "
            f"{f'{mfu:.1%}' if mfu else 'n/a'}; {paper['train_step_tflop']:.3f} TFLOP per step; bare step "
            f"{paper['train_step_s']:.4f} s |"]


def loader_rows(records, speed_224):
    loader = records.get("loader_224")
    if loader is None or loader.get("status") != "ok":
        return ["| 224 px, batch 24: data loading not measured | | | |"]
    step = speed_224.get("train_step_s") if speed_224 else None
    return [f"| 224 px, batch 24: data per batch ({loader['workers']} workers) against the step | "
            f"{seconds(loader['s_per_batch'])} | | bare step {seconds(step)} s: the loader "
            f"{'keeps up' if step and loader['s_per_batch'] < step else 'is slower than the step' if step else '?'} |"]


def trace_rows(out):
    eager, compiled = (read_json(Path(out) / f"trace_{mode}.json") for mode in ("off", "on"))
    if not eager or not compiled:
        return ["| losses of the first 200 steps, eager vs compiled: not measured | | | |"]
    pairs = list(zip(eager["losses"], compiled["losses"]))
    largest = max(abs(a - b) for a, b in pairs)
    relative = max(abs(a - b) / max(abs(a), 1e-12) for a, b in pairs)
    tail = min(20, len(pairs))
    mean_eager = sum(a for a, _ in pairs[-tail:]) / tail
    mean_compiled = sum(b for _, b in pairs[-tail:]) / tail
    return [f"| losses of the first {len(pairs)} steps, --compile off vs on (deterministic, same seed) | | | "
            f"largest difference {largest:.4f} ({relative:.2%} of the loss); mean of the last {tail} steps "
            f"{mean_eager:.4f} eager, {mean_compiled:.4f} compiled |"]


def main(out):
    records = read_records(out)
    rows = ["| measurement | s / iteration | speed-up | notes |", "|---|---|---|---|"]
    rows += bench_rows(records)
    rows += speed_rows(read_json(Path(out) / "speed_immseg.json"), "I-MMSeg b8 176 px")
    rows += paper_rows(read_json(Path(out) / "speed_paper.json"))
    rows += loader_rows(records, read_json(Path(out) / "speed_224.json"))
    rows += trace_rows(out)
    failed = [f"- {name}: {record['status']}" for name, record in records.items() if record.get("status") != "ok"]
    text = "\n".join(rows + ([""] + failed if failed else [])) + "\n"
    print(text)
    return text


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpu_speed_output")
