"""apmatrixd as a distribution ships it, under the real systemd: the .deb installed with apt in a
booted Debian 12, the unmodified unit, D-Bus activation, the real dbus-daemon and polkitd,
busctl, and the kernel emulator over /sys (tests/boot/bootrig.py; issue 16, part 3).

The tests share one machine and each sets up what it needs, so any one can run alone.
"""

from __future__ import annotations

import re
import time

import pytest
from bootrig import MEMBER, OUTSIDER, REPO, SIM, Machine
from busrig import path_of

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]  # the first one may build the root

NAME = "org.apmatrix.Apmatrix1"
ROOT = "/org/apmatrix/Apmatrix1"
MANAGER = (NAME, ROOT, "org.apmatrix.Apmatrix1.Manager")
MATRIX = "org.apmatrix.Apmatrix1.Matrix"
UNIT = "apmatrixd.service"
MATRICES = "/sys/devices/vfio_ap/matrix"
MASKS = ("apmask", "aqmask")
VERSION = next(
    ln.split('"')[1] for ln in (REPO / "pyproject.toml").read_text().splitlines()
    if ln.startswith("version = ")
)  # fmt: skip
UGLY = ("Traceback", "Task exception", "never retrieved", "Errno 9")
"""What a clean run of the daemon never logs."""


def guest(n: int) -> str:
    """The UUID of guest ``n`` (1-9): 11111111-1111-4111-8111-111111111111 and so on."""
    d = str(n)
    return f"{d * 8}-{d * 4}-4{d * 3}-8{d * 3}-{d * 12}"


def busctl(m: Machine, *args: str, user: str | None = None, check: bool = True) -> str:
    r = m.run("busctl", *args, user=user, check=check)
    return r.stdout + r.stderr


def started(m: Machine) -> dict[str, str]:
    """apmatrixd running (whatever an earlier test left), its unit's state."""
    m.run("systemctl", "reset-failed", UNIT, check=False)
    m.run("systemctl", "start", "dbus.service", UNIT)
    return m.show(UNIT, "ActiveState", "SubState", "MainPID", "NRestarts", "InvocationID")


def reserve(m: Machine, adapters: tuple[int, ...], domains: tuple[int, ...]) -> None:
    busctl(m, "call", *MANAGER, "Reserve", "auau", str(len(adapters)), *map(str, adapters),
           str(len(domains)), *map(str, domains))  # fmt: skip


def create(
    m: Machine, uuid: str, name: str, adapters: tuple[int, ...], domains: tuple[int, ...],
    user: str | None = None, check: bool = True,
) -> str:  # fmt: skip
    return busctl(
        m, "call", *MANAGER, "CreateMatrix", "sa{sv}", uuid, "3", "name", "s", name,
        "adapters", "au", str(len(adapters)), *map(str, adapters),
        "domains", "au", str(len(domains)), *map(str, domains), user=user, check=check,
    )  # fmt: skip


def prop(m: Machine, path: str, iface: str, name: str) -> str:
    return busctl(m, "get-property", NAME, path, iface, name).strip()


def daemon_lines(m: Machine, invocation: str) -> list[str]:
    """What the daemon itself logged in one run of the unit."""
    return [str(e.get("MESSAGE", "")) for e in m.journal(f"_SYSTEMD_INVOCATION_ID={invocation}")]


