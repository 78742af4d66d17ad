"""Open a page in headless Chromium as a person would, through the DevTools protocol over a pipe
(`--remote-debugging-pipe`: no port, no network, no extra package): what the console reported,
whether each image decoded, and a screenshot.

Debian's `chromium` package; `.ci/run` installs it where it is missing. Elsewhere a test skips
with that reason, but never under CI.
"""
from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser")
# Wait for every image to decode (or fail to), then report each one's natural width.
IMAGES_JS = """Promise.all(Array.from(document.images).map(
    img => img.decode().then(() => img.naturalWidth, () => 0)))"""


def chromium() -> str:
    found = next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)
    if found is None:
        reason = "headless Chromium not found: `apt-get install chromium` (Debian's package; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must have Chromium: {reason}")
        pytest.skip(reason)
    return found


@dataclass(frozen=True)
class PageCheck:
    errors: list[str]  # console errors, uncaught exceptions, failed loads
    image_widths: list[int]  # each <img>'s naturalWidth once decoded (0: it did not decode)
    screenshot: bytes  # PNG of the viewport


class DevTools:
    """A Chromium process and its DevTools pipe: fd 3 carries commands to it, fd 4 its replies and
    events, each a JSON message ended by a NUL byte."""

    def __init__(self, binary: str, width: int, height: int):
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        to_child, self.commands = os.pipe()
        self.replies, from_child = os.pipe()

        def pipe_fds() -> None:  # in the child, before exec: the two ends where Chromium looks for them
            os.dup2(to_child, 3)
            os.dup2(from_child, 4)

        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             "--remote-debugging-pipe", f"--user-data-dir={self.profile}", f"--window-size={width},{height}"],
            pass_fds=(3, 4), preexec_fn=pipe_fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(to_child)
        os.close(from_child)
        self.next_id, self.buffer, self.events = 0, b"", []

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 60) -> dict[str, Any]:
        """Send a command and wait for its reply; events that arrive meanwhile are kept in `events`."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        while True:
            reply = self.receive(timeout)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def receive(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.replies], [], [], left)[0]:
                raise TimeoutError(f"Chromium sent nothing for {timeout} s")
            chunk = os.read(self.replies, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed its DevTools pipe (exit code {self.proc.poll()})")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def wait_for(self, method: str, timeout: float = 60) -> None:
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self.receive(timeout))

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self.commands, self.replies):
            os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)


def errors_in(events: list[dict[str, Any]]) -> list[str]:
    """Console errors, uncaught exceptions and error log entries (a resource that failed to load)."""
    found = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            found.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            found.append("exception: " + params["exceptionDetails"].get("text", ""))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            found.append(f"log ({params['entry']['source']}): {params['entry']['text']}")
    return found


def check_page(path: Path, width: int = 1280, height: int = 1600) -> PageCheck:
    """Load `path` in a fresh headless Chromium; its console errors, decoded image widths and screenshot."""
    browser = DevTools(chromium(), width, height)
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Page.navigate", {"url": Path(path).resolve().as_uri()}, session=session)
        browser.wait_for("Page.loadEventFired")
        widths = browser.send("Runtime.evaluate", {"expression": IMAGES_JS, "awaitPromise": True,
                                                   "returnByValue": True}, session=session)["result"]["value"]
        shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"]
        return PageCheck(errors_in(browser.events), widths, base64.b64decode(shot))
    finally:
        browser.close()
