"""Egress policies: what a sandbox's guest may reach, parsed and validated from the wire form.

``none``: nothing leaves (the QEMU backend is restricted). ``internet``: any public address,
never the host's own addresses, loopback, link-local (cloud metadata), private or reserved
ranges unless listed. ``allowlist``: only the listed entries: domain names (reached through a
per-sandbox HTTP(S) proxy that checks Host / CONNECT names), IPv4 CIDRs, and ``host:PORT`` for a
service on the host's loopback, which the guest reaches at the NIC's ``host_alias``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Literal

from forkd.errors import InvalidInput

Egress = Literal["none", "internet", "allowlist"]
EGRESS_MODES: tuple[Egress, ...] = ("none", "internet", "allowlist")
MAX_ALLOW_ENTRIES = 256

# Never reachable from a guest with egress ``internet`` unless listed.
BLOCKED_V4 = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
        "172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4",
        "240.0.0.0/4",
    )
)  # fmt: skip

_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_DOMAIN = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})+$")
_HOST_PORT = re.compile(r"^host:(\d{1,5})$")


@dataclass(frozen=True)
class EgressPolicy:
    """One sandbox's egress, validated."""

    egress: Egress = "none"
    domains: tuple[str, ...] = ()  # lower case; "*.example.com" also matches sub-domains
    cidrs: tuple[ipaddress.IPv4Network, ...] = ()
    host_ports: tuple[int, ...] = ()
    allow: tuple[str, ...] = field(default=())  # the entries as given (normalised), for display
    host_ca: bool = False  # the guest gets the host's CA bundle

    @property
    def restricted(self) -> bool:
        """Whether the QEMU backend runs with ``restrict=on`` (nothing but port forwards)."""
        return self.egress == "none"

    @property
    def needs_proxy(self) -> bool:
        return bool(self.domains)

    def domain_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        for d in self.domains:
            if d.startswith("*."):
                if host == d[2:] or host.endswith(d[1:]):
                    return True
            elif host == d:
                return True
        return False

    def to_wire(self) -> dict[str, object]:
        return {"egress": self.egress, "allow": list(self.allow), "host_ca": self.host_ca}


def parse_policy(egress: object, allow: object, host_ca: object = False) -> EgressPolicy:
    """Validate ``{"egress", "allow"}``; a bad entry is an error naming it."""
    if not isinstance(host_ca, bool):
        raise InvalidInput("network.host_ca must be true or false")
    if egress not in EGRESS_MODES:
        raise InvalidInput(
            f"network.egress must be one of {', '.join(EGRESS_MODES)}, got {egress!r}"
        )
    entries = [] if allow is None else allow
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise InvalidInput("network.allow must be a list of strings")
    if len(entries) > MAX_ALLOW_ENTRIES:
        raise InvalidInput(f"network.allow has {len(entries)} entries; at most {MAX_ALLOW_ENTRIES}")
    if egress == "none" and entries:
        raise InvalidInput("network.allow needs egress 'allowlist' or 'internet', not 'none'")
    if egress == "allowlist" and not entries:
        raise InvalidInput("network egress 'allowlist' needs at least one entry in network.allow")
    domains: list[str] = []
    cidrs: list[ipaddress.IPv4Network] = []
    ports: list[int] = []
    shown: list[str] = []
    for raw in entries:
        entry = raw.strip().lower()
        if m := _HOST_PORT.match(entry):
            port = int(m.group(1))
            if not 1 <= port <= 65535:
                raise InvalidInput(f"network.allow entry {raw!r}: port must be 1-65535")
            ports.append(port)
        elif _looks_like_address(entry):
            try:
                net = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise InvalidInput(
                    f"network.allow entry {raw!r} is not a valid IPv4 address or CIDR"
                ) from None
            if not isinstance(net, ipaddress.IPv4Network):
                raise InvalidInput(f"network.allow entry {raw!r}: guests have IPv4 only")
            cidrs.append(net)
            entry = str(net)
        elif _DOMAIN.match(entry) and len(entry) <= 253:
            if egress == "internet":
                raise InvalidInput(
                    f"network.allow entry {raw!r}: with egress 'internet' every public name is "
                    "reachable already; list only addresses, CIDRs or host:PORT to add"
                )
            domains.append(entry)
        else:
            raise InvalidInput(
                f"network.allow entry {raw!r} is not a domain (example.com, *.example.com), "
                "an IPv4 CIDR (203.0.113.0/24) or host:PORT"
            )
        if entry not in shown:
            shown.append(entry)
    return EgressPolicy(
        egress=egress,
        domains=tuple(dict.fromkeys(domains)),
        cidrs=tuple(dict.fromkeys(cidrs)),
        host_ports=tuple(dict.fromkeys(ports)),
        allow=tuple(shown),
        host_ca=host_ca,
    )


def _looks_like_address(entry: str) -> bool:
    return bool(re.fullmatch(r"[0-9./]+", entry)) or ":" in entry


def resolve_policy(
    network: dict[str, object] | None,
    allow_internet_access: bool | None,
    *,
    inherited: EgressPolicy | None,
    default: Egress,
) -> EgressPolicy:
    """The policy of a new sandbox: an explicit ``network``, else the E2B-style shorthand, else
    the policy its template was branched with, else the daemon's default."""
    if network is not None:
        if allow_internet_access is not None:
            want = "internet" if allow_internet_access else "none"
            if network.get("egress") not in (None, want):
                raise InvalidInput(
                    "network.egress and allow_internet_access disagree: give one of them"
                )
        unknown = set(network) - {"egress", "allow", "host_ca"}
        if unknown:
            raise InvalidInput(f"network has unknown field(s): {', '.join(sorted(unknown))}")
        egress = network.get("egress")
        if egress is None:
            egress = "internet" if allow_internet_access else default
        return parse_policy(egress, network.get("allow"), network.get("host_ca", False))
    if allow_internet_access is not None:
        return parse_policy("internet" if allow_internet_access else "none", None)
    if inherited is not None:
        return inherited
    return parse_policy(default, None)


def policy_from_wire(data: dict[str, object]) -> EgressPolicy:
    """A policy as stored (registry, manifest), re-validated."""
    return parse_policy(data.get("egress"), data.get("allow"), data.get("host_ca", False))
