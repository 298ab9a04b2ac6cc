"""The boot rig: apmatrixd installed as a distribution installs it and run by the real systemd.

A Debian 12 root file system (mmdebstrap, from the mirror apt uses here) is booted under
``systemd-nspawn`` with systemd as PID 1; our .deb files (``tools/package deb``) are installed in
it with apt; the kernel emulator (``apmatrixd-sim`` from its .deb) runs there as a transient
unit, and its tree is laid over the AP paths of the container's ``/sys``. The measured recipe
is ``../shared/spec/real-systemd-polkit.md``.

Both builds are cached outside the checkout, so a clean checkout on the same machine (CI)
reuses them; a lock makes concurrent runs build each once:

- ``root-<hash of its package list and set-up>``: ~30 s to build. Only ever booted as a
  ``--volatile=overlay`` copy, so it stays as built and every boot starts clean.
- ``debs-<hash of the sources>``: ~10 s; the hash covers the files tools/package copies
  (tracked and untracked, not ignored) but tests/, so an edit of the sources makes new packages.

The root holds the runtime dependencies (no network inside), two users for the polkit rule,
and mfusepy (PyPI's, as ``pip install`` would put it in /usr/local) for the emulator's FUSE face.

Each container gets a cgroup of its own (nspawn puts its ``payload``/``supervisor`` groups there),
a private network (the emulator's uevents reach its apmatrixd, never the host's udev
listeners), and is powered off, its cgroups removed, even when a test fails.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("APMATRIXD_TEST_CACHE", "/var/cache/apmatrixd-tests"))
SUITE = "bookworm"
ROOT_PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "polkitd",
    "libpam-systemd",  # polkitd depends on default-logind | logind
    # apmatrixd's Depends (no network inside)
    "python3", "python3-dbus-fast", "python3-pyudev", "python3-yaml",
    "fuse3", "libfuse3-3",  # the emulator's FUSE face
)  # fmt: skip
GROUP = "apmatrix"
MEMBER = "zadmin"
"""A user in group apmatrix: the polkit rule lets them manage matrices."""
OUTSIDER = "zguest"
"""A user in no group of ours."""
ROOT_SETUP = (
    ("groupadd", "--system", GROUP),
    ("useradd", "--no-create-home", "--groups", GROUP, MEMBER),
    ("useradd", "--no-create-home", OUTSIDER),
)
ROOT_LAYOUT = 1
"""Bump when the root is set up differently in a way ROOT_PACKAGES and ROOT_SETUP do not show."""

DEBS_IN = "/mnt/apmatrixd-debs"
SIM = "/run/apmatrixd-sim"
"""Where the emulator is mounted inside the container."""
SIM_UNIT = "apmatrixd-test-sim"
ENV = (
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
    "SYSTEMD_COLORS=0",
    "SYSTEMD_PAGER=",
    "DEBIAN_FRONTEND=noninteractive",
)
"""The whole environment of a command in the container (nothing of ours leaks in)."""

# sysfs cannot be extended: a tmpfs over each top directory the emulator has (bus, class,
# devices), the real entries bound back one by one, the emulator's bound beside them, the tmpfs
# made read-only. The real directory is reached through a private bind: a shared one would
# receive the tmpfs too.
OVERLAY_SH = """set -eu
sim=$1
for top in $(ls "$sim"); do
    real=/run/apmatrixd-test-sys/$top
    mkdir -p "$real"
    mount --bind "/sys/$top" "$real"
    mount --make-private "$real"
    mount -t tmpfs -o mode=0755 apmatrixd-test-sys "/sys/$top"
    for e in "$real"/* "$sim/$top"/*; do
        n=${e##*/}
        [ "$e" = "$real/$n" ] && [ -e "$sim/$top/$n" ] && continue
        if [ -d "$e" ]; then mkdir "/sys/$top/$n"; else : > "/sys/$top/$n"; fi
        mount --bind "$e" "/sys/$top/$n"
    done
    mount -o remount,ro "/sys/$top"
    umount "$real"
