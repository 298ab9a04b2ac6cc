"""``apmatrixd-sim``: the kernel emulator from the command line.

``mount`` puts an emulated host where ``/sys`` would be (FUSE), ``scenarios`` lists the built-in
hosts, ``show`` summarises one, and ``demo`` walks through the design document's example on the
in-process face. User errors are one line on stderr: exit 2 for bad arguments (usage, unknown
scenario, missing mountpoint), exit 1 when the machine cannot do it (not root, no /dev/fuse,
mount refused).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn

from apmatrixd.argdoc import DocumentedParser
from apmatrixd.sim.uevent import Sink, attach, sink_from_spec
from apmatrixd.sim.vfs import SysfsTree, Uevent

if TYPE_CHECKING:
    from apmatrixd.sim.model import Host

PROG = "apmatrixd-sim"
DEMO_UUID_A = "11111111-1111-4111-8111-111111111111"
DEMO_UUID_B = "22222222-2222-4222-8222-222222222222"

# Both layouts: where the matrix device lives, its mdev type, and the queue driver for guests.
_LAYOUTS = {
    "upstream": ("devices/vfio_ap/matrix", "vfio_ap-passthrough", "vfio_ap"),
    "rfc2017": ("devices/ap_matrix/matrix", "ap_matrix-passthrough", "vfio_ap_matrix"),
}


class UserError(Exception):
    """A mistake or an unmet precondition, reported as one line; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def _fail(err: UserError) -> NoReturn:
    print(f"{PROG}: error: {err}", file=sys.stderr)
    sys.exit(err.code)


def load_host(scenario: str, kernel: str | None = None) -> Host:
    """The emulated host of a built-in scenario name or a TOML file, on the scenario's kernel
    generation or ``kernel``; UserError if either is unknown."""
    from apmatrixd.sim.model import Host
    from apmatrixd.sim.profile import profile
    from apmatrixd.sim.scenario import load_scenario

    if kernel is None and "@" in scenario:  # NAME@KERNEL, as Host.from_name takes it
        scenario, _, kernel = scenario.rpartition("@")
    try:
        loaded = load_scenario(scenario)
    except (ValueError, KeyError, OSError) as err:
        message = str(err).strip("'\"") or repr(err)
        raise UserError(f"scenario {scenario!r}: {message}") from None
    if kernel is not None:
        try:
            profile(kernel)
        except ValueError as err:
            raise UserError(f"--kernel: {err}") from None
        if loaded.layout != "upstream":
            raise UserError(f"--kernel: scenario {scenario!r} is the {loaded.layout} layout")
        loaded = dataclasses.replace(loaded, kernel=kernel)
    return Host(loaded)


# -- reading a host through the SysfsTree protocol only (works on either layout) ---------------
def _read(tree: SysfsTree, path: str) -> str | None:
    try:
        return tree.read(path).decode().strip()
    except OSError:
        return None


def _list(tree: SysfsTree, path: str) -> list[str]:
    try:
        return tree.listdir(path)
    except OSError:
        return []


def _mask_ids(text: str | None) -> list[int] | None:
    """``0x<64 hex>`` as sysfs prints apmask/aqmask, left bit = id 0."""
    if not text or not text.startswith("0x"):
        return None
    bits = bin(int(text[2:], 16))[2:].zfill(len(text[2:]) * 4)
    return [i for i, bit in enumerate(bits) if bit == "1"]


