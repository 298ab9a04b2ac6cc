"""Hot plug, degrade/restore, drift and storms on the in-process emulator.

The daemon's own pieces: the emulator's uevents go through :class:`SimSource` (deque + pipe +
``add_reader``), the pump batches them, :class:`HotPlug` re-reads and the service emits one
Changes per burst. The same path as ``--simulate``; the pyudev path is in tests/e2e.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from rigs import need_tool, unavailable

from apmatrixd import hotplug
from apmatrixd.core import Apqn, HostOwned
from apmatrixd.events import FEW_FLIPS, ApEvent, EventPump, Scope, SimSource, classify
from apmatrixd.hotplug import HotPlug, drift_text, scope_of
from apmatrixd.kernel import Kernel, KernelError, MdevInfo, TreeSysfs
from apmatrixd.service import Changes, Service, ops
from apmatrixd.service.executor import Stopping
from apmatrixd.sim.model import Host
from apmatrixd.store import Store

G1 = "11111111-1111-4111-8111-111111111111"
G2 = "22222222-2222-4222-8222-222222222222"
X = "99999999-9999-4999-8999-999999999999"


class Rig:
    def __init__(self, host: Host, **kw: Any) -> None:
        self.host = host
        self.svc = Service(Kernel(TreeSysfs(host)))
        self.svc.load()
        self.seen: list[Changes] = []
        self.svc.subscribe(self.seen.append)
        self.loop = asyncio.get_running_loop()
        kw.setdefault("settle", 0.02)
        kw.setdefault("rescan_interval", 0)
        self.hp = HotPlug(self.svc, self.loop, **kw)
        self.source = SimSource(self.hp.pump, host)
        self.hp.start(self.source)

    def write(self, path: str, value: str) -> None:
        self.host.write(path, value.encode())

    async def idle(self, timeout: float = 10.0) -> None:
        """Until every uevent so far has been handled and nothing is pending."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            p, ex = self.hp.pump, self.svc.executor
            if not p.busy and not self.source._queue and not p.settling and not ex.busy:
                await asyncio.sleep(p.settle * 2)
                if not (p.busy or self.source._queue or ex.busy or self.hp.rechecking):
                    return
        raise AssertionError(f"not idle: {self.hp.stats()}")

    def drifts(self) -> list[tuple[str, str]]:
        return [d for c in self.seen for d in c.drift]

    def close(self) -> None:
        self.hp.close()


def run(scenario: str, body: Callable[[Rig], Awaitable[None]], **kw: Any) -> None:
    async def go() -> None:
        rig = Rig(Host.from_name(scenario), **kw)
        try:
            await body(rig)
        finally:
            rig.close()

    asyncio.run(go())


def two_guests(svc: Service) -> None:
    svc.reserve([5, 6], [4, 0x47])
    svc.create_matrix(G1, adapters=[5, 6], domains=[4], name="g1")
    svc.create_matrix(G2, adapters=[6], domains=[0x47], name="g2")


# -- typed events ---------------------------------------------------------------------------------
def test_classify() -> None:
    e = classify({"ACTION": "change", "DEVPATH": "/devices/ap/card05", "SUBSYSTEM": "ap",
                  "CONFIG": "0", "SEQNUM": "7"})  # fmt: skip
    assert e == ApEvent("change", "card", "/devices/ap/card05", adapter=5, config=False)
    q = classify({"ACTION": "bind", "DEVPATH": "/devices/ap/card05/05.00ab", "SUBSYSTEM": "ap",
                  "DRIVER": "vfio_ap"})  # fmt: skip
    assert q is not None
    assert (q.action, q.kind, q.adapter, q.domain) == ("bind", "queue", 5, 0xAB)
    root = classify({"ACTION": "change", "DEVPATH": "/devices/ap", "SUBSYSTEM": "ap",
                     "APMASK": "0x00\n"})  # fmt: skip
    assert root is not None and root.kind == "bus" and root.mask
    m = classify({"ACTION": "add", "DEVPATH": f"/devices/vfio_ap/matrix/{G1}", "SUBSYSTEM": "mdev"})
    assert m is not None and m.uuid == G1
    rfc = classify({"ACTION": "change", "DEVPATH": "/devices/ap_matrix/matrix",
                    "SUBSYSTEM": "ap_matrix", "MDEV_STATE": "registered"})  # fmt: skip
    assert rfc is not None and rfc.kind == "matrix" and rfc.mdev_state == "registered"
    assert classify({"ACTION": "add", "DEVPATH": "/devices/pci0/usb1", "SUBSYSTEM": "usb"}) is None
    assert classify({"ACTION": "add", "DEVPATH": "/devices/ap/cardzz", "SUBSYSTEM": "ap"}) is None


DEVICE_PROBE = """
import json, sys
import pyudev
from apmatrixd.events import SUBSYSTEMS, classify, classify_device
from apmatrixd.sim.uevent import NetlinkSink, decode, encode
from apmatrixd.sim.vfs import Uevent

G1 = sys.argv[1]
sent = [
    Uevent("change", "/devices/ap/card05", "ap", 7, "ap_card", "cex4card",
           {"CONFIG": "1", "MODE": "cca", "DEV_TYPE": "000E", "MODALIAS": "ap:t0E"}),
    Uevent("change", "/devices/ap/card05/05.00ab", "ap", 8, "ap_queue", "vfio_ap",
           {"CONFIG": "0", "MODE": "cca"}),
    Uevent("change", "/devices/ap/card06/06.0004", "ap", 9, "ap_queue", "cex4queue",
           {"ONLINE": "0", "MODE": "accel"}),
    Uevent("bind", "/devices/ap/card06/06.0047", "ap", 10, "ap_queue", "vfio_ap"),
    Uevent("change", "/devices/ap", "ap", 11, None, None, {"AQMASK": "0x" + "f" * 64 + "\\n"}),
    Uevent("change", "/devices/ap", "ap", 12, None, None,
           {"BINDINGS": "complete", "COMPLETECOUNT": "1"}),
    Uevent("change", "/devices/vfio_ap/matrix", "matrix", 13, None, None,
           {"MDEV_STATE": "registered"}),
    Uevent("add", f"/devices/vfio_ap/matrix/{G1}", "mdev", 14, "mdev", "vfio_mdev"),
]
monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="udev")
for subsystem in SUBSYSTEMS:
    monitor.filter_by(subsystem)
monitor.start()
sink = NetlinkSink()
for u in sent:
    sink.send(u)
out = []
for u in sent:
    device = monitor.poll(timeout=5)
    assert device is not None, u
    out.append([repr(classify_device(device)), repr(classify(decode(encode(u))[1]))])
print(json.dumps(out))
"""


def test_a_monitors_device_is_classified_as_its_properties_are() -> None:
    """The pyudev path (libudev's own fields, the rest among its properties) gives the same
    events as the properties, for each kind of uevent the daemon acts on."""
    if os.geteuid() != 0:
        unavailable("needs root (a private network namespace)", installable=False)
    need_tool("unshare", "util-linux")
    r = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", DEVICE_PROBE, G1],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    pairs = json.loads(r.stdout)
    assert len(pairs) == 8
    for by_device, by_properties in pairs:
        assert by_device == by_properties
        assert by_device != "None"


