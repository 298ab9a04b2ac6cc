"""Declared state (Manager.Apply) in process, on the emulator: the plan, idempotence, the dry
run, all or nothing (a refusal names every problem; a kernel write failing anywhere in the
batch leaves the registry, the kernel and the state directory exactly as they were), prune,
and the matrices of other managers."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
from rigs import everything, recording_writes

from apmatrixd import declared
from apmatrixd.core import ApmatrixError, InvalidArgument
from apmatrixd.kernel import Kernel, KernelError, TreeSysfs
from apmatrixd.service import Service, sync
from apmatrixd.service.executor import Command
from apmatrixd.sim.model import Host
from apmatrixd.store import Store

G1 = "11111111-1111-4111-8111-111111111111"
G2 = "22222222-2222-4222-8222-222222222222"
G3 = "33333333-3333-4333-8333-333333333333"
MD = "44444444-4444-4444-8444-444444444444"

DOC = f"""
reserve: {{adapters: ["05", "06"], domains: ["04", "0x47"]}}
matrices:
  - name: guest1
    uuid: {G1}
    adapters: ["05", "06"]
    domains: ["04"]
    autostart: true
  - name: guest2
    adapters: [5, 6]          # integers work too
    domains: ["47"]
    state: defined
"""


def service(tmp_path: Path, scenario: str = "default") -> tuple[Host, Service]:
    host = Host.from_name(scenario)
    svc = Service(Kernel(TreeSysfs(host)), store=Store(tmp_path / "state"))
    svc.mdevctl_dir = str(tmp_path / "etc")
    svc.watch_mdevctl = True
    svc.load()
    return host, svc


def mdevctl_defines(svc: Service, tmp_path: Path, adapter: int, domain: int) -> None:
    """``mdevctl define`` of matrix MD (adapter x domain), read by the daemon."""
    etc = tmp_path / "etc" / "matrix"
    etc.mkdir(parents=True)
    (etc / MD).write_text(
        '{"mdev_type": "vfio_ap-passthrough", "start": "manual", "attrs": ['
        f'{{"assign_adapter": "{adapter:#04x}"}}, {{"assign_domain": "{domain:#06x}"}}]}}'
    )
    svc.reload_mdevctl()


def resync(svc: Service) -> Command[Any]:
    return (yield from sync.resync(svc, everything=True, pool=True))


def actions(result: Any) -> list[tuple[str, str]]:
    return [(s.action, s.target) for s in result.plan]


def test_apply_then_again_changes_nothing(tmp_path: Path) -> None:
    host, svc = service(tmp_path)
    r = svc.apply(DOC)
    assert r.changed
    assert actions(r) == [
        ("reserve", "host pool"), ("create", "guest1"), ("create", "guest2"),
    ]  # fmt: skip
    g1, g2 = svc.matrix(G1), svc.matrix("guest2")
    assert (g1.state, g1.adapters, g1.domains, g1.control_domains, g1.autostart) == (
        "active", (5, 6), (4,), (4,), True,
    )  # fmt: skip
    assert (g2.state, g2.adapters, g2.domains, g2.autostart) == ("defined", (5, 6), (0x47,), False)
    assert host.read("bus/ap/apmask").startswith(b"0xf9ffffff")  # 05 and 06 reserved
    assert sorted(p.name for p in (tmp_path / "state" / "matrices").iterdir()) == sorted(
        [f"{G1}.json", f"{g2.uuid}.json"]
    )
    before = everything(host, svc, tmp_path / "state")
    again = svc.apply(DOC)
    assert (again.changed, again.plan) == (False, [])
    assert everything(host, svc, tmp_path / "state") == before
    # JSON is YAML: the same document as JSON is the same declaration.
    as_json = (
        '{"reserve": {"adapters": ["05", "06"], "domains": ["04", "47"]}, "matrices": ['
        f'{{"name": "guest1", "uuid": "{G1}", "adapters": ["05", "06"], "domains": ["04"],'
        ' "autostart": true}, {"name": "guest2", "adapters": [5, 6], "domains": ["0x47"],'
        ' "state": "defined"}]}'
    )
    assert svc.apply(as_json).changed is False


def test_check_plans_the_same_and_changes_nothing(tmp_path: Path) -> None:
    host, svc = service(tmp_path)
    before = everything(host, svc, tmp_path / "state")
    dry = svc.apply(DOC, check=True)
    assert dry.changed and actions(dry) == [
        ("reserve", "host pool"), ("create", "guest1"), ("create", "guest2"),
    ]  # fmt: skip
    assert everything(host, svc, tmp_path / "state") == before
    assert actions(svc.apply(DOC)) == actions(dry)
    assert svc.apply(DOC, check=True).changed is False


def test_updates_configures_starts_and_stops(tmp_path: Path) -> None:
    host, svc = service(tmp_path)
    svc.apply(DOC)
    changed = DOC.replace('domains: ["04"]\n    autostart: true', 'domains: ["04", "ab"]')
    changed = changed.replace("state: defined", "state: active")
    changed = changed.replace('domains: ["04", "0x47"]', 'domains: ["04", "0x47", "ab"]')
    r = svc.apply(changed)
    assert actions(r) == [
        ("reserve", "host pool"),
        ("update", "guest1"), ("configure", "guest1"),
        ("start", "guest2"),
    ]  # fmt: skip
    g1, g2 = svc.matrix(G1), svc.matrix("guest2")
    assert (g1.domains, g1.control_domains, g1.autostart, g1.state) == (
        (4, 0xAB), (4, 0xAB), False, "active",
    )  # fmt: skip
    assert g2.state == "active"
    kernel = Kernel(TreeSysfs(host)).read_mdev_sets(G1)
    assert kernel is not None and kernel.domains == {4, 0xAB}
    r = svc.apply(changed.replace("state: active", "state: defined"))
    assert actions(r) == [("stop", "guest2")]
    assert svc.matrix("guest2").state == "defined" and not host.exists(host.mdev_dir(g2.uuid))


def test_an_autostart_matrix_that_is_not_live_is_started(tmp_path: Path) -> None:
    host, svc = service(tmp_path)
    svc.apply(DOC)
    svc.stop(G1)
    assert actions(svc.apply(DOC)) == [("start", "guest1")]
    assert svc.matrix(G1).state == "active"


def test_the_order_lets_a_matrix_take_what_another_gives_up(tmp_path: Path) -> None:
    """guest3, listed first, takes 05.0004 that guest1 gives up in the same document."""
    host, svc = service(tmp_path)
    svc.apply(DOC)
    doc = f"""
