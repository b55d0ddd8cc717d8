"""What a researcher looks at: the overlay PNGs, index.html of test.py and predict.py, and the run's progress.png
(a tiny run on the phantom), and a headless Chromium rendering the pages."""
import base64
import csv
import fcntl
import json
import math
import os
import select
import shutil
import subprocess
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest

import predict
import test as test_script
from conftest import preprocess_phantom, train_tiny_run, write_test_priors
from engine.checkpoints import load_checkpoint
from engine.overlays import CLASS_STYLES, overlay_figure
from engine.progress import ProgressWriter, progress_figure, stage_changes
from engine.report_page import pathology_dice, write_test_page

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A run trained for an epoch of one step (validated), resumed for a second; test.py and predict.py (one
    case without its T2w, which fails) with --save_png on its cases."""
    root = tmp_path_factory.mktemp("results")
    preprocess_phantom(root, 6, 3, "--test_every", "3", "--val_fraction", "0.25")
    train_list = root / "data" / "train.txt"
    train_list.write_text("".join(train_list.read_text().splitlines(keepends=True)[:2]))  # one step of 2
    priors = write_test_priors(root)
    run = root / "run"
    assert train_tiny_run(root / "data", priors, run, "--max_epochs", "1", "--batch_size", "2") == 0
    first = {"history": load_checkpoint(run / "last.pth")["train_state"]["history"],
             "progress": (run / "progress.png").read_bytes()}
    assert train_tiny_run(root / "data", priors, run, "--max_epochs", "2", "--batch_size", "2", "--resume", "auto") == 0
    assert test_script.main(["--output_dir", str(run), "--test_save_dir", str(root / "evaluation"),
                             "--save_png"]) == 0
    unlabelled = root / "unlabelled" / "Raw_data"
    cases = sorted(path.name for path in (root / "raw" / "Raw_data" / "LGE").iterdir())[:2]
    for sequence in ("bSSFP", "LGE", "T2w"):
        (unlabelled / sequence).mkdir(parents=True)
        for name in cases[: 1 if sequence == "T2w" else 2]:
            shutil.copy(root / "raw" / "Raw_data" / sequence / name, unlabelled / sequence)
    assert predict.main(["--input_dir", str(unlabelled.parent), "--output_dir", str(root / "predicted"), "--run",
                         str(run), "--device", "cpu", "--save_png"]) == 1  # the case without T2w fails
    return root, first


class PageParser(HTMLParser):
    """The links, image sources and table rows (cell texts) of a page."""

    def __init__(self):
        super().__init__()
        self.links, self.images, self.rows, self.tags = [], [], [], []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "a":
            self.links.append(attrs["href"])
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.rows[-1].append(self._cell.strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def parse_page(path):
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


def local_targets(page, folder):
    """The files a page's links and images point to (all relative paths inside ``folder``)."""
    targets = []
    for reference in page.links + page.images:
        parsed = urlparse(reference)
        assert not parsed.scheme and not parsed.netloc and not reference.startswith("/"), reference
        targets.append(folder / unquote(parsed.path))
    return targets


def test_test_page_lists_every_case_worst_first_and_links_only_existing_files(results):
    root, _ = results
    folder = root / "evaluation"
    rows = list(csv.DictReader(open(folder / "metrics.csv")))
    cases = sorted({row["case"] for row in rows})
    expected = {"metrics.csv", "summary.json", "test_info.json", "index.html",
                *(f"{case}.png" for case in cases), *(f"{case}_pred.nii.gz" for case in cases)}
    assert {path.name for path in folder.iterdir()} == expected
    page = parse_page(folder / "index.html")
    targets = local_targets(page, folder)
    assert all(target.is_file() for target in targets)
    assert {target.name for target in targets} == expected - {"metrics.csv", "summary.json", "test_info.json",
                                                               "index.html"}
    listed = [row[1] for row in page.rows if row and row[0].isdigit()]
    assert sorted(listed) == cases
    per_case = {case: {row["structure"]: (float(row["dice"]), float(row["hd95"])) for row in rows
                       if row["case"] == case} for case in cases}
    scores = [pathology_dice(per_case[case]) for case in listed]
    defined = [score for score in scores if score is not None]
    assert defined == sorted(defined) and scores[:len(defined)] == defined, "worst first, undefined last"
    info = json.loads((folder / "test_info.json").read_text())
    cells = {cell for row in page.rows for cell in row}
    assert f"{info['checkpoint']} (epoch {info['epoch']})" in cells and "bSSFP, LGE, T2w" in cells