def test_scope() -> None:
    def ev(action: str, path: str, **props: str) -> ApEvent:
        e = classify({"ACTION": action, "DEVPATH": path, "SUBSYSTEM": "ap", **props})
        assert e is not None
        return e

    s = scope_of([
        ev("change", "/devices/ap/card05", ONLINE="1"),
        ev("change", "/devices/ap/card05/05.0004", ONLINE="1"),
        ev("change", "/devices/ap/card07/07.0004", CONFIG="0"),
        ev("remove", "/devices/ap/card06/06.0004"),
    ])  # fmt: skip
    assert (s.cards, s.whole, s.named) == ({5, 7}, set(), {6: {4}})
    assert (s.everything, s.pool, s.events) == (False, False, 4)
    assert scope_of([ev("change", "/devices/ap", AQMASK="0x0\n")]).pool
    assert scope_of([], lost=True).everything


def test_drift_text() -> None:
    from apmatrixd.core import Matrix

    k = MdevInfo(G1, frozenset({5, 6, 7}), frozenset({4}), frozenset({4}))
    r = Matrix(G1, frozenset({5, 6}), frozenset({4}), frozenset({4}))
    assert drift_text(k, r) == "adapters: kernel 05-07 vs registry 05,06"


# -- hot plug -------------------------------------------------------------------------------------
@pytest.mark.parametrize("scenario", ["default", "rfc2017"])
def test_card_config_off_and_on_degrades_and_restores(scenario: str) -> None:
    async def body(r: Rig) -> None:
        two_guests(r.svc)
        assert r.svc.matrix(G1).state == "active"
        r.seen.clear()
        r.write("devices/ap/card05/config", "0")
        await r.idle()
        g1 = r.svc.matrix(G1)
        assert g1.state == "degraded"
        assert g1.guest_apqns == (Apqn(6, 4),)  # the whole adapter 05 left the guest
        assert r.svc.matrix(G2).state == "active"
        assert not r.svc.adapter(5).configured
        assert G1 in set().union(*(c.matrices_changed for c in r.seen))
        assert 5 in set().union(*(c.adapters_changed for c in r.seen))
        assert r.drifts() == []
        r.write("devices/ap/card05/config", "1")
        await r.idle()
        assert r.svc.matrix(G1).state == "active"
        assert set(r.svc.matrix(G1).guest_apqns) == {Apqn(5, 4), Apqn(6, 4)}
        assert r.svc.adapter(5).configured
        assert r.drifts() == []
        assert r.hp.pump.received == r.hp.pump.handled > 0

    run(scenario, body)


def test_a_card_is_read_in_a_thread_of_its_own_only_for_its_flip_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A burst that is a card's config flip whole has the card read in a thread of its own as
    the burst is handed over, and the resync takes that reading (here it is marked: it says
    the card is offline). A burst that is more than that flip (here the card flips back within
    it) has it read with the rest of the resync, as ever."""

    async def body(r: Rig) -> None:
        two_guests(r.svc)
        r.write("devices/ap/card05/config", "0")
        await r.idle()
        k = r.svc.kernel
        real = k.read_card
        reads: list[tuple[int, bool]] = []

        def read_card(adapter: int) -> tuple[bool, bool] | None:
            early = threading.current_thread().name.startswith("apmatrixd-early")
            reads.append((adapter, early))
            state = real(adapter)
            if early and state is not None:  # marked, as if read before some later change
                return (False, state[1])
            return state

        monkeypatch.setattr(k, "read_card", read_card)
        r.seen.clear()
        r.write("devices/ap/card05/config", "1")
        await r.idle()
        assert reads == [(5, True)]  # read once, in that thread; not again after
        assert r.hp.stats()["early_reads"] == 1 and len(r.seen) == 1
        assert not r.svc.adapter(5).online  # that reading was taken
        assert r.svc.matrix(G1).state == "active" and r.svc.adapter(5).configured
        reads.clear()
        r.write("devices/ap/card05/config", "0")
        r.write("devices/ap/card05/config", "1")  # one burst: not a flip whole
        await r.idle()
        assert reads == [(5, False)] and r.hp.stats()["early_reads"] == 1
        assert r.svc.adapter(5).online
        assert r.svc.adapter(5).configured and r.svc.matrix(G1).state == "active"

    run("default", body)


def test_a_cards_flip_reads_its_online_and_config_not_its_type() -> None:
    """A card's own uevents change its online and config, never its type (the bus re-creates
    a card whose type changes: remove and add, a whole read): a flip reads those two
    attributes of the card, and the adapter keeps its type and mode."""

    async def body(r: Rig) -> None:
        two_guests(r.svc)
        before = r.svc.adapter(5)
        io = r.svc.kernel.io
        real = io.read_in
        card_reads: list[tuple[str, ...]] = []

        def read_in(directory: str, names: Any) -> dict[str, str | None]:
            if directory == "devices/ap/card05":
                card_reads.append(tuple(names))
            return real(directory, names)

        io.read_in = read_in  # type: ignore[method-assign]
        for value in ("0", "1"):
            r.write("devices/ap/card05/config", value)
            await r.idle()
            assert r.svc.adapter(5).configured is (value == "1")
        assert card_reads == [("online", "config")] * 2
        after = r.svc.adapter(5)
        assert (after.type, after.mode) == (before.type, before.mode) and before.type

    run("default", body)


SIX_CARDS = """
name = "six"
layout = "upstream"
apxa = true
usage_domains = "0-1"

[[adapters]]
ids = "0x01-0x06"
type = "CEX8C"
"""


def test_only_a_bursts_first_cards_are_read_in_a_thread_of_their_own(tmp_path: Path) -> None:
    """Six cards flipping at once is a storm's start: the first EARLY_CARDS are read in a
    thread of their own, the others with the rest of the resync; all six end as the kernel
    says."""
    scenario = tmp_path / "six.toml"
    scenario.write_text(SIX_CARDS)

    async def body(r: Rig) -> None:
        for value in ("0", "1"):
            for a in range(1, 7):
                r.write(f"devices/ap/card{a:02x}/config", value)
            await r.idle()
            assert {r.svc.adapter(a).configured for a in range(1, 7)} == {value == "1"}
        assert hotplug.EARLY_CARDS == 4 and r.hp.stats()["early_reads"] == 2 * 4
        assert r.hp.pump.batches == 2

    run(str(scenario), body)


def test_a_flipped_cards_holders_are_read_while_the_card_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A card's flip whole: its holders' guest views are read while the card is read in its
    own thread, not after (here the card's reading waits for the views: read one after the
    other, it would wait in vain). The card leaving again in between is caught as any
    contradiction: no batch shows the guest holding the deconfigured adapter."""

    async def body(r: Rig) -> None:
        two_guests(r.svc)
        r.write("devices/ap/card05/config", "0")
        await r.idle()
        seen: list[tuple[str, bool]] = []
        r.svc.subscribe(
            lambda _c: seen.append((r.svc.matrix(G1).state, r.svc.adapter(5).configured))
        )
        k = r.svc.kernel
        real_card, real_mdevs = k.read_card, k.read_mdevs
        views = threading.Event()
        waited: list[bool] = []

        def read_card(adapter: int) -> tuple[bool, bool] | None:
            if threading.current_thread().name.startswith("apmatrixd-early"):
                waited.append(views.wait(5))
            return real_card(adapter)

        def read_mdevs(*args: Any, **kw: Any) -> dict[str, MdevInfo]:
            out = real_mdevs(*args, **kw)
            if not views.is_set():
                r.write("devices/ap/card05/config", "0")  # gone again once the views are read
                views.set()
            return out

        monkeypatch.setattr(k, "read_card", read_card)
        monkeypatch.setattr(k, "read_mdevs", read_mdevs)
        r.write("devices/ap/card05/config", "1")
        await r.idle()
        # Both bursts (back, and gone again) were a flip whole: each read so.
        assert waited == [True, True] and r.hp.stats()["early_reads"] == 2
        assert ("active", False) not in seen, seen
        assert r.svc.matrix(G1).state == "degraded" and not r.svc.adapter(5).configured

    run("default", body)