reserve: {{adapters: ["05", "06"], domains: ["04", "47", "ab"]}}
matrices:
  - {{name: guest3, uuid: {G3}, adapters: ["05", "06"], domains: ["04"]}}
  - {{name: guest1, uuid: {G1}, adapters: ["05", "06"], domains: ["ab"], autostart: true}}
  - {{name: guest2, adapters: [5, 6], domains: ["47"], state: defined}}
"""
    r = svc.apply(doc)
    assert actions(r) == [
        ("reserve", "host pool"), ("update", "guest1"), ("create", "guest3"),
    ]  # fmt: skip
    assert svc.matrix(G3).state == "active" and svc.matrix(G1).domains == (0xAB,)
    assert svc.registry.violations() == []
    assert svc.apply(doc).changed is False


def test_a_conflict_among_several_changes_nothing_and_names_every_problem(tmp_path: Path) -> None:
    host, svc = service(tmp_path)
    svc.apply(DOC)
    before = everything(host, svc, tmp_path / "state")
    doc = (
        DOC
        + f"""
  - {{name: guest3, uuid: {G3}, adapters: ["06"], domains: ["04", "47"]}}
  - {{name: guest4, adapters: ["07"], domains: ["ff"]}}
"""
    )
    with pytest.raises(ApmatrixError) as caught:
        svc.apply(doc)
    text = str(caught.value)
    assert caught.value.name == "HostOwned", text  # the most basic problem names the refusal
    assert text.startswith("2 problems: "), text
    assert f"matrix guest3: APQNs already in use: 06.0004 owned by guest1 ({G1})" in text
    assert "06.0047 owned by guest2" in text
    assert "matrix guest4: APQNs still belong to the host: 07.00ff owned by host" in text
    assert everything(host, svc, tmp_path / "state") == before
    # only the conflicts: named Conflict
    with pytest.raises(ApmatrixError) as caught:
        svc.apply(doc.split("  - {name: guest4")[0])
    assert caught.value.name == "Conflict"


def test_bad_documents_name_every_problem(tmp_path: Path) -> None:
    host, svc = service(tmp_path)
    before = everything(host, svc, tmp_path / "state")
    bad = f"""
reserve: {{adapters: ["05", "1ff"], domians: ["04"]}}
matrices:
  - {{name: guest1, adapters: ["zz", 300, true], domains: "04", autostart: "yes"}}
  - {{name: guest1, uuid: not-a-uuid, state: running}}
  - {{name: "bad name!", adapters: []}}
  - {{adapters: ["05"]}}
  - {{name: g6, uuid: {G1}}}
  - {{name: g7, uuid: {G1.upper()}}}