def format_ids(ids: Sequence[int] | None, width: int = 2) -> str:
    """Ids as compact hex ranges (``04 47 ab-ff``); '-' when empty."""
    if ids is None:
        return "?"
    if not ids:
        return "-"
    parts: list[str] = []
    start = prev = ids[0]
    for i in [*ids[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(
            f"{start:0{width}x}" if start == prev else f"{start:0{width}x}-{prev:0{width}x}"
        )
        if i is not None:
            start = prev = i
    return " ".join(parts)


def detect_layout(tree: SysfsTree) -> str:
    for name, (matrix_dir, _type, _driver) in _LAYOUTS.items():
        try:
            if tree.kind(matrix_dir) == "dir":
                return name
        except OSError:
            continue
    return "none"


def summary(tree: SysfsTree) -> list[str]:
    """A short picture of the host: limits, pool masks, adapters and their queues, matrices."""
    layout = detect_layout(tree)
    lines = [
        f"layout {layout}, max adapter id {_read(tree, 'bus/ap/ap_max_adapter_id') or '?'}, "
        f"max domain id {_read(tree, 'bus/ap/ap_max_domain_id') or '?'}"
    ]
    for mask in ("apmask", "aqmask"):
        ids = _mask_ids(_read(tree, f"bus/ap/{mask}"))
        if ids is not None:
            lines.append(f"{mask} {format_ids(ids, 2)}")
    lines.append("adapters:")
    cards = sorted(n for n in _list(tree, "devices/ap") if n.startswith("card"))
    if not cards:
        lines.append("  (none)")
    for card in cards:
        base = f"devices/ap/{card}"
        kind = _read(tree, f"{base}/type") or f"hwtype {_read(tree, f'{base}/hwtype') or '?'}"
        state = "online" if _read(tree, f"{base}/online") == "1" else "offline"
        if _read(tree, f"{base}/config") == "0":
            state = "deconfigured"
        by_driver: dict[str, list[int]] = {}
        for queue in sorted(n for n in _list(tree, base) if "." in n):
            try:
                driver = os.path.basename(tree.readlink(f"{base}/{queue}/driver"))
            except OSError:
                driver = "unbound"
            by_driver.setdefault(driver, []).append(int(queue.split(".")[1], 16))
        queues = "; ".join(f"{d} {format_ids(ids, 4)}" for d, ids in sorted(by_driver.items()))
        lines.append(f"  {card[4:]} {kind:<6} {state:<8} {queues or 'no queues'}")
    if layout != "none":
        matrix_dir = _LAYOUTS[layout][0]
        uuids = [n for n in _list(tree, matrix_dir) if n.count("-") == 4]
        lines.append("matrices:" if uuids else "matrices: none")
        for uuid in sorted(uuids):
            lines.append(f"  {uuid}: {describe_matrix(tree, f'{matrix_dir}/{uuid}')}")
    return lines


def describe_matrix(tree: SysfsTree, mdev: str) -> str:
    matrix = _read(tree, f"{mdev}/matrix")
    if matrix is None:  # rfc2017: separate adapters / domains files
        adapters = (_read(tree, f"{mdev}/adapters") or "").split()
        domains = (_read(tree, f"{mdev}/domains") or "").split()
        return f"adapters {' '.join(adapters) or '-'}, domains {' '.join(domains) or '-'}"
    return " ".join(matrix.split()) or "(empty)"


def _shorten(text: str, width: int = 14) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


# -- demo --------------------------------------------------------------------------------------
class _Shell:
    """Writes to the in-process face and prints them as the shell session they stand for."""

    def __init__(self, tree: SysfsTree, out: Callable[[str], None]) -> None:
        self.tree = tree
        self.out = out
        self.events: list[Uevent] = []
        self.refusals = 0

    def echo(self, value: str, path: str) -> bool:
        self.out(f"$ echo {value} > /sys/{path}")
        self.events.clear()
        try:
            self.tree.write(path, f"{value}\n".encode())
        except OSError as err:
            name = errno.errorcode.get(err.errno or 0, "?")
            self.out(f"bash: echo: write error: {os.strerror(err.errno or 0)}   [{name}]")
            self.refusals += 1
            return False
        self._report_events()
        return True

    def cat(self, path: str) -> None:
        self.out(f"$ cat /sys/{path}")
        try:
            text = self.tree.read(path).decode()
        except OSError as err:
            self.out(f"cat: /sys/{path}: {os.strerror(err.errno or 0)}")
            return
        for line in text.splitlines() or ["(empty)"]:
            self.out(line)

    def _report_events(self) -> None:
        if not self.events:
            return
        counts = Counter(e.action for e in self.events)
        shown = sorted(
            {
                f"{key}={_shorten(value.strip())}"
                for e in self.events
                for key, value in e.env.items()
                if key in {"APMASK", "AQMASK", "CONFIG", "ONLINE"}
            }
        )
        what = ", ".join(f"{n} {a}" for a, n in sorted(counts.items()))
        self.out(f"  (uevents: {what}{'; ' + ' '.join(shown) if shown else ''})")


def demo(host: Host, out: Callable[[str], None] = print) -> int:
    """The design document's example, step by step; returns how many writes were refused."""
    tree: SysfsTree = host
    layout = detect_layout(tree)
    if layout not in _LAYOUTS:
        raise UserError("this scenario has no AP matrix device to demonstrate", 1)
    matrix_dir, mdev_type, guest_driver = _LAYOUTS[layout]
    shell = _Shell(tree, out)
    tree.subscribe(shell.events.append)

    out(f"# The emulated host ({layout} layout):")
    for line in summary(tree):
        out(f"#   {line}")
    out("")
    out("# 1. Take adapters 05 and 06 out of the host pool so guests may have them.")
    if layout == "upstream":
        shell.echo("-5,-6", "bus/ap/apmask")
    else:
        for card in ("card05", "card06"):
            for queue in sorted(n for n in _list(tree, f"devices/ap/{card}") if "." in n):
                shell.echo(queue, "bus/ap/drivers/cex4queue/unbind")
                shell.echo(queue, f"bus/ap/drivers/{guest_driver}/bind")
    out("")
    create = f"{matrix_dir}/mdev_supported_types/{mdev_type}/create"
    a, b = f"{matrix_dir}/{DEMO_UUID_A}", f"{matrix_dir}/{DEMO_UUID_B}"
    out("# 2. Matrix A: adapters 05 and 06, usage domains 04 and 47.")
    shell.echo(DEMO_UUID_A, create)
    for attr, value in (("adapter", "5"), ("adapter", "6"), ("domain", "4"), ("domain", "0x47")):
        shell.echo(value, f"{a}/assign_{attr}")
    out("")
    out("# 3. Matrix B: adapter 05, usage domain ab.")
    shell.echo(DEMO_UUID_B, create)
    shell.echo("5", f"{b}/assign_adapter")
    shell.echo("0xab", f"{b}/assign_domain")
    out("")
    out("# 4. Domain 04 for B too? APQN 05.0004 already belongs to A: the kernel refuses.")
    shell.echo("4", f"{b}/assign_domain")
    out("# 5. Adapter 999 does not exist on any machine.")
    shell.echo("999", f"{b}/assign_adapter")
    if layout == "upstream":
        out("# 6. The host pool cannot take adapter 05 back while matrices hold its queues.")
        shell.echo("+5", "bus/ap/apmask")
    out("")
    out("# The matrices now:")
    for mdev in (a, b):
        for attr in ("matrix",) if layout == "upstream" else ("adapters", "domains"):
            shell.cat(f"{mdev}/{attr}")
    out("")
    out("# The host now:")
    for line in summary(tree):
        out(f"#   {line}")
    return shell.refusals


# -- commands ----------------------------------------------------------------------------------
def _uevents_arg(value: str) -> str:
    kind = value.partition(":")[0]
    if value in ("none", "netlink") or (kind == "umockdev" and value[len("umockdev:") :]):
        return value
    raise argparse.ArgumentTypeError("expected none, netlink or umockdev:DIR")


def _fd_arg(value: str) -> int:
    try:
        fd = int(value)
        os.fstat(fd)
    except (ValueError, OSError):
        raise argparse.ArgumentTypeError(f"{value!r} is not an open file descriptor") from None
    return fd


def cmd_mount(args: argparse.Namespace) -> int:
    from apmatrixd.sim.fuse import mount

    mountpoint = os.path.abspath(args.mountpoint)
    if not os.path.isdir(mountpoint):
        raise UserError(f"mountpoint {args.mountpoint}: no such directory")
    host = load_host(args.scenario, args.kernel)
    if os.geteuid() != 0:
        raise UserError("mount needs root (/dev/fuse with allow_other, netlink uevents)", 1)
    if not os.path.exists("/dev/fuse"):
        raise UserError("/dev/fuse is missing (load the fuse module)", 1)
    sink: Sink | None
    try:
        sink = sink_from_spec(args.uevents)
    except FileNotFoundError as err:
        raise UserError(f"--uevents {args.uevents}: {err.strerror}: {err.filename}") from None
    except (OSError, ValueError) as err:
        raise UserError(f"--uevents {args.uevents}: {err}", 1) from None
    if sink is not None:
        attach(host, sink)
    ready_fd: int | None = args.ready_fd

    def on_ready() -> None:
        line = f"mounted {mountpoint}\n"
        if ready_fd is None:
            sys.stdout.write(line)
            sys.stdout.flush()
        else:
            os.write(ready_fd, line.encode())
            os.close(ready_fd)

    try:
        mount(host, mountpoint, foreground=True, on_ready=on_ready, debug=args.debug)
    except RuntimeError as err:
        raise UserError(str(err), 1) from None
    finally:
        if sink is not None:
            logging.getLogger(__name__).info("uevents sent %d, dropped %d", sink.sent, sink.failed)
            sink.close()
    return 0


def cmd_guest(args: argparse.Namespace) -> int:
    """Attach or detach a fake guest through the mount's control file (root-only, 0600)."""
    from apmatrixd.sim.tree import CONTROL

    mountpoint = os.path.abspath(args.mountpoint)
    base = f"devices/vfio_ap/matrix/{args.uuid}"
    if not os.path.isdir(os.path.join(mountpoint, "devices")):
        raise UserError(f"{args.mountpoint}: not an apmatrixd-sim mount")
    if not os.path.isdir(os.path.join(mountpoint, base)):
        raise UserError(f"no mdev {args.uuid} under {args.mountpoint} (create it first)")
    line = f"{args.action} {args.uuid}"
    if args.action == "attach" and args.release_after is not None:
        line += f" {args.release_after}"
    try:
        fd = os.open(os.path.join(mountpoint, CONTROL), os.O_WRONLY | os.O_NOFOLLOW)
    except OSError as err:
        raise UserError(f"{args.mountpoint}: no emulator control file: {err.strerror}", 1) from None
    try:
        os.write(fd, (line + "\n").encode())
    except OSError as err:
        why = {
            errno.EBUSY: "a guest already holds it",
            errno.ENOENT: "no guest holds it" if args.action == "detach" else "no such mdev",
        }.get(err.errno or 0, err.strerror)
        raise UserError(f"guest {args.action} {args.uuid}: {why}", 1) from None
    finally:
        os.close(fd)
    return 0


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"{value!r} is not 0..3600 seconds")
    return seconds


def cmd_scenarios(args: argparse.Namespace) -> int:
    from apmatrixd.sim.scenario import builtin_names, load_scenario

    for name in builtin_names():
        try:
            scenario = load_scenario(name)
            print(f"{name:<10} {scenario.layout:<9} {scenario.description}")
        except ValueError as err:
            print(f"{name:<10} (broken: {err})")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    host = load_host(args.scenario, args.kernel)
    print(f"scenario {args.scenario} (kernel {host.profile.version})")
    for line in summary(host):
        print(line)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    demo(load_host(args.scenario))
    return 0


def build_parser() -> DocumentedParser:
    parser = DocumentedParser(
        prog=PROG, description="The apmatrixd kernel emulator: an IBM Z AP host without hardware."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log to stderr")
    parser.subcommands(dest="command", required=True, metavar="COMMAND")
    scenario_help = "built-in scenario name or a .toml file (default: %(default)s)"

    p = parser.command("mount", help="serve an emulated /sys at MOUNTPOINT (FUSE, foreground)")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--scenario", default="default", metavar="NAME|FILE", help=scenario_help)
    p.add_argument(
        "--uevents",
        default="none",
        type=_uevents_arg,
        metavar="none|netlink|umockdev:DIR",
        help="where uevents go; netlink only inside a private network namespace",
    )
    p.add_argument(
        "--ready-fd",
        type=_fd_arg,
        metavar="N",
        help="write 'mounted MOUNTPOINT' to fd N and close it once live (default: stdout)",
    )
    p.add_argument(
        "--kernel",
        metavar="VERSION",
        help="kernel generation to emulate instead of the scenario's: "
        "5.15, 6.0, 6.10, 6.12, 6.15 or 6.19",
    )
    p.add_argument("--debug", action="store_true", help="libfuse debug output")
    p.set_defaults(func=cmd_mount)

    p = parser.command("guest", help="start or stop a fake KVM guest on an mdev of a mount")
    p.add_argument("action", choices=("attach", "detach"))
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("uuid", metavar="UUID")
    p.add_argument(
        "--release-after",
        type=_seconds,
        metavar="SECONDS",
        help="attach: QEMU lets go this long after the kernel asks for the device back "
        "(default: only on detach)",
    )
    p.set_defaults(func=cmd_guest)

    p = parser.command("scenarios", help="list the built-in scenarios")
    p.set_defaults(func=cmd_scenarios)

    p = parser.command("show", help="summarise an emulated host")
    p.add_argument("--scenario", default="default", metavar="NAME|FILE", help=scenario_help)
    p.add_argument("--kernel", metavar="VERSION", help="kernel generation (as for mount)")
    p.set_defaults(func=cmd_show)

    p = parser.command("demo", help="walk through the design document's example in-process")
    p.add_argument("--scenario", default="default", metavar="NAME|FILE", help=scenario_help)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format=f"{PROG}: %(levelname)s: %(message)s",
    )
    try:
        code: int = args.func(args)
    except UserError as err:
        _fail(err)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
