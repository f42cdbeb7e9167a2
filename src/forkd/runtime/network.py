"""Sandbox networking: the policy each sandbox gets, what enforces it, its port forwards.

One ``SandboxNetworks`` per runtime. A sandbox with egress ``none`` costs nothing here: its QEMU
backend is restricted and its guest already holds the template's neutral configuration. Any
other egress gets a guard (cgroup + nftables, see :mod:`forkd.net.guard`) installed before its
guest runs, an allow-list proxy when it lists domains, and its guest configured (resolver,
proxy variables, optionally the host's CA bundle) before any user code.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import ssl
from pathlib import Path

from forkd import wire
from forkd.errors import Conflict, InvalidInput, NotFound, Unavailable
from forkd.net import guard as guard_mod
from forkd.net import ports as port_mod
from forkd.net.guard import Guard
from forkd.net.policy import Egress, EgressPolicy, policy_from_wire, resolve_policy
from forkd.net.proxy import AllowListProxy
from forkd.runtime.registry import NetworkRow, Registry
from forkd.snapshots.manifest import SnapshotManifest
from forkd.vmm.agent_client import AgentClient
from forkd.vmm.netdev import GuestNetwork
from forkd.vmm.qemu import QemuProcess, pid_alive

GUEST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
NO_PROXY_VARS = ("NO_PROXY", "no_proxy")
CA_VARS = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT", "CURL_CA_BUNDLE")
# what a template is saved with: names resolve nowhere, no proxy
NEUTRAL_GUEST: dict[str, object] = {
    "nameserver": "127.0.0.1",
    "env": dict.fromkeys((*PROXY_VARS, *NO_PROXY_VARS), None),
}
MAX_PORTS = 32


TEMPLATE_KEY_PREFIX = "tpl-"


def template_key() -> str:
    """The network key of a template's warm-up, naming the process that runs it."""
    return f"{TEMPLATE_KEY_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"


def template_key_owner(key: str) -> int | None:
    if not key.startswith(TEMPLATE_KEY_PREFIX):
        return None
    try:
        return int(key[len(TEMPLATE_KEY_PREFIX) :].split("-", 1)[0])
    except ValueError:
        return None