surplus: 1
"""
    with pytest.raises(InvalidArgument) as caught:
        svc.apply(bad)
    text = str(caught.value)
    for part in [
        "top level: unknown key 'surplus'",
        "reserve: unknown key 'domians'",
        "reserve.adapters: id '1ff' is above ff",
        "matrices[0] (guest1).adapters: not a hex id: 'zz'",
        "matrices[0] (guest1).adapters: id 300 out of 0..255",
        "matrices[0] (guest1).adapters: True is not an id",
        "matrices[0] (guest1): autostart must be true or false, not 'yes'",
        "matrices[1] (guest1): malformed UUID",
        "matrices[1] (guest1): state must be one of active, defined, not 'running'",
        "matrices[1]: name 'guest1' is declared twice (matrices[0])",
        "matrices[3]: needs a name",
        f"matrices[5]: uuid {G1} is declared twice (matrices[4])",
    ]:
        assert part in text, (part, text)
    with pytest.raises(ApmatrixError, match="matrix bad name!: a name may not contain") as err:
        svc.apply("matrices: [{name: 'bad name!'}]")
    assert err.value.name == "InvalidArgument"
    for doc, why in [
        ("- 1\n- 2", "must be a mapping"),
        ("matrices: {name: g}", "matrices: must be a list"),
        ("reserve: [1]", "reserve: must be a mapping"),
        ("a: &x [1]\nb: *x", "aliases"),
        ("matrices: [", "not valid YAML"),
        ("!!python/object:os.system {}", "not valid YAML"),
        ("x" * (declared.MAX_BYTES + 1), "larger than 1048576 bytes"),
    ]:
        with pytest.raises(InvalidArgument, match=why):
            svc.apply(doc)
    assert everything(host, svc, tmp_path / "state") == before


def test_prune_removes_only_apmatrixds_matrices(tmp_path: Path) -> None:
    host, svc = service(tmp_path)
    svc.apply(DOC)
    svc.reserve([7], [0xAB])
    mdevctl_defines(svc, tmp_path, 0x07, 0xAB)
    assert svc.matrix(MD).manager == "mdevctl"
    doc = """
reserve: {adapters: ["05", "06"], domains: ["04"]}
matrices:
  - {name: guest1, adapters: ["05"], domains: ["04"], autostart: true}
