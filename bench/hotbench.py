"""Hot plug and storms in real-host mode: the unmodified daemon on the FUSE emulator bound on
/sys in a private network namespace, uevents over netlink through pyudev (``rigs.NsRig``, the
rig of tests/bus/test_udev_e2e.py). The delivery is timed by a listener thread of the bench
itself in the namespace (hot plug) or by a pyudev listener there (storm)."""

from __future__ import annotations

import asyncio
import ctypes
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from busrig import MANAGER, NAME, ROOT, PrivateBus
from dbus_fast import Message, MessageType, Variant
from rigs import NsRig

from bench.busbench import G1, P1, connect, msg, ok, rss_kb, stop
from bench.common import REPO, Row, Stats, say, show
from bench.hosts import big_state, hotplug_scenario

MATRIX_IFACE = "org.apmatrix.Apmatrix1.Matrix"


class Stamps:
    """Uevents stamped on CLOCK_MONOTONIC as they arrive, and a wait for them to stop."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.lock = threading.Lock()

    def count(self) -> int:
        with self.lock:
            return len(self.times)

    async def quiet(self, for_s: float = 0.15, timeout: float = 30) -> int:
        """Wait until no uevent arrived for ``for_s``; the count so far."""
        deadline = time.monotonic() + timeout
        last, since = self.count(), time.monotonic()
        while time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            n = self.count()
            if n != last:
                last, since = n, time.monotonic()
            elif time.monotonic() - since >= for_s:
                return n
        return self.count()


class Listener(Stamps):
    """A pyudev listener process in the namespace (bench/udevlisten.py)."""

    def __init__(self, rig: NsRig) -> None:
        super().__init__()
        self.proc = subprocess.Popen(
            rig.argv(sys.executable, "-m", "bench.udevlisten"),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        if "listening" not in first:
            raise RuntimeError(f"listener: {first!r}")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            t = float(line.split(" ", 1)[0])
            with self.lock:
                self.times.append(t)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


def _state_watch(bus: Any, path: str, seen: list[tuple[float, str]]) -> None:
    def on(m: Message) -> bool:
        if (
            m.message_type == MessageType.SIGNAL
            and m.member == "PropertiesChanged"
            and m.path == path
        ):
            state = m.body[1].get("State")
            if state is not None:
                seen.append((time.monotonic(), state.value))
        return False

    bus.add_message_handler(on)


async def _add_match(bus: Any) -> None:
    await bus.call(
        Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="AddMatch", signature="s",
            body=[f"type='signal',sender='{NAME}'"],
        )
    )  # fmt: skip


async def _wait(seen: list[tuple[float, str]], want: str, after: int, timeout: float = 10) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for t, s in seen[after:]:
            if s == want:
                return t
        await asyncio.sleep(0.001)
    raise RuntimeError(f"no State={want} signal")


class NsListener(Stamps):
    """Every uevent in the rig's network namespace, stamped in this process: a thread that
    joins the namespace (setns is per thread for the network namespace) and reads the
    udev-format messages (netlink group 2) the daemon's monitor reads. The write, the
    delivery and the signal are then stamped on one clock in one process."""

    def __init__(self, netns: str) -> None:
        super().__init__()
        self.error: BaseException | None = None
        self._stop = False
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(netns, ready), daemon=True)
        self.thread.start()
        if not ready.wait(10) or self.error is not None:
            raise RuntimeError(f"listener: {self.error!r}")

    def _run(self, netns: str, ready: threading.Event) -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_KOBJECT_UEVENT)
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
            sock.bind((0, 2))
            sock.settimeout(0.2)
        except BaseException as err:
            self.error = err
            ready.set()
            return
        ready.set()
        with sock:
            while not self._stop:
                try:
                    sock.recv(1 << 16)
                except TimeoutError:
                    continue
                t = time.monotonic()
                with self.lock:
                    self.times.append(t)

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)


CLONE_NEWNET = 0x40000000
NETLINK_KOBJECT_UEVENT = 15
SO_RCVBUFFORCE = 33


async def _hotplug(
    address: str, rig: NsRig, listener: NsListener, reps: int, setup: bool
) -> dict[str, Any]:
    bus = await connect(address)
    if setup:
        await ok(bus, msg(ROOT, MANAGER, "Reserve", "auau", [[5], list(range(85))]))
        opts = {"adapters": Variant("au", [5]), "domains": Variant("au", list(range(85)))}
        await ok(bus, msg(ROOT, MANAGER, "CreateMatrix", "sa{sv}", [G1, opts]))
    seen: list[tuple[float, str]] = []
    _state_watch(bus, P1, seen)
    await _add_match(bus)
    await listener.quiet()
    config = rig.root / "devices/ap/card05/config"
    loop = asyncio.get_running_loop()
    out: dict[str, list[float]] = {"ours": [], "floor": [], "uevents": []}
    for _ in range(reps):
        mark = len(seen)
        await loop.run_in_executor(None, config.write_text, "0\n")
        await _wait(seen, "degraded", mark)
        await listener.quiet()
        before = listener.count()
        mark = len(seen)
        t_write = time.monotonic()
        await loop.run_in_executor(None, config.write_text, "1\n")
        t_sig = await _wait(seen, "active", mark)
        n = await listener.quiet()
        with listener.lock:
            t_last = listener.times[n - 1]
        out["ours"].append(t_sig - t_write)
        out["floor"].append(t_last - t_write)
        out["uevents"].append(float(n - before))
    bus.disconnect()
    return out


def _spin() -> subprocess.Popen[bytes]:
    """A CPU-bound process of the bench's own: one core busy while hot plug is measured."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def hotplug(quick: bool, work: Path) -> tuple[list[Row], dict[str, Any]]:
    reps = 10 if quick else 100
    say(f"== hot plug: card 05 with 85 queues back (config 0 -> 1), netlink, {reps} runs x 2")
    scenario = hotplug_scenario(work)
    rig = NsRig.start(str(scenario))
    bus = PrivateBus.start()
    raw: dict[str, Any] = {}
    try:
        d, _ = rig.daemon(bus.address, work / "hotplug-state")
        listener = NsListener(rig.netns)
        try:
            raw["idle"] = asyncio.run(_hotplug(bus.address, rig, listener, reps, True))
            spin = _spin()
            try:
                raw["loaded"] = asyncio.run(_hotplug(bus.address, rig, listener, reps, False))
            finally:
                spin.kill()
                spin.wait()
        finally:
            listener.close()
            stop(d)
    finally:
        bus.stop()
        rig.close()
    rows = []
    for case, label in (("idle", "idle"), ("loaded", "one core busy with the bench's own spin")):
        so, sf = Stats.of(raw[case]["ours"]), Stats.of(raw[case]["floor"])
        show(f"{case}: write -> State=active signal received", so)
        show(f"{case}: write -> last uevent delivered", sf)
        n_ev = int(Stats.of(raw[case]["uevents"]).median)
        r = so.p99 / sf.p99
        rows.append(
            Row(
                f"hot plug, adapter with 85 queues back, {label}: write -> State=active signal",
                f"p99 {so.p99 * 1e3:.1f} ms (median {so.median * 1e3:.1f})",
                f"write -> last of {n_ev} uevents delivered, same clock and process: "
                f"p99 {sf.p99 * 1e3:.1f} ms (median {sf.median * 1e3:.1f})",
                r,
                "p99 <= 2x delivery p99",
                r <= 2.0,
                raw={"ours": so.__dict__, "floor": sf.__dict__},
            )
        )
    return rows, raw


