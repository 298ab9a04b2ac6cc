"""mdevctl interop: kstrtoul values, definitions in (all or none), ours out, round trip."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from apmatrixd import mdevctl
from apmatrixd.core import AlreadyExists, Conflict, HostOwned, InvalidArgument, NotFound, OutOfRange
from apmatrixd.kernel import Kernel, TreeSysfs
from apmatrixd.service import Service
from apmatrixd.sim.model import Host
from apmatrixd.store import Store

G1 = "11111111-1111-4111-8111-111111111111"
G2 = "22222222-2222-4222-8222-222222222222"
G3 = "33333333-3333-4333-8333-333333333333"


def mdevctl_file(start: str, *attrs: tuple[str, str]) -> str:
    """As mdevctl 1.2 writes it (serde_json pretty printing: two spaces, no newline at EOF)."""
    obj = {"mdev_type": "vfio_ap-passthrough", "start": start, "attrs": [{k: v} for k, v in attrs]}
    return json.dumps(obj, indent=2)


def write_dir(root: Path, files: dict[str, str]) -> str:
    (root / "matrix").mkdir(parents=True, exist_ok=True)
    for uuid, text in files.items():
        (root / "matrix" / uuid).write_text(text)
    return str(root)


@pytest.mark.parametrize(
    ("text", "value"),
    [("5", 5), ("0x05", 5), ("0X47", 0x47), ("017", 15), ("0", 0), ("+7", 7), ("255\n", 255)],
)
def test_kstrtoul_accepts_what_the_kernel_accepts(text: str, value: int) -> None:
    assert mdevctl.kstrtoul(text) == value


@pytest.mark.parametrize("text", ["", "0x", "08", "-1", " 5", "5 ", "5\n\n", "0xg", "five"])
def test_kstrtoul_refuses_what_the_kernel_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        mdevctl.kstrtoul(text)


@pytest.fixture
def svc(tmp_path: Path) -> Service:
    s = Service(Kernel(TreeSysfs(Host.from_name("default"))), store=Store(tmp_path / "state"))
    s.load()
    s.reserve([5, 6], [4, 0x47, 0xAB])
    return s


def test_import_then_export_round_trips(svc: Service, tmp_path: Path) -> None:
    src = write_dir(
        tmp_path / "etc",
        {
            G1: mdevctl_file(
                "auto",
                ("assign_adapter", "5"),
                ("assign_adapter", "0x06"),
                ("assign_domain", "0xab"),
                ("assign_control_domain", "0xab"),
                ("assign_domain", "4"),
                ("assign_control_domain", "4"),
            ),
            G2: mdevctl_file("manual", ("assign_adapter", "05"), ("assign_domain", "0x47")),
        },
    )
    assert svc.import_mdevctl(src) == [G1, G2]
    one, two = svc.matrix(G1), svc.matrix(G2)
    assert (one.adapters, one.domains, one.control_domains) == ((5, 6), (4, 0xAB), (4, 0xAB))
    assert (one.state, one.autostart, two.autostart) == ("defined", True, False)
    assert two.control_domains == ()  # exactly what the file says
    assert (tmp_path / "state" / "matrices" / f"{G1}.json").exists()
    out = tmp_path / "out"
    out.mkdir()
    svc.export_mdevctl(str(out))
    for uuid in (G1, G2):
        again = mdevctl.parse_file(out / "matrix" / uuid, (out / "matrix" / uuid).read_bytes())
        first = mdevctl.parse_file(
            Path(src) / "matrix" / uuid, (Path(src) / "matrix" / uuid).read_bytes()
        )
        assert (again.adapters, again.domains, again.control_domains, again.autostart) == (
            first.adapters,
            first.domains,
            first.control_domains,
            first.autostart,
        )
    exported = json.loads((out / "matrix" / G1).read_text())
    assert exported["mdev_type"] == "vfio_ap-passthrough" and exported["start"] == "auto"
    assert exported["attrs"][0] == {"assign_adapter": "0x05"}
    assert {"assign_domain": "0x00ab"} in exported["attrs"]
    # The definitions are ours now: they come back after a reboot.
    svc2 = Service(Kernel(TreeSysfs(Host.from_name("default"))), store=Store(tmp_path / "state"))
    svc2.load()
    assert svc2.matrix(G1).state == "active" and svc2.matrix(G2).state == "defined"


def nothing_changed(svc: Service, tmp_path: Path) -> None:
    assert svc.matrices() == []
    assert list((tmp_path / "state" / "matrices").iterdir()) == []


def test_clashing_definitions_are_refused_and_nothing_is_imported(
    svc: Service, tmp_path: Path
) -> None:
    # mdevctl 1.2 defines (and starts) these two happily: both hold 05.0047.
    src = write_dir(
        tmp_path / "etc",
        {
            G1: mdevctl_file("auto", ("assign_adapter", "5"), ("assign_domain", "0x47")),
            G2: mdevctl_file("auto", ("assign_adapter", "0x5"), ("assign_domain", "71")),
        },
    )
    with pytest.raises(Conflict) as exc:
        svc.import_mdevctl(src)
    assert f"matrix/{G2}" in str(exc.value) and "05.0047" in str(exc.value) and G1 in str(exc.value)
    nothing_changed(svc, tmp_path)


def test_a_clash_with_ours_or_the_host_is_refused(svc: Service, tmp_path: Path) -> None:
    svc.create_matrix(G3, adapters=[6], domains=[4])
    src = write_dir(
        tmp_path / "a",
        {
            G1: mdevctl_file("manual", ("assign_adapter", "5"), ("assign_domain", "4")),
            G2: mdevctl_file("manual", ("assign_adapter", "6"), ("assign_domain", "4")),
        },
    )
    with pytest.raises(Conflict, match=G3):
        svc.import_mdevctl(src)
    assert [m.uuid for m in svc.matrices()] == [G3]
    src = write_dir(
        tmp_path / "b",
        {G1: mdevctl_file("manual", ("assign_adapter", "7"), ("assign_domain", "0xff"))},
    )
    with pytest.raises(HostOwned):
        svc.import_mdevctl(src)
    src = write_dir(tmp_path / "c", {G3: mdevctl_file("manual")})
    with pytest.raises(AlreadyExists):
        svc.import_mdevctl(src)
    assert [m.uuid for m in svc.matrices()] == [G3]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("{", "not valid JSON"),
        ('{"mdev_type": "i915-GVTg_V5_4", "start": "auto", "attrs": []}', "mdev_type"),
        ('{"mdev_type": "vfio_ap-passthrough", "start": "later"}', "start is neither"),
        (
            mdevctl_file("auto", ("assign_adapter", "5"), ("assign_domain", "x")),
            "attrs[1]: the assign_domain value is not a number",
        ),
        (
            mdevctl_file("auto", ("assign_adapter", "256")),
            "attrs[0]: the assign_adapter value is above",
        ),
        (mdevctl_file("auto", ("unassign_adapter", "5")), "attrs[0]: not one of the supported"),
    ],
)
def test_a_bad_file_is_refused_naming_file_and_entry(
    svc: Service, tmp_path: Path, text: str, why: str
) -> None:
    good = mdevctl_file("auto", ("assign_adapter", "6"), ("assign_domain", "0x47"))
    src = write_dir(tmp_path / "etc", {G1: good, G2: text})
    with pytest.raises(InvalidArgument) as exc:
        svc.import_mdevctl(src)
    assert str(tmp_path / "etc" / "matrix" / G2) in str(exc.value) and why in str(exc.value)
    for secret in ("i915", "later", "'x'", "256", "unassign_adapter"):  # never the contents
        assert secret not in str(exc.value)
    nothing_changed(svc, tmp_path)


@contextlib.contextmanager
def given(path: str | Path, form: str) -> Iterator[str | int]:
    """The directory as the daemon gets it: its own path, or a caller's descriptor."""
    if form == "path":
        yield str(path)
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