def test_test_page_lists_left_out_cases_with_their_reason_and_escapes_every_string(tmp_path):
    nan = math.nan
    metric_rows = [{"case": case, "structure": name, "dice": dice, "hd95": 1.0, "space": "processed"}
                   for case, scar, edema in (("<b>a</b>", 0.8, 0.6), ("b", 0.2, nan), ("c", nan, nan))
                   for name, dice in (("myocardium", 0.9), ("scar", scar), ("edema", edema), ("scar_edema", 0.7),
                                      ("whole_myocardium", 0.9))]
    summary = {name: {"dice": 0.5, "dice_std": 0.1, "hd95": 1.0, "hd95_std": 0.0, "n": 3, "n_undefined_dice": 0,
                      "n_undefined_hd95": 0, "space": "processed", "hd95_unit": "mm"}
               for name in ("myocardium", "scar", "edema", "scar_edema", "whole_myocardium")}
    info = {"checkpoint": "run/best.pth", "epoch": 3, "ensemble": ["run/best.pth"], "split": "test_vol",
            "root_path": "data", "protocol": "ours", "tta": True, "postprocess": False, "heads": ["fused"],
            "sequences": ["bSSFP", "LGE"], "missing": "leave_out", "stopped_after": None, "seconds": 1.0,
            "left_out": {"d<script>alert(1)</script>": "source label d.nii.gz is not readable (<EOF>)"}}
    write_test_page(tmp_path, info, summary, metric_rows)
    text = (tmp_path / "index.html").read_text()
    page = parse_page(tmp_path / "index.html")
    assert "script" not in page.tags and "b" not in page.tags
    assert [row[1] for row in page.rows if row and row[0].isdigit()] == ["b", "<b>a</b>", "c"]
    assert ["d<script>alert(1)</script>", "source label d.nii.gz is not readable (<EOF>)"] in page.rows
    assert "&lt;EOF&gt;" in text and ["sequences", "bSSFP, LGE (the others: leave_out)"] in page.rows
    assert page.links == [] and page.images == [], "no file of these cases exists"


def test_prediction_page_lists_volumes_and_the_error_of_the_failed_case(results):
    root, _ = results
    folder = root / "predicted"
    rows = list(csv.DictReader(open(folder / "volumes.csv")))
    failed = [row for row in rows if row["error"]]
    predicted = [row for row in rows if not row["error"]]
    assert len(failed) == 1 and "T2w" in failed[0]["error"] and len(predicted) == 1
    case = predicted[0]["case"]
    assert {path.name for path in folder.iterdir()} == {"volumes.csv", "index.html", f"{case}.nii.gz", f"{case}.png"}
    page = parse_page(folder / "index.html")
    assert all(target.is_file() for target in local_targets(page, folder))
    assert {target.name for target in local_targets(page, folder)} == {f"{case}.nii.gz", f"{case}.png"}
    assert [failed[0]["case"], failed[0]["error"]] in page.rows
    volume_row = next(row for row in page.rows if row and row[0] == case)
    assert volume_row[2] == f"{float(predicted[0]['normal_myocardium_ml']):.2f}"


def test_overlay_names_every_class_and_shows_only_slices_with_myocardium():
    images = np.random.default_rng(0).random((3, 24, 24, 5), dtype=np.float32)
    reference, prediction = np.zeros((2, 24, 24, 5), dtype=np.uint8)
    reference[8:16, 8:16, 1], reference[10:12, 10:12, 1] = 1, 2
    prediction[8:16, 8:16, 3], prediction[9:11, 9:11, 3] = 1, 3
    figure = overlay_figure("case0001", images, prediction, reference,
                            dice={"normal myocardium": 0.5, "scar": math.nan, "edema": 0.0}, unused=("T2w",))
    legend = [text.get_text() for text in figure.legends[0].get_texts()]
    assert [name for name, _, _ in CLASS_STYLES.values()] == ["normal myocardium", "scar", "edema"]
    assert legend == ["normal myocardium", "scar", "edema", "reference: filled", "prediction: outline"]
    axes, = figure.axes  # the panels form one image
    texts = [text.get_text() for text in axes.texts]
    assert texts[:6] == ["bSSFP", "LGE", "T2w\n(not used)", "normal myocardium on bSSFP", "scar on LGE",
                         "edema on T2w"]
    assert texts[6:] == ["slice 1", "slice 3"], "the slices holding myocardium in one of the labels"
    assert figure.get_suptitle() == "case0001 · Dice normal myocardium 0.500, scar n/a, edema 0.000"
    without_reference = overlay_figure("new", images, prediction)
    assert [t.get_text() for t in without_reference.legends[0].get_texts()][-1] == "prediction: outline"
    assert "reference: filled" not in [t.get_text() for t in without_reference.legends[0].get_texts()]


