"""report.html in a real browser: headless Chromium driven over its DevTools pipe (no extra packages). A click on
one thumbnail and a drag in one 100 % view move every column; the table sorts; no console errors; a screenshot.

Chromium is Debian's `chromium` package (.ci/run installs it). Without it the test skips, and fails where
URAE_REQUIRE_CHROMIUM=1 (CI sets it).
"""

import base64
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_eval_metrics import pink_image

from urae.eval.cli import main

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--remote-debugging-pipe"]
ZOOM = 320  # the report's 100 % view, CSS pixels (device scale 1 below)


def chromium_path() -> str:
    found = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if found:
        return found
    if os.environ.get("URAE_REQUIRE_CHROMIUM", "") not in ("", "0"):  # CI sets it
        pytest.fail("URAE_REQUIRE_CHROMIUM is set but chromium is not installed (.ci/run installs it with apt-get)")
    pytest.skip("chromium is not installed (Debian: apt-get install chromium); CI installs it")


class DevTools:
    """Chrome DevTools Protocol over --remote-debugging-pipe: JSON messages ending in NUL on fds 3 (in) and 4 (out)."""

    def __init__(self, exe: str, profile: Path):
        to_child, self._w = os.pipe()
        self._r, from_child = os.pipe()

        def fds():  # the child's fds 3 and 4, whatever numbers the pipes got here
            a, b = os.dup(to_child), os.dup(from_child)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={profile}", "about:blank"], pass_fds=(3, 4),
                                     preexec_fn=fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self._id, self.events, self._replies = 0, [], {}
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        buf = b""
        with os.fdopen(self._r, "rb", buffering=0) as f:
            while chunk := f.read(65536):
                buf += chunk
                *msgs, buf = buf.split(b"\0")
                with self._cond:
                    for m in msgs:
                        msg = json.loads(m)
                        if "id" in msg:
                            self._replies[msg["id"]] = msg
                        else:
                            self.events.append(msg)
                    self._cond.notify_all()

    def send(self, method, params=None, session=None, timeout=30):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        with self._cond:
            if not self._cond.wait_for(lambda: self._id in self._replies, timeout):
                raise TimeoutError(method)
            reply = self._replies.pop(self._id)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def wait_event(self, method, timeout=30):
        with self._cond:
            if not self._cond.wait_for(lambda: any(e["method"] == method for e in self.events), timeout):
                raise TimeoutError(method)

    def close(self):
        try:
            self.send("Browser.close", timeout=10)
        except (TimeoutError, RuntimeError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._w)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Two folders of the same two images at 640×480 and 1280×960, scored into a report."""
    root = tmp_path_factory.mktemp("report")
    for name, size in (("small", (640, 480)), ("large", (1280, 960))):
        (root / name).mkdir()
        for i in range(2):
            pink_image(1280, 30 + i).crop((0, 0, 1280, 960)).resize(size, Image.LANCZOS).save(root / name / f"{i}.png")
    assert main(["score", str(root / "small"), str(root / "large"), "--metrics", "detail", "--tile", "256",
                 "--output_dir", str(root / "eval")]) == 0
    return root / "eval" / "report.html"


def test_report_in_headless_chromium_zoom_moves_every_column(report, tmp_path):
    browser = DevTools(chromium_path(), tmp_path / "profile")
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            browser.send(f"{domain}.enable", session=s)
        browser.send("Emulation.setDeviceMetricsOverride", {"width": 1400, "height": 1000, "deviceScaleFactor": 1,
                                                            "mobile": False}, session=s)
        browser.send("Page.navigate", {"url": report.as_uri()}, session=s)
        browser.wait_event("Page.loadEventFired")

        def js(expr):
            r = browser.send("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session=s)
            assert "exceptionDetails" not in r, r
            return r["result"].get("value")

        def crops():
            return js("Array.from(document.querySelectorAll('.cell')).map(c => [c.dataset.group, "
                      "+c.dataset.cropX, +c.dataset.cropY, c.querySelector('.zoom img').naturalWidth])")

        def mouse(kind, x, y):
            browser.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left",
                                                      "buttons": 0 if kind == "mouseReleased" else 1,
                                                      "clickCount": 1}, session=s)

        assert js("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        before = crops()
        assert len(before) == 4 and {c[3] for c in before} == {640, 1280}
        # a click on the first thumbnail at 80 % across, 30 % down: every column centres its 100 % view there
        r = js("(() => { const b = document.querySelector('.cell .thumb').getBoundingClientRect(); "
               "return [b.left, b.top, b.width, b.height]; })()")
        x, y = r[0] + 0.8 * r[2], r[1] + 0.3 * r[3]
        mouse("mousePressed", x, y)
        mouse("mouseReleased", x, y)
        after = crops()
        for group, cx, cy, w in after:
            h = w * 3 // 4
            assert abs(cx - min(max(0.8 * w - ZOOM / 2, 0), w - ZOOM)) <= 2, (group, cx, w)
            assert abs(cy - min(max(0.3 * h - ZOOM / 2, 0), h - ZOOM)) <= 2, (group, cy, h)
        assert all(a[1:3] != b[1:3] for a, b in zip(after, before) if a[3] == 1280)
        # a drag in the second column's 100 % view (1280 px wide) pans every column by the same fraction
        z = js("(() => { const b = document.querySelectorAll('.cell .zoom')[1].getBoundingClientRect(); "
               "return [b.left + b.width / 2, b.top + b.height / 2]; })()")
        js("window.scrollTo(0, 0)")
        mouse("mousePressed", *z)
        mouse("mouseMoved", z[0] + 100, z[1] + 60)
        mouse("mouseReleased", z[0] + 100, z[1] + 60)
        dragged = crops()
        u, v = 0.8 - 100 / 1280, 0.3 - 60 / 960  # moved by the drag's share of the dragged image
        for group, cx, cy, w in dragged:
            h = w * 3 // 4
            assert abs(cx - min(max(u * w - ZOOM / 2, 0), w - ZOOM)) <= 2, (group, cx, w)
            assert abs(cy - min(max(v * h - ZOOM / 2, 0), h - ZOOM)) <= 2, (group, cy, h)
        assert all(a[1:3] != b[1:3] for a, b in zip(dragged, after))
        # the metric table sorts by a clicked column, both ways
        th = js("(() => { const t = Array.from(document.querySelectorAll('table.metrics th'))"
                ".find(h => h.textContent.startsWith('effective_resolution ')); const b = t.getBoundingClientRect();"
                " return [b.left + 5, b.top + 5]; })()")
        order = "Array.from(document.querySelectorAll('table.metrics tbody tr')).map(r => r.cells[0].textContent)"
        for _ in range(2):
            mouse("mousePressed", *th)
            mouse("mouseReleased", *th)
            vals = js("Array.from(document.querySelectorAll('table.metrics tbody tr')).map(r => +r.cells[2].dataset.value)")
            assert vals == sorted(vals, reverse=js("document.querySelector('th[data-dir]').dataset.dir") == "desc")
        assert sorted(js(order)) == ["large", "small"]
        shot = base64.b64decode(browser.send("Page.captureScreenshot", {"format": "png"}, session=s)["data"])
        errors = [e for e in browser.events if e["method"] == "Runtime.exceptionThrown"
                  or (e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
                  or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    finally:
        browser.close()
    assert errors == [], errors
    (tmp_path / "report.png").write_bytes(shot)
    if os.environ.get("URAE_REPORT_SCREENSHOT"):  # keep it for people to look at
        Path(os.environ["URAE_REPORT_SCREENSHOT"]).write_bytes(shot)
    with Image.open(tmp_path / "report.png") as im:
        assert im.size == (1400, 1000)
        assert np.asarray(im.convert("L")).std() > 10  # not a blank page