# -- storm -----------------------------------------------------------------------------------
async def _storm(address: str, rig: NsRig, cards: int) -> dict[str, Any]:
    bus = await connect(address)
    counts: dict[str, int] = {}

    def on(m: Message) -> bool:
        if m.message_type == MessageType.SIGNAL and m.sender != "org.freedesktop.DBus":
            kind = (
                "settling" if m.path == ROOT else "adapter" if "/adapters/" in m.path else "other"
            )
            counts[kind] = counts.get(kind, 0) + 1
        return False

    bus.add_message_handler(on)
    await _add_match(bus)
    loop = asyncio.get_running_loop()
    paths = [rig.root / f"devices/ap/card{a:02x}/online" for a in range(cards)]

    def flip(value: str) -> None:
        for p in paths:
            p.write_text(value)

    t0 = time.monotonic()
    await loop.run_in_executor(None, flip, "0\n")
    written = time.monotonic()
    last = f"{ROOT}/adapters/{cards - 1:02x}"
    while True:  # wait for the last card to be seen offline and Settling to be over
        (online,) = await ok(
            bus, msg(last, "org.freedesktop.DBus.Properties", "Get", "ss",
                     ["org.apmatrix.Apmatrix1.Adapter", "Online"])
        )  # fmt: skip
        (settling,) = await ok(
            bus, msg(ROOT, "org.freedesktop.DBus.Properties", "Get", "ss", [MANAGER, "Settling"])
        )
        if not online.value and not settling.value:
            break
        await asyncio.sleep(0.05)
    done = time.monotonic()
    await ok(bus, msg(ROOT, "org.freedesktop.DBus.Peer", "Ping"))
    bus.disconnect()
    return {"signals": counts, "write_s": written - t0, "settled_s": done - t0}


