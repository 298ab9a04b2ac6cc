"""The emulated kernel: AP bus, zcrypt, vfio_ap and the mdev core joined into ``ApKernel``.

``state.py`` holds what the kernel keeps in memory (cards, queue bindings, masks, mdevs) and
emits its uevents; ``vfio.py`` and ``apbus.py`` hold every ``store()`` rule with its errno, in
the kernel's order of checks. Nothing here knows paths: ``tree.py`` renders the state as
sysfs and routes writes here. State is compact (sets and small dicts) so that a host of
256 adapters x 256 domains costs almost nothing until someone looks at it.

Choices where kernel-facts.md is silent or the real kernel is unknowable here:

- Upstream = 6.19+ semantics without ``driver_override``: ``EBUSY`` on apmask/aqmask uses the
  all-ones rule for the other dimension.
- The guest view is recomputed from scratch whenever it is read (the kernel maintains it
  incrementally, with the same result in every case the emulator can produce). A card with
  ``config=0`` counts as outside the host configuration (the QCI APM lists configured adapters
  only), so its adapter is not in any guest view.
- Queues that were manually unbound are left alone by the reprobe after a mask change (the
  real ``__ap_revise_reserved`` would dereference their NULL driver); ``drivers_probe``,
  ``bind`` or a hot-plug brings them back.
- Reprobes and scans walk devices card-major in ascending id order (the kernel walks its
  device list in registration order, which is the same on a host built by one scan).
- Plugging a usage domain adds queues on every card but does not change the control-domain
  mask (QCI ADM); scenarios set both explicitly.
- ``BINDINGS=complete`` fires at the end of a bus scan (``scan()``, a write to ``scans``,
  hot-plug, ``config`` writes) when every queue is bound and a probe happened since the last.

2017 RFC layout (``layout="rfc2017"``; the real RFC details are unknown, kernel-facts §6), the
rules chosen here: no apmask/aqmask; a freshly booted host has every queue on ``cex4queue``;
mdev files ``adapters``/``domains``/``control_domains`` replace matrix/guest_matrix/ap_config;
assign parses and range-checks exactly like upstream, then ``EADDRNOTAVAIL`` if any queue of
the new cross product exists and is bound to ``cex4queue`` (host-owned), then ``EADDRINUSE``
on overlap with another mdev; binding a queue to ``cex4queue`` while an mdev holds its APQN
is ``EBUSY``; a freshly plugged queue goes to ``cex4queue`` unless an mdev holds its APQN, in
which case it goes to ``vfio_ap_matrix``; the mdev driver is the era's ``vfio_mdev``.
"""

from __future__ import annotations

from apmatrixd.sim.apbus import ApBus
from apmatrixd.sim.state import (
    CEX4CARD,
    CEX4QUEUE,
    RFC2017,
    UPSTREAM,
    Card,
    Mdev,
    Names,
    oserror,
    parse_device_name,
    sorted_ids,
)
from apmatrixd.sim.vfio import VfioAp


class ApKernel(VfioAp, ApBus):
    """State and every store rule of one emulated LPAR; every public method holds ``lock``."""


__all__ = [
    "CEX4CARD",
    "CEX4QUEUE",
    "RFC2017",
    "UPSTREAM",
    "ApKernel",
    "Card",
    "Mdev",
    "Names",
    "oserror",
    "parse_device_name",
    "sorted_ids",
]