def host_ca_bundle() -> Path | None:
    """The host's CA bundle file (the one its own TLS clients trust)."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile, GUEST_CA_BUNDLE,
                      "/etc/pki/tls/certs/ca-bundle.crt"):  # fmt: skip
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


class SandboxNetworks:
    """Policies, guards, proxies and port forwards of one runtime's sandboxes."""

    def __init__(self, registry: Registry, *, default: Egress, long_lived: bool) -> None:
        self.registry = registry
        self.default: Egress = default
        self._long_lived = long_lived
        self._guard: Guard | None = None
        self._guard_probed = False
        self._proxies: dict[str, AllowListProxy] = {}

    # --- policy ----------------------------------------------------------------------------

    def policy_for(
        self,
        manifest: SnapshotManifest,
        network: wire.NetworkRequest | None,
        allow_internet_access: bool | None,
    ) -> EgressPolicy:
        """A child's policy: the request's, else its branch source's, else the default."""
        inherited = policy_from_wire(manifest.egress) if manifest.egress else None
        return self.check(manifest.tag, manifest.network, network, allow_internet_access,
                          inherited)  # fmt: skip

    def check(
        self,
        tag: str,
        nic: GuestNetwork | None,
        network: wire.NetworkRequest | None,
        allow_internet_access: bool | None,
        inherited: EgressPolicy | None = None,
    ) -> EgressPolicy:
        """Validate a requested policy for a machine (400, 409 or 503 with the reason)."""
        request = network.model_dump(exclude_none=True) if network is not None else None
        if request is not None and not request.get("allow"):
            request.pop("allow", None)
        policy = resolve_policy(
            request, allow_internet_access, inherited=inherited, default=self.default
        )
        if policy.restricted and not policy.host_ca:
            return policy
        if nic is None:
            if policy.restricted:
                raise Conflict(f"snapshot {tag!r} has no network card: host_ca needs one")
            raise Conflict(
                f"snapshot {tag!r} has no network card (made before guest networking "
                f"or from an image without it), so egress {policy.egress!r} cannot apply: "
                "rebuild the image ('forkd image build') and make a new template"
            )
        if not policy.restricted:
            self.require_guard()
        if policy.needs_proxy and not self._long_lived:
            raise Unavailable(
                "an allow-list of domain names needs the daemon (its proxy lives there): "
                "start 'forkd daemon' or list addresses instead"
            )
        return policy

    def require_guard(self) -> Guard:
        if not self._guard_probed:
            self._guard, self._guard_probed = Guard.available(), True
        if self._guard is None:
            raise Unavailable(
                "egress other than 'none' needs the egress guard, which this host lacks: "
                f"{guard_mod.probe()} ('forkd doctor' explains)"
            )
        return self._guard

    # --- lifecycle -------------------------------------------------------------------------

    async def prepare(
        self, sandbox_id: str, policy: EgressPolicy, nic: GuestNetwork | None
    ) -> None:
        """Record the policy; for open egress start the proxy and install the guard (before the
        sandbox's QEMU runs guest code)."""
        # Recorded first, so that a failure below (or a crash) leaves a record to clean up by.
        row = NetworkRow(sandbox_id, policy.to_wire(),
                         nic=nic.model_dump() if nic is not None else None)  # fmt: skip
        self.registry.put_network(row)
        try:
            if policy.needs_proxy:
                proxy = AllowListProxy(policy)
                self._proxies[sandbox_id] = proxy
                row.proxy_port = await proxy.start()
                self.registry.put_network(row)
            if not policy.restricted:
                await self.require_guard().install(sandbox_id, policy, proxy_port=row.proxy_port)
        except BaseException:
            await self.release(sandbox_id)
            raise

    def enter(self, sandbox_id: str, policy: EgressPolicy, pid: int) -> None:
        if not policy.restricted:
            self.require_guard().enter(sandbox_id, pid)

    def guest_config(
        self,
        sandbox_id: str,
        nic: GuestNetwork,
        policy: EgressPolicy,
        *,
        template_open: bool = False,
    ) -> dict[str, object] | None:
        """The guest's resolver and proxy variables for ``policy`` (sent in a fork's hello, or
        with ``set_net``). None when the guest needs nothing: templates are saved neutral,
        except branches of sandboxes with open egress (``template_open``)."""
        if policy.restricted and not policy.host_ca:
            return NEUTRAL_GUEST if template_open else None
        env: dict[str, str | None] = dict.fromkeys((*PROXY_VARS, *NO_PROXY_VARS), None)
        row = self.registry.get_network(sandbox_id)
        if row is not None and row.proxy_port:
            env.update(dict.fromkeys(PROXY_VARS, f"http://{nic.host_alias}:{row.proxy_port}"))
            env.update(dict.fromkeys(NO_PROXY_VARS, f"localhost,127.0.0.1,{nic.host_alias}"))
        if policy.host_ca:
            env.update(dict.fromkeys(CA_VARS, GUEST_CA_BUNDLE))
        nameserver = nic.dns if policy.egress == "internet" else "127.0.0.1"
        return {"nameserver": nameserver, "env": env}

    async def give_host_ca(self, agent: AgentClient, policy: EgressPolicy) -> None:
        """Copy the host's CA bundle over the guest's (``host_ca``)."""
        if not policy.host_ca:
            return
        bundle = host_ca_bundle()
        if bundle is None:
            raise Unavailable("network.host_ca: this host has no CA bundle file to give")
        await agent.write_file(GUEST_CA_BUNDLE, bundle.read_bytes())

    async def configure_guest(
        self, sandbox_id: str, agent: AgentClient, nic: GuestNetwork, policy: EgressPolicy
    ) -> None:
        """Configure a connected guest for ``policy`` (a template's warm-up)."""
        config = self.guest_config(sandbox_id, nic, policy)
        if config is not None:
            await agent.set_net(config)
        await self.give_host_ca(agent, policy)

    async def neutralize_guest(self, agent: AgentClient) -> None:
        """Undo :meth:`configure_guest` (a template's warm-up) before the state is saved."""
        await agent.set_net(NEUTRAL_GUEST)

    async def release(self, sandbox_id: str) -> None:
        """Remove everything the sandbox's network held (idempotent)."""
        proxy = self._proxies.pop(sandbox_id, None)
        if proxy is not None:
            await proxy.close()
        row = self.registry.get_network(sandbox_id)
        if row is not None and row.policy.get("egress") != "none":
            if not self._guard_probed:
                self._guard, self._guard_probed = Guard.available(), True
            if self._guard is not None:
                await self._guard.remove(sandbox_id)
        self.registry.delete_network(sandbox_id)

    async def readopt(self, sandbox_id: str) -> None:
        """A restarted daemon serves a running sandbox's allow-list proxy again, on the port its
        guard and guest already point at."""
        row = self.registry.get_network(sandbox_id)
        if row is None or not row.proxy_port or sandbox_id in self._proxies:
            return
        proxy = AllowListProxy(policy_from_wire(row.policy))
        try:
            await proxy.start(row.proxy_port)
        except OSError:
            return  # the port was taken meanwhile: its names stay unreachable, nothing opens
        self._proxies[sandbox_id] = proxy

    async def sweep(self, alive: set[str]) -> None:
        """Drop records, tables and cgroups of sandboxes that no longer run (and of template
        warm-ups whose process is gone; another process's warm-up in progress is kept)."""
        keep = set(alive)
        for key in self.registry.network_ids():
            owner = template_key_owner(key)
            if owner is not None and owner != os.getpid() and pid_alive(owner):
                keep.add(key)
        for key in self.registry.network_ids():
            if key not in keep:
                await self.release(key)
        g = Guard.available()
        if g is not None:
            names = {guard_mod.table_name(k) for k in keep}
            for table in g.tables():
                if table not in names:
                    g.remove_table(table)

    def policy_of(self, sandbox_id: str) -> EgressPolicy:
        row = self.registry.get_network(sandbox_id)
        return policy_from_wire(row.policy) if row else EgressPolicy()

    def info(self, sandbox_id: str) -> wire.SandboxNetwork | None:
        row = self.registry.get_network(sandbox_id)
        if row is None or row.nic is None:
            return None
        nic = GuestNetwork.model_validate(row.nic)
        policy = policy_from_wire(row.policy)
        return wire.SandboxNetwork(egress=policy.egress, allow=list(policy.allow),
                                   guest_ip=nic.guest_ip, host_alias=nic.host_alias)  # fmt: skip

    def nic_of(self, sandbox_id: str) -> GuestNetwork | None:
        row = self.registry.get_network(sandbox_id)
        return GuestNetwork.model_validate(row.nic) if row and row.nic else None

    # --- ports -----------------------------------------------------------------------------

    def ports(self, sandbox_id: str) -> list[wire.PortInfo]:
        row = self.registry.get_network(sandbox_id)
        return [wire.PortInfo(**p) for p in (row.ports if row else [])]

    async def expose(
        self, sandbox_id: str, qemu: QemuProcess, agent: AgentClient, port: int
    ) -> wire.PortInfo:
        """Forward guest TCP ``port`` to a fresh port on the host's 127.0.0.1."""
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise InvalidInput(f"port must be 1-65535, got {port!r}")
        nic = self.nic_of(sandbox_id)
        if nic is None:
            raise Conflict(f"sandbox {sandbox_id} has no network card: no port can reach it")
        row = self.registry.get_network(sandbox_id)
        assert row is not None  # nic_of found it
        for existing in row.ports:
            if existing["port"] == port:
                return wire.PortInfo(**existing)
        if len(row.ports) >= MAX_PORTS:
            raise Conflict(f"sandbox {sandbox_id} already forwards {MAX_PORTS} ports")
        tcp = (await agent.read_file("/proc/net/tcp")).decode(errors="replace")
        tcp6 = b""
        with contextlib.suppress(Exception):
            tcp6 = await agent.read_file("/proc/net/tcp6")
        if port_mod.loopback_only(tcp, tcp6.decode(errors="replace"), port):
            raise Conflict(
                f"the service on guest port {port} listens on the guest's 127.0.0.1 only, which "
                f"forwards cannot reach: bind it to 0.0.0.0 (or {nic.guest_ip}), e.g. "
                f"'python3 -m http.server {port} --bind 0.0.0.0'"
            )
        last = ""
        for _ in range(3):
            host_port = port_mod.free_loopback_port()
            said = await qemu.execute(
                "human-monitor-command", {"command-line": port_mod.hostfwd_add(host_port, port)}
            )
            if not str(said).strip():
                break
            last = str(said).strip()
        else:
            raise Unavailable(f"cannot forward guest port {port}: {last}")
        info = wire.PortInfo(port=port, host="127.0.0.1", host_port=host_port,
                             url=f"http://127.0.0.1:{host_port}")  # fmt: skip
        row.ports.append(info.model_dump())
        self.registry.put_network(row)
        return info

    async def unexpose(self, sandbox_id: str, qemu: QemuProcess, port: int) -> None:
        row = self.registry.get_network(sandbox_id)
        match = [p for p in (row.ports if row else []) if p["port"] == port]
        if row is None or not match:
            raise NotFound(f"sandbox {sandbox_id} does not forward guest port {port}")
        await qemu.execute(
            "human-monitor-command",
            {"command-line": port_mod.hostfwd_remove(int(match[0]["host_port"]))},
        )
        row.ports = [p for p in row.ports if p["port"] != port]
        self.registry.put_network(row)