done
rmdir /run/apmatrixd-test-sys/* /run/apmatrixd-test-sys
"""
# Before the emulator stops: with its tree still bound it takes 10 s to go, without 0.1 s.
UNOVERLAY_SH = """for top in $(ls "$1"); do
    while findmnt -n -o FSTYPE "/sys/$top" | grep -q tmpfs; do umount -R "/sys/$top" || break; done
done
"""


class RigError(RuntimeError):
    """The rig could not build or boot what the tests need (with what went wrong)."""


def missing() -> tuple[str, bool] | None:
    """Why this machine cannot run the rig, and whether tools/bootstrap would fix it."""
    if os.geteuid() != 0:
        return "needs root", False
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse", False
    tools = {"systemd-nspawn": "systemd-container", "mmdebstrap": "mmdebstrap",
             "nsenter": "util-linux", "dpkg-buildpackage": "dpkg-dev"}  # fmt: skip
    for tool, package in tools.items():
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install {package})", True
    if not mirrors():
        return f"no Debian {SUITE} mirror in /etc/apt/sources.list*", False
    return None


def mirrors() -> list[str]:
    """``deb URI SUITE main`` for each Debian entry of this suite apt uses here (one-line and
    deb822 files), read at run time: no host name is written down anywhere."""
    entries: list[tuple[str, str, str]] = []  # (type, uri, suite), each with component main
    apt = Path("/etc/apt")
    for f in [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]:
        for line in _read(f).splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()  # no [options]
            if len(words) >= 4 and "main" in words[3:]:
                entries.append((words[0], words[1], words[2]))
    for f in sorted((apt / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", _read(f)):
            fields = _deb822(stanza)
            if "main" in fields.get("components", []) and fields.get("enabled") != ["no"]:
                entries += itertools.product(
                    fields.get("types", []), fields.get("uris", []), fields.get("suites", [])
                )
    suites = re.compile(rf"{SUITE}(-updates|-security)?")
    lines = [f"deb {u} {s} main" for t, u, s in entries if t == "deb" and suites.fullmatch(s)]
    return list(dict.fromkeys(lines))


def _read(f: Path) -> str:
    try:
        return f.read_text()
    except OSError:
        return ""


def _deb822(stanza: str) -> dict[str, list[str]]:
    """The one-line fields of a deb822 stanza, keys lower case, values split."""
    fields = {}
    for line in stanza.splitlines():
        key, colon, value = line.partition(":")
        if colon and line[:1].strip() and not line.startswith("#"):
            fields[key.strip().lower()] = value.split()
    return fields


# -- the caches ---------------------------------------------------------------------------------
@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """One builder at a time (other runs on this machine wait, then reuse what it built)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _run(argv: list[str], what: str, timeout: float, **kw: Any) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if r.returncode != 0:
        raise RigError(f"{what} failed (exit {r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}")
    return r.stdout


def sim_requirement() -> str:
    """The emulator's FUSE library as pyproject pins it (``mfusepy==3.1.1``)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (req,) = [r for r in project["optional-dependencies"]["sim"] if r.startswith("mfusepy")]
    return str(req)


def build_root() -> Path:
    """The cached Debian root: built once per package list and set-up, then reused."""
    key = _digest([SUITE, ROOT_PACKAGES, ROOT_SETUP, sim_requirement(), ROOT_LAYOUT])
    root = CACHE / f"root-{key}"
    with locked(f"root-{key}"):
        if (root / ".apmatrixd-test-root").exists():
            os.utime(root / ".apmatrixd-test-root")  # in use: see prune()
            return root
        tmp = CACHE / f".root-{key}.building"
        shutil.rmtree(tmp, ignore_errors=True)  # a build cut short earlier
        try:
            _run(["mmdebstrap", "--variant=minbase", f"--include={','.join(ROOT_PACKAGES)}",
                  "--quiet", SUITE, str(tmp), *mirrors()], "mmdebstrap", 1800)  # fmt: skip
            for cmd in ROOT_SETUP:
                _run(["chroot", str(tmp), *cmd], " ".join(cmd), 60)
            _install_wheel(tmp)
            (tmp / ".apmatrixd-test-root").write_text(f"{key}\n")
            tmp.rename(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    prune("root-", keep=root)
    return root


def _install_wheel(root: Path) -> None:
    """mfusepy, which Debian does not package, where a local ``pip install`` would put it
    (apmatrixd-sim's Recommends cannot name it): the pure wheel unpacked into /usr/local."""
    py = "import sys; print('%d.%d' % sys.version_info[:2])"
    version = _run(["chroot", str(root), "python3", "-c", py], "python3", 60).strip()
    with tempfile.TemporaryDirectory() as d:
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
              "--only-binary=:all:", "-d", d, sim_requirement()], "pip download", 300)  # fmt: skip
        (wheel,) = Path(d).glob("*.whl")
        site = root / f"usr/local/lib/python{version}/dist-packages"
        site.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)


def source_hash() -> str:
    """A hash of the files tools/package builds from (their git blob ids and modes); tests/
    is copied too but neither built nor shipped, so editing a test builds nothing again."""
    listed = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                  "git ls-files", 60, cwd=REPO).split("\0")  # fmt: skip
    files = sorted(
        f for f in listed if f and not f.startswith("tests/") and os.path.lexists(REPO / f)
    )
    blobs = _run(["git", "hash-object", "--no-filters", "--stdin-paths"], "git hash-object",
                 60, cwd=REPO, input="\n".join(files) + "\n").split()  # fmt: skip
    modes = [oct(os.lstat(REPO / f).st_mode) for f in files]
    return _digest(list(zip(files, blobs, modes, strict=True)))


def build_debs() -> Path:
    """The directory holding this checkout's .deb files (tools/package deb), cached."""
    key = source_hash()
    debs = CACHE / f"debs-{key}"
    with locked("debs"):
        if not (debs / ".apmatrixd-test-debs").exists():
            tmp = Path(tempfile.mkdtemp(prefix=".debs-", dir=CACHE))
            tmp.chmod(0o755)  # apt reads them as _apt where it can
            try:
                _run([str(REPO / "tools" / "package"), "deb", "--out", str(tmp)],
                     "tools/package deb", 900)  # fmt: skip
                (tmp / ".apmatrixd-test-debs").write_text(f"{key}\n")
                shutil.rmtree(debs, ignore_errors=True)
                tmp.rename(debs)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        os.utime(debs / ".apmatrixd-test-debs")
        prune("debs-", keep=debs, spare=3)
    return debs


def prune(prefix: str, keep: Path, spare: int | None = None, days: float = 14) -> None:
    """Drop the cached builds beside ``keep`` that nobody used for ``days``, or, with
    ``spare``, all but the ``spare`` used last (small ones, quick to build again)."""
    others = sorted((p for p in CACHE.glob(prefix + "*") if p != keep), key=_used, reverse=True)
    for i, p in enumerate(others):
        if (spare is not None and i >= spare) or time.time() - _used(p) > days * 86400:
            shutil.rmtree(p, ignore_errors=True)


def _used(p: Path) -> float:
    marks = list(p.glob(".apmatrixd-test-*"))
    return marks[0].stat().st_mtime if marks else 0.0


# -- the machine ---------------------------------------------------------------------------------
def _own_cgroups(name: str) -> list[Path]:
    """A fresh cgroup below ours in each hierarchy nspawn uses (the named systemd one and the
    unified one), so that parallel containers and their leftovers never meet. Those of a run
    that was killed before it could power off (its pid is gone) are ended first."""
    mounts: dict[str, Path] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        fstype, _src, opts = [*post.split(), "", "", ""][:3]
        target = Path(pre.split()[4])
        if fstype == "cgroup2":
            mounts.setdefault("", target)
        elif fstype == "cgroup" and "name=systemd" in opts.split(","):
            mounts.setdefault("name=systemd", target)
    out = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _id, controllers, path = line.split(":", 2)
        if controllers in mounts:
            parent = mounts[controllers] / path.lstrip("/")
            for stale in parent.glob("apmatrixd-test-*-*"):
                if not Path(f"/proc/{stale.name.split('-')[2]}").exists():
                    _remove_cgroup(stale)
            with contextlib.suppress(OSError):
                (parent / name).mkdir()
                out.append(parent / name)
    return out


def _remove_cgroup(group: Path) -> None:
    """Kill what is left in ``group`` and remove it and what nspawn made below it."""
    deadline = time.monotonic() + 10
    while group.exists() and time.monotonic() < deadline:
        for sub in sorted(group.rglob("cgroup.procs"), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError, ValueError):
                for pid in sub.read_text().split():
                    os.kill(int(pid), signal.SIGKILL)
        for d in sorted((p for p in group.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                d.rmdir()
        with contextlib.suppress(OSError):
            group.rmdir()
        if group.exists():
            time.sleep(0.05)


_serial = 0


@dataclass
class Machine:
    """A booted container: commands run in it through ``nsenter`` into its PID 1."""

    name: str
    nspawn: subprocess.Popen[bytes]
    log: Path
    cgroups: list[Path]
    leader: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def boot(cls, root: Path, debs: Path) -> Machine:
        global _serial
        _serial += 1
        name = f"apmatrixd-test-{os.getpid()}-{_serial}"
        cgroups = _own_cgroups(name)
        log = Path(tempfile.mkstemp(prefix=f"{name}-", suffix=".log")[1])
        enter = "".join(f'echo $$ > "{g}/cgroup.procs"; ' for g in cgroups)
        argv = [
            "sh", "-c", enter + 'exec "$@"', "sh",
            "systemd-nspawn", "-D", str(root), "-b", "-M", name,
            "--register=no", "--keep-unit",  # no machined here: the cgroup above is its own
            "--volatile=overlay", "--private-network", "--console=pipe",
            "--bind=/dev/fuse", f"--bind-ro={debs}:{DEBS_IN}",
        ]  # fmt: skip
        started = time.monotonic()
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        m = cls(name, proc, log, cgroups)
        try:
            m._wait_leader()
            m._wait_running()
            m.timings["boot"] = time.monotonic() - started
            m._install(debs)
            m.timings["install"] = time.monotonic() - started - m.timings["boot"]
            m._mount_sim()
        except BaseException:
            m.close()
            raise
        return m

    def _wait_leader(self) -> None:
        """The container's systemd: the child of nspawn."""
        deadline = time.monotonic() + 20
        pid = self.nspawn.pid
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise RigError(f"systemd-nspawn exited {self.nspawn.returncode}:\n{self._log()}")
            with contextlib.suppress(OSError):
                for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
                    if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                        self.leader = int(child)
                        return
            time.sleep(0.02)
        raise RigError(f"no systemd in the container after 20 s:\n{self._log()}")

    def _wait_running(self) -> None:
        """Booted: ``is-system-running`` says ``running`` (``offline`` until PID 1 listens)."""
        deadline = time.monotonic() + 60
        state = "offline"
        while state == "offline" and time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise RigError(f"systemd-nspawn exited {self.nspawn.returncode}:\n{self._log()}")
            r = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=60)
            state = r.stdout.strip() or "offline"
            if state == "offline":
                time.sleep(0.02)
        if state != "running":
            failed = self.run("systemctl", "--failed", "--no-legend", check=False).stdout
            raise RigError(f"boot: {state}; failed units:\n{failed}\n{self._log()}")

    def _log(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def _install(self, debs: Path) -> None:
        """apmatrixd and apmatrixd-sim from our .deb files, as an admin installs them (the
        dependencies are in the root already: no network inside)."""
        pkgs = [f"{DEBS_IN}/{p.name}" for p in sorted(debs.glob("apmatrixd*.deb"))]
        r = self.run("apt-get", "install", "-y", "-q", "--no-install-recommends", *pkgs,
                     check=False, timeout=300)  # fmt: skip
        if r.returncode != 0:
            raise RigError(f"apt-get install {' '.join(pkgs)}: {r.stdout}{r.stderr}")

    def _mount_sim(self) -> None:
        """The emulator as a transient unit, its tree over the AP paths of /sys."""
        self.run("mkdir", "-p", SIM)
        self.run("systemd-run", f"--unit={SIM_UNIT}", "--property=Type=exec",
                 "apmatrixd-sim", "mount", "--uevents", "netlink", SIM)  # fmt: skip
        self.wait(lambda: self.is_mount(SIM), 10, f"the emulator mounted at {SIM}")
        self.sh(OVERLAY_SH, SIM)

    def is_mount(self, path: str) -> bool:
        """``path`` is a mount point in the container (read from outside: never blocks)."""
        mountinfo = Path(f"/proc/{self.leader}/mountinfo").read_text()
        return any(line.split()[4] == path for line in mountinfo.splitlines())

    # -- commands in the container ------------------------------------------------------------
    def run(
        self, *cmd: str, user: str | None = None, check: bool = True, timeout: float = 60,
        stdin: str | None = None,
    ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """``cmd`` in the container as root (or ``user``, through runuser: their groups from
        the container's group database), with only :data:`ENV`."""
        argv = ["nsenter", "-t", str(self.leader), "-a", "env", "-i", *ENV]
        argv += ["runuser", "-u", user, "--", *cmd] if user else list(cmd)
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=stdin)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)}: exit {r.returncode}\n{r.stdout}{r.stderr}")
        return r

    def sh(self, script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-c", script, "sh", *args, check=check)

    def write(self, path: str, text: str) -> None:
        self.run("sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1"', "sh", path, stdin=text)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(ln.split("=", 1) for ln in out.splitlines() if "=" in ln)

    def cursor(self) -> str:
        """The journal's position now: :meth:`journal` after it shows what came since."""
        out = self.run("journalctl", "--lines=1", "--output=json", "--quiet").stdout
        return str(json.loads(out)["__CURSOR"]) if out.strip() else ""

    def journal(self, *match: str, after: str = "") -> list[dict[str, Any]]:
        """Journal entries (``journalctl -o json``) for ``match`` (``-u UNIT``, ``FIELD=V``)."""
        since = [f"--after-cursor={after}"] if after else []
        out = self.run("journalctl", "--output=json", "--no-pager", "--quiet", *since,
                       *match).stdout  # fmt: skip
        return [json.loads(ln) for ln in out.splitlines() if ln.strip()]

    def wait(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.05)

    # -- the end --------------------------------------------------------------------------------
    def close(self) -> None:
        """Power off (the emulator's tree unbound first), then remove what nspawn leaves."""
        started = time.monotonic()
        try:
            if self.leader and self.nspawn.poll() is None:
                with contextlib.suppress(Exception):
                    self.run("systemctl", "stop", "apmatrixd.service", check=False, timeout=30)
                    self.sh(UNOVERLAY_SH, SIM, check=False)
                    self.run("systemctl", "stop", SIM_UNIT, check=False, timeout=30)
                    self.run("systemctl", "poweroff", check=False, timeout=30)
                    self.nspawn.wait(timeout=30)
            if self.nspawn.poll() is None and self.leader:
                with contextlib.suppress(Exception):
                    self.run("systemctl", "poweroff", "-ff", check=False, timeout=10)
                    self.nspawn.wait(timeout=10)
            if self.nspawn.poll() is None:
                os.killpg(self.nspawn.pid, signal.SIGKILL)
                self.nspawn.wait(timeout=10)
        finally:
            for group in self.cgroups:
                _remove_cgroup(group)
            self.log.unlink(missing_ok=True)
            self.timings["poweroff"] = time.monotonic() - started