def storm(quick: bool, work: Path, state1000: Path) -> tuple[list[Row], dict[str, Any]]:
    cards = 16 if quick else 256
    say(f"== storm: {cards} cards of the big host offline (netlink + pyudev); memory")
    rig = NsRig.start("big")
    bus = PrivateBus.start()
    raw: dict[str, Any] = {}
    rows: list[Row] = []
    try:
        import shutil

        state = work / "storm-state"
        shutil.copytree(state1000, state)
        d, took = rig.daemon(bus.address, state, timeout=600)
        pid = rig.daemon_pid(d)
        raw["startup_fuse_s"] = took
        raw["memory_after_ready_kb"] = rss_kb(pid)
        say(
            f"  real-host mode over FUSE, 1,000 autostart matrices: READY=1 after {took:.2f} s, "
            f"RSS {raw['memory_after_ready_kb']['VmRSS'] / 1024:.1f} MiB"
        )
        listener = Listener(rig)
        try:
            raw |= asyncio.run(_storm(bus.address, rig, cards))
            heard = asyncio.run(listener.quiet(0.5, 120))
        finally:
            listener.close()
        raw["memory_after_storm_kb"] = rss_kb(pid)
        d.terminate()
        log = d.stderr()
        d.close()
    finally:
        bus.stop()
        rig.close()
    sent = rig.uevents_sent()
    found = re.findall(
        r"absorbed (\d+) uevents.*?(\d+) received, (\d+) handled, (\d+) batches", log
    )
    received, handled = (int(found[-1][1]), int(found[-1][2])) if found else (0, 0)
    lost = log.count("uevents were lost")
    want = cards * 257
    raw |= {"expected": want, "emulator_sent": sent, "listener_heard": heard,
            "daemon_received": received, "daemon_handled": handled, "overflows": lost,
            "batches": [list(map(int, f)) for f in found]}  # fmt: skip
    say(
        f"  uevents: expected {want}, emulator sent {sent}, listener heard {heard}, daemon "
        f"received {received}, handled {handled}, overflows {lost}; signals {raw['signals']}; "
        f"settled after {raw['settled_s']:.2f} s"
    )
    # Cumulative counts on both ends (the start-up's own uevents included): what the emulator
    # sent, what the daemon received and handled. The pyudev listener is only a witness.
    sent_n = sent[0] if sent else want
    zero_lost = received == handled == sent_n and lost == 0 and (sent is None or sent[1] == 0)
    coalesced = (
        raw["signals"].get("adapter", 0) <= 2 * cards and raw["signals"].get("other", 0) == 0
    )
    rows.append(
        Row(
            f"storm of {want:,} uevents ({cards} cards offline at once)",
            f"{handled:,} handled of {received:,} received; {raw['signals'].get('adapter', 0)} "
            f"adapter signals, {raw['signals'].get('settling', 0)} Settling signals; "
            f"settled {raw['settled_s']:.1f} s",
            f"{sent_n:,} sent by the emulator since the mount (start-up included; "
            f"{heard:,} of the storm heard by a plain pyudev listener)",
            handled / sent_n if sent_n else None,
            "zero lost; signals coalesced",
            zero_lost and coalesced,
            raw={k: raw[k] for k in ("signals", "expected", "emulator_sent", "daemon_handled")},
        )
    )
    mem = raw["memory_after_ready_kb"]["VmRSS"] / 1024
    hwm = raw["memory_after_storm_kb"]["VmHWM"] / 1024
    rows.append(
        Row(
            "resident memory, big host, 1,000 matrices (real-host mode, FUSE on /sys)",
            f"{mem:.1f} MiB after READY=1; peak {hwm:.1f} MiB after the storm",
            "-",
            None,
            "<= 60 MB",
            mem * 2**20 <= 60e6 and hwm * 2**20 <= 60e6,
            raw={
                "after_ready": raw["memory_after_ready_kb"],
                "after_storm": raw["memory_after_storm_kb"],
            },
        )
    )
    return rows, raw


def run(quick: bool, work: Path) -> tuple[list[Row], dict[str, Any]]:
    from bench import idlebench

    rows, raw = hotplug(quick, work)
    state = big_state(work / "state-storm-src", 1000)
    r, raw_storm = storm(quick, work, state)
    r_idle, raw_idle = idlebench.idle(quick, work, state)
    return rows + r + r_idle, {"hotplug": raw, "storm": raw_storm, "idle": raw_idle}
