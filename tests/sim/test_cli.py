"""``apmatrixd-sim``: its user errors, its summaries, and the real emulator mounted by it.

The mount tests run the command as a subprocess exactly as a user (or a later end-to-end rig)
would, then drive it with bash: the messages checked are the ones bash prints for the errno the
emulated kernel returned.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from rigs import REPO, force_unmount, in_netns, is_mount, need_fuse, need_netns

from apmatrixd.sim import cli
from apmatrixd.sim.uevent import decode

UUID_A = "6c3e0a7b-6e8c-4cd4-9b3e-6f1b1f6a2f10"
UUID_B = "0f8e2d6a-3b9c-4e1f-8a7d-5c4b3a291807"
CLI = [sys.executable, "-m", "apmatrixd.sim.cli"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=20, cwd=REPO, check=False
    )


def one_line_error(done: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert done.returncode == code, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for word in words:
        assert word in lines[0], lines[0]


# -- user errors -------------------------------------------------------------------------------
def test_bad_arguments_are_one_line_and_exit_2(tmp_path: Path) -> None:
    one_line_error(run_cli("mount", str(tmp_path / "absent")), 2, "mountpoint", "absent")
    one_line_error(run_cli("show", "--scenario", "nosuch"), 2, "nosuch", "default")
    one_line_error(run_cli("mount", str(tmp_path), "--scenario", "nosuch"), 2, "nosuch")


def test_argparse_refusals_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args in (
        ["mount", str(tmp_path), "--uevents", "kernel"],
        ["mount", str(tmp_path), "--uevents", "umockdev:"],
        ["mount", str(tmp_path), "--ready-fd", "987"],
        ["mount", str(tmp_path), "--uevents", f"umockdev:{tmp_path}/missing"],
        ["mount"],
        [],
        ["frobnicate"],
    ):
        with pytest.raises(SystemExit) as info:
            cli.main(args)
        assert info.value.code == 2, args
        assert "Traceback" not in capsys.readouterr().err


def test_not_root_is_refused_before_touching_fuse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SystemExit) as info:
        cli.main(["mount", str(tmp_path)])
    assert info.value.code == 1
    assert "needs root" in capsys.readouterr().err


# -- scenarios, show, demo ---------------------------------------------------------------------
def test_scenarios_lists_the_builtins() -> None:
    done = run_cli("scenarios")
    assert done.returncode == 0, done.stderr
    names = [line.split()[0] for line in done.stdout.splitlines()]
    assert {"default", "rfc2017", "big"} <= set(names)


def test_show_summarises_the_default_host(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["show"]) == 0
    out = capsys.readouterr().out
    assert "layout upstream" in out
    assert "05 CEX5C" in out and "06 CEX5A" in out
    assert "cex4queue 0004 0047 00ab 00ff" in out
    assert "apmask 00-ff" in out and "matrices: none" in out


def test_show_rfc2017(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["show", "--scenario", "rfc2017"]) == 0
    out = capsys.readouterr().out
    assert "layout rfc2017" in out and "05 CEX5C" in out


def test_format_ids() -> None:
    assert cli.format_ids([]) == "-"
    assert cli.format_ids([4, 0x47, 0xAB, 0xAC, 0xAD, 0xFF]) == "04 47 ab-ad ff"
    assert cli.format_ids([4], 4) == "0004"


@pytest.mark.parametrize("scenario", ["default", "rfc2017"])
def test_demo_walks_through_the_example(scenario: str) -> None:
    lines: list[str] = []
    refused = cli.demo(cli.load_host(scenario), lines.append)
    text = "\n".join(lines)
    assert "Address already in use   [EADDRINUSE]" in text
    assert "No such device   [ENODEV]" in text
    assert refused == (3 if scenario == "default" else 2)  # + EBUSY for apmask upstream
    if scenario == "default":
        assert "Device or resource busy   [EBUSY]" in text
        assert "05.0004" in text and "05.00ab" in text


def test_demo_command_runs() -> None:
    done = run_cli("demo")
    assert done.returncode == 0, done.stderr
    assert "Address already in use" in done.stdout


# -- the real emulator, mounted by the command -------------------------------------------------
@dataclass
class Mounted:
    mnt: Path
    proc: subprocess.Popen[str]

    def sh(self, script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", script],
            cwd=self.mnt,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=10)


def start_mount(mnt: Path, *args: str) -> subprocess.Popen[str]:
    """Start ``apmatrixd-sim mount`` and return once it reports the mount live on --ready-fd."""
    rfd, wfd = os.pipe()
    proc = subprocess.Popen(
        [*CLI, "mount", str(mnt), "--ready-fd", str(wfd), *args],
        pass_fds=(wfd,),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(wfd)
    try:
        ready, _, _ = select.select([rfd], [], [], 15)
        line = os.read(rfd, 200).decode() if ready else ""
    finally:
        os.close(rfd)
    if line != f"mounted {mnt}\n":
        proc.kill()
        _out, err = proc.communicate(timeout=5)
        force_unmount(mnt)
        raise AssertionError(f"mount did not come up: {line!r} {err}")
    return proc


@pytest.fixture
def sysfs(request: pytest.FixtureRequest) -> Iterator[Mounted]:
    need_fuse()
    with tempfile.TemporaryDirectory(prefix="apmatrixd-sim-") as top:
        mnt = Path(top) / "sys"
        mnt.mkdir()
        proc = start_mount(mnt, "--scenario", getattr(request, "param", "default"))
        mounted = Mounted(mnt, proc)
        try:
            yield mounted
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
            force_unmount(mnt)


UPSTREAM_SCRIPT = f"""
set -u
T=devices/vfio_ap/matrix/mdev_supported_types/vfio_ap-passthrough
cat bus/ap/apmask
echo -5,-6 > bus/ap/apmask
echo {UUID_A} > $T/create && echo {UUID_B} > $T/create
A=devices/vfio_ap/matrix/{UUID_A}; B=devices/vfio_ap/matrix/{UUID_B}
echo 5 > $A/assign_adapter && echo 4 > $A/assign_domain && echo 5 > $B/assign_adapter
echo "== conflict"
echo 4 > $B/assign_domain; echo "rc=$?"
echo "== range"
echo 999 > $B/assign_adapter; echo "rc=$?"
echo "== readonly"
echo 1 > $A/matrix; echo "rc=$?"
echo "== matrix"; cat $A/matrix
echo "== ls"; ls $T/devices; ls bus/ap/devices | head -3
echo "== link"; readlink bus/mdev/devices/{UUID_A}
"""


@pytest.mark.e2e
def test_upstream_through_bash(sysfs: Mounted) -> None:
    done = sysfs.sh(UPSTREAM_SCRIPT)
    out = done.stdout.split("== ")
    assert out[0].strip() == "0x" + "f" * 64
    assert "rc=1" in out[1] and "rc=1" in out[2] and "rc=1" in out[3]
    errors = done.stderr.splitlines()
    assert len(errors) == 3, done.stderr
    assert errors[0].endswith("write error: Address already in use")
    assert errors[1].endswith("write error: No such device")
    assert errors[2].endswith("Permission denied")
    assert out[4].split() == ["matrix", "05.0004"]
    assert sorted(out[5].split()[1:3]) == sorted([UUID_A, UUID_B])
    assert out[5].split()[3:] == ["05.0004", "05.0047", "05.00ab"]
    assert out[6].split()[1].endswith(f"devices/vfio_ap/matrix/{UUID_A}")
    assert sysfs.stop() == 0
    assert not is_mount(sysfs.mnt)


RFC_SCRIPT = f"""
set -u
T=devices/ap_matrix/matrix/mdev_supported_types/ap_matrix-passthrough
echo 05.0004 > bus/ap/drivers/cex4queue/unbind
echo 05.0004 > bus/ap/drivers/vfio_ap_matrix/bind
readlink devices/ap/card05/05.0004/driver
echo {UUID_A} > $T/create && echo {UUID_B} > $T/create
A=devices/ap_matrix/matrix/{UUID_A}; B=devices/ap_matrix/matrix/{UUID_B}
echo 5 > $A/assign_adapter && echo 4 > $A/assign_domain && echo 5 > $B/assign_adapter
echo "== conflict"
echo 4 > $B/assign_domain; echo "rc=$?"
echo "== host-owned"
echo 0x47 > $B/assign_domain; echo "rc=$?"
echo "== files"; cat $A/adapters $A/domains
"""


@pytest.mark.e2e
@pytest.mark.parametrize("sysfs", ["rfc2017"], indirect=True)
def test_rfc2017_through_bash(sysfs: Mounted) -> None:
    done = sysfs.sh(RFC_SCRIPT)
    out = done.stdout.split("== ")
    assert out[0].strip().endswith("drivers/vfio_ap_matrix")
    errors = done.stderr.splitlines()
    assert len(errors) == 2, done.stderr
    assert errors[0].endswith("write error: Address already in use")
    assert errors[1].endswith("write error: Cannot assign requested address")
    assert "rc=1" in out[1] and "rc=1" in out[2]
    assert out[3].split()[1:] in (["05", "0004"], ["0x05", "0x0004"])
    assert sysfs.stop() == 0


@pytest.mark.e2e
def test_sigint_unmounts_even_when_busy(sysfs: Mounted) -> None:
    fd = os.open(sysfs.mnt / "bus/ap/apmask", os.O_RDONLY)  # keeps the mount busy
    try:
        sysfs.proc.send_signal(signal.SIGINT)
        assert sysfs.proc.wait(timeout=10) == 0
        assert not is_mount(sysfs.mnt)  # detached at once, not left behind
    finally:
        with contextlib.suppress(OSError):  # the server is gone: ENOTCONN
            os.close(fd)


# -- uevents through netlink, all in a private network namespace -------------------------------
NETLINK_SCRIPT = r"""
import json, os, select, subprocess, sys, tempfile
import pyudev

