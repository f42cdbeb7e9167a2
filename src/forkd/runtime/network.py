"""Sandbox networking: the policy each sandbox gets, what enforces it, its port forwards.

One ``SandboxNetworks`` per runtime. A sandbox with egress ``none`` costs nothing here: its QEMU
backend is restricted and its guest already holds the template's neutral configuration. Any
other egress gets a guard (cgroup + nftables, see :mod:`forkd.net.guard`) installed before its
guest runs, an allow-list proxy when it lists domains, and its guest configured (resolver,
proxy variables, optionally the host's CA bundle) before any user code.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import ssl
import subprocess
from pathlib import Path

from forkd import wire
from forkd.errors import Conflict, InvalidInput, NotFound, QemuGone, Unavailable
from forkd.net import guard as guard_mod
from forkd.net import nsbridge, pasta
from forkd.net import ports as port_mod
from forkd.net.guard import Guard
from forkd.net.nsbridge import Forward
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


def _needs_routes(policy: EgressPolicy) -> bool:
    """Open routes out (not only loopback ports): ``internet``, CIDR entries."""
    return policy.egress == "internet" or bool(policy.cidrs)


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

    def __init__(
        self, registry: Registry, *, default: Egress, long_lived: bool, scope: str = "x"
    ) -> None:
        self.registry = registry
        self.scope = scope  # this home's name in host-wide guard tables
        self.default: Egress = default
        self._long_lived = long_lived
        self._guard: Guard | None = None
        self._guard_probed = False
        self._proxies: dict[str, AllowListProxy] = {}
        # sandboxes whose QEMU has a network namespace of its own (jailed): its descriptor,
        # the forwards into it (ingress, by guest port) and out of it (its loopback ports)
        self._netns: dict[str, int] = {}
        self._ingress: dict[str, dict[int, Forward]] = {}
        self._egress: dict[str, list[Forward]] = {}
        self._serving: set[asyncio.Future[None]] = set()
        self._pasta: dict[str, subprocess.Popen[bytes]] = {}  # its routes out (open egress)

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

    def host_netns(self, policy: EgressPolicy) -> bool:
        """Whether a machine with a NIC and this policy must share the host's network namespace.

        Every other one gets its own (when jailed), with only what is bridged into it: its port
        forwards and its policy's loopback ports (``host:PORT``, the proxy), and for open routes
        (``internet``, CIDRs) a guarded pasta. Without pasta open routes need the host's
        namespace; so do loopback ports in a one-shot process, which would take their bridges
        with it when it exits.
        """
        if _needs_routes(policy):
            return pasta.probe() is not None
        return bool(policy.host_ports) and not self._long_lived

    def require_guard(self) -> Guard:
        if not self._guard_probed:
            self._guard, self._guard_probed = Guard.available(self.scope), True
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
        """Put QEMU ``pid`` under its guard, and (in a namespace of its own) open its loopback
        ports inside: bound here, before its guest runs, served as soon as the loop runs."""
        if policy.restricted:
            return
        guard = self.require_guard()
        guard.enter(sandbox_id, pid)
        ports = self._loopback_ports(sandbox_id, policy)
        routes = _needs_routes(policy)
        ns = self._netns_of(sandbox_id, pid) if ports or routes else None
        if ns is None:
            return
        self._open_loopback(sandbox_id, ports, ns)
        if routes and sandbox_id not in self._pasta:
            try:
                self._pasta[sandbox_id] = pasta.start(ns, pid, guard.leaf(sandbox_id))
            except OSError as exc:
                raise Unavailable(f"egress {policy.egress!r}: {exc}") from exc
            row = self.registry.get_network(sandbox_id)
            proxy_port = row.proxy_port if row is not None else None
            guard.install_inside(ns, sandbox_id, policy, proxy_port=proxy_port)

    def _open_loopback(self, sandbox_id: str, ports: list[int], ns: int) -> None:
        forwards = self._egress.setdefault(sandbox_id, [])
        for port in ports:
            fwd = Forward(listen_ns=ns, target_ns=None, target_port=port)
            fwd.bind(port)  # the number the guest dials on the host alias
            forwards.append(fwd)
            self._serve_soon(fwd)

    def _loopback_ports(self, sandbox_id: str, policy: EgressPolicy) -> list[int]:
        row = self.registry.get_network(sandbox_id)
        proxy = [row.proxy_port] if row is not None and row.proxy_port else []
        return sorted({*policy.host_ports, *proxy})

    def _netns_of(self, sandbox_id: str, pid: int) -> int | None:
        """The descriptor of the sandbox's own network namespace; None when QEMU shares this
        process's (unjailed, or a policy that needs the host's)."""
        ns = self._netns.get(sandbox_id)
        if ns is None:
            try:
                if not nsbridge.own_netns(pid):
                    return None
                ns = nsbridge.open_netns(pid)
            except OSError as exc:  # gone (the caller answers 410 for that)
                raise QemuGone(f"cannot open the network namespace of QEMU {pid}: {exc}") from exc
            self._netns[sandbox_id] = ns
        return ns

    def _serve_soon(self, fwd: Forward) -> None:
        task = asyncio.ensure_future(fwd.serve())
        self._serving.add(task)
        task.add_done_callback(self._serving.discard)

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
        await self._close_bridges(sandbox_id)
        helper = self._pasta.pop(sandbox_id, None)
        if helper is not None:
            await asyncio.to_thread(pasta.stop, helper)
        row = self.registry.get_network(sandbox_id)
        if row is not None and row.policy.get("egress") != "none":
            if not self._guard_probed:
                self._guard, self._guard_probed = Guard.available(self.scope), True
            if self._guard is not None:
                # one another process started (a one-shot CLI's sandbox, a daemon restart)
                await asyncio.to_thread(pasta.kill_leftovers, self._guard.leaf(sandbox_id))
                await self._guard.remove(sandbox_id)
        self.registry.delete_network(sandbox_id)

    async def _close_bridges(self, sandbox_id: str) -> None:
        forwards = [*self._egress.pop(sandbox_id, []),
                    *self._ingress.pop(sandbox_id, {}).values()]  # fmt: skip
        for fwd in forwards:
            await fwd.close()
        ns = self._netns.pop(sandbox_id, None)
        if ns is not None:
            os.close(ns)

    async def readopt(self, sandbox_id: str) -> None:
        """A restarted daemon serves a running sandbox's allow-list proxy again, on the port its
        guard and guest already point at, and its bridges (port forwards, loopback ports) on the
        ports they had."""
        row = self.registry.get_network(sandbox_id)
        if row is None:
            return
        policy = policy_from_wire(row.policy)
        if row.proxy_port and sandbox_id not in self._proxies:
            proxy = AllowListProxy(policy)
            try:
                await proxy.start(row.proxy_port)
                self._proxies[sandbox_id] = proxy
            except OSError:
                pass  # the port was taken meanwhile: its names stay unreachable, nothing opens
        sandbox = self.registry.get_sandbox(sandbox_id)
        if sandbox is None or sandbox_id in self._netns:
            return
        with contextlib.suppress(QemuGone, OSError):
            ns = self._netns_of(sandbox_id, sandbox.pid)
            if ns is None:
                return
            self._open_loopback(sandbox_id, self._loopback_ports(sandbox_id, policy), ns)
            for p in row.ports:
                await self._bridge_in(sandbox_id, ns, int(p["port"]), int(p["host_port"]))

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
        g = Guard.available(self.scope)
        if g is not None:
            names = {guard_mod.table_name(self.scope, k) for k in keep}
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
        # A jailed QEMU's forward listens on its own namespace's loopback, at the same number
        # as the daemon's bridge to it on the host's.
        ns = self._netns_of(sandbox_id, qemu.pid)
        if ns is not None and not self._long_lived:
            raise Unavailable(
                "a port forward of a sandbox in its own network namespace is bridged by the "
                "daemon: start 'forkd daemon' to forward ports"
            )
        last = ""
        for _ in range(3):
            host_port = port_mod.free_loopback_port()
            said = await qemu.execute(
                "human-monitor-command", {"command-line": port_mod.hostfwd_add(host_port, port)}
            )
            if str(said).strip():
                last = str(said).strip()
                continue
            if ns is None:
                break
            try:
                await self._bridge_in(sandbox_id, ns, port, host_port)
                break
            except OSError as exc:  # taken on the host meanwhile: another number
                last = f"127.0.0.1:{host_port}: {exc}"
                await qemu.execute(
                    "human-monitor-command",
                    {"command-line": port_mod.hostfwd_remove(host_port)},
                )
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
        fwd = self._ingress.get(sandbox_id, {}).pop(port, None)
        if fwd is not None:
            await fwd.close()
        await qemu.execute(
            "human-monitor-command",
            {"command-line": port_mod.hostfwd_remove(int(match[0]["host_port"]))},
        )
        row.ports = [p for p in row.ports if p["port"] != port]
        self.registry.put_network(row)

    async def _bridge_in(self, sandbox_id: str, ns: int, port: int, host_port: int) -> None:
        """Host 127.0.0.1:``host_port`` -> the same port on the sandbox's own loopback, where
        its QEMU's forward to guest ``port`` listens."""
        fwd = Forward(listen_ns=None, target_ns=ns, target_port=host_port)
        await fwd.start(host_port)
        self._ingress.setdefault(sandbox_id, {})[port] = fwd
