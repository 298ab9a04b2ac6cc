"""``apmatrixd``: wiring only. Pick the kernel, load the service, export, own the name, READY.

Start-up order is the contract of spec §3: READY=1 goes out only once the registry matches
the kernel and the state directory (``Service.load``: stored reservations re-applied, autostart
matrices started, live mdevs reconciled), every object is exported and the bus name is ours.
A damaged state file is set aside and logged, never fatal. SIGTERM and
SIGINT send STOPPING=1, release the name and exit 0. User errors (bus unreachable, name
taken, no AP matrix device, unknown scenario) are one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from dbus_fast import BusType, DBusError, NameFlag, RequestNameReply

from apmatrixd import __version__, notify
from apmatrixd.argdoc import DocumentedParser
from apmatrixd.auth import Authority
from apmatrixd.bus import names
from apmatrixd.bus.base import ApmatrixBus
from apmatrixd.bus.tree import ObjectTree
from apmatrixd.chzdev import RULES_DIR
from apmatrixd.core import ApmatrixError
from apmatrixd.service import Changes

if TYPE_CHECKING:
    from apmatrixd.hotplug import HotPlug
    from apmatrixd.kernel import Kernel
    from apmatrixd.service import Service
    from apmatrixd.sim.fuse import Mount
    from apmatrixd.store import Store

log = logging.getLogger("apmatrixd")

S390_LOCK = "/run/lock/s390apconfig.lock"
"""s390-tools (ap-check, chzdev) serialise AP configuration changes with this lock."""


DEFAULT_STATE_DIR = "/var/lib/apmatrixd"
MDEVCTL_DIR = "/etc/mdevctl.d"
STOP_WAIT = 5.0
"""Seconds a stop waits for queued changes (a change cut short is rolled back at start)."""
RELEASE_WAIT = 2.0
"""Seconds a stop waits for the bus to confirm the name is released (exit frees it anyway)."""


class StartupError(Exception):
    """Something the admin must fix; printed as one line, exit status 1."""


def build_parser() -> DocumentedParser:
    """The daemon's options (also the source of its man page, apmatrixd(8))."""
    p = DocumentedParser(
        prog="apmatrixd",
        description="Keeps IBM Z AP matrices (vfio_ap mediated devices) conflict-free and "
        "serves them on D-Bus as " + names.BUS_NAME + ".",
    )
    p.add_argument(
        "--simulate",
        nargs="?",
        const="default",
        metavar="SCENARIO",
        help="run on the in-process kernel emulator (built-in scenario name or TOML file; "
        "default: the 2017 design document's host)",
    )
    bus = p.exclusive()
    bus.add_argument("--bus-address", metavar="ADDR", help="connect to this D-Bus address")
    bus.add_argument("--session", action="store_true", help="use the session bus")
    bus.add_argument(
        "--system",
        action="store_true",
        help="use the system bus (the default; honours DBUS_SYSTEM_BUS_ADDRESS)",
    )
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help="where matrix definitions and reservations are kept (default: $STATE_DIRECTORY "
        f"or {DEFAULT_STATE_DIR}; with --simulate: none unless given)",
    )
    p.add_argument("--sysfs-root", metavar="DIR", help="sysfs root (default /sys)")
    p.add_argument(
        "--sim-mount",
        metavar="DIR",
        help="with --simulate: also mount the emulated sysfs at DIR (FUSE), so the hardware "
        "can be played from a shell (echo 0 > DIR/devices/ap/card05/config)",
    )
    p.add_argument(
        "--rescan-interval",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="re-read every matrix this often to catch changes made behind the daemon's back "
        "(the kernel sends no uevent for them; default 30, 0 = never)",
    )
    p.add_argument(
        "--bindings-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="autostart waits this long for the AP bus to report its bindings complete "
        "(BINDINGS=complete) before starting matrices anyway (default 60)",
    )
    p.add_argument(
        "--in-use-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long a forced Stop or Remove waits for a running guest to let go of its "
        "matrix before it answers Timeout (default 30; a caller may ask for less)",
    )
    p.add_argument(
        "--mdevctl-dir",
        metavar="DIR",
        help="mdevctl's configuration directory: its definitions there that are not ours are "
        "held as mdevctl-managed matrices (read at start, at each rescan and on ReloadMdevctl), "
        "and the one ImportMdevctl/ExportMdevctl open by path (default "
        f"{MDEVCTL_DIR}; any other comes as a descriptor the caller opened). With --simulate "
        "the simulated host has no mdevctl definitions unless this is given",
    )
    p.add_argument(
        "--udev-rules-dir",
        metavar="DIR",
        help="with --simulate: read chzdev's persistent AP masks (41-ap.rules) for the emulated "
        f"host from DIR (default: none; a real host's are read from {RULES_DIR})",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.sim_mount and args.simulate is None:
        p.error("--sim-mount needs --simulate")
    if args.rescan_interval < 0:
        p.error("--rescan-interval must be >= 0")
    if args.mdevctl_dir is not None and not os.path.isabs(args.mdevctl_dir):
        p.error("--mdevctl-dir must be an absolute path")
    if args.simulate is not None and args.sysfs_root:
        p.error("--simulate and --sysfs-root exclude each other")
    if args.udev_rules_dir is not None and args.simulate is None:
        p.error(f"--udev-rules-dir needs --simulate (a real host's rules are in {RULES_DIR})")
    if args.udev_rules_dir is not None and not os.path.isabs(args.udev_rules_dir):
        p.error("--udev-rules-dir must be an absolute path")
    return args


_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6}


