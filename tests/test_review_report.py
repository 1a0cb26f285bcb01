"""The review report as a reviewer sees it. review.md (tables + PNG links, for people reading files) and
review.html (the same report with the PNGs embedded) are written from one review outcome; in the MLflow
UI the HTML page must show every plot inline: a real `mlflow server` on 127.0.0.1 and headless Chromium
(Debian's chromium + chromium-driver, installed by scripts/install_browser.sh) open the run's artifact
page and check that each plot is an image the browser really decoded.

The MLflow UI (3.x) renders a markdown artifact with relative image links as the text `[alt](file.png)`
and drops data: URIs from markdown, so the markdown page alone shows no plot there."""
from __future__ import annotations

import base64
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PLOTS = ["auc_gauc.png", "category_gain.png", "training_curves.png", "tsne.png"]
CATEGORIES = ["bag", "dress", "shoes", "skirt"]
HUES = ["red", "green", "blue", "orange", "magenta", "?"]


def review_outcome():
    """A review outcome as run_review builds it (metric reports from evaluate_predictions, real gates,
    training curves, another version on the snapshot), on synthetic predictions instead of trained models:
    the challenger's scores follow the labels more closely than the champion's, except in one category."""
    from etl.config import ReviewConf
    from training.ctr.metrics import evaluate_predictions
    from training.ctr.review import PROMOTED, REJECTED, ReviewOutcome, gate_checks

    rng = np.random.default_rng(7)
    n = 4000
    frame = pd.DataFrame({"item_id": [f"i{k}" for k in rng.integers(0, 400, n)],
                          "pv_id": [f"pv{k}" for k in rng.integers(0, 500, n)],
                          "query": rng.choice(CATEGORIES, n)})
    frame["label"] = (rng.random(n) < 0.2).astype(np.int64)
    truth = frame["label"].to_numpy() - 0.5
    noise = rng.normal(size=n)
    champ = 1 / (1 + np.exp(-(0.6 * truth + noise)))
    boost = np.where(frame["query"].to_numpy() == "bag", 0.3, 1.4)  # the challenger is worse on bags only
    chall = 1 / (1 + np.exp(-(boost * truth + noise)))
    cold = {f"i{k}" for k in range(40)}
    reports = {"3": evaluate_predictions(frame, chall, cold_items=cold),
               "2": evaluate_predictions(frame, champ, cold_items=cold)}
    gates = gate_checks(reports["3"], reports["2"], ReviewConf())
    failed = [g for g in gates if not g.passed]
    curve = [{"epoch": e, "train_loss": 0.6 - 0.05 * e, "eval_auc": 0.6 + 0.03 * e} for e in range(4)]
    # The challenger as a multi_cluster model: its scores with one level hidden (as review.validate
    # computes them from training.ctr.train.level_scores), here a weaker signal per level.
    full = reports["3"]["overall"]
    level_gains = []
    for name, ids, weight in (("level 1 (coarse)", 8, 1.0), ("cluster id (fine)", 128, 1.3)):
        o = evaluate_predictions(frame, 1 / (1 + np.exp(-(weight * boost * truth / 1.4 + noise))))["overall"]
        level_gains.append({"level": name, "ids": ids, "auc": o["auc"], "gauc": o["gauc"],
                            "auc_gain": full["auc"] - o["auc"], "gauc_gain": full["gauc"] - o["gauc"]})
    return ReviewOutcome(
        REJECTED if failed else PROMOTED, [f"{g.name}: {g.detail}" for g in failed] or ["every gate passed"],
        challenger="3", champion="2", snapshot="ctr_train@v2|fv=fv-test|eval=2026-11-22", gates=gates,
        reports=reports, tags={"3": {"feature_mode": "multi_cluster", "validation.dates": "2026-11-21"},
              "2": {"feature_mode": "none", "validation.dates": "none"}},
        curves={"3": curve, "2": [{**p, "eval_auc": p["eval_auc"] - 0.05} for p in curve]},
        others=[{"version": "1", "feature_mode": "simscore", "auc": 0.61, "gauc": 0.58}],
        level_gains={"3": level_gains})