@pytest.mark.parametrize(("config", "want"), [("0", ("degraded", False)), ("1", ("active", True))])
def test_a_card_that_flips_while_the_guests_are_read_is_read_again(
    monkeypatch: pytest.MonkeyPatch, config: str, want: tuple[str, bool]
) -> None:
    """guest_matrix is read after the cards: a card that leaves or comes back in between is
    read again in the same batch, so no batch shows a matrix and its adapter disagreeing."""

    async def body(r: Rig) -> None:
        two_guests(r.svc)
        r.write("devices/ap/card05/config", "1" if config == "0" else "0")
        await r.idle()
        seen: list[tuple[str, bool]] = []
        r.svc.subscribe(
            lambda _c: seen.append((r.svc.matrix(G1).state, r.svc.adapter(5).configured))
        )
        k = r.svc.kernel
        real = k.read_mdevs

        def late(*args: Any, **kw: Any) -> dict[str, MdevInfo]:
            monkeypatch.setattr(k, "read_mdevs", real)
            r.write("devices/ap/card05/config", config)  # after this batch read card 05
            return real(*args, **kw)

        monkeypatch.setattr(k, "read_mdevs", late)
        await r.hp.submit(Scope(cards={5}))
        assert seen[0] == want
        await r.idle()
        assert set(seen) == {want}

    run("default", body)


def test_guest_views_read_before_the_kernel_updated_them_are_read_once_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """vfio_ap updates guest_matrix after the scan's last uevent: a batch that read the guest
    views before that (card 05 back, the guest still without it) and finds the card as it was
    reads their holders once more, so the batch shows the guest whole, not degraded until the
    next rescan; if that is still too early, the card and its holders are read again a while
    later. A contradiction that stays is shown as the kernel says (read again once only)."""

    async def body(r: Rig) -> None:
        two_guests(r.svc)
        r.write("devices/ap/card05/config", "0")
        await r.idle()
        assert r.svc.matrix(G1).state == "degraded"
        k = r.svc.kernel
        real = k.read_mdevs
        calls: list[list[str] | None] = []

        def early(*args: Any, **kw: Any) -> dict[str, MdevInfo]:
            out = real(*args, **kw)
            only = args[1] if len(args) > 1 else kw.get("only")
            calls.append(None if only is None else sorted(only))
            if len(calls) <= stale_reads:  # as before on_scan_complete: 05 not in the view
                out = {u: replace(m, guest_apqns=frozenset(q for q in m.guest_apqns
                                                          if q.adapter != 5))
                       for u, m in out.items()}  # fmt: skip
            return out

        stale_reads = 1
        monkeypatch.setattr(k, "read_mdevs", early)
        r.write("devices/ap/card05/config", "1")
        await r.idle()
        assert calls[1:] == [[G1]]  # the holder of 05, once more
        assert r.svc.matrix(G1).state == "active"
        # vfio_ap still scanning when read once more: the card and its holder are read
        # again a while later (config 0: one read; config 1: two, then the later one).
        calls.clear()
        stale_reads = 3
        r.write("devices/ap/card05/config", "0")
        await r.idle()
        r.seen.clear()
        r.write("devices/ap/card05/config", "1")
        await r.idle()
        assert calls == [[G1]] * 4
        assert r.svc.matrix(G1).state == "active"
        assert [G1 in c.matrices_changed for c in r.seen] == [False, True]
        assert r.hp.stats()["resyncs"] == 5  # one a write, and the later read
        calls.clear()
        stale_reads = 100  # the kernel keeps saying so: read again later once, then believed
        r.write("devices/ap/card05/config", "0")
        await r.idle()
        r.write("devices/ap/card05/config", "1")
        await r.idle()
        assert calls == [[G1]] * 5  # config 0: one read; config 1: two, two later, no more
        assert r.svc.matrix(G1).state == "degraded"

    run("default", body)


@pytest.mark.parametrize("scenario", ["default", "rfc2017"])
def test_adapter_unplugged_and_plugged_back(scenario: str) -> None:
    async def body(r: Rig) -> None:
        two_guests(r.svc)
        r.seen.clear()
        r.host.unplug_adapter(5)
        await r.idle()
        assert [a.id for a in r.svc.adapters()] == [6]
        assert r.svc.matrix(G1).state == "degraded"
        assert any(5 in c.adapters_removed for c in r.seen)
        r.host.plug_adapter(5, "CEX5C")
        await r.idle()
        assert [a.id for a in r.svc.adapters()] == [5, 6]
        five = r.svc.adapter(5)
        assert (five.type, five.mode, five.online, five.configured) == (
            "CEX5C",
            "CCA-Coproc",
            True,
            True,
        )
        assert r.svc.matrix(G1).state == "active"
        assert r.svc.registry.violations() == []
        assert r.drifts() == []

    run(scenario, body)


def test_new_adapter_shows_up() -> None:
    async def body(r: Rig) -> None:
        r.host.plug_adapter(0x0B, "CEX8P")
        await r.idle()
        b = r.svc.adapter(0x0B)
        assert (b.type, b.mode, b.online, b.configured) == ("CEX8P", "EP11-Coproc", True, True)
        assert b.domains == (4, 0x47, 0xAB, 0xFF)
        r.write("devices/ap/card0b/online", "0")
        await r.idle()
        assert not r.svc.adapter(0x0B).online

    run("default", body)


def test_domain_unplugged_shrinks_the_guest_view() -> None:
    async def body(r: Rig) -> None:
        r.svc.reserve([5, 6], [4, 0x47])
        r.svc.create_matrix(G1, adapters=[5], domains=[4, 0x47])
        r.host.unplug_domain(0x47)
        await r.idle()
        g1 = r.svc.matrix(G1)
        assert g1.state == "degraded" and g1.guest_apqns == (Apqn(5, 4),)
        r.host.plug_domain(0x47)
        await r.idle()
        assert r.svc.matrix(G1).state == "active"

    run("default", body)