class _JournalFormatter(logging.Formatter):
    """``<N>`` priority prefixes (sd-daemon(3)) so the journal keeps our levels."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 7)
        return "\n".join(f"<{prio}>{line}" for line in super().format(record).splitlines())


def setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        logging.getLogger("dbus_fast").setLevel(logging.WARNING)


def make_kernel(args: argparse.Namespace) -> Kernel:
    from apmatrixd.kernel import Kernel, KernelError, OsSysfs, TreeSysfs

    try:
        if args.simulate is not None:
            from apmatrixd.sim.model import FAULT_ENV, Host

            try:
                host = Host.from_name(args.simulate)
            except (ValueError, KeyError, OSError) as err:
                msg = str(err).strip("'\"") or repr(err)
                raise StartupError(f"scenario {args.simulate!r}: {msg}") from None
            faults = os.environ.get(FAULT_ENV, "")
            if faults:  # test-only: kernel writes that will fail (see FAULT_ENV)
                try:
                    armed = host.inject_faults_from_env(faults)
                except (ValueError, OSError) as err:
                    raise StartupError(str(err)) from None
                log.warning("%s: emulated kernel writes will fail: %s", FAULT_ENV, armed)
            return Kernel(TreeSysfs(host))
        root = args.sysfs_root or "/sys"
        return Kernel(OsSysfs(root), lock_path=None if args.sysfs_root else S390_LOCK)
    except KernelError as err:
        raise StartupError(str(err)) from None


def make_store(args: argparse.Namespace) -> Store | None:
    """The state directory. An emulated host keeps none unless asked: its definitions must
    never land in the real host's /var/lib/apmatrixd."""
    from apmatrixd.store import KILL_ENV, Store, kill_fault_from_env

    if args.state_dir is None and args.simulate is None:
        args.state_dir = os.environ.get("STATE_DIRECTORY", "").split(":")[0] or DEFAULT_STATE_DIR
    if args.state_dir is None:
        log.debug("no --state-dir: matrix definitions on the emulated host are not kept")
        return None
    fault = None
    if args.simulate is not None:  # test-only hooks exist on the emulated host only
        try:
            fault = kill_fault_from_env()
        except ValueError as err:
            raise StartupError(str(err)) from None
    elif os.environ.get(KILL_ENV):
        log.warning("%s is a test hook of --simulate: ignored on a real host", KILL_ENV)
    return Store(args.state_dir, fault=fault)


def make_bus(args: argparse.Namespace) -> tuple[ApmatrixBus, str]:
    if args.bus_address:
        return ApmatrixBus(bus_address=args.bus_address), args.bus_address
    if args.session:
        return ApmatrixBus(bus_type=BusType.SESSION), "the session bus"
    return ApmatrixBus(bus_type=BusType.SYSTEM), "the system bus"


def _status(service: Service) -> str:
    # Counted from the registry, the layout from the state: building every matrix's view,
    # or the host's, here cost every change.
    n = len(service.registry.matrices)
    return f"STATUS=serving {n} matri{'x' if n == 1 else 'ces'} ({service.state.layout} layout)"


