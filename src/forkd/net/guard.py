"""The egress guard: kernel packet filtering of one QEMU process's own sockets.

With an unrestricted user-mode backend every guest connection becomes a socket that QEMU opens
on the host, so the host can filter them like any local program's: each guarded QEMU lives in
its own cgroup v2 leaf, and one nftables table per sandbox matches that cgroup (``socket
cgroupv2``, Linux 5.13+) on the output hook and lets through only what the policy allows.
Needs root, the ``nft`` program and a cgroup v2 hierarchy; :func:`probe` says what is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from forkd.errors import Unavailable
from forkd.net.policy import BLOCKED_V4, EgressPolicy

LEAF_PARENT = "forkd"
# nft resolves a ``socket cgroupv2`` path below this directory (its level counts from the
# cgroup v2 root, which on a hybrid host is ``unified`` below it)
NFT_CGROUP_BASE = Path("/sys/fs/cgroup")
TABLE_PREFIX = "forkd_"
NFT_TIMEOUT_S = 10.0


def cgroup2_root(mountinfo: Path = Path("/proc/self/mountinfo")) -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup`` or a hybrid's ``unified``)."""
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        pre, _, post = line.partition(" - ")
        if post.split(" ", 1)[0] == "cgroup2":
            return Path(pre.split()[4])
    return None


def nft_binary() -> str | None:
    return shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")


def probe() -> str | None:
    """None when the guard can work on this host, else what is missing and how to fix it."""
    if os.geteuid() != 0:
        return "the egress guard needs root (nftables rules and cgroups)"
    if nft_binary() is None:
        return "nft not found: install the nftables package (apt-get install nftables)"
    root = cgroup2_root()
    if root is None:
        return "no cgroup v2 hierarchy is mounted (needed to tell each QEMU's sockets apart)"
    if root != NFT_CGROUP_BASE and NFT_CGROUP_BASE not in root.parents:
        return f"cgroup v2 is mounted at {root}, outside {NFT_CGROUP_BASE} where nft looks"
    try:
        (root / LEAF_PARENT).mkdir(exist_ok=True)
    except OSError as exc:
        return f"cannot create {root / LEAF_PARENT}: {exc}"
    return None


def table_name(scope: str, sandbox_id: str) -> str:
    """``forkd_<scope>_<id>``: ``scope`` names the forkd home, so that one home's sweep never
    touches the tables of another home's sandboxes (nftables tables are host-wide)."""
    return f"{TABLE_PREFIX}{scope}_" + re.sub(r"[^A-Za-z0-9_]", "_", sandbox_id)


def host_nameservers(resolv: Path = Path("/etc/resolv.conf")) -> list[str]:
    """IPv4 resolvers the host uses: the user-mode DNS forwarder sends guest queries there."""
    out: list[str] = []
    with contextlib.suppress(OSError):
        for line in resolv.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    if ipaddress.ip_address(parts[1]).version == 4:
                        out.append(parts[1])
    return out


def host_addresses() -> list[str]:
    """The host's own IPv4 addresses (services bound to 0.0.0.0 answer on each)."""
    ip = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin:/bin")
    if ip is None:
        return []
    try:
        raw = subprocess.run([ip, "-j", "-4", "addr", "show"], capture_output=True, text=True,
                             timeout=NFT_TIMEOUT_S, check=True).stdout  # fmt: skip
        return [a["local"] for link in json.loads(raw) for a in link.get("addr_info", [])
                if "local" in a]  # fmt: skip
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError):
        return []


def ruleset(
    table: str,
    cgroup: str,
    level: int,
    policy: EgressPolicy,
    *,
    proxy_port: int | None,
    nameservers: list[str],
    host_addrs: list[str],
    inside: bool = False,
) -> str:
    """The nftables script of one sandbox's table (pure: unit-tested).

    ``inside``: for the sandbox's own network namespace, where every socket but the daemon's
    bridges is its QEMU's: all output is checked whatever its cgroup, except on ``lo``, where
    only those bridges and QEMU's own forwards listen."""
    allow: list[str] = ["ct state established,related accept"]
    loopback_ports = sorted({*policy.host_ports, *([proxy_port] if proxy_port else [])})
    if loopback_ports:
        ports = ", ".join(str(p) for p in loopback_ports)
        allow.append(f"ip daddr 127.0.0.1 tcp dport {{ {ports} }} accept")
    if policy.cidrs:
        nets = ", ".join(str(n) for n in policy.cidrs)
        allow.append(f"ip daddr {{ {nets} }} accept")
    if policy.egress == "internet":
        if nameservers:
            ns = ", ".join(nameservers)
            allow.append(f"ip daddr {{ {ns} }} meta l4proto {{ tcp, udp }} th dport 53 accept")
        blocked = ", ".join([*(str(n) for n in BLOCKED_V4), *host_addrs])
        allow.append(f"ip daddr {{ {blocked} }} goto refuse")
        allow.append("meta nfproto ipv4 accept")
    rules = "\n".join(f"    {r}" for r in allow)
    match = (
        'oif "lo" accept\n    jump egress'
        if inside
        else f'socket cgroupv2 level {level} "{cgroup}" jump egress'
    )
    return f"""table inet {table} {{
  chain output {{
    type filter hook output priority filter; policy accept;
    {match}
  }}
  chain egress {{
{rules}
    goto refuse
  }}
  chain refuse {{
    meta l4proto tcp reject with tcp reset
    reject
  }}
}}
"""


