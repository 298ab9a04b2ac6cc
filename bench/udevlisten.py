"""A pyudev listener in the bench's network namespace: one line per uevent on stdout,
``<CLOCK_MONOTONIC seconds> <ACTION> <DEVPATH>``, flushed at once. The floor of hot plug:
what it costs the kernel (here the emulator) to deliver the uevents at all."""

from __future__ import annotations

import sys
import time

import pyudev


def main() -> int:
    monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="udev")
    monitor.set_receive_buffer_size(128 * 1024 * 1024)
    monitor.start()
    print("listening", flush=True)
    out = sys.stdout
    for device in iter(monitor.poll, None):
        out.write(f"{time.monotonic():.6f} {device.action} {device.device_path}\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