def assert_stopped_cleanly(m: Machine, invocation: str) -> None:
    state = m.show(UNIT, "ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    lines = daemon_lines(m, invocation)
    assert state == {"ActiveState": "inactive", "Result": "success", "ExecMainCode": "1",
                     "ExecMainStatus": "0"}, (state, lines)  # fmt: skip
    assert "apmatrixd: stopping" in lines, lines
    assert not [ln for ln in lines if any(u in ln for u in UGLY)], lines


def test_systemctl_start_reaches_active_running_with_its_status_line(machine: Machine) -> None:
    m = machine
    m.run("systemctl", "start", UNIT)
    status = m.run("systemctl", "status", UNIT, "--no-pager", "--lines=0", check=False).stdout
    assert re.search(r"^\s+Active: active \(running\)", status, re.M), status
    assert re.search(
        r'^\s+Status: "serving \d+ matric\w+ \(upstream layout\)"', status, re.M
    ), status
    # the unit as packaged (no drop-in), where the package put it, enabled by its postinst
    assert "Loaded: loaded (/lib/systemd/system/apmatrixd.service; enabled" in status, status
    assert m.show(UNIT, "Type", "DropInPaths") == {"Type": "notify", "DropInPaths": ""}


def test_dbus_activation_starts_it_on_the_first_call(machine: Machine) -> None:
    m = machine
    started(m)
    m.run("systemctl", "stop", UNIT)
    assert m.show(UNIT, "ActiveState")["ActiveState"] == "inactive"
    mark = m.cursor()
    assert prop(m, ROOT, MANAGER[2], "Version") == f's "{VERSION}"'
    assert m.show(UNIT, "ActiveState", "SubState") == {"ActiveState": "active",
                                                       "SubState": "running"}  # fmt: skip
    said = [str(e.get("MESSAGE")) for e in m.journal("-u", "dbus.service", after=mark)]
    assert f"[system] Successfully activated service '{NAME}'" in said, said


def test_reserve_and_create_matrix_write_the_emulated_sysfs(machine: Machine) -> None:
    m = machine
    started(m)
    g1 = guest(1)
    reserve(m, (5, 6), (4,))
    assert create(m, g1, "guest1", (5, 6), (4,)).strip() == f'o "{path_of(g1)}"'
    apmask, aqmask = (int(m.run("cat", f"/sys/bus/ap/{f}").stdout, 16) for f in MASKS)
    # bit 0 is the leftmost of 256: cleared, the ids go to vfio_ap
    assert not apmask >> (255 - 5) & 1 and not apmask >> (255 - 6) & 1, hex(apmask)
    assert apmask >> (255 - 7) & 1 and not aqmask >> (255 - 4) & 1, (hex(apmask), hex(aqmask))
    assert m.run("cat", f"{MATRICES}/{g1}/matrix").stdout.split() == ["05.0004", "06.0004"]
    # written through /sys into the emulator's own tree
    sim = m.run("cat", f"{SIM}/devices/vfio_ap/matrix/{g1}/matrix").stdout
    assert sim.split() == ["05.0004", "06.0004"]
    assert prop(m, path_of(g1), MATRIX, "State") == 's "active"'


RULES = re.search(r"rules\.d/50-apmatrix\.rules`:\n\n```js\n(.*?)```",
                  (REPO / "README.md").read_text(), re.S)  # fmt: skip


def test_the_polkit_rule_lets_the_apmatrix_group_in_and_keeps_others_out(
    machine: Machine,
) -> None:
    """The README's rules file, the shipped polkit actions, the real polkitd: a member of group
    apmatrix may manage, another user is refused (and nothing changes), both may read."""
    assert RULES, "README.md: no 50-apmatrix.rules example"
    m = machine
    started(m)
    m.write("/etc/polkit-1/rules.d/50-apmatrix.rules", RULES.group(1))
    m.run("systemctl", "try-restart", "polkit.service")  # it reads the rules when it starts
    reserve(m, (5, 6), (0x47,))
    g2, g3 = guest(2), guest(3)
    assert create(m, g2, "guest2", (5,), (0x47,), user=MEMBER).strip() == f'o "{path_of(g2)}"'
    assert m.run("cat", f"{MATRICES}/{g2}/matrix").stdout.split() == ["05.0047"]
    aqmask = m.run("cat", "/sys/bus/ap/aqmask").stdout
    refused = create(m, g3, "guest3", (6,), (0x47,), user=OUTSIDER, check=False)
    assert "Access denied" in refused, refused
    assert m.run("ls", MATRICES).stdout.split().count(g3) == 0
    refused = busctl(m, "call", *MANAGER, "Reserve", "auau", "0", "1", "0xff", user=OUTSIDER,
                     check=False)  # fmt: skip
    assert "Access denied" in refused and m.run("cat", "/sys/bus/ap/aqmask").stdout == aqmask
    for user in (MEMBER, OUTSIDER):  # reading is open to everyone
        assert busctl(m, "get-property", NAME, path_of(g2), MATRIX, "Name",
                      user=user).strip() == 's "guest2"'  # fmt: skip


def test_kill_9_is_followed_by_a_restart_and_the_definitions_are_back(machine: Machine) -> None:
    m = machine
    before = started(m)
    g4 = guest(4)
    reserve(m, (5, 6), (0xAB,))
    create(m, g4, "guest4", (5, 6), (0xAB,))
    m.sh(f"kill -9 {before['MainPID']}")

    def restarted() -> bool:
        now = m.show(UNIT, "SubState", "MainPID", "NRestarts")
        return (now["SubState"] == "running" and now["MainPID"] != before["MainPID"]
                and int(now["NRestarts"]) == int(before["NRestarts"]) + 1)  # fmt: skip

    m.wait(restarted, 20, "apmatrixd restarted after kill -9")
    assert prop(m, path_of(g4), MATRIX, "Name") == 's "guest4"'
    assert prop(m, path_of(g4), MATRIX, "State") == 's "active"'
    assert prop(m, path_of(g4), MATRIX, "Apqns") == "a(uu) 2 5 171 6 171"
    assert m.run("test", "-f", f"/var/lib/apmatrixd/matrices/{g4}.json").returncode == 0
    said = [str(e.get("MESSAGE")) for e in m.journal("-u", UNIT)]
    assert any("code=killed, status=9/KILL" in s for s in said), said


WATCHDOG_DROPIN = "/run/systemd/system/apmatrixd.service.d/50-test-watchdog.conf"


def test_the_watchdog_holds(machine: Machine) -> None:
    """WatchdogSec=3s (a drop-in, to keep the wait short): 8 s without a watchdog kill."""
    m = machine
    started(m)
    m.write(WATCHDOG_DROPIN, "[Service]\nWatchdogSec=3s\n")
    try:
        m.run("systemctl", "daemon-reload")
        m.run("systemctl", "restart", UNIT)
        before = m.show(UNIT, "WatchdogUSec", "MainPID", "NRestarts")
        assert before["WatchdogUSec"] == "3s", before
        mark = m.cursor()
        time.sleep(8)  # what is tested is that nothing happens meanwhile
        assert m.show(UNIT, "WatchdogUSec", "MainPID", "NRestarts") == before
        said = [str(e.get("MESSAGE")) for e in m.journal("-u", UNIT, after=mark)]
        assert not [s for s in said if "atchdog" in s], said
    finally:
        m.run("rm", "-f", WATCHDOG_DROPIN)
        m.run("systemctl", "daemon-reload")
        m.run("systemctl", "restart", UNIT)


def test_systemctl_stop_is_clean(machine: Machine) -> None:
    m = machine
    invocation = started(m)["InvocationID"]
    reserve(m, (5, 6), (4,))  # some traffic first: signals, a change
    m.run("systemctl", "stop", UNIT)
    assert_stopped_cleanly(m, invocation)


SHUTDOWN = "apmatrixd-test-shutdown.target"
SHUTDOWN_UNIT = f"""[Unit]
Description=Stops the bus and apmatrixd in one transaction, as shutdown.target does
DefaultDependencies=no
Conflicts=dbus.service {UNIT}
After=dbus.service {UNIT}
"""
"""(``After=``: the target is reached once both have stopped, not when the stops begin.)"""


def test_stopping_together_with_the_bus_is_clean_too(machine: Machine) -> None:
    """As at poweroff, dbus.service stops in the same transaction (a target that conflicts
    with both, as shutdown.target does with everything): apmatrixd is ordered to stop first,
    releases its name and exits 0. Unordered it raced the bus: 'Task exception was never
    retrieved', Errno 9, a stop that hung until systemd's kill 90 s later, or a failed unit."""
    m = machine
    invocation = started(m)["InvocationID"]
    m.write(f"/run/systemd/system/{SHUTDOWN}", SHUTDOWN_UNIT)
    try:
        m.run("systemctl", "daemon-reload")
        mark = m.cursor()
        m.run("systemctl", "start", SHUTDOWN, timeout=30)
        assert_stopped_cleanly(m, invocation)
        said = [str(e.get("MESSAGE")) for e in m.journal("_PID=1", after=mark)]
        order = [s.split(" - ")[0] for s in said if s.startswith(("Stopping ", "Stopped "))]
        # one after the other (unordered, both stops would begin before either ends)
        assert order == ["Stopping apmatrixd.service", "Stopped apmatrixd.service",
                         "Stopping dbus.service", "Stopped dbus.service"], said  # fmt: skip
    finally:
        m.run("systemctl", "stop", SHUTDOWN)
        m.run("rm", "-f", f"/run/systemd/system/{SHUTDOWN}")
        m.run("systemctl", "daemon-reload")
        m.run("systemctl", "start", "dbus.service")


def test_systemd_analyze_security_rates_it_at_most_2_0(machine: Machine) -> None:
    m = machine
    started(m)
    out = m.run("systemd-analyze", "security", UNIT, "--no-pager").stdout
    found = re.search(r"Overall exposure level for apmatrixd\.service: (\d+\.\d+)", out)
    assert found, out
    assert float(found.group(1)) <= 2.0, out


def test_the_journal_keeps_the_daemons_levels(machine: Machine) -> None:
    """An admin's echo while apmatrixd is stopped is drift at the next start: a warning
    (PRIORITY 4) beside the info lines (6), and the kernel is left as the admin made it."""
    m = machine
    started(m)
    g5 = guest(5)
    reserve(m, (5, 6), (0xFF,))
    create(m, g5, "guest5", (5, 6), (0xFF,))
    m.run("systemctl", "stop", UNIT)
    m.sh(f"echo 6 > {MATRICES}/{g5}/unassign_adapter")
    mark = m.cursor()
    m.run("systemctl", "start", UNIT)
    entries = m.journal("-u", UNIT, after=mark)
    own = [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "apmatrixd"]  # not systemd's
    levels = {str(e.get("MESSAGE")): int(e["PRIORITY"]) for e in own}
    drift = [s for s in levels if g5 in s and "changed while apmatrixd was not running" in s]
    serving = [s for s in levels if s.startswith("apmatrixd: serving ")]
    assert drift and serving, levels
    assert levels[drift[0]] == 4 and levels[serving[0]] == 6, levels
    assert m.run("cat", f"{MATRICES}/{g5}/matrix").stdout.split() == ["05.00ff"]
    assert prop(m, path_of(g5), MATRIX, "Adapters") == "au 1 5"