@dataclass(frozen=True)
class Guard:
    """Installs, and removes, one sandbox's cgroup leaf and nftables table (of one home:
    ``scope``)."""

    root: Path
    scope: str

    @classmethod
    def available(cls, scope: str) -> Guard | None:
        if probe() is not None:
            return None
        root = cgroup2_root()
        return None if root is None else cls(root, scope)

    def leaf(self, sandbox_id: str) -> Path:
        return self.root / LEAF_PARENT / sandbox_id

    async def install(
        self, sandbox_id: str, policy: EgressPolicy, *, proxy_port: int | None
    ) -> None:
        """Create the sandbox's cgroup and its rules; then :meth:`enter` moves QEMU in."""
        leaf = self.leaf(sandbox_id)
        leaf.mkdir(parents=True, exist_ok=True)
        script = ruleset(
            table_name(self.scope, sandbox_id), str(leaf.relative_to(NFT_CGROUP_BASE)), 2, policy,
            proxy_port=proxy_port, nameservers=host_nameservers(), host_addrs=host_addresses(),
        )  # fmt: skip
        await asyncio.to_thread(self._nft, ["-f", "-"], script)

    def install_inside(
        self, ns_fd: int, sandbox_id: str, policy: EgressPolicy, *, proxy_port: int | None
    ) -> None:
        """The same rules inside the sandbox's own network namespace, for every socket there
        (whatever cgroup QEMU is in). Behind pasta, what the host's table refuses would only
        time out (pasta does not pass a reset on); refused inside, the guest's connection fails
        at once. QEMU has no capability to change it, and it goes with the namespace."""
        script = ruleset(
            table_name(self.scope, sandbox_id), "", 0, policy, proxy_port=proxy_port,
            nameservers=host_nameservers(), host_addrs=host_addresses(), inside=True,
        )  # fmt: skip
        self._nft(["-f", "-"], script, netns_fd=ns_fd)

    def enter(self, sandbox_id: str, pid: int) -> None:
        """Move QEMU into the guarded cgroup (before the guest runs any code)."""
        (self.leaf(sandbox_id) / "cgroup.procs").write_text(str(pid))

    async def remove(self, sandbox_id: str) -> None:
        with contextlib.suppress(Unavailable):
            table = table_name(self.scope, sandbox_id)
            await asyncio.to_thread(self._nft, ["delete", "table", "inet", table])
        with contextlib.suppress(OSError):
            self.leaf(sandbox_id).rmdir()

    def tables(self) -> list[str]:
        """This home's installed tables (for sweeping leftovers)."""
        try:
            out = self._nft(["-j", "list", "tables"])
            items = json.loads(out).get("nftables", [])
        except (Unavailable, ValueError):
            return []
        names = [i["table"]["name"] for i in items if "table" in i]
        return [n for n in names if n.startswith(f"{TABLE_PREFIX}{self.scope}_")]

    def remove_table(self, table: str) -> None:
        with contextlib.suppress(Unavailable):
            self._nft(["delete", "table", "inet", table])

    def _nft(self, args: list[str], stdin: str | None = None, netns_fd: int | None = None) -> str:
        nft = nft_binary()
        if nft is None:
            raise Unavailable("nft not found: install the nftables package")
        cmd = [nft, *args]
        if netns_fd is not None:  # in that namespace (nsenter opens its own inherited copy)
            nsenter = shutil.which("nsenter") or "nsenter"
            cmd = [nsenter, f"--net=/proc/self/fd/{netns_fd}", "--", *cmd]
        try:
            proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True,
                                  timeout=NFT_TIMEOUT_S, check=False,
                                  pass_fds=() if netns_fd is None else (netns_fd,))  # fmt: skip
        except (OSError, subprocess.SubprocessError) as exc:
            raise Unavailable(f"nft {' '.join(args)}: {exc}") from exc
        if proc.returncode != 0:
            raise Unavailable(f"nft {' '.join(args)} failed: {proc.stderr.strip()[-300:]}")
        return proc.stdout
