"""The benchmark's files: its error, JSON read and written atomically under a lock, the results files (one
JSON record per line, plain or gzip-compressed), the machine each record was made on, and the tables published."""
import gzip
import json
import logging
import math
import os
import platform
import sys
from pathlib import Path

import torch

from engine.runs import file_lock
from networks.inference import cpu_features
from utils import atomic_path

logger = logging.getLogger("benchmark")


class BenchmarkError(ValueError):
    """Bad benchmark input or state; the message names the file and what was expected."""

STRUCTURE_NAMES = {"myocardium": "normal myocardium", "scar": "scar", "edema": "edema",
                   "scar_edema": "scar+edema", "whole_myocardium": "whole myocardium"}


def read_json(path, what):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise BenchmarkError(f"{what} {path} is not readable JSON: {error}") from None


def write_json(path, content):
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(content, indent=2) + "\n")


def locked(path, timeout_s=120):
    """Exclusive access to ``path`` among invocations: the lock file .<name>.lock beside it (engine.runs.file_lock),
    waited for up to ``timeout_s``."""
    lock = Path(path).with_name(f".{Path(path).name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)

    def in_use(holder):
        return (f"{lock} has been held for {timeout_s} s by process {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}: another invocation is writing {path} (remove {lock} if no process "
                "writes it any more)")

    return file_lock(lock, in_use, wait_s=timeout_s)


def cpu_model():
    """The processor's model name (Linux: /proc/cpuinfo), else what the platform module reports."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_description(device):
    """What a wall-clock budget's iterations depend on besides the code, kept with every record: the same budget
    buys a different number of iterations on another machine."""
    description = {"cpu": cpu_model(), **cpu_features(), "cpu_count": os.cpu_count(),
                   "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    if device in ("auto", "cuda") and torch.cuda.is_available():
        description["gpu"] = torch.cuda.get_device_name(0)
    return description


def stored_results(path):
    """Where the results file ``path`` is kept: ``path`` itself, or ``path`` + ``.gz`` where only that exists (a
    results file the repository keeps compressed); both at once is an error, since neither says which is current."""
    path = Path(path)
    compressed = path.with_name(path.name + ".gz")
    if not compressed.is_file():
        return path
    if path.is_file():
        raise BenchmarkError(f"{path} and {compressed} both exist: keep one of them (gunzip the second, or merge)")
    return compressed


def _results_text(stored):
    if not stored.is_file():
        return ""
    return gzip.decompress(stored.read_bytes()).decode() if stored.suffix == ".gz" else stored.read_text()


def read_results(path):
    """All records of a results file (JSON lines, or their .gz, see stored_results); absent file: none."""
    stored = stored_results(path)
    records = []
    for number, line in enumerate(_results_text(stored).splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise BenchmarkError(f"{stored}, line {number}: not a JSON record ({error})") from None
    return records


def run_key(record):
    return record["input"], record["variant"], record["setting"], record["fold"]


def append_results(path, records):
    """Add records to the results file (compressed again where it is kept compressed); the file is replaced
    atomically, under a lock."""
    path = Path(path)
    with locked(path):
        stored = stored_results(path)
        existing = _results_text(stored)
        if existing and not existing.endswith("\n"):
            existing += "\n"
        text = existing + "".join(json.dumps(record, allow_nan=False) + "\n" for record in records)
        with atomic_path(stored) as temporary:
            if stored.suffix == ".gz":
                temporary.write_bytes(gzip.compress(text.encode(), mtime=0))
            else:
                temporary.write_text(text)


def records_or_refuse(results, command):
    """The records of a results file, refused when there are none yet."""
    records = read_results(results)
    if not records:
        raise BenchmarkError(f"{results} holds no records yet: run {command} first")
    return records


def publish(text, path):
    """A Markdown table: written atomically to ``path`` and to stdout."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)
    sys.stdout.write(text)
    logger.info("table written to %s", path)


def defined(value):
    return None if math.isnan(value) else value


def span(values, fmt):
    low, high = min(values), max(values)
    return fmt.format(low) if low == high else f"{fmt.format(low)}-{fmt.format(high)}"


def table_row(variant, input_name, budget, group, counts, cells):
    """A Markdown row of a per-variant table: its variant, input and budget, the folds of its records, the span of
    ``counts`` (iterations, members) and its structure cells."""
    folds = ",".join(str(f) for f in sorted({r["fold"] for r in group}))
    return "| " + " | ".join([variant, input_name, budget, folds, span(counts, "{:d}"), *cells]) + " |"


def publish_report(out, results_name, command, title, explanation, table, table_name):
    """The table of <out>/<results_name> (``table`` of its records) under its title and explanation, published to
    <out>/<table_name>; refused while the results file holds no records (made by ``command``)."""
    results = Path(out) / results_name
    records = records_or_refuse(results, command)
    publish("\n".join([f"# {title} ({results})", "", explanation, "", table(records), ""]), Path(out) / table_name)
    return 0
