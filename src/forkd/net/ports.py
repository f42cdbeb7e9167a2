"""Ingress: a guest TCP port forwarded to the host's loopback through the user-mode backend.

A forward is added to a running QEMU with the monitor's ``hostfwd_add`` (it lives in that
process and goes with it). Forwards deliver to the guest's NIC address, so a service bound only
to the guest's 127.0.0.1 is not reachable: :func:`loopback_only` tells the caller to say so.
"""

from __future__ import annotations

import socket

from forkd.vmm.netdev import NETDEV_ID

LISTEN = "0A"


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def hostfwd_add(host_port: int, guest_port: int) -> str:
    return f"hostfwd_add {NETDEV_ID} tcp:127.0.0.1:{host_port}-:{guest_port}"


def hostfwd_remove(host_port: int) -> str:
    return f"hostfwd_remove {NETDEV_ID} tcp:127.0.0.1:{host_port}"


def listeners(proc_net_tcp: str, port: int) -> list[str]:
    """IPv4 addresses listening on ``port`` according to a guest's ``/proc/net/tcp``."""
    out = []
    for line in proc_net_tcp.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[3] != LISTEN:
            continue
        addr_hex, _, port_hex = fields[1].partition(":")
        try:
            if int(port_hex, 16) != port:
                continue
            raw = int(addr_hex, 16).to_bytes(4, "little")
        except ValueError:
            continue
        out.append(socket.inet_ntoa(raw))
    return out


def loopback_only(proc_net_tcp: str, proc_net_tcp6: str, port: int) -> bool:
    """True when something listens on ``port`` but only on the guest's loopback."""
    v4 = listeners(proc_net_tcp, port)
    v6 = _listeners6(proc_net_tcp6, port)
    if not v4 and not v6:
        return False
    reachable = [a for a in v4 if not a.startswith("127.")] + [a for a in v6 if a != "loopback"]
    return not reachable


def _listeners6(proc_net_tcp6: str, port: int) -> list[str]:
    out = []
    for line in proc_net_tcp6.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[3] != LISTEN:
            continue
        addr_hex, _, port_hex = fields[1].partition(":")
        try:
            if int(port_hex, 16) != port:
                continue
        except ValueError:
            continue
        loop = addr_hex == "00000000000000000000000001000000"
        out.append("loopback" if loop else addr_hex)
    return out
