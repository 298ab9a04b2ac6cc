"""Scenario loading: the built-ins, the compact syntax, and clear errors for bad files."""

from __future__ import annotations

from pathlib import Path

import pytest

from apmatrixd.sim.scenario import builtin_names, load_scenario

ALL = frozenset(range(256))


def test_builtin_names() -> None:
    assert builtin_names() == ["big", "default", "rfc2017"]


def test_default_is_the_design_document_host() -> None:
    sc = load_scenario("default")
    assert sc.layout == "upstream"
    assert [(a.id, a.type, a.mode, a.hwtype) for a in sc.adapters] == [
        (5, "CEX5C", "CCA-Coproc", 11),
        (6, "CEX5A", "Accelerator", 11),
    ]
    assert sc.usage_domains == {0x04, 0x47, 0xAB, 0xFF}
    assert sc.control_domains == sc.usage_domains
    assert sc.apmask == ALL and sc.aqmask == ALL
    assert (sc.max_adapter_id, sc.max_domain_id) == (255, 255)


def test_rfc2017_is_the_same_host_on_the_old_layout() -> None:
    sc, default = load_scenario("rfc2017"), load_scenario("default")
    assert sc.layout == "rfc2017"
    assert sc.adapters == default.adapters and sc.usage_domains == default.usage_domains


def test_big_loads() -> None:
    sc = load_scenario("big")
    assert len(sc.adapters) == 256 and sc.usage_domains == ALL
    assert {a.uevent_mode for a in sc.adapters} == {"cca", "ep11", "accel"}


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "host.toml"
    path.write_text(text)
    return str(path)


def test_file_with_everything(tmp_path: Path) -> None:
    sc = load_scenario(
        write(
            tmp_path,
            """
            apxa = false
            usage_domains = [1, "3-5"]
            control_domains = "0-15"
            apmask = "+0-63,-7"
            aqmask = "0x8"
            [[adapters]]
            ids = "0x10-0x11"
            type = "CEX7P"
            online = false
            [[adapters]]
            id = 63
            type = "CEX4A"
            config = false
            """,
        )
    )
    assert sc.name == "host" and sc.source.endswith("host.toml")
    assert (sc.max_adapter_id, sc.max_domain_id) == (63, 15)
    assert [(a.id, a.type, a.online, a.config) for a in sc.adapters] == [
        (16, "CEX7P", False, True),
        (17, "CEX7P", False, True),
        (63, "CEX4A", True, False),
    ]
    assert sc.usage_domains == {1, 3, 4, 5} and sc.control_domains == frozenset(range(16))
    assert sc.apmask == frozenset(range(64)) - {7} and sc.aqmask == {0}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("adapters = 5", "array of tables"),
        ("bogus = 1", "unknown key"),
        ('layout = "s390"', "layout"),
        ("[[adapters]]\nid = 300", "outside"),
        ('[[adapters]]\nid = 1\ntype = "CEX9C"', "CEX4..CEX8"),
        ("[[adapters]]\nid = 1\n[[adapters]]\nid = 1", "twice"),
        ("[[adapters]]\nid = 1\nids = '2-3'", "exactly one"),
        ("apxa = false\nusage_domains = [16]", "outside 0..15"),
        ("apxa = false\nmax_adapter_id = 255", "without APXA"),
        ('usage_domains = ["9-3"]', "backwards"),
        ('apmask = "0X1"', "apmask"),
        ("[[adapters]]\nid = 1\nonline = 1", "true or false"),
        ("this is = not toml", "TOML"),
    ],
)
def test_bad_files_name_file_and_problem(tmp_path: Path, text: str, problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ValueError) as exc:
        load_scenario(path)
    assert path in str(exc.value) and problem in str(exc.value)


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match="not a built-in scenario"):
        load_scenario("no-such-scenario")
