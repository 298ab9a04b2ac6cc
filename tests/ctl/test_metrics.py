"""apmatrixctl metrics against a real apmatrixd on the FUSE emulator, read back with
prometheus_client's own parser, node_exporter's textfile collector and promtool."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from busrig import Daemon, DaemonFactory
from ctlrig import CTL, ctl, ok
from rigs import REPO, free_port, need_tool, unavailable

from apmatrixd import __version__

try:  # a Recommends: apmatrixctl works without it, these tests do not
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:
    text_string_to_metric_families = None


@pytest.fixture(autouse=True)
def _prometheus_client() -> None:
    if text_string_to_metric_families is None:
        unavailable("prometheus_client not installed (apt-get install python3-prometheus-client)")


ERR = "org.apmatrix.Apmatrix1.Error."
U1 = "11111111-1111-4111-8111-111111111111"
U2 = "22222222-2222-4222-8222-222222222222"
RULES = REPO / "contrib" / "prometheus" / "apmatrix-alerts.yml"
PROM_TOOLS = REPO / ".venv" / "prometheus"  # tools/bootstrap unpacks them there


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of the exposition: (name, sorted labels) -> value."""
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, key
            out[key] = s.value
    return out


def value(got: Samples, name: str, **labels: str) -> float:
    return got[(name, tuple(sorted(labels.items())))]


def metrics(address: str) -> Samples:
    return samples(ok(address, "metrics").out)


def wait(address: str, cond: Any, what: str, timeout: float = 10) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        got = metrics(address)
        if cond(got):
            return got
        assert time.monotonic() < deadline, f"waited for {what}"
        time.sleep(0.05)


