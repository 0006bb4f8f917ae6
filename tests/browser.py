"""A headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``): stdlib only.

Chromium reads commands on fd 3 and writes replies and events on fd 4, each a JSON object ended by a NUL byte.
``open_page`` loads a file, waits (bounded) until the page says it is done, and returns what a test needs: the
console errors, uncaught exceptions and error log entries, every URL the page tried to fetch, the value of a
JavaScript expression evaluated at the end, and optionally a full-page PNG screenshot.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


FLAGS = [
    "--headless",
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--no-first-run",
    "--no-default-browser-check",
    "--mute-audio",
    "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
    "--remote-debugging-pipe",
]


@dataclass
class PageResult:
    errors: list[str] = field(default_factory=list)  # console errors, exceptions, error log entries
    requests: list[str] = field(default_factory=list)  # every URL the page requested, the page itself included
    value: Any = None  # the result of ``evaluate``
    screenshot: bytes | None = None


class _Pipe:
    def __init__(self, proc: subprocess.Popen[bytes], to_browser: int, from_browser: int) -> None:
        self.proc, self.out, self.inp = proc, to_browser, from_browser
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict[str, Any]:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return dict(reply.get("result", {}))
            self.events.append(reply)

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply from chromium")
            ready, _, _ = select.select([self.inp], [], [], left)
            if ready:
                chunk = os.read(self.inp, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium exited (status {self.proc.poll()})")
                self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return dict(json.loads(raw))


def _high_fd(fd: int) -> int:
    """A copy of ``fd`` numbered 10 or above, so that placing the pipe ends on 3 and 4 cannot clobber it."""
    copy = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return copy


def open_page(path: Path, *, ready: str, evaluate: str, timeout: float = 60.0, width: int = 1280,
              screenshot: bool = False) -> PageResult:
    """Load ``path``; poll the JS expression ``ready`` until it is truthy (at most ``timeout`` s); then evaluate
    ``evaluate`` (its JSON value is returned) and, if asked, capture the whole page."""
    exe = chromium_path()
    if exe is None:
        raise FileNotFoundError("chromium is not installed")
    cmd_r, cmd_w = (_high_fd(fd) for fd in os.pipe())
    ev_r, ev_w = (_high_fd(fd) for fd in os.pipe())

    with tempfile.TemporaryDirectory(prefix="moeprobe-chromium-") as profile:
        args = [exe, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},900", "about:blank"]
        # bash (dash takes one-digit fds only) puts our pipe ends on fds 3 and 4, where Chromium looks for them, and closes the originals.
        wrapper = f'exec "$0" "$@" 3<&{cmd_r} 4>&{ev_w} {cmd_r}<&- {ev_w}>&-'
        proc = subprocess.Popen(
            ["/bin/bash", "-c", wrapper, *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(cmd_r, ev_w),
        )
        os.close(cmd_r)
        os.close(ev_w)
        pipe = _Pipe(proc, cmd_w, ev_r)
        try:
            return _drive(pipe, path, ready, evaluate, timeout, width, screenshot)
        finally:
            try:
                pipe.send("Browser.close", timeout=5)
            except (RuntimeError, TimeoutError, OSError):
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            os.close(cmd_w)
            os.close(ev_r)


def _drive(pipe: _Pipe, path: Path, ready: str, evaluate: str, timeout: float, width: int,
           screenshot: bool) -> PageResult:
    target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Runtime", "Log", "Network", "Page"):
        pipe.send(f"{domain}.enable", session=session)
    pipe.send("Page.navigate", {"url": path.resolve().as_uri()}, session=session)

    def js(expression: str) -> Any:
        got = pipe.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session)
        if "exceptionDetails" in got:
            raise RuntimeError(f"evaluating {expression[:60]!r}: {got['exceptionDetails'].get('text')}")
        return got["result"].get("value")

    deadline = time.monotonic() + timeout
    while not js(ready):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: not ready after {timeout:.0f} s ({ready})")
        time.sleep(0.1)
    result = PageResult(value=js(evaluate))
    if screenshot:
        height = int(js("Math.ceil(document.documentElement.scrollHeight)"))
        pipe.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
        shot = pipe.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=session)
        result.screenshot = base64.b64decode(shot["data"])
    for event in pipe.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            result.errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            result.errors.append("exception: " + str(details.get("exception", {}).get("description") or details.get("text")))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            result.errors.append("log: " + str(params["entry"].get("text")))
        elif method == "Network.requestWillBeSent":
            result.requests.append(str(params.get("request", {}).get("url")))
    return result
