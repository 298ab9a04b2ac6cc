"""Real polkitd, real dbus-daemon and apmatrixd in a mount namespace of their own.

Run as root by tests/bus/test_polkit_real.py under ``unshare --mount --propagation private``
(``python polkit_ns.py WORKDIR``): it binds copies of /etc/passwd and /etc/group with two test
users (``apm-member`` in group ``apmatrix``, ``apm-other`` not), an actions directory with
our policy, and an empty rules directory (``RULES``), so the host's polkit configuration
neither helps nor hurts; starts a system-type dbus-daemon with polkit's and our bus policy,
Debian's ``polkitd`` and ``apmatrixd --simulate``; then runs the steps the test names (one
JSON line each on stdout). Nothing here outlives the namespace (the binds) or the run (the
processes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from busrig import (
    MANAGER,
    POLICY,
    REPO,
    ROOT,
    apmatrixd_argv,
    as_user,
    spec,
    world_readable_client,
)

POLKITD = "/usr/lib/polkit-1/polkitd"
POLKIT_BUS_POLICY = "/usr/share/dbus-1/system.d/org.freedesktop.PolicyKit1.conf"
MEMBER, OTHER, GROUP = 61001, 61002, 61000
ACTIONS = REPO / "dbus" / "org.apmatrix.apmatrix1.policy"
ALLOW_GROUP = """\
polkit.addRule(function(action, subject) {
    if (action.id == "org.apmatrix.apmatrix1.manage" ||
        action.id == "org.apmatrix.apmatrix1.reserve") {
        return subject.isInGroup("apmatrix") ? polkit.Result.YES : polkit.Result.NO;
    }
});
"""
"""Group apmatrix may manage and reserve; everyone else is refused outright. Import and
export are left to their defaults (auth_admin)."""
G1 = "11111111-1111-4111-8111-111111111111"
G2 = "22222222-2222-4222-8222-222222222222"


def bind(src: Path, dst: str) -> None:
    subprocess.run(["mount", "--bind", str(src), dst], check=True)


def users(work: Path) -> None:
    """/etc/passwd and /etc/group with the test users, bound over the real ones."""
    passwd, group = work / "passwd", work / "group"
    passwd.write_text(
        Path("/etc/passwd").read_text()
        + f"apm-member:x:{MEMBER}:{MEMBER}::/nonexistent:/usr/sbin/nologin\n"
        + f"apm-other:x:{OTHER}:{OTHER}::/nonexistent:/usr/sbin/nologin\n"
    )
    group.write_text(
        Path("/etc/group").read_text()
        + f"apm-member:x:{MEMBER}:\napm-other:x:{OTHER}:\napmatrix:x:{GROUP}:apm-member\n"
    )
    for f in (passwd, group):
        f.chmod(0o644)
    bind(passwd, "/etc/passwd")
    bind(group, "/etc/group")


def polkit_dirs(work: Path) -> Path:
    """Actions: the host's plus ours; rules: ours only (empty for now). Returns the rules dir."""
    actions = work / "actions"
    shutil.copytree("/usr/share/polkit-1/actions", actions)
    shutil.copy(ACTIONS, actions / ACTIONS.name)
    bind(actions, "/usr/share/polkit-1/actions")
    rules, none = work / "rules", work / "no-rules"
    for d in (rules, none):
        d.mkdir()
        shutil.chown(d, "polkitd", "root")
        d.chmod(0o700)
    bind(rules, "/etc/polkit-1/rules.d")
    bind(none, "/usr/share/polkit-1/rules.d")  # the distribution's rules stay out of it
    return rules


def write_rules(rules: Path, text: str) -> None:
    f = rules / "50-apmatrix-test.rules"
    f.write_text(text)
    shutil.chown(f, "polkitd", "root")