def test_metrics_follow_what_happens_on_the_host(start: DaemonFactory, mnt: Path) -> None:
    """Reserve, two matrices (one only defined), a refused call, two drifts (one adopted, one
    not), a card deconfigured: each shows in the metrics the CLI prints."""
    began = time.time()
    d = start("--simulate", "--sim-mount", str(mnt), "--rescan-interval", "0.2")
    a = d.address
    got = metrics(a)
    assert value(got, "apmatrix_up") == 1
    about = {"kernel": "6.19+", "layout": "upstream", "version": __version__}
    assert value(got, "apmatrix_info", **about) == 1
    # the default host: cards 05 and 06, domains 04 47 ab ff, all the host's
    assert [value(got, "apmatrix_apqns", owner=o) for o in ("host", "free", "matrix")] == [8, 0, 0]
    assert [
        value(got, "apmatrix_matrices", state=s) for s in ("defined", "active", "degraded")
    ] == [
        0,
        0,
        0,
    ]
    kinds = {dict(k[1])["kind"] for k in got if k[0] == "apmatrix_drifts_total"}
    assert kinds == {
        "sets",
        "created",
        "removed",
        "started",
        "host_pool",
        "while_stopped",
        "released",
        "mdevctl",
    }
    assert all(v == 0 for k, v in got.items() if k[0].endswith("_total"))
    assert value(got, "apmatrix_refused_calls_total", error=ERR + "Conflict") == 0
    assert not [k for k in got if k[0] == "apmatrix_lost_apqns"]
    # the rescan timer moves the last rescan on (0.2 s here)
    first = value(got, "apmatrix_last_rescan_timestamp_seconds")
    assert began - 1 <= first <= time.time() + 1
    wait(a, lambda g: value(g, "apmatrix_last_rescan_timestamp_seconds") > first, "a rescan")

    ok(a, "reserve", "-a", "5,6", "-d", "4,47,ab")
    ok(a, "create", "guest1", "--uuid", U1, "-a", "5,6", "-d", "4")
    ok(a, "create", "guest2", "--uuid", U2, "-a", "5,6", "-d", "47", "--no-start")
    got = metrics(a)
    assert [value(got, "apmatrix_apqns", owner=o) for o in ("host", "free", "matrix")] == [0, 4, 4]
    assert [
        value(got, "apmatrix_matrices", state=s) for s in ("defined", "active", "degraded")
    ] == [
        1,
        1,
        0,
    ]
    assert value(got, "apmatrix_matrix_state", matrix="guest2", uuid=U2, state="defined") == 1
    assert value(got, "apmatrix_matrix_apqns", matrix="guest1", uuid=U1) == 2
    assert value(got, "apmatrix_matrix_guest_apqns", matrix="guest1", uuid=U1) == 2
    assert value(got, "apmatrix_matrix_lost_apqns", matrix="guest1", uuid=U1) == 0

    # A conflicting call: refused, counted by its error name, nothing else.
    r = ctl(a, "create", "guest3", "-a", "6", "-d", "47")
    assert r.rc == 1 and "Conflict" in r.err
    got = metrics(a)
    refused = {dict(k[1])["error"]: v for k, v in got.items() if k[0].startswith("apmatrix_ref")}
    assert refused[ERR + "Conflict"] == 1
    assert sum(refused.values()) == 1

    # An admin's echo the registry can take (a free domain): a drift of the sets, adopted.
    (mnt / "devices" / "vfio_ap" / "matrix" / U1 / "assign_domain").write_text("0xab\n")
    got = wait(
        a, lambda g: value(g, "apmatrix_drifts_total", kind="sets") == 1, "the adopted drift"
    )
    assert value(got, "apmatrix_drifts_not_adopted_total", kind="sets") == 0
    # One it cannot take (guest2, only defined, holds 47): counted as not adopted too.
    (mnt / "devices" / "vfio_ap" / "matrix" / U1 / "assign_domain").write_text("0x47\n")
    got = wait(
        a, lambda g: value(g, "apmatrix_drifts_total", kind="sets") == 2, "the refused drift"
    )
    assert value(got, "apmatrix_drifts_not_adopted_total", kind="sets") == 1
    assert value(got, "apmatrix_matrix_apqns", matrix="guest1", uuid=U1) == 6  # the kernel's

    # Card 05 deconfigured: guest1 turns degraded, its three 05 queues lost for that reason.
    (mnt / "devices" / "ap" / "card05" / "config").write_text("0\n")
    got = wait(a, lambda g: value(g, "apmatrix_matrices", state="degraded") == 1, "guest1 degraded")
    assert value(got, "apmatrix_lost_apqns", reason="deconfigured") == 3
    assert [k for k in got if k[0] == "apmatrix_lost_apqns"] == [
        ("apmatrix_lost_apqns", (("reason", "deconfigured"),))
    ]
    assert value(got, "apmatrix_matrix_lost_apqns", matrix="guest1", uuid=U1) == 3
    assert value(got, "apmatrix_matrix_guest_apqns", matrix="guest1", uuid=U1) == 3
    assert value(got, "apmatrix_matrix_state", matrix="guest1", uuid=U1, state="degraded") == 1
    shown = ok(a, "--json", "show", "guest1").json()
    assert len(shown["lost"]) == 3 and shown["state"] == "degraded"
    assert value(got, "apmatrix_matrix_lost_apqns", matrix="guest2", uuid=U2) == 0
    # the same drifts, no more; the refusal still counted once
    assert value(got, "apmatrix_drifts_total", kind="sets") == 2
    assert value(got, "apmatrix_refused_calls_total", error=ERR + "Conflict") == 1