def tsne_sample():
    """Item embeddings clustered by hue, coloured by category and hue (as embedding_sample returns)."""
    rng = np.random.default_rng(3)
    hue = rng.choice(HUES, 120)
    centres = {h: rng.normal(scale=4, size=8) for h in HUES}
    emb = np.stack([centres[h] + rng.normal(size=8) for h in hue]).astype(np.float32)
    return emb, {"category": rng.choice(CATEGORIES, 120), "hidden hue": hue}


class _Page(HTMLParser):
    """Headings, table rows (cell texts) and images (alt, data-file, src) of an HTML page, in order."""

    def __init__(self):
        super().__init__()
        self.items, self._cell, self._row, self._heading = [], None, None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.items.append(("img", a.get("alt"), a.get("data-file"), a.get("src", "")))
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag in ("h1", "h2"):
            self._heading = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._heading is not None:
            self._heading += data

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr":
            self.items.append(("row", self._row))
        elif tag in ("h1", "h2"):
            self.items.append(("heading", self._heading))
            self._heading = None


def _markdown_items(md: str) -> list[tuple]:
    items = []
    for line in md.splitlines():
        if line.startswith("#"):
            items.append(("heading", line.lstrip("#").strip()))
        elif line.startswith("| "):
            items.append(("row", [c.strip() for c in line.strip("|").split(" | ")]))
        elif m := re.fullmatch(r"!\[(.*)\]\((.*)\)", line):
            items.append(("img", m.group(1), m.group(2)))
    return items


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])  # the IHDR chunk: width, height


def test_html_report_is_the_markdown_report_with_the_plots_inside(tmp_path):
    from training.ctr.report import write_report

    outcome = review_outcome()
    assert outcome.decision == "rejected" and outcome.reasons[0].startswith("categories: regressed: bag")
    md_path = write_report(outcome, str(tmp_path), tsne_sample())
    assert md_path == str(tmp_path / "review.md")
    assert sorted(os.listdir(tmp_path)) == sorted(PLOTS + ["review.html", "review.md"])
    md = (tmp_path / "review.md").read_text(encoding="utf-8")
    page = _Page()
    page.feed((tmp_path / "review.html").read_text(encoding="utf-8"))

    md_items = _markdown_items(md)
    html_items = [(k, *rest[:2]) if k == "img" else (k, *rest) for k, *rest in page.items]
    assert html_items == md_items  # same headings, table rows and plots, in the same order
    assert [i[2] for i in md_items if i[0] == "img"] == PLOTS
    assert ("row", ["v3", "multi_cluster", f"{outcome.reports['3']['overall']['auc']:.4f}",
                    f"{outcome.reports['3']['overall']['gauc']:.4f}",
                    f"{outcome.reports['3']['overall']['logloss']:.4f}",
                    f"{outcome.reports['3']['cold_start']['auc']:.4f}", f"{outcome.reports['3']['warm']['auc']:.4f}",
                    "4000"]) in md_items
    # The gain per cluster level: the full model's metric minus the metric with that level hidden.
    assert ("heading", "Gain per cluster level, v3") in md_items
    full = outcome.reports["3"]["overall"]
    for g in outcome.level_gains["3"]:
        assert g["auc_gain"] > 0 and abs(full["auc"] - g["auc"] - g["auc_gain"]) < 1e-12
        assert ("row", [g["level"], str(g["ids"]), f"{g['auc']:.4f}", f"{g['auc_gain']:+.4f}", f"{g['gauc']:.4f}",
                        f"{g['gauc_gain']:+.4f}"]) in md_items
    for _, _, name, src in (i for i in page.items if i[0] == "img"):
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        assert base64.b64decode(src[len(prefix):]) == (tmp_path / name).read_bytes()  # the very PNG, embedded
    assert "**Decision: rejected** — categories: regressed: bag" in md
    # v3 chose its epochs on held-out validation dates, then was refit: its curve is the selection fit's
    assert "\nv3: the curve is the epoch-selection fit's (validation dates held out)" in md and "v2, v3" not in md
    html = (tmp_path / "review.html").read_text(encoding="utf-8")
    assert "<strong>Decision: rejected</strong> — categories: regressed: bag" in html
    assert ("<li>evaluation snapshot: <code>ctr_train@v2|fv=fv-test|eval=2026-11-22</code> (both models re-scored "
            "on it)</li>") in html


