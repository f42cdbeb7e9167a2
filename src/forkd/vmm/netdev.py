"""The guest NIC and its QEMU user-mode (slirp) backend.

Every template made with a NIC gets the same MAC, address, gateway and DNS, recorded in its
manifest, and every child reuses them: a child is a copy of its parent's RAM, so its kernel
already believes in that address. Each QEMU process runs its own slirp stack, so each child has
a private NAT with no L2 or connection state shared with its siblings.
"""

from __future__ import annotations

from pydantic import BaseModel

NETDEV_ID = "net0"


class GuestNetwork(BaseModel):
    """Addresses the guest's kernel holds (fixed at template boot, shared by all children)."""

    mac: str = "52:54:00:12:34:56"
    guest_ip: str = "10.0.2.15"
    prefix_len: int = 24
    gateway: str = "10.0.2.2"
    # slirp's built-in DNS forwarder; only reachable when the backend is not restricted
    dns: str = "10.0.2.3"
    # the address at which the guest reaches the host's loopback (slirp maps the gateway to it)
    host_alias: str = "10.0.2.2"

    def device_args(self) -> list[str]:
        """The machine part: the virtio NIC (must match between a template and its children)."""
        # romfile=: no option ROM (no PXE boot here, and one less file to map per child);
        # guest_announce=off: no gratuitous ARP bursts after each restore.
        return [
            "-device",
            f"virtio-net-pci,netdev={NETDEV_ID},mac={self.mac},romfile=,guest_announce=off,mq=off",
        ]

    def kernel_cmdline(self) -> str:
        """How the guest's init learns its static address (read from /proc/cmdline)."""
        return f"forkd.net={self.guest_ip}/{self.prefix_len},{self.gateway}"


def backend_args(*, restrict: bool) -> list[str]:
    """The instance part: this process's own slirp stack.

    ``restrict=on`` cuts the guest off from everything but port forwards (DNS included), so
    egress ``none`` needs nothing else to hold; ``restrict=off`` relies on the host guard.
    """
    flag = "on" if restrict else "off"
    return ["-netdev", f"user,id={NETDEV_ID},ipv6=off,hostname=forkd,restrict={flag}"]