def test_textfile_is_replaced_whole_and_says_when_the_daemon_is_gone(
    start: DaemonFactory, tmp_path: Path
) -> None:
    d = start()
    a = d.address
    ok(a, "reserve", "-a", "5", "-d", "4")
    ok(a, "create", "g", "-a", "5", "-d", "4")
    out = tmp_path / "apmatrix.prom"
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    out.symlink_to(victim)  # planted: replaced, never followed
    assert ok(a, "metrics", "--textfile", str(out)).out == ""
    assert not out.is_symlink() and victim.read_text() == "keep me\n"
    assert oct(out.stat().st_mode & 0o777) == "0o644"
    got = samples(out.read_text())
    assert value(got, "apmatrix_matrix_state", matrix="g", uuid=value_uuid(got), state="active")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["apmatrix.prom", "victim"]
    # node_exporter reads *.prom only: anything else is a usage error, nothing written
    r = ctl(a, "metrics", "--textfile", str(tmp_path / "apmatrix.txt"))
    assert r.rc == 2 and "*.prom" in r.err
    r = ctl(a, "--json", "metrics")
    assert r.rc == 2 and "--json does not apply" in r.err
    # the daemon stops: the file says so (apmatrix_up 0) instead of going stale
    d.terminate()
    r = ctl(a, "metrics", "--textfile", str(out))
    assert r.rc == 1 and "not running" in r.err, r
    assert samples(out.read_text()) == {("apmatrix_up", ()): 0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["apmatrix.prom", "victim"]


def value_uuid(got: Samples) -> str:
    (uuid,) = {dict(k[1])["uuid"] for k in got if k[0] == "apmatrix_matrix_state"}
    return uuid


# -- node_exporter and promtool --------------------------------------------------------------------
def prom_tool(name: str) -> str:
    """promtool or node_exporter: unpacked by tools/bootstrap, or installed."""
    here = PROM_TOOLS / name
    if here.exists():
        return str(here)
    found = shutil.which(name) or shutil.which(f"prometheus-{name.replace('_', '-')}")
    if found is None:
        unavailable(f"{name} not found (tools/bootstrap unpacks it into {PROM_TOOLS})")
    return found


def test_node_exporter_serves_the_textfile(start: DaemonFactory, tmp_path: Path) -> None:
    """Debian's node_exporter, its textfile collector only, on 127.0.0.1: it reads our file
    without an error and serves every series of it."""
    exe = prom_tool("node_exporter")
    d = start()
    ok(d.address, "reserve", "-a", "5,6", "-d", "4")
    ok(d.address, "create", "guest1", "-a", "5,6", "-d", "4")
    ok(d.address, "metrics", "--textfile", str(tmp_path / "apmatrix.prom"))
    ours = samples((tmp_path / "apmatrix.prom").read_text())
    port = free_port()
    proc = subprocess.Popen(
        [exe, f"--web.listen-address=127.0.0.1:{port}", "--collector.disable-defaults",
         "--collector.textfile", f"--collector.textfile.directory={tmp_path}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    text = r.read().decode()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "node_exporter did not come up"
                time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(10)
    served = samples(text)
    assert value(served, "node_textfile_scrape_error") == 0
    assert {k: v for k, v in served.items() if k[0].startswith("apmatrix")} == ours


def test_alert_rules_parse_and_name_only_our_metrics(daemon: Daemon) -> None:
    """The rules are YAML of Prometheus' shape, and every metric their expressions name is
    one apmatrixctl metrics writes (every family is there, even one with no sample yet)."""
    try:
        import yaml
    except ImportError:
        unavailable("PyYAML not installed (apt-get install python3-yaml)")
    ok(daemon.address, "reserve", "-a", "5", "-d", "4")
    ok(daemon.address, "create", "g", "-a", "5", "-d", "4")
    families = list(text_string_to_metric_families(ok(daemon.address, "metrics").out))
    exported = {f.name for f in families} | {s.name for f in families for s in f.samples}
    assert "apmatrix_lost_apqns" in exported  # a family without samples: named all the same
    doc = yaml.safe_load(RULES.read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} >= {"ApmatrixGuestLostCrypto", "ApmatrixRefusedCallsRising"}
    for r in rules:
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}, r
        named = set(re.findall(r"\bapmatrix_\w+", r["expr"]))
        assert named and named <= exported, (r["alert"], named - exported)


def test_promtool_checks_the_rules_and_fires_lost_crypto(
    start: DaemonFactory, mnt: Path, tmp_path: Path
) -> None:
    """promtool check rules accepts the file; promtool test rules, fed what a real daemon
    exported with a card deconfigured, fires ApmatrixGuestLostCrypto for that guest only."""
    promtool = prom_tool("promtool")
    done = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    d = start("--simulate", "--sim-mount", str(mnt))
    a = d.address
    ok(a, "reserve", "-a", "5,6", "-d", "4,47")
    ok(a, "create", "guest1", "--uuid", U1, "-a", "5,6", "-d", "4")
    ok(a, "create", "guest2", "--uuid", U2, "-a", "6", "-d", "47")
    (mnt / "devices" / "ap" / "card05" / "config").write_text("0\n")
    got = wait(a, lambda g: value(g, "apmatrix_matrices", state="degraded") == 1, "degraded")
    series = [
        {
            "series": name + "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}",
            "values": f"{v:g}x10",
        }
        for (name, labels), v in got.items()
    ]
    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {
                        "eval_time": "5m",
                        "alertname": "ApmatrixGuestLostCrypto",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "critical",
                                    "matrix": "guest1",
                                    "uuid": U1,
                                },
                                "exp_annotations": {
                                    "summary": "A guest lost crypto: matrix guest1 on ",
                                    "description": f"The guest of matrix guest1 ({U1}) lacks 1 "
                                    "of its assigned APQNs; `apmatrixctl show guest1` on the "
                                    "host says why for each.",
                                },
                            }
                        ],
                    },
                    {"eval_time": "5m", "alertname": "ApmatrixDown", "exp_alerts": []},
                ],
            }
        ],
    }
    (tmp_path / "test.yml").write_text(json.dumps(test))  # JSON is YAML
    done = subprocess.run(
        [promtool, "test", "rules", str(tmp_path / "test.yml")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


# -- the timer's unit ------------------------------------------------------------------------------
UNIT = REPO / "systemd" / "apmatrixd-metrics.service"


def unit_setting(text: str, key: str) -> str:
    (line,) = [ln for ln in text.splitlines() if ln.startswith(f"{key}=")]
    return line.split("=", 1)[1]


def test_the_metrics_unit_verifies_and_its_command_writes_the_file(
    daemon: Daemon, tmp_path: Path
) -> None:
    """systemd-analyze accepts the service and its timer (exposure at most 2, as the daemon's
    unit), and its ExecStart=, expanded as systemd does, writes the textfile."""
    need_tool("/usr/bin/systemd-analyze", "systemd")
    text = UNIT.read_text()
    exe = str(CTL)
    for name in ("apmatrixd-metrics.service", "apmatrixd-metrics.timer"):
        src = (REPO / "systemd" / name).read_text()
        (tmp_path / name).write_text(src.replace("/usr/bin/apmatrixctl", exe))
    r = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(tmp_path / n) for n in
         ("apmatrixd-metrics.service", "apmatrixd-metrics.timer"))],
        capture_output=True, text=True,
    )  # fmt: skip
    assert (r.returncode, r.stdout + r.stderr) == (0, "")
    r = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=20", "--no-pager",
         str(tmp_path / "apmatrixd-metrics.service")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout
    assert float(r.stdout.split("apmatrixd-metrics.service:")[1].split()[0]) <= 2.0
    env = unit_setting(text, "Environment")
    var, default = env.split("=", 1)
    assert default == "/var/lib/prometheus/node-exporter/apmatrix.prom"  # Debian's directory
    assert unit_setting(text, "ReadWritePaths") == "-" + os.path.dirname(default)
    out = tmp_path / "apmatrix.prom"
    argv = unit_setting(text, "ExecStart").replace(f"${{{var}}}", str(out)).split()
    assert argv[0] == "/usr/bin/apmatrixctl"
    done = subprocess.run(
        [exe, *argv[1:]],
        env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=daemon.address),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert value(samples(out.read_text()), "apmatrix_up") == 1