FORMS = pytest.mark.parametrize("form", ["path", "fd"])


@FORMS
def test_import_skips_links_and_fifos_without_blocking(
    svc: Service, tmp_path: Path, form: str
) -> None:
    good = mdevctl_file("auto", ("assign_adapter", "6"), ("assign_domain", "0x47"))
    src = write_dir(tmp_path / "etc", {G1: good})
    secret = tmp_path / "root-only"
    secret.write_text(mdevctl_file("auto", ("assign_adapter", "5"), ("assign_domain", "4")))
    (tmp_path / "etc" / "matrix" / G2).symlink_to(secret)  # not followed
    os.mkfifo(tmp_path / "etc" / "matrix" / G3)  # a FIFO nobody writes: must not block
    with given(src, form) as where:
        assert svc.import_mdevctl(where) == [G1]


def test_a_descriptor_that_is_not_a_directory_is_refused(svc: Service, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for flags in (os.O_PATH, os.O_RDONLY | os.O_NONBLOCK):
        fd = os.open(fifo, flags)
        try:
            for verb in (svc.import_mdevctl, svc.export_mdevctl):
                with pytest.raises(InvalidArgument, match="descriptor passed is not a directory"):
                    verb(fd)
        finally:
            os.close(fd)
    nothing_changed(svc, tmp_path)


def test_import_needs_an_absolute_existing_dir(svc: Service, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        svc.import_mdevctl("etc/mdevctl.d")
    with pytest.raises(NotFound):
        svc.import_mdevctl(str(tmp_path / "nope"))
    with pytest.raises(NotFound, match="no matrix/ directory"):
        svc.import_mdevctl(str(tmp_path))


def test_an_adopted_live_mdev_is_claimed_by_its_definition(tmp_path: Path) -> None:
    host = Host.from_name("default")
    kernel = Kernel(TreeSysfs(host))
    svc = Service(kernel, store=Store(tmp_path / "state"))
    svc.load()
    svc.reserve([5], [4])
    kernel.create_mdev(G1)  # mdevctl started it before apmatrixd ran
    kernel.assign(G1, "adapter", 5)
    kernel.assign(G1, "domain", 4)
    svc.load()
    assert svc.matrix(G1).adopted
    src = write_dir(
        tmp_path / "etc",
        {G1: mdevctl_file("auto", ("assign_adapter", "5"), ("assign_domain", "4"))},
    )
    assert svc.import_mdevctl(src) == [G1]
    m = svc.matrix(G1)
    assert (m.adopted, m.autostart, m.state) == (False, True, "active")
    assert (tmp_path / "state" / "matrices" / f"{G1}.json").exists()


@FORMS
def test_export_follows_no_link_a_user_planted(svc: Service, tmp_path: Path, form: str) -> None:
    """ExportMdevctl(DIR) with DIR world-writable: a local user made DIR/matrix a link to a
    directory of theirs choosing, and DIR/matrix/<uuid> a link to a file. Root writes
    neither target: the planted directory link is refused, a planted file link replaced.
    A link given as the directory itself is not followed by path (by descriptor the caller
    resolved it with its own rights)."""
    svc.create_matrix(G1, adapters=[5], domains=[4])
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o1777)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if form == "path":
        (tmp_path / "link").symlink_to(shared)
        for verb in (svc.export_mdevctl, svc.import_mdevctl):
            with pytest.raises(InvalidArgument, match="symlink is not followed"):
                verb(str(tmp_path / "link"))
    (shared / "matrix").symlink_to(elsewhere)
    with given(shared, form) as where:
        with pytest.raises(InvalidArgument, match="not a directory .a symlink is not followed"):
            svc.export_mdevctl(where)
        assert list(elsewhere.iterdir()) == []
        with pytest.raises(InvalidArgument, match="symlink is not followed"):
            svc.import_mdevctl(where)
    (shared / "matrix").unlink()
    (shared / "matrix").mkdir()
    victim = tmp_path / "victim"
    victim.write_text("root's file\n")
    (shared / "matrix" / G1).symlink_to(victim)
    with given(shared, form) as where:
        svc.export_mdevctl(where)
    assert victim.read_text() == "root's file\n"
    written = shared / "matrix" / G1
    assert not written.is_symlink() and json.loads(written.read_text())["start"] == "manual"
    assert oct(written.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in (shared / "matrix").iterdir()] == [G1]  # no temporary left


def test_an_id_out_of_range_is_named_once(tmp_path: Path) -> None:
    noapxa = Path(__file__).parents[1] / "diff" / "noapxa.toml"  # limits 63/15
    s = Service(Kernel(TreeSysfs(Host.from_name(str(noapxa)))), store=Store(tmp_path / "state"))
    s.load()
    src = write_dir(tmp_path / "etc", {G1: mdevctl_file("manual", ("assign_adapter", "0x40"))})
    with pytest.raises(OutOfRange) as err:
        s.import_mdevctl(src)
    assert str(err.value) == f"{src}/matrix/{G1}: id out of range: adapter 0x40 > max 0x3f"