async def _watchdog(interval: float) -> None:
    while True:
        notify.notify("WATCHDOG=1")
        await asyncio.sleep(interval)


async def run(args: argparse.Namespace) -> int:
    from apmatrixd.kernel import KernelError
    from apmatrixd.service import Service, startup

    kernel = make_kernel(args)
    service = Service(kernel, store=make_store(args))
    service.in_use_timeout = max(args.in_use_timeout, 0.0)
    # A simulated host is not this machine: the host's own mdevctl definitions are not its.
    service.mdevctl_dir = os.path.normpath(args.mdevctl_dir or MDEVCTL_DIR)
    service.watch_mdevctl = args.mdevctl_dir is not None or args.simulate is None
    interval = notify.watchdog_interval()
    watchdog = asyncio.ensure_future(_watchdog(interval)) if interval else None
    with contextlib.ExitStack() as cleanup:
        if watchdog is not None:
            cleanup.callback(watchdog.cancel)
        cleanup.callback(service.executor.close)
        # Listen before reading: nothing that happens during the enumeration is missed.
        hotplug = start_events(args, kernel, service)
        cleanup.callback(hotplug.close)
        early = EarlyDrift()
        service.subscribe(early)
        try:
            # A command like any other: uevents meanwhile queue their resyncs behind it.
            await service.submit("start-up", startup.load)
        except KernelError as err:
            raise StartupError(f"reading the AP configuration: {err}") from None
        except OSError as err:
            raise StartupError(f"state directory {args.state_dir}: {err.strerror}") from None
        except ApmatrixError as err:
            raise StartupError(f"start-up: {err}") from None
        rules = RULES_DIR if args.simulate is None else args.udev_rules_dir
        if rules is not None:
            await watch_boot_pool(service, hotplug, rules)
        if args.sim_mount:
            cleanup.callback(mount_sim(kernel, args.sim_mount).stop)
        if not service.state.bindings_ready:
            timer = asyncio.get_running_loop().call_later(
                max(args.bindings_timeout, 0.0), _bindings_timed_out, service
            )
            cleanup.callback(timer.cancel)
        return await _connect_and_serve(args, service, early)


def _bindings_timed_out(service: Service) -> None:
    from apmatrixd.service import ops

    if service.state.bindings_ready:
        return
    log.warning("the AP bus has not reported its bindings complete: autostart goes ahead")
    fut = service.submit("autostart", ops.bindings_complete, "not complete in time")
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())


def start_events(args: argparse.Namespace, kernel: Kernel, service: Service) -> HotPlug:
    """Uevents from udev (real host) or from the emulator (--simulate), and the rescan timer.

    Without a udev monitor (no netlink here) the daemon still works, on the timer alone.
    """
    from apmatrixd.events import SimSource, UdevSource
    from apmatrixd.hotplug import HotPlug
    from apmatrixd.kernel import TreeSysfs

    hotplug = HotPlug(service, asyncio.get_running_loop(), rescan_interval=args.rescan_interval)
    if isinstance(kernel.io, TreeSysfs):
        hotplug.start(SimSource(hotplug.pump, kernel.io.tree))
        return hotplug
    try:
        source = UdevSource(hotplug.pump)
        hotplug.start(source)
    except (OSError, ImportError) as err:
        log.warning("no udev monitor (%s): hot plug is seen by the rescan timer only", err)
    return hotplug


async def watch_boot_pool(service: Service, hotplug: HotPlug, directory: str) -> None:
    """chzdev's persistent masks: read now, again at every rescan (when the file changed), and
    compared with the reservations whenever those change (service/boot.py)."""
    from apmatrixd.service import boot

    what = f"reading chzdev's persistent AP masks in {directory}"
    await service.submit(what, boot.refresh, directory)

    def reread() -> None:
        fut = service.submit(what, boot.refresh, directory)
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())

    hotplug.on_rescan.append(reread)
    service.subscribe(boot.follow(service))


def mount_sim(kernel: Kernel, where: str) -> Mount:
    """The in-process emulator, also as FUSE at ``where`` (--sim-mount)."""
    from apmatrixd.kernel import TreeSysfs

    assert isinstance(kernel.io, TreeSysfs)
    if not os.path.isdir(where):
        raise StartupError(f"--sim-mount {where}: not a directory")
    try:
        from apmatrixd.sim.fuse import mount
    except (ImportError, OSError) as err:
        raise StartupError(f"--sim-mount needs mfusepy and libfuse3: {err}") from None
    try:
        mounted = mount(kernel.io.tree, where, foreground=False)
    except (RuntimeError, OSError) as err:
        raise StartupError(f"--sim-mount {where}: {err}") from None
    log.info("emulated sysfs mounted at %s", where)
    return mounted