mon = pyudev.Monitor.from_netlink(pyudev.Context(), source="udev")
mon.filter_by("ap")
mon.start()
with tempfile.TemporaryDirectory() as top:
    mnt = os.path.join(top, "sys")
    os.mkdir(mnt)
    rfd, wfd = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "apmatrixd.sim.cli", "mount", mnt, "--uevents", "netlink",
         "--ready-fd", str(wfd)], pass_fds=(wfd,))
    os.close(wfd)
    try:
        assert select.select([rfd], [], [], 15)[0], "mount did not come up"
        os.read(rfd, 200)
        with open(os.path.join(mnt, "devices/ap/card05/config"), "w") as f:
            f.write("0\n")
        got = []
        while (dev := mon.poll(0.5)) is not None:
            got.append({k: dev.properties.get(k) for k in
                        ("ACTION", "DEVPATH", "SUBSYSTEM", "DEVTYPE", "CONFIG", "SEQNUM")})
            if dev.properties.get("CONFIG") == "0" and dev.device_type == "ap_card":
                break
        proc.terminate()
        rc = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["fusermount3", "-uz", mnt], capture_output=True)
print(json.dumps({"rc": rc, "events": got}))
"""


@pytest.mark.e2e
def test_config_write_reaches_a_pyudev_monitor_over_netlink() -> None:
    need_fuse()
    need_netns()
    done = in_netns(NETLINK_SCRIPT)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["rc"] == 0
    card = [e for e in result["events"] if e["DEVTYPE"] == "ap_card"]
    assert card and card[-1]["ACTION"] == "change"
    assert card[-1]["DEVPATH"] == "/devices/ap/card05" and card[-1]["CONFIG"] == "0"
    assert card[-1]["SUBSYSTEM"] == "ap" and int(card[-1]["SEQNUM"]) > 0


@pytest.mark.e2e
def test_umockdev_sockets_get_the_uevent(tmp_path: Path) -> None:
    need_fuse()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "event9"))
    listener.settimeout(5)
    mnt = tmp_path / "sys"
    mnt.mkdir()
    proc = start_mount(mnt, "--uevents", f"umockdev:{tmp_path}")
    try:
        (mnt / "devices/ap/card06/config").write_text("0\n")
        _header, props = decode(listener.recv(65536))
        assert props["DEVPATH"] == "/devices/ap/card06" and props["CONFIG"] == "0"
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    finally:
        listener.close()
        if proc.poll() is None:
            proc.kill()
        force_unmount(mnt)


def test_kernel_generation_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["show", "--kernel", "5.15"]) == 0
    assert "(kernel 5.15)" in capsys.readouterr().out
    assert cli.main(["show", "--scenario", "default@6.0"]) == 0
    assert "(kernel 6.0)" in capsys.readouterr().out
    one_line_error(run_cli("show", "--kernel", "5.4"), 2, "--kernel", "5.15, 6.0")
    one_line_error(run_cli("show", "--scenario", "rfc2017", "--kernel", "6.0"), 2, "rfc2017")
    one_line_error(run_cli("mount", "/", "--kernel", "7"), 2, "--kernel")


def test_guest_needs_a_mount(tmp_path: Path) -> None:
    uuid = "11111111-1111-4111-8111-111111111111"
    one_line_error(run_cli("guest", "attach", str(tmp_path), uuid), 2, "not an apmatrixd-sim")
    (tmp_path / "devices").mkdir()
    one_line_error(run_cli("guest", "detach", str(tmp_path), uuid), 2, "no mdev", uuid)
    bad = run_cli("guest", "attach", str(tmp_path), uuid, "--release-after", "-1")
    assert bad.returncode == 2 and "'-1' is not 0..3600 seconds" in bad.stderr
