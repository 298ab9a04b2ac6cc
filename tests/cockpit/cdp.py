"""Headless Chromium driven over the DevTools protocol through a pipe, standard library only.

``--remote-debugging-pipe`` makes Chromium read CDP commands from fd 3 and write replies and
events to fd 4, each a JSON text ended by NUL: no websocket, no Node.js, no downloaded browser
(Playwright speaks the same pipe). Debian's ``chromium`` is the browser.

Every wait polls a condition in the page (``Page.wait``); nothing sleeps for a fixed time.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--remote-debugging-pipe",
]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    return None


class CDPError(Exception):
    """A CDP command failed, or the page threw."""


class Browser:
    def __init__(self, proc: subprocess.Popen[bytes], to_browser: int, from_browser: int) -> None:
        self.proc = proc
        self._out = to_browser
        self._in = from_browser
        self._next = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._replies: dict[int, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._closed = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @classmethod
    def launch(cls, profile: Path, width: int = 1360, height: int = 1000) -> Browser:
        exe = chromium_path()
        if exe is None:
            raise RuntimeError("chromium not installed")
        # Chromium wants the pipes on fds 3 (commands in) and 4 (replies out); a shell puts
        # them there (no preexec_fn: it is unsafe with threads).
        cmd_r, cmd_w = os.pipe()
        evt_r, evt_w = os.pipe()
        # Above 9 so that placing them on 3 and 4 cannot clobber one with the other.
        child_in = fcntl.fcntl(cmd_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_out = fcntl.fcntl(evt_w, fcntl.F_DUPFD_CLOEXEC, 10)
        for fd in (cmd_r, evt_w):
            os.close(fd)
        with open(profile.parent / "chromium.log", "wb") as log:
            proc = subprocess.Popen(
                [
                    "/bin/bash",
                    "-c",
                    f'exec "$@" 3<&{child_in} 4>&{child_out} {child_in}<&- {child_out}>&-',
                    "bash",
                    exe,
                    *CHROMIUM_FLAGS,
                    f"--user-data-dir={profile}",
                    f"--window-size={width},{height}",
                    "about:blank",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                pass_fds=(child_in, child_out),
            )
        os.close(child_in)
        os.close(child_out)
        return cls(proc, cmd_w, evt_r)

    # -- the pipe ------------------------------------------------------------------------------
    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._in, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                with self._cond:
                    if "id" in msg:
                        self._replies[msg["id"]] = msg
                    else:
                        self.events.append(msg)
                    self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session: str | None = None,
        timeout: float = 15,
    ) -> dict[str, Any]:
        with self._lock:
            self._next += 1
            ident = self._next
            msg: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
            if session:
                msg["sessionId"] = session
            os.write(self._out, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cond:
            while ident not in self._replies:
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    raise CDPError(
                        f"{method}: no reply ({'browser gone' if self._closed else 'timeout'})"
                    )
                self._cond.wait(left)
            reply = self._replies.pop(ident)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    def new_page(self) -> Page:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        page = Page(self, session, target)
        for domain in ("Page", "Runtime"):
            page.send(f"{domain}.enable")
        return page

    def grant(self, origin: str, *permissions: str) -> None:
        self.send("Browser.grantPermissions", {"origin": origin, "permissions": list(permissions)})

    def close(self) -> None:
        with contextlib.suppress(CDPError):
            self.send("Browser.close", timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._out, self._in):
            with contextlib.suppress(OSError):
                os.close(fd)


class Page:
    def __init__(self, browser: Browser, session: str, target: str) -> None:
        self.browser = browser
        self.session = session
        self.target = target
        self.describe: Callable[[], str] = lambda: ""
        """What to add to a timeout's message (set by the test rig: the page's alerts)."""

    def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.browser.send(method, params, self.session)

    # -- what went wrong in the page, for assertion messages -----------------------------------
    def console(self) -> list[str]:
        out = []
        for ev in list(self.browser.events):
            if ev.get("sessionId") != self.session:
                continue
            p = ev.get("params", {})
            if ev.get("method") == "Runtime.consoleAPICalled":
                args = " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"])
                out.append(f"console.{p['type']}: {args}")
            elif ev.get("method") == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                out.append(f"exception: {d.get('exception', {}).get('description', d['text'])}")
        return out

    def _why(self) -> str:
        try:
            extra = self.describe()
        except Exception as err:  # only for a message
            extra = repr(err)
        return "\n".join([extra, *self.console()])

    # -- basics --------------------------------------------------------------------------------
    def goto(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})
        self.wait("document.readyState === 'complete' && location.href !== 'about:blank'")

    def eval(self, expr: str) -> Any:
        r = self.send(
            "Runtime.evaluate",
            {"expression": expr, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise CDPError(f"{expr!r}: {d.get('exception', {}).get('description', d['text'])}")
        return r["result"].get("value")

    def wait(self, expr: str, timeout: float = 10, what: str = "") -> Any:
        """Poll ``expr`` in the page until it is truthy; its value (JSON: a DOM node is {},
        so test for nodes with ``!!``)."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            try:
                last = self.eval(expr)
            except CDPError as err:  # e.g. while the page navigates
                last = err
            if last and not isinstance(last, CDPError):
                return last
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {what or expr}: last {last!r}\n{self._why()}"
                )
            time.sleep(0.03)

    def until(self, check: Callable[[], Any], timeout: float = 10, what: str = "") -> Any:
        """Poll a Python condition (e.g. on the page's text) until truthy."""
        deadline = time.monotonic() + timeout
        while not (value := check()):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n" + self._why())
            time.sleep(0.03)
        return value

    # -- input, as a user gives it (real mouse and keyboard events) ----------------------------
    def _centre(self, selector: str) -> tuple[float, float]:
        box = self.wait(
            f"""(() => {{
                const e = document.querySelector({json.dumps(selector)});
                if (!e || e.offsetParent === null) return null;
                e.scrollIntoView({{block: 'center'}});
                const r = e.getBoundingClientRect();
                return [r.x + r.width / 2, r.y + r.height / 2];
            }})()""",
            what=f"{selector} to be visible",
        )
        return float(box[0]), float(box[1])

    def click(self, selector: str) -> None:
        x, y = self._centre(selector)
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1},
            )

    def fill(self, selector: str, text: str) -> None:
        """Click into a field, select what is there and type ``text`` over it."""
        self.click(selector)
        self.eval(f"document.querySelector({json.dumps(selector)}).select()")
        if text:
            self.send("Input.insertText", {"text": text})
        else:
            for kind in ("keyDown", "keyUp"):
                self.send(
                    "Input.dispatchKeyEvent",
                    {"type": kind, "key": "Delete", "code": "Delete", "windowsVirtualKeyCode": 46},
                )

    def text(self, selector: str) -> str:
        return str(self.eval(f"document.querySelector({json.dumps(selector)})?.textContent ?? ''"))

    def screenshot(self, path: Path, width: int = 1360, height: int = 1000) -> None:
        """The whole page, from the top. A PatternFly page scrolls inside its main container
        (the page itself is one screen high), so the window is made as tall as the content of
        the tallest scrolled box for the picture, then put back."""
        h = self.eval(
            """(() => {
                let extra = 0;
                for (const e of document.querySelectorAll('*')) {
                    const y = getComputedStyle(e).overflowY;
                    if ((y === 'auto' || y === 'scroll') && e.scrollHeight > e.clientHeight) {
                        e.scrollTop = 0;
                        extra = Math.max(extra, e.scrollHeight - e.clientHeight);
                    }
                }
                window.scrollTo(0, 0);
                return Math.max(document.documentElement.scrollHeight, window.innerHeight + extra);
            })()"""
        )
        metrics = {"width": width, "deviceScaleFactor": 1, "mobile": False}
        self.send("Emulation.setDeviceMetricsOverride", {**metrics, "height": int(h)})
        try:
            self.wait("new Promise(r => requestAnimationFrame(() => setTimeout(() => r(true), 0)))")
            data = self.send(
                "Page.captureScreenshot",
                {
                    "format": "png",
                    "clip": {"x": 0, "y": 0, "width": width, "height": h, "scale": 1},
                },
            )["data"]
        finally:
            self.send("Emulation.setDeviceMetricsOverride", {**metrics, "height": height})
        path.write_bytes(base64.b64decode(data))
