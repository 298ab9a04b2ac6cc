"""One manager per matrix: mdevctl's definitions held (never changed), external mdevs, take
over, the callout's proposals decided as our own changes, and our files gone with our matrices."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_mdevctl import G1, G2, G3, mdevctl_file

from apmatrixd.core import Conflict, HostOwned, NotFound
from apmatrixd.core.errors import NotManaged
from apmatrixd.kernel import Kernel, TreeSysfs
from apmatrixd.service import Service
from apmatrixd.sim.model import Host
from apmatrixd.store import Store

G4 = "44444444-4444-4444-8444-444444444444"


def define(etc: Path, uuid: str, start: str = "manual", **sets: list[int]) -> Path:
    attrs = [("assign_adapter", f"{a:#x}") for a in sets.get("adapters", [])]
    attrs += [("assign_domain", f"{d:#x}") for d in sets.get("domains", [])]
    attrs += [("assign_control_domain", f"{d:#x}") for d in sets.get("control", [])]
    (etc / "matrix").mkdir(parents=True, exist_ok=True)
    path = etc / "matrix" / uuid
    path.write_text(mdevctl_file(start, *attrs))
    return path


def service(kernel: Kernel, tmp_path: Path) -> Service:
    s = Service(kernel, store=Store(tmp_path / "state"))
    s.mdevctl_dir = str(tmp_path / "etc")
    s.watch_mdevctl = True
    s.load()
    return s


@pytest.fixture
def kernel() -> Kernel:
    return Kernel(TreeSysfs(Host.from_name("default")))


@pytest.fixture
def svc(kernel: Kernel, tmp_path: Path) -> Service:
    s = service(kernel, tmp_path)
    s.reserve([5, 6], [4, 0x47, 0xAB])
    return s


def test_an_mdevctl_definition_is_held_and_named_in_a_conflict(
    svc: Service, tmp_path: Path
) -> None:
    define(tmp_path / "etc", G1, "auto", adapters=[5], domains=[4], control=[4])
    svc.reload_mdevctl()
    m = svc.matrix(G1)
    assert (m.manager, m.state, m.autostart, m.adapters, m.domains) == (
        "mdevctl", "defined", True, (5,), (4,),
    )  # fmt: skip
    with pytest.raises(Conflict, match=f"05.0004 owned by mdevctl's definition {G1}"):
        svc.create_matrix(G2, adapters=[5, 6], domains=[4])
    assert svc.check([5], [4])[0].owner == G1
    # never changed, started or removed here
    for change in (
        lambda: svc.assign(G1, "domain", 0x47),
        lambda: svc.start(G1),
        lambda: svc.remove(G1),
        lambda: svc.configure(G1, autostart=False),
    ):
        with pytest.raises(NotManaged, match="mdevctl manages matrix .*use mdevctl"):
            change()
    assert not svc.kernel.mdev_exists(G1)
    assert not (tmp_path / "state" / "matrices" / f"{G1}.json").exists()


def test_mdevctl_modify_and_undefine_are_followed(svc: Service, tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    define(etc, G1, adapters=[5], domains=[4])
    svc.reload_mdevctl()
    define(etc, G1, adapters=[5], domains=[0x47])  # mdevctl modify
    svc.reload_mdevctl()
    assert svc.matrix(G1).domains == (0x47,)
    svc.create_matrix(G2, adapters=[5], domains=[4])  # 05.0004 is free again
    (etc / "matrix" / G1).unlink()  # mdevctl undefine
    svc.reload_mdevctl()
    with pytest.raises(NotFound):
        svc.matrix(G1)
    svc.create_matrix(G3, adapters=[5], domains=[0x47])


def test_a_definition_found_at_start_up_and_one_that_breaks_a_rule(
    kernel: Kernel, tmp_path: Path
) -> None:
    first = service(kernel, tmp_path)
    first.reserve([5, 6], [4, 0x47])
    first.create_matrix(G1, adapters=[5], domains=[4], start=False)
    etc = tmp_path / "etc"
    define(etc, G2, adapters=[6], domains=[0x47])
    define(etc, G3, adapters=[5], domains=[4])  # written past any guard: clashes with ours
    svc = service(kernel, tmp_path)  # a restart
    assert svc.matrix(G2).manager == "mdevctl"
    clash = svc.matrix(G3)
    assert (clash.manager, clash.adapters, clash.domains) == ("mdevctl", (5,), (4,))
    assert any(u == G3 and "breaks a rule" in what for u, what in svc.startup_drift)
    # its APQNs are claimed in every decision, though it could not be held
    with pytest.raises(Conflict):
        svc.create_matrix(G4, adapters=[5, 6], domains=[4])
    assert svc.matrix(G1).manager == "apmatrixd"


def test_an_mdevctl_matrix_started_and_stopped_by_mdevctl(svc: Service, tmp_path: Path) -> None:
    define(tmp_path / "etc", G1, adapters=[5], domains=[4])
    svc.reload_mdevctl()
    k = svc.kernel
    k.create_mdev(G1)  # mdevctl start
    k.assign(G1, "adapter", 5)
    k.assign(G1, "domain", 4)
    k.assign(G1, "adapter", 6)  # and a live change beyond its definition
    svc.run(_resync)
    m = svc.matrix(G1)
    assert (m.manager, m.state, m.adapters) == ("mdevctl", "active", (5, 6))
    with pytest.raises(Conflict, match="mdevctl's definition"):
        svc.create_matrix(G2, adapters=[6], domains=[4])
    k.remove_mdev(G1)  # mdevctl stop: the definition holds its APQNs again
    svc.run(_resync)
    m = svc.matrix(G1)
    assert (m.manager, m.state, m.adapters) == ("mdevctl", "defined", (5,))
    svc.create_matrix(G2, adapters=[6], domains=[4])


def _resync(svc: Service):  # type: ignore[no-untyped-def]
    from apmatrixd.service import sync

    return (yield from sync.resync(svc, everything=True, pool=True))


def test_an_external_mdev_goes_with_its_mdev_and_becomes_mdevctls_when_defined(
    svc: Service, tmp_path: Path
) -> None:
    k = svc.kernel
    k.create_mdev(G1)  # KubeVirt, a DRA driver, a shell
    k.assign(G1, "adapter", 5)
    k.assign(G1, "domain", 4)
    svc.run(_resync)
    assert svc.matrix(G1).manager == "external"
    with pytest.raises(Conflict, match=f"mdev {G1}, made outside apmatrixd"):
        svc.create_matrix(G2, adapters=[5], domains=[4])
    define(tmp_path / "etc", G1, adapters=[5], domains=[4])  # mdevctl define --uuid (from live)
    svc.run(_resync)
    assert svc.matrix(G1).manager == "mdevctl"
    (tmp_path / "etc" / "matrix" / G1).unlink()
    svc.run(_resync)
    assert svc.matrix(G1).manager == "external"
    k.remove_mdev(G1)
    svc.run(_resync)
    with pytest.raises(NotFound):
        svc.matrix(G1)


def test_take_over_makes_it_ours_and_our_remove_takes_its_file(
    svc: Service, tmp_path: Path, kernel: Kernel
) -> None:
    etc = tmp_path / "etc"
    define(etc, G1, "auto", adapters=[5], domains=[4], control=[4])
    svc.reload_mdevctl()
    svc.take_over(G1)
    assert svc.matrix(G1).manager == "apmatrixd"
    svc.assign(G1, "domain", 0x47)
    svc.reload_mdevctl()  # its file is ours now: not read back as mdevctl's
    assert svc.matrix(G1).domains == (4, 0x47)
    again = service(kernel, tmp_path)
    assert (again.matrix(G1).manager, again.matrix(G1).domains) == ("apmatrixd", (4, 0x47))
    again.remove(G1)
    assert not (etc / "matrix" / G1).exists()  # or mdevctl would start it at the next boot


def test_take_over_of_a_definition_that_breaks_a_rule_is_refused(
    svc: Service, tmp_path: Path
) -> None:
    svc.create_matrix(G1, adapters=[5], domains=[4], start=False)
    define(tmp_path / "etc", G2, adapters=[5], domains=[4])
    svc.reload_mdevctl()
    with pytest.raises(Conflict):
        svc.take_over(G2)
    assert svc.matrix(G2).manager == "mdevctl"


def test_proposals_are_decided_as_our_own_changes(svc: Service, tmp_path: Path) -> None:
    svc.create_matrix(G1, name="guest1", adapters=[5, 6], domains=[4])
    with pytest.raises(Conflict, match="05.0004 owned by guest1") as err:
        svc.propose_mdevctl("define", G2, [5], [4, 0x47])
    assert "06" not in str(err.value)
    with pytest.raises(HostOwned, match="01.0001 owned by host"):
        svc.propose_mdevctl("define", G2, [1, 5], [1, 0x47])
    svc.propose_mdevctl("define", G2, [5, 6], [0x47], [0x47], autostart=True)
    svc.propose_mdevctl("start", G2, [5, 6], [0x47])
    with pytest.raises(NotManaged, match="apmatrixd manages matrix guest1"):
        svc.propose_mdevctl("modify", G1, [5], [4])
    with pytest.raises(NotFound, match="not live"):
        svc.propose_mdevctl("live", G2, [5], [0x47])
    assert sorted(os.listdir(tmp_path / "state" / "matrices")) == [f"{G1}.json"]  # no change


def test_export_writes_only_ours(svc: Service, tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    svc.create_matrix(G1, adapters=[5], domains=[4], start=False)
    theirs = define(etc, G2, "auto", adapters=[6], domains=[0x47])
    svc.reload_mdevctl()
    before = theirs.read_bytes()
    assert svc.export_mdevctl(str(etc)) == [G1]
    assert theirs.read_bytes() == before  # mdevctl's own file, as mdevctl wrote it
    svc.reload_mdevctl()  # our exported file is not read back as mdevctl's
    assert (svc.matrix(G1).manager, svc.matrix(G2).manager) == ("apmatrixd", "mdevctl")


def test_a_live_modify_is_decided_and_carried_out(svc: Service, tmp_path: Path) -> None:
    """mdevctl 1.3 leaves a live modify's sysfs writes to its callout: apmatrixd does them."""
    svc.create_matrix(G1, name="guest1", adapters=[5], domains=[4])
    define(tmp_path / "etc", G2, adapters=[6], domains=[0x47])
    svc.reload_mdevctl()
    k = svc.kernel
    k.create_mdev(G2)
    k.assign(G2, "adapter", 6)
    k.assign(G2, "domain", 0x47)
    svc.run(_resync)
    with pytest.raises(Conflict, match="05.0004 owned by guest1"):
        svc.propose_mdevctl("live", G2, [5, 6], [4, 0x47])
    assert k.read_mdevs(svc.state.infos)[G2].adapters == {6}  # refused: nothing written
    svc.propose_mdevctl("live", G2, [6], [4, 0x47])
    assert k.read_mdevs(svc.state.infos)[G2].domains == {4, 0x47}
    m = svc.matrix(G2)
    assert (m.manager, m.domains, m.state) == ("mdevctl", (4, 0x47), "active")
    assert not (tmp_path / "state" / "matrices" / f"{G2}.json").exists()  # not ours
    k.remove_mdev(G2)  # stopped: its definition (without the live change) holds again
    svc.run(_resync)
    assert svc.matrix(G2).domains == (0x47,)
