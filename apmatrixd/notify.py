"""sd_notify: tell systemd we are ready, what we are doing, that we stop, that we live.

Our own ~40 lines rather than a dependency. We read async-sdnotify 0.1.0.post1 (PyPI, 139
lines): it handles abstract ``@`` sockets correctly, but

- it warns on every run outside systemd (NOTIFY_SOCKET unset is an error to it);
- sends go through an asyncio datagram transport whose errors land in the default
  protocol's ``error_received`` and vanish, so a lost READY=1 is silent;
- it ignores ``WATCHDOG_PID`` (a child or a re-exec would ping for the wrong pid);
- STOPPING=1 needs its private ``_notify``.

(sdnotify 0.3.2 swallows everything with a bare ``except``; python-systemd needs a C build.)
Here: unset socket = no-op; a path or ``@abstract`` socket gets one datagram per call;
errors are logged, never raised, because a daemon must not die for its supervisor's sake.
Nor hang for it: a send never blocks the event loop (``wait`` bounds it, for READY=1 and
STOPPING=1), so a supervisor that stops reading its socket (a full datagram queue) costs a
dropped STATUS=, never a daemon frozen in ``send`` (found by tests/reliability).
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


_dropping = False
"""The last send failed: log the next failure only once it worked again in between."""


def notify(*lines: str, wait: float = 0.0) -> bool:
    """Send ``lines`` (``READY=1``, ``STATUS=...``) as one datagram; False if not sent.

    Never blocks longer than ``wait`` seconds (0: not at all) when the receiver's queue is
    full; the datagram is then dropped.
    """
    global _dropping
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    elif addr[0] != "/":
        log.debug("NOTIFY_SOCKET %r: unsupported address family, ignored", addr)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            if wait > 0:
                sock.settimeout(wait)
            else:
                sock.setblocking(False)
            sock.connect(addr)
            sock.sendall("\n".join(lines).encode())
    except OSError as exc:
        if not _dropping:
            why = "the receiver is not reading" if isinstance(exc, BlockingIOError) else exc
            log.warning("sd_notify %s failed: %s", lines[0] if lines else "", why)
        _dropping = True
        return False
    _dropping = False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), None if not for us."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    try:
        if not usec or int(usec) <= 0 or (pid and int(pid) != os.getpid()):
            return None
        return int(usec) / 2_000_000
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r WATCHDOG_PID=%r", usec, pid)
        return None