def spy_reads(r: Rig) -> list[tuple[str, Any]]:
    """Record the kernel's card reads (which ones the resync chose), calling through."""
    calls: list[tuple[str, Any]] = []
    k = r.svc.kernel
    for name in ("read_adapters", "read_adapter", "read_queues", "read_card"):
        real = getattr(k, name)

        def spy(*args: Any, _real: Any = real, _name: str = name) -> Any:
            calls.append((_name, args[0].id if _name == "read_queues" else args[:1]))
            if _name == "read_queues":
                calls.append(("domains", frozenset(args[1])))
            return _real(*args)

        setattr(k, name, spy)
    return calls


def test_only_the_queues_named_by_events_are_read_again() -> None:
    """A queue that leaves vfio_ap, a domain unplugged and plugged back: each card re-reads
    the queues its events named, not all of its queues, and ends up as the kernel says."""

    async def body(r: Rig) -> None:
        r.svc.reserve([5], [])  # every queue of card 05 on vfio_ap
        await r.idle()
        assert r.svc.adapter(5).guest_domains == (4, 0x47, 0xAB, 0xFF)
        calls = spy_reads(r)
        r.write("bus/ap/drivers/vfio_ap/unbind", "05.0004")  # by hand: no mask moved
        await r.idle()
        assert r.svc.adapter(5).guest_domains == (0x47, 0xAB, 0xFF)
        assert calls == [("read_queues", 5), ("domains", {4})]
        calls.clear()
        r.host.unplug_domain(0xAB)
        await r.idle()
        assert r.svc.adapter(5).domains == r.svc.adapter(6).domains == (4, 0x47, 0xFF)
        assert sorted(c for c in calls if c[0] == "read_queues") == [
            ("read_queues", 5),
            ("read_queues", 6),
        ]
        assert {c for c in calls if c[0] != "read_queues"} == {("domains", frozenset({0xAB}))}
        calls.clear()
        r.host.plug_domain(0xAB)
        await r.idle()
        assert r.svc.adapter(6).domains == (4, 0x47, 0xAB, 0xFF)
        assert {c[0] for c in calls} == {"read_queues", "domains"}
        assert r.svc.registry.violations() == [] and r.drifts() == []

    run("default", body)


def test_lost_events_fall_back_to_reading_every_card() -> None:
    """Events that never arrived (ENOBUFS) name nothing: the overflow reads every card."""

    async def body(r: Rig) -> None:
        assert r.source._unsubscribe is not None
        r.source._unsubscribe()  # the uevents of the next change are lost
        r.host.unplug_domain(0xAB)
        r.source._unsubscribe = r.host.subscribe(r.source._on_uevent)
        calls = spy_reads(r)
        r.hp.pump.overflow()
        r.hp.pump.arm()
        await r.idle()
        assert calls == [("read_adapters", ())]
        assert r.svc.adapter(5).domains == r.svc.adapter(6).domains == (4, 0x47, 0xFF)

    run("default", body)


def test_scope_falls_back_to_the_whole_card() -> None:
    """Too many queues of one card, an action we do not know, or a card-level event: the
    whole card is read, and its named queues are forgotten (that read covers them)."""

    def ev(action: str, a: int, d: int | None = None) -> ApEvent:
        path = f"/devices/ap/card{a:02x}" + ("" if d is None else f"/{a:02x}.{d:04x}")
        e = classify({"ACTION": action, "DEVPATH": path, "SUBSYSTEM": "ap"})
        assert e is not None
        return e

    from apmatrixd.events import QUEUE_LIMIT

    s = scope_of([ev("add", 5, d) for d in range(QUEUE_LIMIT)] + [ev("bind", 6, 1)])
    assert (s.whole, s.named) == (set(), {5: set(range(QUEUE_LIMIT)), 6: {1}})
    s = scope_of([ev("add", 5, d) for d in range(QUEUE_LIMIT + 1)] + [ev("add", 5, 99)])
    assert (s.whole, s.named, s.events) == ({5}, {}, QUEUE_LIMIT + 2)
    s = scope_of([ev("bind", 5, 1), ev("move", 5, 2), ev("bind", 6, 1), ev("remove", 7)])
    assert (s.whole, s.named) == ({5, 7}, {6: {1}})
    s = scope_of([ev("bind", 5, 1)], lost=True)
    assert s.everything and s.pool


def test_a_failed_read_changes_nothing_and_the_full_read_announces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A read failing half-way (an mdev vanishing mid-read) takes nothing: the state changes
    only after the whole read, and the full re-read that follows announces the new card."""

    async def body(r: Rig) -> None:
        real = r.svc.kernel.read_mdevs
        calls: list[int] = []

        def flaky(*args: Any) -> Any:
            calls.append(1)
            if len(calls) == 1:
                raise KernelError(errno.ENOENT, "devices/vfio_ap/matrix", "reading")
            return real(*args)

        monkeypatch.setattr(r.svc.kernel, "read_mdevs", flaky)
        r.host.plug_adapter(0x0B, "CEX8P")
        await r.idle()
        assert len(calls) == 2 and r.svc.adapter(0x0B).type == "CEX8P"
        assert sum(0x0B in c.adapters_added for c in r.seen) == 1
        assert r.hp.stats()["failures"] == 1

    run("default", body)


def test_a_resync_that_keeps_failing_is_retried_with_backoff(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def body(r: Rig) -> None:
        real = r.svc.kernel.read_mdevs
        calls: list[float] = []

        def broken(*args: Any) -> Any:
            calls.append(time.monotonic())
            if len(calls) <= 4:  # the batch, its full re-read, the first retry's two
                raise KernelError(errno.EIO, "devices/vfio_ap/matrix", "reading")
            return real(*args)

        monkeypatch.setattr(r.svc.kernel, "read_mdevs", broken)
        r.host.plug_adapter(0x0B, "CEX8P")
        for _ in range(300):  # no uevent comes: only the retries can pick the card up
            await asyncio.sleep(0.01)
            if 0x0B in r.svc.state.adapters:
                break
        assert r.svc.adapter(0x0B).type == "CEX8P"
        assert len(calls) == 5
        assert calls[2] - calls[1] >= 0.09 and calls[4] - calls[3] >= 0.19  # 0.1 s, then 0.2 s

    run("default", body)


def test_a_stopping_daemon_neither_retries_nor_logs_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A rescan due while the daemon stops is refused by the queue (Stopping): not a failure to
    log with a traceback and retry every 0.1 s until systemd's kill."""

    async def body(r: Rig) -> None:
        r.svc.executor.refuse("apmatrixd is stopping")
        fut = r.hp.rescan()
        with pytest.raises(Stopping):
            await fut
        await asyncio.sleep(0.3)  # a retry would be due after 0.1 s
        assert r.hp.failures == 0 and r.hp.resyncs == 0
        assert not [rec for rec in caplog.records if rec.levelno >= logging.WARNING]

    run("default", body)


