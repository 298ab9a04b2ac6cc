"""Injected kernel faults: a sysfs write fails half-way through CreateMatrix, Update and
Reserve. The registry, the kernel and the state directory end exactly as before the call,
and the caller gets ``Error.Kernel``.

In process (both layouts): the change is first recorded on a twin host to learn its sysfs
writes; then, for every write of it, a fresh host gets the emulator's fault hook
(``Host.inject_fault``) on that write's attribute, so the failure lands at every position of
the batch (after 0, 1, 2, ... writes that succeeded and must be undone). Then the same call,
with no fault left, succeeds: the daemon is not stuck.

End to end: the daemon armed through its test-only hook ``APMATRIXD_TEST_FAULTS`` (the
emulator's ``inject_fault`` from the environment, like ``APMATRIXD_TEST_KILL_AT``), the error
name read off the bus, the kernel read through FUSE and the state directory as bytes.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from busrig import MANAGER, MATRIX, ROOT, Client, arun
from dbus_fast import Variant
from relrig import ERR, SimFactory, check_all, path_of
from rigs import everything, recording_writes

from apmatrixd.kernel import Kernel, KernelError, TreeSysfs
from apmatrixd.service import Service
from apmatrixd.sim.model import Host
from apmatrixd.store import Store

G1 = "11111111-1111-4111-8111-111111111111"
G2 = "22222222-2222-4222-8222-222222222222"
ERRNOS = [errno.EBUSY, errno.EIO, errno.EINVAL, errno.ENODEV, errno.EADDRNOTAVAIL]

OPS: dict[str, Callable[[Service], object]] = {
    "create": lambda s: s.create_matrix(G2, adapters=[5, 6], domains=[0x47], name="g2"),
    "update": lambda s: s.update(G1, [5, 6], [0x47, 0xAB], [1]),
    "reserve": lambda s: s.reserve([6], [0xFF]),
}


def setup(scenario: str, state: Path) -> tuple[Host, Service]:
    """Adapter 05 and domains 04, 47, ab reserved; guest 1 live on 05.0004."""
    host = Host.from_name(scenario)
    svc = Service(Kernel(TreeSysfs(host)), store=Store(state))
    svc.load()
    svc.reserve([5], [4, 0x47, 0xAB])
    svc.create_matrix(G1, adapters=[5], domains=[4], name="g1", autostart=True)
    return host, svc


def writes_of(scenario: str, op: str, state: Path) -> list[str]:
    """The sysfs writes ``op`` makes, in order, as the emulator sees their paths."""
    host, svc = setup(scenario, state)
    seen = recording_writes(host)
    OPS[op](svc)
    return seen


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("scenario", ["default", "default@6.0", "rfc2017"])
def test_write_fails_anywhere_in_the_batch(tmp_path: Path, scenario: str, op: str) -> None:
    writes = writes_of(scenario, op, tmp_path / "twin")
    # A batch, so "half-way" exists; or, on 6.10+, one ap_config write that must fail whole.
    single = len(writes) == 1 and writes[0].endswith("/ap_config")
    assert single or len(writes) >= 2, writes
    faults = 0
    for i, path in enumerate(writes):
        if path in writes[:i]:
            continue  # the hook fails the first write to a path; that position is covered
        state = tmp_path / f"{i}"
        host, svc = setup(scenario, state)
        before = everything(host, svc, state)
        host.inject_fault(path, ERRNOS[i % len(ERRNOS)])
        with pytest.raises(KernelError) as caught:
            OPS[op](svc)
        assert caught.value.name == "Kernel"
        assert f"Errno {ERRNOS[i % len(ERRNOS)]}" in str(caught.value), str(caught.value)
        assert not any(host.faults.values()), "the fault did not fire"
        after = everything(host, svc, state)
        for key in before:
            assert after[key] == before[key], (op, i, path, key)
        faults += 1
        OPS[op](svc)  # no fault left: the same call goes through
        assert svc.registry.violations() == []
    assert faults >= (1 if single else 2)
    print(f"{scenario} {op}: {len(writes)} writes, {faults} faults injected")


@pytest.mark.parametrize("scenario", ["default", "default@6.0"])
def test_error_kernel_end_to_end(sim: SimFactory, scenario: str) -> None:
    """CreateMatrix, Update and Reserve over D-Bus, each failing half-way in the kernel: on
    6.0 one write per id, on 6.19 the mdev made and its one ap_config write refused."""
    m = "devices/vfio_ap/matrix"
    first = {"adapters": Variant("au", [5]), "domains": Variant("au", [4])}
    if scenario == "default":
        # An empty G1 is one create write; its first ap_config write is the Update's.
        first = {}
        update = f"{m}/{G1}/ap_config:EINVAL"
        create = f"{m}/{G2}/ap_config:EBUSY"
    else:
        update = f"{m}/{G1}/unassign_control_domain:EINVAL"
        create = f"{m}/{G2}/assign_domain:EBUSY"
    faults = ";".join(["bus/ap/aqmask:EIO", create, update])
    s = sim(scenario=scenario, env={"APMATRIXD_TEST_FAULTS": faults})
    assert "APMATRIXD_TEST_FAULTS" in s.daemon.stderr()

    async def go() -> None:
        c = await Client.connect(s.address)

        async def fails(path: str, iface: str, member: str, sig: str, body: list[Any]) -> None:
            before = (await c.snapshot(), s.kernel(), s.state_bytes())
            name, text = await c.error(path, iface, member, sig, body)
            assert name == ERR + "Kernel", (member, name, text)
            assert "Errno" in text, text
            assert (await c.snapshot(), s.kernel(), s.state_bytes()) == before, member
            problems, _ = await check_all(c, s)
            assert problems == []
            await c.ok(path, iface, member, sig, body)  # the fault is spent: now it works

        await fails(ROOT, MANAGER, "Reserve", "auau", [[5, 6], [4, 0x47]])
        await c.ok(ROOT, MANAGER, "CreateMatrix", "sa{sv}", [G1, first])
        opts2 = {"adapters": Variant("au", [5, 6]), "domains": Variant("au", [0x47])}
        await fails(ROOT, MANAGER, "CreateMatrix", "sa{sv}", [G2, opts2])
        await c.ok(path_of(G2), MATRIX, "Remove")
        await fails(path_of(G1), MATRIX, "Update", "auauau", [[5, 6], [0x47], []])
        problems, _ = await check_all(c, s)
        assert problems == []
        c.close()

    arun(go())
