"""metrics: the host as Prometheus metrics, for node_exporter's textfile collector.

apmatrixd has no listening socket (a root daemon on the system bus should not grow one), so
its metrics reach Prometheus as a file: ``apmatrixctl metrics --textfile PATH`` (the shipped
``apmatrixd-metrics.timer`` runs it every 30 s) reads everything over D-Bus, as any client
does, and writes the text exposition format, built with ``prometheus_client``, atomically into
node_exporter's textfile directory. What only the daemon can know (drifts, refused calls, the
last rescan) comes from the Manager's ``Statistics``; the rest is what every client sees.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from apmatrixd.argdoc import DocumentedParser
from apmatrixd.atfile import replace_at
from apmatrixd.bus import names
from apmatrixd.ctl.client import Connection, CtlError, Snapshot
from apmatrixd.ctl.output import Output
from apmatrixd.ctl.picture import HostPicture

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

PREFIX = "apmatrix"
STATES = ("defined", "active", "degraded")
OWNERS = ("host", "free", "matrix")
REFUSALS = (
    *sorted(names.error_name(e) for e in names.ERRORS),
    names.FAILED,
    names.ACCESS_DENIED,
    names.INTERACTIVE_AUTH_REQUIRED,
)
"""Every error name a call can be refused with: listed at 0 from the start, so that rate() and
increase() see the first refusal of each."""


def register(cmds: DocumentedParser) -> None:
    p = cmds.command(
        "metrics",
        help="print the host's metrics in the Prometheus text format (node_exporter)",
        description="Print the host's metrics in the Prometheus text exposition format: "
        "matrices by state, APQNs by owner, lost APQNs by reason, drifts, refused calls, the "
        "last rescan, and one series per matrix. With --textfile, write them atomically to "
        "PATH (for node_exporter's textfile collector) instead; if apmatrixd cannot be "
        "reached, PATH then holds apmatrix_up 0 and the exit status is 1.",
    )
    p.add_argument(
        "--textfile",
        metavar="PATH",
        help="write to PATH (a *.prom file in node_exporter's --collector.textfile.directory, "
        "e.g. /var/lib/prometheus/node-exporter/apmatrix.prom) through a temporary renamed "
        "over it",
    )
    p.set_defaults(func=cmd_metrics)


def _families() -> tuple[Any, Any, Any]:
    try:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            InfoMetricFamily,
        )
    except ImportError:
        raise CtlError(
            "metrics needs the prometheus_client module (apt install python3-prometheus-client, "
            "dnf install python3-prometheus_client, or pip install prometheus-client)"
        ) from None
    return CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily


def collect(snap: Snapshot) -> list[Metric]:
    """Every metric of the host as ``snap`` (the Manager's Statistics included) shows it."""
    counter, gauge, info = _families()
    stats = snap.statistics
    p = PREFIX
    out: list[Metric] = []
    up = gauge(f"{p}_up", "1: apmatrixd answered (0: it could not be reached)")
    up.add_metric([], 1)
    host = snap.host
    about = info(f"{p}", "apmatrixd and the host it runs on")
    about.add_metric(
        [],
        {"version": host.version, "layout": host.layout, "kernel": host.kernel_generation},
    )
    out += [up, about]

    ms = snap.sorted_matrices()
    by_state = Counter(m.state for m in ms)
    out.append(_by(gauge, f"{p}_matrices", "Matrices by state", "state", by_state, STATES))
    in_use = gauge(f"{p}_matrices_in_use", "Matrices a running guest uses")
    in_use.add_metric([], sum(m.in_use for m in ms))
    out.append(in_use)
    out.append(
        _by(
            gauge,
            f"{p}_apqns",
            "APQNs on the host by owner: the host's drivers, free (reserved, no matrix), a matrix",
            "owner",
            _owners(snap),
            OWNERS,
        )
    )
    reasons = Counter(kind for m in ms for _a, _d, kind in m.lost_reasons)
    out.append(
        _by(
            gauge,
            f"{p}_lost_apqns",
            "Assigned APQNs live matrices' guests do not get, by reason (only reasons that occur)",
            "reason",
            reasons,
            (),
        )
    )

    # The daemon lists every drift kind, 0 included.
    drifts = stats.get("drifts", {})
    out.append(_by(counter, f"{p}_drifts", "Drift signals by kind", "kind", drifts, ()))
    out.append(
        _by(
            counter,
            f"{p}_drifts_not_adopted",
            "Drifts the registry could not adopt (they break a rule), by kind",
            "kind",
            stats.get("drifts_not_adopted", {}),
            (),
        )
    )
    out.append(
        _by(
            counter,
            f"{p}_refused_calls",
            "Calls apmatrixd answered with an error, by D-Bus error name",
            "error",
            stats.get("refused", {}),
            REFUSALS,
        )
    )
    last = gauge(
        f"{p}_last_rescan_timestamp_seconds",
        "When apmatrixd last re-read the host pool and every mdev (0: never)",
    )
    last.add_metric([], int(stats.get("last_rescan", 0)) / 1e6)
    out.append(last)
    out += _per_matrix(gauge, ms)
    return out


def _by(kind: Any, name: str, doc: str, label: str, counts: Any, every: Iterable[str]) -> Metric:
    """One family with a sample per label value: every one of ``every`` (0 if not counted)
    and whatever else ``counts`` has."""
    fam = kind(name, doc, labels=[label])
    values = {k: 0 for k in every} | {str(k): v for k, v in dict(counts).items()}
    for value, n in sorted(values.items()):
        fam.add_metric([value], n)
    made: Metric = fam
    return made


def _owners(snap: Snapshot) -> Counter[str]:
    """The host's queues by owner kind, as the host picture draws them."""
    pic = HostPicture(snap)
    out: Counter[str] = Counter()
    for a in snap.adapters.values():
        for d in a.domains:
            owner = pic.owner(a.id, d)
            out[owner if owner in ("host", "free") else "matrix"] += 1
    return out


def _per_matrix(gauge: Any, ms: Iterable[Any]) -> Iterator[Metric]:
    labels = ["matrix", "uuid"]
    state = gauge(f"{PREFIX}_matrix_state", "1 for each matrix's state", labels=[*labels, "state"])
    apqns = gauge(f"{PREFIX}_matrix_apqns", "APQNs assigned to each matrix", labels=labels)
    guest = gauge(f"{PREFIX}_matrix_guest_apqns", "APQNs each matrix's guest gets", labels=labels)
    lost = gauge(
        f"{PREFIX}_matrix_lost_apqns",
        "Assigned APQNs each live matrix's guest does not get",
        labels=labels,
    )
    in_use = gauge(f"{PREFIX}_matrix_in_use", "1: a running guest uses the matrix", labels=labels)
    for m in ms:
        key = [m.name or m.uuid, m.uuid]
        state.add_metric([*key, m.state], 1)
        apqns.add_metric(key, len(m.apqns))
        guest.add_metric(key, len(m.guest_apqns))
        lost.add_metric(key, len(m.lost))
        in_use.add_metric(key, int(m.in_use))
    yield from (state, apqns, guest, lost, in_use)


def render(families: Iterable[Metric]) -> bytes:
    """The text exposition format (version 0.0.4, what node_exporter's collector reads)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.registry import Collector

    class Fixed(Collector):
        def __init__(self, fams: list[Metric]) -> None:
            self.fams = fams

        def collect(self) -> Iterator[Metric]:
            return iter(self.fams)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed(list(families)))
    return generate_latest(registry)


def down() -> bytes:
    _counter, gauge, _info = _families()
    up = gauge(f"{PREFIX}_up", "1: apmatrixd answered (0: it could not be reached)")
    up.add_metric([], 0)
    return render([up])


def write_textfile(path: str, data: bytes) -> None:
    """``data`` as ``path``, atomically: node_exporter reads the old file or the new one."""
    parent, name = os.path.split(os.path.abspath(path))
    try:
        fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        raise CtlError(f"--textfile {path}: directory {parent}: {err.strerror}") from None
    try:
        replace_at(fd, name, data)
    except OSError as err:
        raise CtlError(f"--textfile {path}: {err.strerror}") from None
    finally:
        os.close(fd)


def check_textfile(path: str) -> None:
    name = os.path.basename(path)
    if not name.endswith(".prom") or name.startswith("."):
        raise CtlError(
            f"--textfile {path}: node_exporter's textfile collector reads only *.prom files "
            "(not dot files)",
            code=2,
        )


async def cmd_metrics(conn: Connection, args: argparse.Namespace, out: Output) -> int:
    if out.as_json:
        raise CtlError("metrics prints the Prometheus text format: --json does not apply", code=2)
    if args.textfile:
        check_textfile(args.textfile)
    _families()  # a missing module is said before anything is read
    try:
        snap = await conn.snapshot()
    except CtlError:
        if args.textfile:  # what node_exporter serves says the daemon is down, not stale
            write_textfile(args.textfile, down())
        raise
    data = render(collect(snap))
    if args.textfile:
        write_textfile(args.textfile, data)
    else:
        out.stream.write(data.decode())
        out.stream.flush()
    return 0
