"""A fleet of simulated hosts for Ansible: N daemons (``--simulate``, a state directory each),
each on a private bus of its own, an inventory naming them, and ansible-playbook run over it
with our collection. Shared by tests/ansible/test_fleet.py and bench/fleetbench.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from busrig import Daemon, PrivateBus, start_daemon

REPO = Path(__file__).resolve().parents[2]
COLLECTIONS = REPO / "ansible"
BIN = Path(sys.executable).parent
RECAP = re.compile(r"^(?P<host>\S+)\s+:\s+(?P<counts>(?:\w+=\d+\s*)+)$", re.M)
COUNTER = re.compile(r"(\w+)=(\d+)")
PLAYBOOK = """\
- hosts: all
  gather_facts: false
  tasks:
    - name: the host's AP crypto layout
      apmatrix.apmatrix.apmatrix_apply:
        layout: "{{ layout }}"
        prune: "{{ prune | default(false) }}"
        bus_address: "{{ apmatrix_bus }}"
"""


@dataclass
class Host:
    name: str
    bus: PrivateBus
    daemon: Daemon

    @property
    def address(self) -> str:
        return self.bus.address


@dataclass
class Run:
    seconds: float
    rc: int
    stats: dict[str, dict[str, int]]  # host -> ok, changed, failed, ... (the recap)
    results: dict[str, dict[str, Any]]  # host -> the module's result
    output: str  # what ansible-playbook printed, stdout and stderr

    def hosts(self, key: str) -> set[str]:
        return {h for h, s in self.stats.items() if s.get(key)}


def _one(name: str, state: Path) -> Host:
    state.mkdir(mode=0o700, parents=True)
    bus = PrivateBus.start()
    try:
        daemon = start_daemon(bus.address, ("--simulate", "--state-dir", str(state)))
    except BaseException:
        bus.stop()
        raise
    return Host(name, bus, daemon)


@contextmanager
def fleet(n: int) -> Iterator[tuple[list[Host], Path]]:
    """``n`` hosts started in parallel, and a directory with the inventory and playbook."""
    work = Path(tempfile.mkdtemp(prefix="apmatrixd-fleet-", dir="/tmp"))
    names = [f"lpar{i:02d}" for i in range(1, n + 1)]
    with ThreadPoolExecutor(max_workers=min(n, 8)) as pool:
        futures = [pool.submit(_one, h, work / "state" / h) for h in names]
    hosts: list[Host] = []
    errors: list[BaseException] = []
    for f in futures:
        try:
            hosts.append(f.result())
        except BaseException as err:  # keep the ones that started, to stop them
            errors.append(err)
    try:
        if errors:
            raise errors[0]
        lines = ["[lpars]"]
        lines += [
            f"{h.name} ansible_connection=local ansible_python_interpreter={sys.executable}"
            f" apmatrix_bus={h.address}"
            for h in hosts
        ]
        (work / "inventory.ini").write_text("\n".join(lines) + "\n")
        (work / "site.yml").write_text(PLAYBOOK)
        yield hosts, work
    finally:
        for h in hosts:
            h.daemon.terminate()
            h.daemon.close()
            h.bus.stop()
        shutil.rmtree(work, ignore_errors=True)


def playbook(
    work: Path, layout: Any, *flags: str, forks: int = 20, extra: dict[str, Any] | None = None
) -> Run:
    """ansible-playbook over the fleet with ``layout`` for every host (or ``extra``'s per-host
    ``layouts``); the JSON callback's stats and each host's module result."""
    (work / "vars.json").write_text(json.dumps({"layout": layout, **(extra or {})}))
    tree = work / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    env = dict(
        os.environ,
        ANSIBLE_COLLECTIONS_PATH=str(COLLECTIONS),
        # ansible-core's own callbacks only: the recap from the default one, each host's
        # result from tree (the json callback is ansible.posix's)
        ANSIBLE_CALLBACKS_ENABLED="ansible.builtin.tree",
        ANSIBLE_CALLBACK_TREE_DIR=str(tree),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_LOCAL_TEMP=str(work / "tmp"),
        ANSIBLE_HOME=str(work / "ansible-home"),
        ANSIBLE_RETRY_FILES_ENABLED="False",
        PATH=f"{BIN}:{os.environ.get('PATH', '')}",  # apmatrixctl, as a package installs it
    )
    argv = [
        str(BIN / "ansible-playbook"), "-i", str(work / "inventory.ini"),
        "-e", f"@{work / 'vars.json'}", "-f", str(forks), *flags, str(work / "site.yml"),
    ]  # fmt: skip
    t = time.monotonic()
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, cwd=work)
    seconds = time.monotonic() - t
    stats: dict[str, dict[str, int]] = {}
    recap = p.stdout.partition("PLAY RECAP")[2]
    for m in RECAP.finditer(recap):
        stats[m["host"]] = {k: int(v) for k, v in COUNTER.findall(m["counts"])}
    if not stats:
        raise AssertionError(f"ansible-playbook rc={p.returncode}: {p.stdout}\n{p.stderr}")
    results = {f.name: json.loads(f.read_text()) for f in tree.iterdir()} if tree.exists() else {}
    return Run(seconds, p.returncode, stats, results, p.stdout + p.stderr)


def ctl(host: Host, *args: str, data: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "apmatrixctl"), "--address", host.address, *args],
        input=data, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def applies_in_parallel(hosts: Sequence[Host], document: str) -> float:
    """The same applies without Ansible: one ``apmatrixctl apply -`` per host, all at once."""
    t = time.monotonic()
    procs = [
        subprocess.Popen(
            [str(BIN / "apmatrixctl"), "--address", h.address, "apply", "-", "--json"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for h in hosts
    ]
    for p in procs:
        _out, err = p.communicate(document, timeout=120)
        assert p.returncode == 0, err
    return time.monotonic() - t
