"""Headless Chromium driven over its DevTools protocol (the `websockets` package): open a page served from
localhost, type into it, read what it records, and every request, console message and exception it makes.

Chromium is started with a proxy that refuses every connection (127.0.0.1:9, the discard port, closed), and
localhost bypasses proxies: a request outside localhost fails, and shows in `requests` and `failed`.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from conftest import CHROMIUM_FLAGS


class Page:
    def __init__(self, ws):
        self.ws, self.next_id = ws, 0
        self.requests: list[str] = []
        self.failed: list[str] = []
        self.console: list[tuple[str, str]] = []  # (type, text): console.* calls, log entries, exceptions

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self._event(msg)

    def _event(self, msg):
        method, p = msg.get("method"), msg.get("params", {})
        if method == "Network.requestWillBeSent":
            self.requests.append(p["request"]["url"])
        elif method == "Network.loadingFailed":
            self.failed.append(f"{p.get('errorText')} {p.get('requestId')}")
        elif method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            self.console.append((p["type"], text))
        elif method == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            self.console.append(("exception", d.get("exception", {}).get("description") or d.get("text", "")))
        elif method == "Log.entryAdded":
            self.console.append((p["entry"]["level"], p["entry"]["text"]))

    def eval(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(r["exceptionDetails"])
        return r["result"].get("value")

    def state(self) -> dict:
        return json.loads(self.eval("JSON.stringify(window.abliterate || {})") or "{}")

    def wait(self, statuses: tuple[str, ...], timeout: float) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            state = self.state()
            if state.get("status") in statuses or state.get("status") == "error":
                return state
            time.sleep(0.25)
        raise TimeoutError(f"the page did not reach {statuses} in {timeout} s: {self.state()}; {self.console}")

    def type(self, selector: str, text: str) -> None:
        """Focus the element and type `text` as keyboard input, then press Enter."""
        self.eval(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", text=text)
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13,
                      **({"text": "\r"} if kind == "keyDown" else {}))

    def screenshot(self, png: Path) -> Path:
        png.parent.mkdir(parents=True, exist_ok=True)
        png.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return png

    def errors(self) -> list[str]:
        return [f"{kind}: {text}" for kind, text in self.console if kind in ("error", "exception", "assert")]


@contextmanager
def chromium_page(profile: Path, url: str, width: int = 1280, height: int = 1200):
    """A Page of Chromium showing `url`, its DevTools events recorded from before the first request."""
    from websockets.sync.client import connect

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    proc = subprocess.Popen([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
                             "--proxy-server=127.0.0.1:9", f"--window-size={width},{height}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    found = threading.Event()

    def read():  # the stderr pipe is drained all along, or Chromium blocks on a full pipe
        for line in proc.stderr:
            lines.append(line)
            if "DevTools listening on" in line:
                found.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not found.wait(60):
            raise RuntimeError("Chromium did not start its DevTools server: " + "".join(lines[-20:]))
        browser_url = re.search(r"ws://\S+", next(x for x in lines if "DevTools listening on" in x)).group(0)
        port = browser_url.split(":")[2].split("/")[0]
        import urllib.request

        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        target = next(t for t in targets if t["type"] == "page")
        with connect(target["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as ws:
            page = Page(ws)
            for domain in ("Network", "Runtime", "Log", "Page"):
                page.call(f"{domain}.enable")
            page.call("Page.navigate", url=url)
            yield page
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
