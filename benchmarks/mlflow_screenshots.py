"""The MLflow UI as a user sees it, in a real browser: screenshots of an experiment's runs
table and of the compare view of its pipeline runs (FLOPs against accuracy).

Starts ``mlflow server`` on 127.0.0.1 over a copy of a finished store (the quickstart's by
default: ``./mlflow.db`` and ``./mlartifacts``), drives headless Chromium from Debian's
packages (``apt-get install chromium``) over the DevTools protocol (with aiohttp, which Ray
brings) and writes PNGs to ``--out``:

- ``runs.png``: the experiment's runs table, every parent run expanded into its nested runs
  (pipeline into stage runs), with the Dataset and Models columns;
- ``compare.png``: the compare view's scatter plot of the metric ``--x`` against ``--y`` over
  the experiment's pipeline runs, or over the child runs of the run named ``--parent`` (a
  sweep's trials); only runs that logged both metrics are compared. The chosen axes are read
  back from the page, and a mismatch is an error rather than a wrong picture.

``--shots`` takes one of them only, for when each comes from a different store. Not part of
``make test``: it needs the browser and a finished run.

    python benchmarks/mlflow_screenshots.py [--store mlflow.db] [--artifacts mlartifacts]
        [--experiment mixmae-quickstart] [--parent methods] [--x pretrain_flops] [--y probe_top1]
        [--shots runs compare] [--out docs/screenshots]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--hide-scrollbars",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, deadline_s: float = 60.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {deadline_s:.0f} s")


class Browser:
    """Headless Chromium driven over the DevTools protocol: navigate, run JavaScript, capture."""

    def __init__(self, executable: str, width: int = 1600, height: int = 1000):
        self.port = free_port()
        self.profile = tempfile.TemporaryDirectory()
        self.process = subprocess.Popen(
            [executable, *CHROMIUM_FLAGS, f"--window-size={width},{height}", f"--user-data-dir={self.profile.name}",
             f"--remote-debugging-port={self.port}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.size = (width, height)
        wait_until_up(f"http://127.0.0.1:{self.port}/json/version")
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list") as response:
            page = next(t for t in json.load(response) if t["type"] == "page")
        self.loop = asyncio.new_event_loop()
        self.session = self.loop.run_until_complete(self._connect(page["webSocketDebuggerUrl"]))
        self.ids = itertools.count(1)
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    async def _connect(self, url: str):
        import aiohttp

        self.http = aiohttp.ClientSession()
        return await self.http.ws_connect(url, max_msg_size=0)

    def call(self, method: str, **params):
        async def exchange():
            ident = next(self.ids)
            await self.session.send_json({"id": ident, "method": method, "params": params})
            while True:
                message = await self.session.receive_json()
                if message.get("id") == ident:
                    if "error" in message:
                        raise RuntimeError(f"{method}: {message['error']}")
                    return message.get("result", {})

        return self.loop.run_until_complete(exchange())

    def open(self, url: str, settle_s: float = 8.0) -> None:
        self.call("Page.navigate", url=url)
        time.sleep(settle_s)  # the UI renders after its API calls return; no event says when

    def run(self, script: str, settle_s: float = 2.0):
        result = self.call("Runtime.evaluate", expression=script, awaitPromise=True, returnByValue=True)
        time.sleep(settle_s)
        return result.get("result", {}).get("value")

    def wait_for(self, script: str, timeout_s: float = 60.0) -> None:
        """Poll until ``script`` is truthy: the UI fills in after its API calls, at no set time."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.run(f"Boolean({script})", 0):
                return
            time.sleep(0.5)
        raise TimeoutError(f"the page never satisfied {script[:120]!r} within {timeout_s:.0f} s")

    def capture(self, out: Path) -> Path:
        out.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return out

    def close(self) -> None:
        self.loop.run_until_complete(self.session.close())
        self.loop.run_until_complete(self.http.close())
        self.process.terminate()
        self.process.wait(timeout=30)
        self.profile.cleanup()

    def click(self, script: str, settle_s: float = 2.0) -> bool:
        """A real mouse click (the UI's widgets react to pointer events, not to ``element.click()``)
        at the centre of the element ``script`` finds; False when it finds none."""
        box = self.run(f"(() => {{ const e = ({script}); if (!e) return null; e.scrollIntoView({{block: 'center'}});"
                       " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()",
                       0.5)
        if not box:
            return False
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)
        time.sleep(settle_s)
        return True


