"""The daemon on each kernel generation: what it detects from sysfs and how it writes."""

from __future__ import annotations

import pytest

from apmatrixd.kernel import Kernel, TreeSysfs
from apmatrixd.service import Service
from apmatrixd.sim.model import Host
from apmatrixd.sim.profile import PROFILES

G1 = "11111111-1111-4111-8111-111111111111"

GENERATIONS = {
    "5.15": "before 6.0",
    "6.0": "6.0+",
    "6.10": "6.10+",
    "6.12": "6.12+",
    "6.15": "6.12+",  # 6.15 adds only an eventfd: sysfs cannot tell it from 6.12
    "6.19": "6.19+",
}


class Counting(TreeSysfs):
    """Every path written, in order."""

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self.paths: list[str] = []

    def write(self, path: str, data: str) -> None:
        self.paths.append(path.rsplit("/", 1)[-1])
        super().write(path, data)


@pytest.mark.parametrize("kernel", sorted(PROFILES))
def test_generation_is_told_from_sysfs(kernel: str) -> None:
    host = Host.from_name(f"default@{kernel}")
    svc = Service(Kernel(TreeSysfs(host)))
    svc.load()
    svc.reserve([5, 6], [4, 0x47])
    svc.create_matrix(G1, adapters=[5], domains=[4])
    svc.kernel.detect_features()
    assert svc.kernel.features.generation == GENERATIONS[kernel]


@pytest.mark.parametrize(("kernel", "writes"), [("6.10", ["ap_config"]), ("6.19", ["ap_config"]),
    ("6.0", ["assign_adapter", "assign_domain", "assign_control_domain"])])  # fmt: skip
def test_update_of_a_live_matrix_is_one_ap_config_write(kernel: str, writes: list[str]) -> None:
    host = Host.from_name(f"default@{kernel}")
    io = Counting(host)
    svc = Service(Kernel(io))
    svc.load()
    svc.reserve([5, 6], [4, 0x47])
    svc.create_matrix(G1, adapters=[5], domains=[4])
    host.attach_guest(G1)
    io.paths.clear()
    svc.update(G1, [5, 6], [4, 0x47], [4, 0x47])
    assert io.paths == writes
    guest = host.guest(G1)
    assert guest is not None and guest.updates == len(writes)  # one hot plug per write
    assert len(svc.matrix(G1).guest_apqns) == 4
