"""A small Chrome DevTools Protocol client for tests: start headless Chromium, open a page, collect console errors
and exceptions, evaluate JavaScript, take a screenshot. Uses the `websockets` package's synchronous client."""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary ($RELTAG_CHROMIUM first), or None."""
    env = os.environ.get("RELTAG_CHROMIUM")
    if env:
        return env if Path(env).exists() else None
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """Headless Chromium with one page target, driven over CDP.

    Use as a context manager; `errors` collects console errors (Runtime.consoleAPICalled type error,
    Log.entryAdded level error) and uncaught exceptions (Runtime.exceptionThrown) of the page since the last
    navigate(), as one-line strings; `requests` the URLs it requested (data: URIs included).
    """

    def __init__(self, binary: str, width: int = 1280, height: int = 900, timeout: float = 30.0):
        self.binary, self.width, self.height, self.timeout = binary, width, height, timeout
        self.errors: list[str] = []
        self.requests: list[str] = []  # URLs the page asked for since the last navigate() (Network domain)
        self._ids = itertools.count(1)

    # --- process and connection
    def __enter__(self) -> Browser:
        from websockets.sync.client import connect

        self._profile = tempfile.mkdtemp(prefix="reltag-chromium-")
        self._proc = subprocess.Popen(
            [self.binary, "--headless=new", "--remote-debugging-port=0", f"--user-data-dir={self._profile}",
             "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
             "--disable-extensions", "--disable-background-networking", "--hide-scrollbars",
             f"--window-size={self.width},{self.height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            port_file = Path(self._profile) / "DevToolsActivePort"
            deadline = time.monotonic() + self.timeout
            while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
                if self._proc.poll() is not None:
                    err = self._proc.stderr.read().decode(errors="replace")[-2000:]
                    raise RuntimeError(
                        f"chromium exited with {self._proc.returncode} before listening: {err}"
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError(f"chromium wrote no {port_file} within {self.timeout} s")
                time.sleep(0.05)
            port, path = port_file.read_text().splitlines()[:2]
            self._ws = connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=self.timeout)
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self._session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                self.call(f"{domain}.enable", session=True)
            self.call("Emulation.setDeviceMetricsOverride", session=True, width=self.width, height=self.height,
                      deviceScaleFactor=1, mobile=False)  # fmt: skip
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        ws = getattr(self, "_ws", None)
        if ws is not None:
            try:
                ws.close()
            except Exception:
                pass
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc.stderr.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    # --- protocol
    def _note(self, msg: dict) -> None:
        method, p = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled" and p.get("type") == "error":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            self.errors.append(f"console.error: {text}")
        elif method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            self.errors.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
        elif method == "Network.requestWillBeSent":
            self.requests.append(p.get("request", {}).get("url", ""))
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            e = p["entry"]
            self.errors.append(f"log {e.get('source')}: {e.get('text')} {e.get('url', '')}".strip())

    def _recv(self, deadline: float) -> dict:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no answer from chromium in time")
        msg = json.loads(self._ws.recv(timeout=left))
        self._note(msg)
        return msg

    def call(self, method: str, session: bool = False, **params) -> dict:
        """Send one command (to the page's session when `session`), return its result; raise on a CDP error."""
        mid = next(self._ids)
        msg = {"id": mid, "method": method, "params": params}
        if session:
            msg["sessionId"] = self._session
        self._ws.send(json.dumps(msg))
        deadline = time.monotonic() + self.timeout
        while True:
            m = self._recv(deadline)
            if m.get("id") == mid:
                if "error" in m:
                    raise RuntimeError(f"CDP {method} failed: {m['error']}")
                return m.get("result", {})

    def wait_event(self, method: str) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            m = self._recv(deadline)
            if m.get("method") == method and m.get("sessionId") == self._session:
                return m.get("params", {})

    # --- page
    def navigate(self, url: str) -> None:
        """Open url and wait for its load event (images of the page decoded by then)."""
        self.errors, self.requests = [], []
        res = self.call("Page.navigate", session=True, url=url)
        if res.get("errorText"):
            raise RuntimeError(f"navigating to {url} failed: {res['errorText']}")
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str):
        """Value of a JavaScript expression in the page (JSON-serialisable)."""
        res = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True,
                        awaitPromise=True)  # fmt: skip
        if "exceptionDetails" in res:
            raise RuntimeError(f"evaluating {expression!r} raised: {res['exceptionDetails']}")
        return res["result"].get("value")

    def screenshot(self, full_page: bool = False) -> bytes:
        """PNG of the viewport (or of the whole page, at the viewport's width)."""
        params: dict = {"format": "png"}
        if full_page:
            h = int(self.evaluate("Math.ceil(document.documentElement.scrollHeight)"))
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": self.width, "height": h, "scale": 1})  # fmt: skip
        return base64.b64decode(self.call("Page.captureScreenshot", session=True, **params)["data"])