def visible_text(text: str) -> str:
    """JavaScript finding the innermost visible element whose text is ``text``."""
    return (f"[...document.querySelectorAll('body *')].filter(e => e.offsetParent !== null && "
            f"e.textContent.trim() === {json.dumps(text)}).pop()")


def choose_axis(browser: Browser, axis: str, metric: str) -> None:
    """Pick the metric ``metric`` on the compare view's scatter plot ``axis`` ("x" or "y")."""
    # A Radix select: a button#x-axis-selector whose value attribute is "metric-<name>" or
    # "param-<name>", opening a listbox of role=option rows.
    button = f"document.getElementById('{axis}-axis-selector')"
    # A param may share the metric's name; metrics come after params in the list.
    option = (f"[...document.querySelectorAll('[role=option]')]"
              f".filter(o => o.offsetParent && o.textContent.trim() === {json.dumps(metric)}).pop()")
    if not browser.click(button) or not browser.click(option):
        sys.exit(f"the scatter plot's {axis.upper()}-axis offers no {metric!r}")
    chosen = browser.run(f"{button}.getAttribute('value')", 0)
    if chosen != f"metric-{metric}":
        sys.exit(f"the scatter plot's {axis.upper()}-axis shows {chosen!r}, not the metric {metric!r}")


# Closes the assistant panel that opens by itself on first load.
CLOSE_ASSISTANT = ("[...document.querySelectorAll('button')]"
                   ".find(b => /close/i.test(b.getAttribute('aria-label') || ''))")
# The "+" button before a parent run's name: unlabelled, so known by its cell renderer and its
# plus icon's vertical bar ("V4.5"), which the "-" icon of an expanded row lacks.
COLLAPSED = ("[...document.querySelectorAll('button[data-component-id*=runnamecellrenderer]')]"
             ".find(b => b.offsetParent && b.querySelector('path[d*=\"V4.5\"]'))")
RUN_LINK = "document.querySelector('a[href*=\"/runs/\"]')"
# Opens pages in the sidebar's "Model training" mode rather than its GenAI default.
MODEL_TRAINING = "workflowType=machine_learning"


def shoot_runs(browser: Browser, base: str, experiment_id: str, out: Path) -> Path:
    browser.open(f"{base}/#/experiments/{experiment_id}/runs?{MODEL_TRAINING}")
    browser.click(CLOSE_ASSISTANT)
    browser.wait_for(RUN_LINK)
    for _ in range(200):  # expanding a row may reveal collapsed grandchildren
        if not browser.click(COLLAPSED, settle_s=1.0):
            break
    if browser.run(f"Boolean({COLLAPSED})", 0):
        sys.exit("some parent runs in the runs table would not expand")
    # Shows every dataset of a run (a probe's train and val) instead of the first and "+1";
    # the toggle is there only when some run has dataset inputs.
    browser.click(visible_text("Expand rows"))
    return browser.capture(out / "runs.png")