"""
    # Without prune: nothing goes; guest1 shrinks.
    assert actions(svc.apply(doc, check=True)) == [("update", "guest1")]
    # With prune, mdevctl's matrix holds 07.00ab: releasing 07 and ab is refused, by name.
    with pytest.raises(ApmatrixError) as caught:
        svc.apply(doc, prune=True)
    assert caught.value.name == "Busy"
    assert f"release: APQNs are held by matrices: 07.00ab owned by mdevctl's definition {MD}" in (
        str(caught.value)
    )
    doc = doc.replace('domains: ["04"]}', 'domains: ["04", "ab"]}', 1)
    doc = doc.replace('adapters: ["05", "06"]', 'adapters: ["05", "06", "07"]', 1)
    r = svc.apply(doc, prune=True)
    guest2 = next(s.uuid for s in r.plan if s.action == "remove")
    assert actions(r) == [
        ("remove", "guest2"), ("update", "guest1"), ("release", "host pool"),
    ]  # fmt: skip
    assert [m.name or m.uuid for m in svc.matrices()] == ["guest1", MD]
    assert not (tmp_path / "state" / "matrices" / f"{guest2}.json").exists()
    assert svc.host.host_domains == tuple(d for d in range(256) if d not in (4, 0xAB))
    assert svc.apply(doc, prune=True).changed is False


def test_other_managers_matrices_are_never_touched(tmp_path: Path) -> None:
    host, svc = service(tmp_path)
    svc.reserve([5, 6], [4, 0x47])
    mdevctl_defines(svc, tmp_path, 0x05, 0x04)
    before = everything(host, svc, tmp_path / "state")
    with pytest.raises(ApmatrixError) as caught:
        svc.apply(f"matrices: [{{name: theirs, uuid: {MD}, adapters: ['05'], domains: ['04']}}]")
    assert caught.value.name == "NotManaged" and f"mdevctl manages matrix {MD}" in str(caught.value)
    with pytest.raises(ApmatrixError) as caught:
        svc.apply("matrices: [{name: mine, adapters: ['05', '06'], domains: ['04']}]")
    assert caught.value.name == "Conflict"
    assert f"05.0004 owned by mdevctl's definition {MD}" in str(caught.value)
    assert everything(host, svc, tmp_path / "state") == before
    # An mdev made outside apmatrixd: declared under its UUID, refused by name; prune
    # leaves it (and mdevctl's) alone.
    k = svc.kernel
    k.create_mdev(G2)
    k.assign(G2, "adapter", 6)
    k.assign(G2, "domain", 0x47)
    svc.run(resync)
    assert svc.matrix(G2).manager == "external"
    with pytest.raises(ApmatrixError, match=f"matrix {G2} was made outside apmatrixd"):
        svc.apply(f"matrices: [{{name: x, uuid: {G2}, adapters: ['06'], domains: ['47']}}]")
    keep = "reserve: {adapters: ['05', '06'], domains: ['04', '47']}"
    assert svc.apply(keep, prune=True).changed is False
    assert {m.uuid for m in svc.matrices()} == {MD, G2}


def test_a_guest_in_use_is_never_stopped_or_pruned(tmp_path: Path) -> None:
    host, svc = service(tmp_path)
    svc.apply(DOC)
    host.attach_guest(G1)
    before = everything(host, svc, tmp_path / "state")
    with pytest.raises(ApmatrixError) as caught:
        svc.apply(DOC.replace("autostart: true", "state: defined"))
    assert caught.value.name == "Busy" and "stop matrix guest1, which a guest uses" in str(
        caught.value
    )
    with pytest.raises(ApmatrixError, match="remove matrix guest1, which a guest uses"):
        svc.apply("reserve: {adapters: ['05', '06'], domains: ['04', '47']}", prune=True)
    assert everything(host, svc, tmp_path / "state") == before
    host.detach_guest(G1)


# -- a kernel write failing anywhere in the batch ---------------------------------------------
FAULT_DOC = f"""
reserve: {{adapters: ["05", "06"], domains: ["04", "47", "ab"]}}
matrices:
  - {{name: guest3, uuid: {G3}, adapters: ["05"], domains: ["04"]}}
  - {{name: guest1, uuid: {G1}, adapters: ["05", "06"], domains: ["ab"], autostart: true}}
"""


def fault_setup(scenario: str, state: Path) -> tuple[Host, Service]:
    """guest1 live on 05,06 x 04; guest2 live on 05,06 x 47; adapter 07 and domain ff reserved."""
    host = Host.from_name(scenario)
    svc = Service(Kernel(TreeSysfs(host)), store=Store(state))
    svc.load()
    svc.apply(
        DOC.replace("state: defined", f"uuid: {G2}").replace(
            '["04", "0x47"]', '["04", "0x47", "ff"]'
        )
    )
    svc.reserve([7], [])
    return host, svc


@pytest.mark.parametrize("scenario", ["default", "default@6.0", "rfc2017"])
def test_a_kernel_write_failing_anywhere_undoes_the_whole_apply(
    tmp_path: Path, scenario: str
) -> None:
    """Reserve ab, prune guest2 (emptied, removed last), update guest1, create guest3 on
    what guest1 gave up, release 07 and ff: a fault at each write leaves nothing."""
    host, svc = fault_setup(scenario, tmp_path / "twin")
    seen = recording_writes(host)
    r = svc.apply(FAULT_DOC, prune=True)
    want = ["reserve", "remove", "update", "create", "release"]
    if scenario == "rfc2017":
        want.remove("release")  # the 2017 host has no queue of 07 or ff to give back
    assert [s.action for s in r.plan] == want
    assert len(seen) >= 4, seen
    faults = 0
    errs = [errno.EBUSY, errno.EIO, errno.EINVAL, errno.ENODEV]
    for i, path in enumerate(seen):
        if path in seen[:i]:
            continue  # the hook fails the first write to a path
        state = tmp_path / str(i)
        host, svc = fault_setup(scenario, state)
        before = everything(host, svc, state)
        host.inject_fault(path, errs[i % len(errs)])
        with pytest.raises(KernelError):
            svc.apply(FAULT_DOC, prune=True)
        assert not any(host.faults.values()), "the fault did not fire"
        after = everything(host, svc, state)
        for key in before:
            assert after[key] == before[key], (i, path, key)
        faults += 1
        assert svc.apply(FAULT_DOC, prune=True).changed  # no fault left: it goes through
        assert svc.registry.violations() == []
        assert svc.apply(FAULT_DOC, prune=True).changed is False
    assert faults >= 4
