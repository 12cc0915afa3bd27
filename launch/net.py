"""Network helpers for starting ranks: addresses, interfaces, free ports."""
from __future__ import annotations

import socket

from testbed.core.errors import TestbedError


def route_address(host: str) -> str:
    """This machine's IPv4 address on the route to `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))  # a UDP connect sends nothing: it only asks the routing table
        except OSError as exc:
            raise TestbedError(f"no route to {host}: {exc.strerror or exc}") from None
        return s.getsockname()[0]

def route_interface(host: str) -> str:
    """The interface this machine reaches `host` through."""
    import psutil

    local = route_address(host)
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == local for a in addrs):
            return name
    raise TestbedError(f"no interface holds {local}, the address on the route to {host}")

def interface_address(ifname: str) -> str:
    import psutil

    for addr in psutil.net_if_addrs().get(ifname, []):
        if addr.family == socket.AF_INET:
            return addr.address
    raise TestbedError(f"dist.ifname: interface {ifname!r} has no IPv4 address on {socket.gethostname()}")

def free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]