def shoot_compare(browser: Browser, base: str, experiment_id: str, run_ids: list[str], x: str, y: str,
                  out: Path) -> Path:
    query = urllib.parse.urlencode({"runs": json.dumps(run_ids), "experiments": json.dumps([experiment_id])})
    browser.open(f"{base}/#/compare-runs?{query}&{MODEL_TRAINING}")
    browser.click(CLOSE_ASSISTANT)
    browser.wait_for(visible_text("Scatter Plot"))
    if not browser.click(visible_text("Scatter Plot")):
        sys.exit("the compare view has no Scatter Plot tab")
    browser.wait_for("document.getElementById('x-axis-selector')")
    choose_axis(browser, "x", x)
    choose_axis(browser, "y", y)
    titles_js = "[...document.querySelectorAll('.js-plotly-plot .xtitle, .js-plotly-plot .ytitle')]"
    browser.wait_for(f"{titles_js}.length == 2")
    titles = browser.run(f"{titles_js}.map(e => e.textContent)", 0)
    if titles != [x, y]:
        sys.exit(f"the scatter plot's axes read {titles}, not [{x!r}, {y!r}]")
    return browser.capture(out / "compare.png")


def compared_runs(client: MlflowClient, experiment_id: str, parent: str | None, x: str, y: str) -> list[str]:
    """The ids of the experiment's pipeline runs, or of the children of the latest run named
    ``parent``, that logged both metrics (a failed trial would be a column with no point)."""
    where = "tags.`mixmae.kind` = 'pipeline'"
    if parent is not None:
        named = client.search_runs([experiment_id], f"attributes.run_name = '{parent}'", max_results=1,
                                   order_by=["attributes.start_time DESC"])
        if not named:
            sys.exit(f"no run named {parent!r} in the experiment")
        where = f"tags.`mlflow.parentRunId` = '{named[0].info.run_id}'"
    runs = client.search_runs([experiment_id], where, max_results=200)
    return [r.info.run_id for r in runs if x in r.data.metrics and y in r.data.metrics]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="mlflow.db", help="the SQLite store of a finished run (left untouched)")
    parser.add_argument("--artifacts", default="mlartifacts")
    parser.add_argument("--experiment", default="mixmae-quickstart")
    parser.add_argument("--parent", help="compare the child runs of the run with this name (a sweep's trials) "
                                         "instead of the experiment's pipeline runs")
    parser.add_argument("--x", default="pretrain_flops", help="the compare view's scatter plot: X metric")
    parser.add_argument("--y", default="probe_top1", help="... and Y metric")
    parser.add_argument("--shots", nargs="+", choices=["runs", "compare"], default=["runs", "compare"])
    parser.add_argument("--out", default="docs/screenshots")
    args = parser.parse_args()
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        sys.exit("no Chromium: install Debian's (apt-get install chromium)")
    if not Path(args.store).is_file():
        sys.exit(f"no store {args.store}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # The server may migrate the schema or write to the store; a copy leaves the original as it was.
    scratch = tempfile.TemporaryDirectory()
    store = Path(shutil.copy(args.store, scratch.name))
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store}",
         "--default-artifact-root", str(Path(args.artifacts).absolute()), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    browser = None
    try:
        wait_until_up(f"{base}/health", deadline_s=180)
        client = MlflowClient(base)
        experiment = client.get_experiment_by_name(args.experiment)
        if experiment is None:
            sys.exit(f"no experiment {args.experiment!r} in {args.store}")
        run_ids = []
        if "compare" in args.shots:
            run_ids = compared_runs(client, experiment.experiment_id, args.parent, args.x, args.y)
            if not run_ids:
                sys.exit(f"no runs to compare that logged both {args.x!r} and {args.y!r}")
        browser = Browser(executable)
        shots = []
        if "runs" in args.shots:
            shots.append(shoot_runs(browser, base, experiment.experiment_id, out))
        if "compare" in args.shots:
            shots.append(shoot_compare(browser, base, experiment.experiment_id, run_ids, args.x, args.y, out))
        for shot in shots:
            print(f"wrote {shot}")
    finally:
        if browser is not None:
            browser.close()
        server.terminate()
        server.wait(timeout=30)
        scratch.cleanup()


if __name__ == "__main__":
    main()