class EarlyDrift:
    """Drift found before the objects are exported reaches no listener: kept for READY."""

    def __init__(self) -> None:
        self.held: list[tuple[str, str]] = []
        self.open = True

    def __call__(self, changes: Changes) -> None:
        if self.open:
            self.held += changes.drift

    def release(self) -> list[tuple[str, str]]:
        self.open = False
        held, self.held = self.held, []
        return held


async def _connect_and_serve(args: argparse.Namespace, service: Service, early: EarlyDrift) -> int:
    try:
        bus, where = make_bus(args)
    except ValueError as err:  # no address to be found (no session bus in this shell)
        hint = " (--session needs a session bus: run under dbus-run-session)"
        hint = hint if args.session else ""
        raise StartupError(f"no bus to connect to: {err}{hint}") from None
    except OSError as err:  # dbus-fast < 2 connects the socket in the constructor
        raise StartupError(f"cannot connect to the bus: {err.strerror or err}") from None
    try:
        await bus.connect()
    except (OSError, ValueError, DBusError) as err:
        raise StartupError(f"cannot connect to {where}: {err}") from None
    try:
        authority = Authority(bus)
        await authority.install()
        tree = ObjectTree(bus, service, authority)
        bus.dispatcher.on_refused = service.count_refusal
        tree.export()
        held = early.release()  # from now on the tree hears every drift itself
        try:
            reply = await bus.request_name(names.BUS_NAME, NameFlag.DO_NOT_QUEUE)
        except DBusError as err:
            raise StartupError(f"may not own {names.BUS_NAME} on {where}: {err.text}") from None
        if reply != RequestNameReply.PRIMARY_OWNER:
            raise StartupError(
                f"{names.BUS_NAME} is already owned on {where} (is another apmatrixd running?)"
            )
        bus.announce = True  # from now on object changes are news worth a signal
        return await _serve(bus, service, [*service.startup_drift, *held])
    finally:
        bus.disconnect()


async def _serve(bus: ApmatrixBus, service: Service, drift: list[tuple[str, str]]) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    status = _status(service)

    def on_changes(_changes: Changes) -> None:
        nonlocal status
        new = _status(service)
        if new != status:
            status = new
            notify.notify(status)

    service.subscribe(on_changes)
    notify.notify("READY=1", status, wait=5.0)
    log.info("serving %s on %s: %s", names.BUS_NAME, bus.unique_name, status[7:])
    if drift:  # found before anyone could listen: said once we serve
        service.emit(Changes(drift=drift))

    tasks = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(bus.wait_for_disconnect())]  # type: ignore[no-untyped-call]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for t in pending:
        t.cancel()
    # Both may be done in one turn (SIGTERM as the bus goes down at poweroff): read every
    # outcome, else asyncio logs "Task exception was never retrieved" at exit.
    why = next((e for t in done if not t.cancelled() and (e := t.exception())), None)
    if not stop.is_set():
        reason = f" ({str(why) or type(why).__name__})" if why else ""  # EOFError says nothing
        log.error("lost the bus connection%s", reason)
        notify.notify("STOPPING=1", "STATUS=lost the bus connection", wait=5.0)
        return 1
    notify.notify("STOPPING=1", "STATUS=stopping", wait=5.0)
    log.info("stopping")
    service.executor.refuse("apmatrixd is stopping")
    # Only on a live bus, and bounded: a call made once the bus is gone is never answered
    # (dbus-fast fails only the calls pending when it noticed), and a stop must not hang.
    if bus.connected:
        with contextlib.suppress(DBusError, OSError, EOFError, TimeoutError):
            await asyncio.wait_for(bus.release_name(names.BUS_NAME), RELEASE_WAIT)
    # Let the changes queued so far finish (a cut one is undone), and the files of the last
    # one answered be written (else the next start writes them from the journal).
    if service.executor.busy:
        log.info("waiting for %s", service.executor.running or "queued changes")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(service.executor.idle(), STOP_WAIT)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    try:
        return asyncio.run(run(args))
    except StartupError as err:
        log.error("%s", err)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