def test_progress_appears_after_the_first_validation_and_keeps_the_epochs_before_a_resume(results):
    root, first = results
    run = root / "run"
    assert first["progress"].startswith(PNG_SIGNATURE)
    assert [entry["epoch"] for entry in first["history"]] == [1] and first["history"][0]["val_dice"] is not None
    history = load_checkpoint(run / "last.pth")["train_state"]["history"]
    assert [entry["epoch"] for entry in history] == [1, 2]
    assert history[0] == first["history"][0], "the epoch before the resume is kept as it was"
    for entry in history:
        assert math.isfinite(entry["loss"]) and entry["lr"] > 0 and entry["val_dice"] is not None
        assert set(entry["terms"]) == {"fused", "modality", "contrast"}
    assert (run / "progress.png").read_bytes() != first["progress"], "redrawn after the resumed epoch"
    figure = progress_figure(history)
    loss_line = figure.axes[0].get_lines()[0]
    assert list(loss_line.get_xdata()) == [1, 2] and list(loss_line.get_ydata()) == [e["loss"] for e in history]


def test_stage_changes_are_named_and_a_failed_drawing_only_warns(tmp_path, caplog):
    def entry(epoch, fused, contrast):
        return {"epoch": epoch, "loss": 1.0, "terms": {}, "lr": 0.1, "val_dice": None,
                "weights": {"fused": fused, "modality": 1.0, "contrast": contrast}}

    history = [entry(1, 0.0, 0.0), entry(2, 0.0, 0.1), entry(3, 1.0, 0.05), entry(4, 1.0, 0.05)]
    assert stage_changes(history) == [(2, "contrastive loss on"), (3, "fused head on")]
    writer = ProgressWriter(tmp_path / "missing_folder_is_a_file" / "progress.png")
    (tmp_path / "missing_folder_is_a_file").write_text("")
    writer.submit(history)
    writer.wait()
    assert "progress.png not drawn" in caplog.text


# A real browser --------------------------------------------------------------------------------------------------

class DevToolsPipe:
    """Headless Chromium driven over its DevTools protocol on a pipe (no network port): its console and log
    entries are read as the page loads."""

    def __init__(self, profile):
        to_browser, self._to_browser = os.pipe()
        self._from_browser, from_browser = os.pipe()

        def connect_pipe():  # the browser reads fd 3 and writes fd 4
            reading, writing = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser, from_browser))
            os.dup2(reading, 3)
            os.dup2(writing, 4)

        self.log = Path(profile) / "stderr.txt"
        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
            preexec_fn=connect_pipe, close_fds=False, stdout=subprocess.DEVNULL, stderr=self.log.open("wb"))
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._next_id, self.events = b"", 0, []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=self.session)

    def _receive(self, deadline):
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._from_browser], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("Chromium did not answer within 60 s")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise EOFError(f"Chromium closed its pipe: {self.log.read_text(errors='replace')[-2000:]}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method, params=None, session=None):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + 60
        while True:
            answer = self._receive(deadline)
            if answer.get("id") == self._next_id:
                assert "error" not in answer, answer
                return answer["result"]
            self.events.append(answer)

    def render(self, url, screenshot):
        """Load ``url``, write its full-page screenshot; the console errors, uncaught exceptions and error log
        entries (failed loads) it produced."""
        self.events = []
        self.call("Page.navigate", {"url": url}, self.session)
        deadline = time.monotonic() + 60
        while not any(event.get("method") == "Page.loadEventFired" for event in self.events):
            self.events.append(self._receive(deadline))
        data = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, self.session)
        screenshot.write_bytes(base64.b64decode(data["data"]))
        errors = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown" or (method == "Runtime.consoleAPICalled"
                                                       and params["type"] in ("error", "assert")):
                errors.append(json.dumps(params)[:500])
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                errors.append(f"{params['entry']['text']} ({params['entry'].get('url', '')})")
        return errors

    def close(self):
        try:
            self.call("Browser.close")
        except EOFError:  # the browser may close its pipe before it answers
            pass
        finally:
            self.process.wait(timeout=30)
            os.close(self._to_browser)
            os.close(self._from_browser)


@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                    reason=f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; make test installs it "
                           "where apt-get is there)")
def test_chromium_renders_the_pages_without_a_console_error(results, tmp_path):
    root, _ = results
    control = tmp_path / "control.html"
    control.write_text('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>control</title></head>'
                       '<body><img src="absent.png" alt="absent"></body></html>')
    browser = DevToolsPipe(tempfile.mkdtemp(dir=tmp_path))
    try:
        control_errors = browser.render(control.as_uri(), tmp_path / "control.png")
        pages = {name: browser.render((root / name / "index.html").as_uri(), tmp_path / f"{name}.png")
                 for name in ("evaluation", "predicted")}
    finally:
        browser.close()
    assert any("ERR_FILE_NOT_FOUND" in error for error in control_errors), "a missing image is seen as an error"
    assert pages == {"evaluation": [], "predicted": []}
    for name in pages:
        screenshot = (tmp_path / f"{name}.png").read_bytes()
        assert screenshot.startswith(PNG_SIGNATURE) and len(screenshot) > 10_000
