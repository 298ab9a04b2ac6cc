"""The Cockpit rig: a private system bus with our shipped policy (tests/bus/busrig.py), apmatrixd
on a simulated host started as systemd would, ``cockpit-ws --local-session=cockpit-bridge`` on
127.0.0.1 finding the page in ``cockpit/`` through ``XDG_DATA_HOME``, and headless Chromium
driven over the DevTools pipe (cdp.py).

How cockpit-bridge finds the bus: it is GLib's GDBus (Cockpit 287, the C bridge), and
``g_bus_get(G_BUS_TYPE_SYSTEM)`` takes ``DBUS_SYSTEM_BUS_ADDRESS`` when set; cockpit-ws hands
its environment to the bridge it spawns, so setting it on cockpit-ws is enough (the tests see
the daemon's objects through the page, which proves it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "bus"))

from busrig import Daemon, PrivateBus, as_user, start_daemon  # noqa: E402
from cdp import Browser, Page, chromium_path  # noqa: E402
from rigs import free_port  # noqa: E402

REPO = HERE.parent.parent
PACKAGE = REPO / "cockpit" / "dist"
COCKPIT_WS = next(
    (p for p in ("/usr/lib/cockpit/cockpit-ws", "/usr/libexec/cockpit-ws") if os.path.exists(p)),
    None,
)
PAGE = "/cockpit/@localhost/apmatrix/index.html"


def missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (the bridge runs as the caller; only root may change matrices)"
    if COCKPIT_WS is None:
        return "cockpit-ws not installed (apt-get install cockpit-ws)"
    if shutil.which("cockpit-bridge") is None:
        return "cockpit-bridge not installed (apt-get install cockpit-bridge)"
    if chromium_path() is None:
        return "chromium not installed (apt-get install chromium)"
    if shutil.which("dbus-daemon") is None:
        return "dbus-daemon not installed"
    return None


@dataclass
class Cockpit:
    proc: subprocess.Popen[bytes]
    base: str
    log: Path

    @classmethod
    def start(cls, bus_address: str, home: Path, uid: int = 0) -> Cockpit:
        """cockpit-ws, and so its bridge, as ``uid``: root is a session with administrative
        access on; another user (no sudo to turn it on) one where it is off."""
        share = home / "share"
        (share / "cockpit").mkdir(parents=True)
        # Where a user's own Cockpit packages live (~/.local/share/cockpit/<name>).
        (share / "cockpit" / "apmatrix").symlink_to(PACKAGE)
        if uid:
            for p in (home, share, share / "cockpit"):
                os.chown(p, uid, uid)
        env = dict(
            os.environ,
            DBUS_SYSTEM_BUS_ADDRESS=bus_address,
            XDG_DATA_HOME=str(share),
            HOME=str(home),
        )
        env.pop("DBUS_SESSION_BUS_ADDRESS", None)
        log = home / "cockpit-ws.log"
        assert COCKPIT_WS is not None
        for _attempt in range(3):  # the port may be taken between free_port() and bind
            port = free_port()
            with open(log, "wb") as f:
                proc = subprocess.Popen(
                    [
                        *(as_user(uid) if uid else []),
                        COCKPIT_WS,
                        "--no-tls",
                        "--local-session=cockpit-bridge",
                        "--address=127.0.0.1",
                        f"--port={port}",
                    ],
                    env=env,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    cwd=home,
                )
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 10
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(base + PAGE, timeout=2) as r:
                        if r.status == 200:
                            return cls(proc, base, log)
                except (urllib.error.URLError, ConnectionError):
                    time.sleep(0.05)
            proc.kill()
            proc.wait()
        raise RuntimeError(f"cockpit-ws did not serve the page: {log.read_text()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Stack:
    bus: str
    daemons: list[Daemon]
    cockpit: Cockpit
    browser: Browser
    page: Page
    dir: Path

    @property
    def daemon(self) -> Daemon:
        return self.daemons[-1]

    def start_daemon(self, *args: str) -> Daemon:
        """Another apmatrixd on the same bus (after the last one stopped)."""
        self.daemons.append(start_daemon(self.bus, args or ("--simulate",)))
        return self.daemon

    @property
    def url(self) -> str:
        return self.cockpit.base + PAGE

    def open(self) -> Page:
        self.page.describe = self.describe
        self.page.goto(self.url)
        self.page.wait("document.getElementById('app')?.dataset.ready === 'true'", 15, "page ready")
        return self.page

    def describe(self) -> str:
        alerts = self.page.eval(
            "[...document.querySelectorAll('#alerts .alert')].map(a => a.textContent).join('\\n')"
        )
        return f"alerts: {alerts}\ndaemon log:\n{self.daemon.stderr()[-3000:]}"


StackFactory = Callable[..., Stack]


def disabled_reason(stack: Stack, selector: str) -> str | None:
    """Why the page offers a change button disabled (its tooltip's text), or None when it may
    be pressed."""
    out = stack.page.eval(
        f"(e => e.getAttribute('aria-disabled') === 'true' ? e.dataset.disabledReason : null)"
        f"(document.querySelector({json.dumps(selector)}))"
    )
    return None if out is None else str(out)


def start_stack(
    cleanups: list[Callable[[], None]], *daemon_args: str, uid: int = 0, ready_timeout: float = 15
) -> Stack:
    """Bus, daemon (``--simulate`` unless ``daemon_args``; READY=1 within ``ready_timeout``
    s), cockpit-ws (as ``uid``) and a browser tab, in that order; each part's undo is appended
    to ``cleanups`` (run them in reverse)."""
    d = Path(tempfile.mkdtemp(prefix="apm-cockpit-", dir="/tmp"))
    cleanups.append(lambda: shutil.rmtree(d, ignore_errors=True))
    bus = PrivateBus.start()
    cleanups.append(bus.stop)
    daemon = start_daemon(bus.address, daemon_args or ("--simulate",), ready_timeout=ready_timeout)
    daemons = [daemon]

    def stop_daemons() -> None:
        for dmn in daemons:
            rc = dmn.terminate()
            err = dmn.stderr()
            dmn.close()
            assert rc == 0 and "Traceback" not in err, err

    cleanups.append(stop_daemons)
    cockpit = Cockpit.start(bus.address, d, uid)
    cleanups.append(cockpit.stop)
    browser = Browser.launch(d / "profile")
    cleanups.append(browser.close)
    page = browser.new_page()
    page.send(
        "Emulation.setDeviceMetricsOverride",
        {"width": 1360, "height": 1000, "deviceScaleFactor": 1, "mobile": False},
    )
    return Stack(bus.address, daemons, cockpit, browser, page, d)
