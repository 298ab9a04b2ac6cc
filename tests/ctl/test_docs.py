"""The shipped bash completion and man page are generated from the parser and up to date."""

from __future__ import annotations

import subprocess
from pathlib import Path

from rigs import need_tool

from apmatrixd.ctl.docs import bash_completion, man_page
from apmatrixd.ctl.main import build_parser

REPO = Path(__file__).resolve().parent.parent.parent
REGEN = "run tools/gen-ctl-docs"


def test_completion_is_up_to_date() -> None:
    shipped = (REPO / "ctl" / "apmatrixctl.bash").read_text()
    assert shipped == bash_completion(build_parser()), REGEN


def test_man_page_is_up_to_date() -> None:
    shipped = (REPO / "ctl" / "apmatrixctl.1").read_text()
    assert shipped == man_page(build_parser()), REGEN


def test_the_daemon_man_page_ships_up_to_date_and_renders() -> None:
    """apmatrixctl(1) names apmatrixd(8) in SEE ALSO: it ships, from the daemon's parser."""
    from apmatrixd.ctl.docs import daemon_man_page
    from apmatrixd.daemon import build_parser as daemon_parser

    page = REPO / "ctl" / "apmatrixd.8"
    assert page.read_text() == daemon_man_page(), REGEN
    for a in daemon_parser().options():
        for opt in a.option_strings:
            assert opt.replace("-", "\\-") in page.read_text(), opt
    need_tool("man", "man-db")
    r = subprocess.run(
        ["man", "-l", str(page)], capture_output=True, text=True, timeout=20,
        env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin", "MANPAGER": "cat", "PAGER": "cat"},
    )  # fmt: skip
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "AUTHORISATION" in r.stdout and "--mdevctl-dir" in r.stdout


def test_the_callout_man_page_ships_up_to_date() -> None:
    from apmatrixd.ctl.docs import callout_man_page

    page = (REPO / "ctl" / "apmatrixd-callout.8").read_text()
    assert page == callout_man_page(), REGEN
    assert "00\\-apmatrixd\\-callout" in page and "ap\\-check" in page


def test_the_emulator_man_page_ships_up_to_date() -> None:
    from apmatrixd.ctl.docs import sim_man_page

    page = (REPO / "ctl" / "apmatrixd-sim.1").read_text()
    assert page == sim_man_page(), REGEN
    for cmd in ("mount", "guest", "scenarios", "show", "demo"):
        assert f"\\fB{cmd}\\fR" in page, cmd


def test_every_command_is_documented_and_completed() -> None:
    parser = build_parser()
    comp, man = bash_completion(parser), man_page(parser)
    for cmd in ("list", "show", "create", "assign", "check", "picture", "monitor",
                "import-mdevctl", "export-mdevctl"):  # fmt: skip
        assert f"        {cmd}) opts=" in comp
        assert f"\\fB{cmd.replace('-', chr(92) + '-')}\\fR" in man


def test_completion_works_in_bash() -> None:
    need_tool("bash", "bash")
    script = (
        f"source {REPO / 'ctl' / 'apmatrixctl.bash'}\n"
        "COMP_WORDS=(apmatrixctl as); COMP_CWORD=1; _apmatrixctl; echo ${COMPREPLY[@]}\n"
        "COMP_WORDS=(apmatrixctl assign x --ad); COMP_CWORD=3; _apmatrixctl; echo ${COMPREPLY[@]}\n"
    )
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=10)
    assert r.stdout.splitlines() == ["assign", "--address --adapters"], r.stderr


def test_man_page_renders() -> None:
    need_tool("man", "man-db")
    r = subprocess.run(
        ["man", "-l", str(REPO / "ctl" / "apmatrixctl.1")],
        capture_output=True,
        text=True,
        timeout=20,
        env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin", "MANPAGER": "cat", "PAGER": "cat"},
    )
    assert r.returncode == 0, r.stderr
    assert "EXIT STATUS" in r.stdout and "a bare 47 is 0x47" in r.stdout


def test_every_parser_records_what_its_help_shows() -> None:
    """The pages are built from what the parsers recorded as they were declared: every
    option and command `--help` shows is recorded, and nothing else."""
    import re

    from apmatrixd import callout
    from apmatrixd.argdoc import DocumentedParser
    from apmatrixd.ctl.main import build_parser as ctl_parser
    from apmatrixd.daemon import build_parser as daemon_parser
    from apmatrixd.sim.cli import build_parser as sim_parser

    def check(p: DocumentedParser) -> int:
        # argparse's usage line lists every option it knows that is not hidden (by its
        # first name)
        usage = set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", p.format_usage()))
        recorded = {a.option_strings[0] for a in p.options()}
        assert recorded == usage, (p.prog, recorded ^ usage)
        return len(recorded) + sum(check(sp) for sp, _ in p.commands.values())

    for p in (ctl_parser(), daemon_parser(), sim_parser(), callout.parser()):
        assert check(p) > 0
    top = ctl_parser()
    assert {"list", "create", "apply", "metrics", "monitor"} <= top.commands.keys()
    assert set(top.commands) == set(
        re.findall(r"^    (\S+)", top.format_help(), re.M)
    ), "every command --help lists is recorded"
