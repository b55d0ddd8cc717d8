"""Run folders: which checkpoints a folder holds and whether a run may write there, the one file lock (a run
folder's, a results file's),
clearing a folder, config.json, the git commit, logging and TensorBoard."""
import contextlib
import datetime
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from utils import atomic_path, process_alive

logger = logging.getLogger("trainer")

ROOT = Path(__file__).resolve().parent.parent


class RunFolderError(ValueError):
    """A run folder holds an earlier run's checkpoints that this run would mix with its own."""


def run_checkpoints(run_dir):
    """The checkpoints train.py writes in a run folder: last.pth, best.pth, epoch_N.pth."""
    return sorted(path for pattern in ("last.pth", "best.pth", "epoch_*.pth") for path in Path(run_dir).glob(pattern))


def check_run_folder(run_dir, resume, overwrite=False):
    """Refuse a run folder holding checkpoints unless this run continues them (--resume) or clears them first."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"run folder {run_dir} is a file; choose another --output_dir")
    existing = run_checkpoints(run_dir)
    continues = (resume == "auto" and (run_dir / "last.pth").is_file()) or (
        resume not in (None, "auto") and resumes_from_folder(resume, run_dir))
    if not existing or continues or overwrite:
        return
    names = ", ".join(path.name for path in existing)
    if resume not in (None, "auto"):
        raise RunFolderError(f"--resume {resume} continues another run's checkpoint in run folder {run_dir}, which "
                             f"holds checkpoints of an earlier run ({names}): the two runs' files would mix. Choose "
                             "another --output_dir, or pass --overwrite to delete the earlier run's files first")
    if resume == "auto":
        raise RunFolderError(f"run folder {run_dir} holds checkpoints ({names}) but no last.pth for --resume auto: "
                             "continue from one of them with --resume PATH, or start afresh with --overwrite "
                             "(deletes the earlier run's files first)")
    raise RunFolderError(f"run folder {run_dir} already holds checkpoints of an earlier run ({names}): continue it "
                         "with --resume auto, or start afresh with --overwrite (deletes the earlier run's files "
                         "first), or choose another --output_dir")


def resumes_from_folder(resume, run_dir):
    """Whether the checkpoint ``resume`` lies in ``run_dir`` (the run continues itself)."""
    return Path(resume).resolve().parent == Path(run_dir).resolve()


LOCK_NAME = "train.lock"


class LockHeldError(RunFolderError):
    """Another live process holds a lock this process needs."""


def _take_lock(lock, owner, in_use):
    """Create ``lock`` holding ``owner``, or take over one left by a dead process of this machine; a lock another
    live process holds raises LockHeldError(in_use(holder))."""
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, ValueError):
                holder = {}
            if holder.get("host") == owner["host"] and isinstance(holder.get("pid"), int) and not process_alive(
                    holder["pid"]):
                logger.warning("%s was left by process %d, which no longer runs: taking it over", lock, holder["pid"])
                lock.unlink(missing_ok=True)
                continue
            raise LockHeldError(in_use(holder)) from None
        with os.fdopen(descriptor, "w") as handle:
            json.dump(owner, handle)
        return
    raise LockHeldError(f"{lock}: another process took the lock at the same time; try again")


@contextlib.contextmanager
def file_lock(lock, in_use, wait_s=0.0):
    """Hold the lock file ``lock`` (created exclusively, naming this process's pid, host and start) for the block.

    A lock left by a process of this machine that no longer runs (killed) is taken over; one that a live process
    holds is waited for up to ``wait_s`` seconds, then refused with LockHeldError(in_use(holder)), where ``holder``
    is what the lock names. One from another machine must be deleted by hand.
    """
    owner = {"pid": os.getpid(), "host": socket.gethostname(),
             "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    deadline = time.monotonic() + wait_s
    while True:
        try:
            _take_lock(lock, owner, in_use)
            break
        except LockHeldError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)
    try:
        yield
    finally:
        try:
            if json.loads(lock.read_text()) == owner:
                lock.unlink()
        except (OSError, ValueError):
            pass


@contextlib.contextmanager
def run_folder_lock(run_dir, active=True):
    """Hold ``<run_dir>/train.lock`` while this process trains (or times its step) in the folder.

    A second process that would write the same checkpoints is refused with the first's pid, host and start (see
    :func:`file_lock`). A folder this call created is removed again if it is still empty at the end.
    ``active=False`` (the other processes of a distributed run) does nothing.
    """
    if not active:
        yield
        return
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_NAME

    def in_use(holder):
        return (f"run folder {run_dir} is in use: {lock} names process {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}, started {holder.get('started', '?')}. Two runs in one folder would "
                f"overwrite each other's checkpoints: wait for that run to end, choose another --output_dir, or "
                f"delete {lock} if no process uses the folder any more")

    try:
        with file_lock(lock, in_use):
            yield
    finally:
        if created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()


def clear_run_folder(run_dir):
    """Delete what train.py and test.py wrote in a run folder; anything else stays. Returns the deleted paths."""
    run_dir = Path(run_dir)
    files = run_checkpoints(run_dir) + [run_dir / name for name in ("config.json", "log.txt")
                                        if (run_dir / name).is_file()]
    folders = [run_dir / "log"] if (run_dir / "log").is_dir() else []
    folders += [folder for folder in sorted(run_dir.glob("test_*"))
                if (folder / "test_info.json").is_file() or (folder / "summary.json").is_file()]
    for path in files:
        path.unlink()
    for folder in folders:
        shutil.rmtree(folder)
    return files + folders


def git_commit():
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def tensorboard_writer(folder):
    """A TensorBoard writer, or None (with a warning) where tensorboardX is not installed."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        logger.warning("tensorboardX is not installed: no TensorBoard events are written (pip install tensorboardX)")
        return None
    return SummaryWriter(str(folder))


def plain_values(mapping):
    return {k: str(v) if isinstance(v, Path) else v for k, v in mapping.items()}


def write_run_config(run_dir, args, spec, priors_provenance, preprocessing, record=None):
    """config.json beside the checkpoints: the model specification, the arguments, the priors and the
    training data's preprocessing record (read_preprocessing), and the entries of ``record`` (a subset stage's
    complete run)."""
    with atomic_path(run_dir / "config.json") as temporary:
        temporary.write_text(json.dumps({"spec": spec, "args": plain_values(vars(args)), "priors": priors_provenance,
                                         "preprocessing": preprocessing, "git_commit": git_commit(), **(record or {})},
                                        indent=2, default=str) + "\n")


def configure_logging(run_dir=None, is_main=True):
    """Console (and, on rank 0, run-folder) logging; replaces only the handlers it added before."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "immseg_handler", False)]:
        root.removeHandler(handler)
        handler.close()
    handlers = [logging.StreamHandler(sys.stderr)]
    if run_dir is not None and is_main:
        handlers.append(logging.FileHandler(run_dir / "log.txt"))
    formatter = logging.Formatter("[%(asctime)s] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for handler in handlers:
        handler.immseg_handler = True
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(logging.INFO if is_main else logging.WARNING)