def bus_daemon(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    conf = work / "bus.conf"
    template = (REPO / "tools" / "private-bus.conf.in").read_text()
    conf.write_text(
        template.replace("@SOCKET@", str(work / "bus.sock"))
        .replace("@POLICY@", str(POLICY))
        .replace("</busconfig>", f"  <include>{POLKIT_BUS_POLICY}</include>\n</busconfig>")
    )
    r, w = os.pipe()
    proc = subprocess.Popen(
        ["dbus-daemon", f"--config-file={conf}", "--nofork", "--nopidfile", f"--print-address={w}"],
        pass_fds=(w,),
    )
    os.close(w)
    with os.fdopen(r) as f:
        address = f.readline().strip()
    if not address:
        raise RuntimeError("dbus-daemon did not start")
    return proc, address


def wait_for_name(address: str, name: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run(
            ["busctl", f"--address={address}", "status", name], capture_output=True, text=True
        )
        if r.returncode == 0:
            return
        time.sleep(0.02)
    raise RuntimeError(f"{name} did not appear on the bus")


class Run:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []
        users(work)
        self.rules = polkit_dirs(work)
        bus, self.address = bus_daemon(work)
        self.procs.append(bus)
        self.polkitd = self.start_polkitd()
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=self.address)
        with open(work / "apmatrixd.log", "wb") as log:
            self.procs.append(
                subprocess.Popen([*apmatrixd_argv(), "--simulate"], env=env, stderr=log)
            )
        wait_for_name(self.address, "org.apmatrix.Apmatrix1")

    def start_polkitd(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=self.address)
        with open(self.work / "polkitd.log", "ab") as log:
            proc = subprocess.Popen([POLKITD, "--no-debug"], env=env, stderr=log, stdout=log)
        self.procs.append(proc)
        wait_for_name(self.address, "org.freedesktop.PolicyKit1")
        return proc

    def calls(self, uid: int, *calls: dict[str, Any]) -> list[dict[str, Any]]:
        """Method calls from a client process running as ``uid`` (its own groups cleared:
        polkit reads the group database, not the caller's process)."""
        script, site = world_readable_client()
        pre = [] if uid == 0 else as_user(uid)
        r = subprocess.run(
            [*pre, "/usr/bin/python3", script, json.dumps(list(calls))],
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONPATH=site),
            timeout=60,
            cwd="/",
        )
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
        out: list[dict[str, Any]] = json.loads(r.stdout)
        return out

    def call(self, member: str, sig: str = "", body: Any = (), **kw: Any) -> dict[str, Any]:
        return spec(self.address, ROOT, MANAGER, member, sig, body, **kw)

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def create(uuid: str) -> tuple[str, list[Any]]:
    opts = {"adapters": {"$v": ["au", [5]]}, "domains": {"$v": ["au", [4]]}}
    return "sa{sv}", [uuid, opts]


def main(work: Path) -> None:
    run = Run(work)
    state = spec(run.address, ROOT, "org.freedesktop.DBus.Properties", "GetAll", "s", [MANAGER])
    steps: dict[str, Any] = {}
    try:
        # No rule: the shipped defaults (auth_admin_keep), and no agent to ask.
        steps["default"] = run.calls(
            MEMBER,
            run.call("Reserve", "auau", [[5], [4]]),
            run.call("Reserve", "auau", [[5], [4]], interactive=True),
        )
        write_rules(run.rules, ALLOW_GROUP)
        deadline = time.monotonic() + 10  # polkitd reloads on its own (inotify)
        while True:
            (probe,) = run.calls(MEMBER, run.call("Reserve", "auau", [[5], [4]]))
            if probe["error"] is None or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        steps["member"] = [
            probe,
            *run.calls(
                MEMBER,
                run.call("CreateMatrix", *create(G1)),
                run.call("ExportMdevctlFd", "h", [0], dirs=["/tmp"]),
                run.call("ExportMdevctlFd", "h", [0], dirs=["/tmp"], interactive=True),
            ),
        ]
        steps["other"] = run.calls(
            OTHER,
            run.call("Reserve", "auau", [[6], [4]]),
            run.call("CreateMatrix", *create(G2)),
            run.call("Check", "auaus", [[5], [4], ""]),
        )
        run.polkitd.terminate()
        run.polkitd.wait(5)
        steps["polkitd_stopped"] = run.calls(
            MEMBER,
            run.call("Reserve", "auau", [[7], []]),
            run.call("Check", "auaus", [[5], [4], ""]),
        )
        steps["state_without_polkitd"] = run.calls(0, state)
        steps["root_without_polkitd"] = run.calls(0, run.call("Reserve", "auau", [[6], []]))
        run.polkitd = run.start_polkitd()
        steps["polkitd_back"] = run.calls(MEMBER, run.call("Release", "auau", [[6], []]))
        steps["state"] = run.calls(0, state)
    finally:
        run.close()
    print(json.dumps(steps))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