# ---- the MLflow UI in a headless browser ------------------------------------------------------------
def _require_browser():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (dev extra)")
    if missing:
        # scripts/test.sh installs them and sets COURIER_REQUIRE_BROWSER=1: a broken install fails there
        reason = f"{', '.join(missing)} missing: run scripts/install_browser.sh and scripts/env.sh"
        if os.environ.get("COURIER_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real MLflow tracking server (sqlite + artifacts served from a local folder) on 127.0.0.1."""

    def __init__(self, root: Path):
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = root / "mlflow-server.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # its job-runner processes only cost CPU here
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                 "--artifacts-destination", (root / "artifacts").as_uri()],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)  # own group: workers stop too

    def wait_ready(self, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self.url
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not come up on {self.url}: {self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self):
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def browser(tmp_path):
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox",  # CI runs as root, where Chromium's sandbox does not start
                "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)  # given driver: no download
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def mlflow_server(tmp_path, browser):  # after `browser`: no server is started when the browser is missing
    server = MlflowServer(tmp_path)
    try:
        yield server
    finally:
        server.stop()


def shown_plots(driver, timeout: float = 45) -> dict[str, tuple[int, int, float]]:
    """In the artifact view of an HTML file: data-file -> (naturalWidth, naturalHeight, drawn width) of
    each image in the page, once every image has finished loading (decoded or failed)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, timeout, poll_frequency=0.2)
    try:  # the UI fetches the artifact and shows it in a sandboxed iframe (a blob: URL)
        frame = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "iframe.mlflow-html-iframe"))[0]
    except TimeoutException:
        body = driver.find_element(By.TAG_NAME, "body").text
        pytest.fail(f"the artifact view shows no HTML page; it shows: {body[-1500:]}")
    driver.switch_to.frame(frame)
    done = "return Array.from(document.images).every(i => i.complete) && document.images.length > 0"
    wait.until(lambda d: d.execute_script(done), "no image in the page finished loading")
    return {i.get_attribute("data-file"): tuple(driver.execute_script(
        "const r = arguments[0]; return [r.naturalWidth, r.naturalHeight, r.getBoundingClientRect().width]", i))
        for i in driver.find_elements(By.TAG_NAME, "img")}


def test_review_report_shows_its_plots_in_the_mlflow_ui(tmp_path, mlflow_server, browser):
    from mlflow import MlflowClient
    from selenium.webdriver.common.by import By

    from training.ctr.report import write_report

    folder = tmp_path / "report"
    write_report(review_outcome(), str(folder), tsne_sample())  # while the server starts
    url = mlflow_server.wait_ready()
    client = MlflowClient(tracking_uri=url)  # logs through the server's artifact proxy, as a job host does
    experiment_id = client.create_experiment("review-report-ui")
    run_id = client.create_run(experiment_id).info.run_id
    client.log_artifacts(run_id, str(folder), "review")
    client.set_terminated(run_id)

    # The run page's Artifacts tab with the file selected: the route the UI's artifact tree navigates to.
    browser.get(f"{url}/#/experiments/{experiment_id}/runs/{run_id}/artifacts/review/review.html")
    shown = shown_plots(browser)
    assert sorted(shown) == sorted(PLOTS)
    for name, (width, height, drawn) in shown.items():
        # decoded by the browser to the PNG's own size (a broken image has naturalWidth 0), and laid out
        assert (width, height) == png_size((folder / name).read_bytes()), name
        assert drawn > 200, name
    # ... and the tables, cell by cell as in review.md: header + 4 gates, + 2 models, + 2 cluster levels,
    # + 1 row per category
    rows = [[c.text for c in r.find_elements(By.CSS_SELECTOR, "th, td")]
            for r in browser.find_elements(By.TAG_NAME, "tr")]
    md_rows = [i[1] for i in _markdown_items((folder / "review.md").read_text(encoding="utf-8")) if i[0] == "row"]
    assert rows == md_rows and len(rows) == (1 + 4) + (1 + 2) + (1 + 2) + (1 + len(CATEGORIES))