def test_autostart_hook_runs_after_hot_plug(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(r: Rig) -> None:
        called: list[int] = []
        real = ops.start_waiting

        def spy(svc: Service) -> Any:
            called.append(1)
            return (yield from real(svc))

        monkeypatch.setattr(ops, "start_waiting", spy)
        r.host.plug_adapter(0x0C)
        await r.idle()
        assert called

    run("default", body)


# -- drift ----------------------------------------------------------------------------------------
def test_matrix_changed_by_hand_is_drift_and_adopted() -> None:
    async def body(r: Rig) -> None:
        two_guests(r.svc)
        r.svc.reserve([7], [])
        r.seen.clear()
        r.write(f"devices/vfio_ap/matrix/{G1}/assign_adapter", "7")  # no uevent at all
        await r.hp.rescan()
        g1 = r.svc.matrix(G1)
        assert g1.adapters == (5, 6, 7)
        assert r.svc.registry.get(G1).adapters == {5, 6, 7}  # adopted: it is valid
        assert r.drifts() == [(G1, "adapters: kernel 05-07 vs registry 05,06")]
        await r.hp.rescan()
        assert len(r.drifts()) == 1  # said once
        assert r.svc.registry.violations() == []

    run("default", body)


def test_a_card_burst_reads_only_the_mdevs_holding_its_cards() -> None:
    """Hot plug of card 05 re-reads the guests that hold 05, not every mdev, and of those
    only the guest view (a burst of cards changes no sets): no ``ap_config``. A hand edit
    (no uevent) that gives a holder more shows in its view, and that holder is read whole:
    the first burst that names a card it holds finds it."""

    async def body(r: Rig) -> None:
        two_guests(r.svc)  # g1: 05,06 x 04; g2: 06 x 47
        r.write("bus/ap/scans", "1")  # BINDINGS=complete after the reprobes: not in the bursts
        await r.idle()
        k, asked, reads = r.svc.kernel, [], []
        real, read = k.read_mdevs, k.io.read_in

        def spy(adapters: Any = None, only: Any = None, *rest: Any) -> dict[str, MdevInfo]:
            asked.append(None if only is None else sorted(only))
            return real(adapters, only, *rest)

        def counting(directory: str, names: Any) -> dict[str, str | None]:
            reads.extend(names)
            return read(directory, names)

        k.read_mdevs = spy  # type: ignore[method-assign]
        k.io.read_in = counting  # type: ignore[method-assign]
        r.write("devices/ap/card05/config", "0")
        await r.idle()
        assert asked == [[G1]] and reads.count("guest_matrix") == 1
        assert "ap_config" not in reads
        assert r.svc.matrix(G1).state == "degraded" and r.drifts() == []
        r.write("devices/ap/card05/config", "1")
        await r.idle()
        assert asked[1:] == [[G1]] and r.svc.matrix(G1).state == "active"
        r.write(f"devices/vfio_ap/matrix/{G2}/assign_adapter", "5")  # no uevent at all
        reads.clear()
        r.write("devices/ap/card06/config", "0")
        await r.idle()
        assert asked[2:] == [sorted([G1, G2])]
        assert reads.count("ap_config") == 1  # g2's view holds 05.0047: g2 read whole
        assert r.drifts() == [(G2, "adapters: kernel 05,06 vs registry 06")]
        assert r.svc.matrix(G2).state == "degraded"

    run("default", body)


def test_adopted_drift_is_stored_so_a_restart_keeps_it(tmp_path: Path) -> None:
    """Found by tests/reliability: the registry took the kernel's sets but the state directory
    kept the old ones, so the next start-up wrote the admin's change back out of sysfs."""

    async def body(r: Rig) -> None:
        r.svc.store = Store(tmp_path)
        two_guests(r.svc)
        r.svc.reserve([7], [])
        r.write(f"devices/vfio_ap/matrix/{G1}/assign_adapter", "7")
        await r.hp.rescan()
        await r.svc.executor.idle()  # the files of its last change follow its answer
        assert Store(tmp_path).load().matrices[G1].adapters == {5, 6, 7}
        again = Service(Kernel(TreeSysfs(r.host)), store=Store(tmp_path))
        again.load()  # a restart on the same host
        assert again.matrix(G1).adapters == (5, 6, 7)
        assert "07.0004" in r.host.read(f"devices/vfio_ap/matrix/{G1}/matrix").decode()

    run("default", body)


def test_drift_that_breaks_a_rule_is_shown_not_adopted() -> None:
    async def body(r: Rig) -> None:
        two_guests(r.svc)
        r.svc.reserve([], [0xAB])
        r.svc.create_matrix(X, adapters=[5], domains=[0xAB], start=False)  # only defined
        r.seen.clear()
        r.write(f"devices/vfio_ap/matrix/{G1}/assign_domain", "0xab")  # the kernel allows it
        await r.hp.rescan()
        g1 = r.svc.matrix(G1)
        assert g1.domains == (4, 0xAB)  # the truth is shown
        assert r.svc.registry.get(G1).domains == {4}  # the registry stays valid
        ((uuid, what),) = r.drifts()
        assert uuid == G1 and what.startswith("domains: kernel 04,ab vs registry 04")
        assert "not adopted" in what
        assert r.svc.registry.violations() == []
        r.write(f"devices/vfio_ap/matrix/{G1}/unassign_domain", "0xab")  # put back
        await r.hp.rescan()
        assert r.svc.matrix(G1).domains == (4,)
        assert len(r.drifts()) == 1

    run("default", body)


def test_mdev_created_and_removed_outside() -> None:
    async def body(r: Rig) -> None:
        two_guests(r.svc)
        r.svc.reserve([], [0xAB])
        t = "devices/vfio_ap/matrix/mdev_supported_types/vfio_ap-passthrough/create"
        r.write(t, X)
        r.write(f"devices/vfio_ap/matrix/{X}/assign_adapter", "5")
        r.write(f"devices/vfio_ap/matrix/{X}/assign_domain", "0xab")
        await r.idle()  # the mdev add event, then the re-read
        x = r.svc.matrix(X)
        assert x.adopted and x.adapters == (5,) and x.domains == (0xAB,)
        r.write(f"devices/vfio_ap/matrix/{G2}/remove", "1")
        await r.idle()
        assert r.svc.matrix(G2).state == "defined"
        texts = dict(r.drifts())
        assert texts[X].startswith("created outside apmatrixd")
        assert "removed outside" in texts[G2]
        assert r.svc.registry.violations() == []

    run("default", body)


def test_host_pool_changed_by_hand() -> None:
    async def body(r: Rig) -> None:
        r.write("bus/ap/apmask", "-0x10")
        await r.idle()
        assert 0x10 not in r.svc.host.host_adapters
        ((uuid, what),) = r.drifts()
        assert uuid == "" and what.startswith("host adapters: kernel")

    run("default", body)


def test_own_changes_are_not_drift() -> None:
    async def body(r: Rig) -> None:
        two_guests(r.svc)
        r.svc.unassign(G1, "adapter", 6)
        r.svc.stop(G2)
        r.svc.start(G2)
        r.svc.remove(G2)
        r.svc.release([], [0x47])
        await r.idle()
        await r.hp.rescan()
        assert r.drifts() == []

    run("default", body)
    run("rfc2017", body)


def test_rescan_timer_finds_drift() -> None:
    async def body(r: Rig) -> None:
        two_guests(r.svc)
        await r.idle()
        rescans = r.hp.rescans
        r.write(f"devices/vfio_ap/matrix/{G1}/unassign_adapter", "6")
        for _ in range(100):
            await asyncio.sleep(0.02)
            if r.drifts():
                break
        assert r.drifts() and r.hp.rescans > rescans

    run("default", body, rescan_interval=0.05)


def test_the_rescan_reads_the_host_pool_where_no_uevent_tells() -> None:
    """The timer reads apmask and aqmask only where a mask change can come without a uevent:
    without a uevent source, or on a bus without ``bindings`` (Features.mask_uevents). Where
    both are there, a mask written by hand arrives as APMASK= and that burst reads the pool;
    the tick still reads its slice and moves Statistics' last_rescan on. (The timer's scope
    names no event: it must still be read; a scope without events is false.)"""

    async def body(r: Rig) -> None:
        svc = r.svc
        two_guests(svc)
        await r.idle()
        assert svc.kernel.features.mask_uevents and r.hp.masks_heard()
        reads: list[object] = []
        mdevs: list[object] = []
        real, real_mdevs = svc.kernel.read_pool, svc.kernel.read_mdevs
        svc.kernel.read_pool = lambda *a: reads.append(a) or real(*a)  # type: ignore[method-assign]
        svc.kernel.read_mdevs = lambda *a: mdevs.append(a) or real_mdevs(*a)  # type: ignore[method-assign]
        before = svc.state.stats.last_rescan
        await r.hp.rescan()
        assert reads == [] and len(mdevs) == 1
        assert svc.state.stats.last_rescan > before
        r.write("bus/ap/apmask", "-0x10")  # its uevent reads the pool
        await r.idle()
        assert len(reads) == 1 and 0x10 not in svc.host.host_adapters
        ((_, what),) = r.drifts()
        assert what.startswith("host adapters: kernel")
        r.hp.request_resync()  # a command that could not read back what it did
        await r.idle()
        assert len(reads) == 2
        # A bus that sends no mask uevents: the tick is all that sees a mask change.
        svc.kernel.features = replace(svc.kernel.features, mask_uevents=False)
        r.host.apmask = r.host.apmask - {0x11}  # behind the emulator, which sends one
        await r.hp.rescan()
        assert len(reads) == 3 and 0x11 not in svc.host.host_adapters
        # No uevent source: likewise.
        svc.kernel.features = replace(svc.kernel.features, mask_uevents=True)
        r.hp.sources.clear()
        await r.hp.rescan()
        assert len(reads) == 4

    run("default", body)


# -- storms ---------------------------------------------------------------------------------------
def test_storm_of_65536_queues_coming_online() -> None:
    """All 65,536 queues of a 256x256 host come online (plus 256 card events), written from
    another thread while the loop absorbs: none lost, one Changes per burst, bounded."""
    host = Host.from_name("big")
    for a in range(256):
        host.write(f"devices/ap/card{a:02x}/online", b"0")

    async def body(r: Rig) -> None:
        settles: list[bool] = []
        r.svc.subscribe(lambda _c: settles.append(r.svc.settling))
        emitted: list[int] = []
        host.subscribe(lambda _e: emitted.append(1))
        t0 = time.monotonic()

        def writer() -> None:
            for a in range(256):
                host.write(f"devices/ap/card{a:02x}/online", b"1")

        th = threading.Thread(target=writer)
        th.start()
        while th.is_alive():
            await asyncio.sleep(0.01)
        await r.idle(30)
        took = time.monotonic() - t0
        stats = r.hp.stats()
        assert len(emitted) == 256 * 257
        assert stats["received"] == stats["handled"] == len(emitted), stats
        assert all(a.online for a in r.svc.adapters())
        changed = [c for c in r.seen if c.adapters_changed]
        # one signal per object per burst: every adapter appears in exactly one batch
        per_adapter = sum(len(c.adapters_changed) for c in changed)
        assert per_adapter == 256, per_adapter
        assert len(r.seen) <= 2 * stats["batches"] + 2
        assert True in settles and r.svc.settling is False
        print(f"storm: {len(emitted)} uevents, {stats}, {len(r.seen)} batches out, {took:.2f} s")

    async def go() -> None:
        rig = Rig(host, settle=0.05)
        try:
            await body(rig)
        finally:
            rig.close()

    asyncio.run(go())


def test_pump_batches_and_settling() -> None:
    async def go() -> None:
        loop = asyncio.get_running_loop()
        batches: list[int] = []
        flags: list[bool] = []
        pump = EventPump(
            loop, lambda s: batches.append(s.events), settle=0.02, storm=10,
            on_settling=flags.append,
        )  # fmt: skip
        for i in range(25):
            pump.add({"ACTION": "change", "DEVPATH": f"/devices/ap/card{i:02x}",
                      "SUBSYSTEM": "ap", "ONLINE": "1"})  # fmt: skip
        pump.add({"ACTION": "add", "DEVPATH": "/devices/virtual/x", "SUBSYSTEM": "usb"})
        pump.arm()
        await asyncio.sleep(0.1)
        assert batches == [25] and flags == [True, False]
        assert pump.stats()["ignored"] == 1
        pump.add({"ACTION": "change", "DEVPATH": "/devices/ap/card01", "SUBSYSTEM": "ap"})
        pump.arm()
        await asyncio.sleep(0.1)
        assert batches == [25, 1] and flags == [True, False]  # one event is no storm
        pump.overflow()
        pump.arm()
        await asyncio.sleep(0.1)
        assert batches == [25, 1, 0]

    asyncio.run(go())


def test_a_few_cards_flipping_config_are_no_storm_however_many_queues() -> None:
    """A card's config flip with its 85 queues is more uevents than a storm's threshold, but
    its end is known: no Settling signal pair around its batch. Five cards' flips, or as many
    uevents of another kind, are a storm."""

    async def go() -> None:
        loop = asyncio.get_running_loop()
        flags: list[bool] = []
        batches: list[int] = []
        domains = frozenset(range(85))
        pump = EventPump(
            loop, lambda s: batches.append(s.events), settle=0.02, storm=64,
            on_settling=flags.append, queues=lambda _a: domains,
        )  # fmt: skip

        def flip(cards: range) -> None:
            for a in cards:
                pump.add(_card(a, CONFIG="1"))
            for a in cards:
                for d in sorted(domains):
                    pump.add(_queue(a, d, CONFIG="1"))
            pump.arm()

        flip(range(5, 6))
        await asyncio.sleep(0.1)
        assert batches == [86] and flags == []
        flip(range(1, 1 + FEW_FLIPS))
        await asyncio.sleep(0.1)
        assert batches == [86, 86 * FEW_FLIPS] and flags == []
        flip(range(1, 2 + FEW_FLIPS))
        await asyncio.sleep(0.1)
        assert batches[-1] == 86 * (FEW_FLIPS + 1) and flags == [True, False]
        for d in sorted(domains):  # as many queues coming online: a storm
            pump.add(_queue(5, d, ONLINE="1"))
        pump.arm()
        await asyncio.sleep(0.1)
        assert batches[-1] == 85 and flags == [True, False, True, False]

    asyncio.run(go())


def test_settle_window_grows_with_the_burst() -> None:
    """A small burst waits settle_min; a burst going on for settle waits the full settle."""

    async def go() -> None:
        loop = asyncio.get_running_loop()
        batches: list[int] = []
        pump = EventPump(loop, lambda s: batches.append(s.events), settle=0.05)
        assert pump.settle_min == 0.005
        pump.add({"ACTION": "change", "DEVPATH": "/devices/ap/card01", "SUBSYSTEM": "ap"})
        t0 = pump._first
        assert pump.window(t0) == 0.005
        assert pump.window(t0 + 0.003) == 0.005
        assert pump.window(t0 + 0.02) == pytest.approx(0.02)
        assert pump.window(t0 + 0.5) == 0.05
        pump.arm()
        await asyncio.sleep(0.2)
        assert batches == [1]
        assert EventPump(loop, pump.handler, settle=0.02, settle_min=0.1).settle_min == 0.02

    asyncio.run(go())


def _card(a: int, **props: str) -> dict[str, str]:
    return {"ACTION": "change", "DEVPATH": f"/devices/ap/card{a:02x}", "SUBSYSTEM": "ap", **props}


def _queue(a: int, d: int, **props: str) -> dict[str, str]:
    path = f"/devices/ap/card{a:02x}/{a:02x}.{d:04x}"
    return {"ACTION": "change", "DEVPATH": path, "SUBSYSTEM": "ap", **props}


def test_a_card_config_flip_with_all_its_queues_is_handed_over_at_once() -> None:
    """The kernel sends the card's CONFIG= first, then one per queue: once every queue the
    card is known to have has come, the burst waits no longer (not as long as it lasted).
    Anything else in the burst leaves it to the adaptive window."""

    async def go() -> None:
        loop = asyncio.get_running_loop()
        known = {5: frozenset({0, 1, 2})}
        pump = EventPump(loop, lambda s: None, settle=0.05, queues=known.get)
        pump.add(_card(5, CONFIG="1"))
        t0 = pump._first
        for d in (0, 1):
            pump.add(_queue(5, d, CONFIG="1"))
        assert pump.window(t0 + 0.03) == pytest.approx(0.03)  # queue 2 still to come
        pump.add(_queue(5, 2, CONFIG="1"))
        assert pump.window(t0 + 0.03) == 0.0
        pump.add(_card(6, ONLINE="0"))  # something else came: not over by the order alone
        assert pump.window(t0 + 0.03) == pytest.approx(0.03)
        pump.flush()
        assert pump.window(t0 + 0.03) == pytest.approx(0.03)  # a new burst starts empty

        cases = {
            "a card the daemon does not know": [_card(7, CONFIG="1")],
            "a queue the card is not known to have": [
                _card(5, CONFIG="1"), *(_queue(5, d, CONFIG="1") for d in (0, 1, 2, 9)),
            ],
            "a queue before its card": [
                _queue(5, 0, CONFIG="1"), _card(5, CONFIG="1"),
                *(_queue(5, d, CONFIG="1") for d in (1, 2)),
            ],
            "the card's flip twice": [
                _card(5, CONFIG="1"), *(_queue(5, d, CONFIG="1") for d in (0, 1, 2)),
                _card(5, CONFIG="0"),
            ],
            "a queue added": [
                _card(5, CONFIG="1"), *(_queue(5, d, CONFIG="1") for d in (0, 1, 2)),
                {**_queue(5, 3), "ACTION": "add"},
            ],
        }  # fmt: skip
        for what, events in cases.items():
            pump.flush()
            for e in events:
                pump.add(e)
            assert pump.window(pump._first + 0.03) == pytest.approx(0.03), what
        pump.flush()
        pump.add(_card(5, CONFIG="1"))
        for d in (0, 1, 2):
            pump.add(_queue(5, d, CONFIG="1"))
        pump.overflow()  # lost events: nothing says the burst is over
        assert pump.window(pump._first + 0.03) == pytest.approx(0.03)
        pump.close()

    asyncio.run(go())


@pytest.mark.parametrize("scenario", ["default", "rfc2017"])
def test_hot_plug_knows_a_returning_card_is_done_from_its_queues(scenario: str) -> None:
    """On the emulator (the kernel's order), a card coming back with its queues is one burst
    the pump knows to be over; the one batch it makes has the guest whole again."""

    async def body(r: Rig) -> None:
        two_guests(r.svc)
        r.write("devices/ap/card05/config", "0")
        await r.idle()
        assert r.svc.matrix(G1).state == "degraded"
        pump, over = r.hp.pump, []
        window = pump.window

        def spy(now: float) -> float:  # the window the last drain of the burst armed
            over.append(pump.flips.complete)
            return window(now)

        pump.window = spy  # type: ignore[method-assign]
        r.seen.clear()
        r.write("devices/ap/card05/config", "1")
        await r.idle()
        assert over[-1] is True and pump.batches == 2
        assert len(r.seen) == 1 and G1 in r.seen[0].matrices_changed
        assert r.svc.matrix(G1).state == "active"
        assert set(r.svc.matrix(G1).guest_apqns) == {Apqn(5, 4), Apqn(6, 4)}

    run(scenario, body, settle=0.05)


def test_a_failed_batch_makes_the_next_read_everything() -> None:
    """A handler that fails half-way may leave a card's state half taken; a later partial
    re-read (only the queues named) would never repair it."""

    async def go() -> None:
        loop = asyncio.get_running_loop()
        seen: list[tuple[int, bool]] = []

        def handler(scope: Scope) -> None:
            seen.append((scope.events, scope.everything))
            if len(seen) == 1:
                raise RuntimeError("a bug half-way through a batch")

        pump = EventPump(loop, handler, settle=0.01)
        queue = {"ACTION": "change", "DEVPATH": "/devices/ap/card05/05.0004", "SUBSYSTEM": "ap"}
        for _ in range(2):
            pump.add(queue)
            pump.arm()
            await asyncio.sleep(0.1)
        assert seen == [(1, False), (1, True)]

    asyncio.run(go())


def test_sim_source_never_loses_a_wake_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """An event that arrives while the loop empties the pipe must not leave later events
    stranded in the queue (a lost wake-up once stalled the storm test for minutes)."""
    from apmatrixd.sim.vfs import Uevent

    added: list[str] = []

    class Pump:
        loop = None

        def add(self, props: dict[str, str]) -> None:
            added.append(props["DEVPATH"])

        def arm(self) -> None:
            pass

    src = SimSource(Pump(), Host.from_name("default"))  # type: ignore[arg-type]

    def ev(name: str) -> Uevent:
        return Uevent("change", f"/devices/ap/{name}", "ap", 1)

    real_read = os.read

    def read_while_an_event_arrives(fd: int, n: int) -> bytes:
        src._on_uevent(ev("b"))  # another thread, between the loop's wake-up and its read
        return real_read(fd, n)

    src._on_uevent(ev("a"))
    with monkeypatch.context() as m:
        m.setattr(os, "read", read_while_an_event_arrives)
        src._readable()
    assert added == ["/devices/ap/a", "/devices/ap/b"]
    src._on_uevent(ev("c"))  # must wake the loop: the pipe has to be readable now
    assert select.select([src._rfd], [], [], 0)[0] == [src._rfd]
    src._readable()
    assert added[-1] == "/devices/ap/c"
    os.close(src._rfd)
    os.close(src._wfd)


def test_pool_drift_that_cannot_be_adopted_is_said_once_and_counted() -> None:
    async def body(r: Rig) -> None:
        two_guests(r.svc)
        r.svc.reserve([7], [])
        r.svc.create_matrix(X, adapters=[7], domains=[0xAB], start=False)  # only defined
        await r.idle()
        r.seen.clear()
        r.write("bus/ap/apmask", "+7")  # the kernel allows it: X is not live
        await r.idle()
        await r.hp.rescan()
        await r.hp.rescan()
        ((uuid, what),) = r.drifts()
        assert uuid == "" and "not adopted" in what
        assert 7 not in r.svc.host.host_adapters  # the registry keeps its valid pool
        before = r.host.read("bus/ap/apmask")
        with pytest.raises(HostOwned) as refused:  # named before any write, not EADDRNOTAVAIL
            r.svc.start(X)
        assert "07.00ab owned by host" in str(refused.value)
        assert not r.svc.kernel.mdev_exists(X) and r.host.read("bus/ap/apmask") == before
        assert ("07.00ab", "host") in [(str(c.apqn), c.owner) for c in r.svc.check([7], [0xAB])]
        r.write("bus/ap/apmask", "-7")  # the admin puts it back
        await r.idle()
        r.svc.start(X)  # live (degraded: this host has no adapter 07)
        assert r.svc.kernel.mdev_exists(X) and r.svc.matrix(X).state == "degraded"

    run("default", body)


def test_an_adopted_mdev_never_stored_goes_with_its_mdev() -> None:
    async def body(r: Rig) -> None:
        r.svc.reserve([5], [0xAB])
        t = "devices/vfio_ap/matrix/mdev_supported_types/vfio_ap-passthrough/create"
        r.write(t, X)
        r.write(f"devices/vfio_ap/matrix/{X}/assign_adapter", "5")
        await r.idle()
        assert r.svc.matrix(X).adopted
        r.write(f"devices/vfio_ap/matrix/{X}/remove", "1")
        await r.idle()
        assert X not in r.svc.registry.matrices  # not a definition holding its APQNs
        assert "only adopted" in dict(r.drifts())[X]
        r.svc.create_matrix(G1, adapters=[5], domains=[0xAB])  # its APQNs are free

    run("default", body)


def test_bursts_behind_a_slow_command_merge_into_one_resync() -> None:
    async def body(r: Rig) -> None:
        r.host.inject_delay("bus/ap/apmask", 0.5)
        slow = r.svc.submit("Reserve", ops.reserve, [5], [])
        await asyncio.sleep(0.1)  # the write is stuck in the worker
        before = r.hp.resyncs
        for a in (0x10, 0x11, 0x12):
            r.host.plug_adapter(a, "CEX8C")
            await asyncio.sleep(0.05)  # three bursts, each handed over while it waits
        await slow
        await r.idle()
        assert r.hp.resyncs - before <= 2  # the reserve's own uevent, the merged bursts
        assert {0x10, 0x11, 0x12} <= r.svc.state.adapters.keys()

    run("default", body)


def twenty_matrices(svc: Service) -> list[str]:
    """Matrices 05 x domain k for k < 20: more than a rescan slice (8) holds."""
    svc.reserve([5, 6], list(range(20)))
    uuids = [f"{k:08x}-0000-4000-8000-{k:012x}" for k in range(20)]
    for k, u in enumerate(uuids):
        svc.create_matrix(u, adapters=[5], domains=[k])
    return uuids


def test_the_rescan_timer_reads_a_slice_of_many_mdevs() -> None:
    """20 live mdevs: each tick re-reads 8 of them (sync.rescan_slice), every one within
    ceil(20 / 8) ticks; a hand edit outside the slice is seen when its turn comes, and a
    uevent burst still re-reads every mdev."""
    from apmatrixd.service import sync

    async def body(r: Rig) -> None:
        svc = r.svc
        uuids = twenty_matrices(svc)
        await r.idle()
        read: list[list[str]] = []
        real = svc.kernel.read_mdevs

        def counting(*args: Any) -> dict[str, MdevInfo]:
            got = real(*args)
            read.append(sorted(got))
            return got

        svc.kernel.read_mdevs = counting  # type: ignore[method-assign]
        slices = [sync.rescan_slice(svc, t, 30.0) for t in range(3)]
        assert [len(s) for s in slices] == [8, 8, 8]
        assert set().union(*slices) == set(uuids)
        # A hand edit of the last one: no uevent, outside the first two slices.
        r.write(f"devices/vfio_ap/matrix/{uuids[19]}/assign_adapter", "6")
        r.hp.rescan_interval = 30.0
        r.hp.rescans = 0
        seen_in = False
        for tick in range(3):
            await r.hp.rescan()
            assert len(read[-1]) == 8
            seen_in = seen_in or uuids[19] in read[-1]
            assert bool(r.drifts()) == seen_in, tick  # seen in its slice, not before
        assert seen_in and len(r.drifts()) == 1
        assert svc.matrix(uuids[19]).adapters == (5, 6)
        # Any uevent: every mdev, as before.
        r.write("devices/ap/card06/config", "0")
        await r.idle()
        assert read[-1] == sorted(uuids)

    run("default", body)


TWENTY = """name = "twenty"
description = "adapters 05, 06 with 20 usage domains each"
layout = "upstream"
apxa = true
usage_domains = "0-19"

[[adapters]]
ids = "0x05-0x06"
type = "CEX8C"
"""


def test_a_slice_keeps_the_guest_views_only_while_uevents_are_heard(tmp_path: Path) -> None:
    """The timer's slice reads the sets and InUse (a guest starting sends no uevent); the
    guest view only where the sets changed, since everything else that changes it comes
    with uevents. With no uevent source (no udev monitor) the timer is all there is: then
    every guest view in the slice is read again."""
    from apmatrixd.service import sync

    async def body(r: Rig) -> None:
        svc = r.svc
        uuids = twenty_matrices(svc)
        await r.idle()
        reads: list[str] = []
        real = svc.kernel.io.read

        def counting(path: str) -> str:
            reads.append(path.rsplit("/", 1)[-1])
            return real(path)

        svc.kernel.io.read = counting  # type: ignore[method-assign]
        r.hp.rescan_interval = 30.0
        r.hp.rescans = 0
        first = sync.rescan_slice(svc, 1, 30.0)  # the first tick's (rescan() counts it)
        r.host.attach_guest(first[0])  # no uevent
        await r.hp.rescan()
        assert reads.count("guest_matrix") == 0 and reads.count("status") == 8
        assert svc.matrix(first[0]).in_use
        # A hand edit in the next slice: its guest view is read, and follows.
        second = sync.rescan_slice(svc, 2, 30.0)
        r.write(f"devices/vfio_ap/matrix/{second[0]}/assign_adapter", "6")
        reads.clear()
        await r.hp.rescan()
        assert reads.count("guest_matrix") == 1
        k = uuids.index(second[0])
        assert set(svc.matrix(second[0]).guest_apqns) == {Apqn(5, k), Apqn(6, k)}
        # No uevent source: every guest view of the slice is read.
        r.hp.sources.clear()
        reads.clear()
        await r.hp.rescan()
        assert reads.count("guest_matrix") == 8

    (tmp_path / "twenty.toml").write_text(TWENTY)
    run(str(tmp_path / "twenty.toml"), body)
