"""Wire formats of the REST API (forkd v0.5 compatible, plus our extra fields).

One place for every request and response body; the daemon validates with these and serves them
in ``/openapi.json``, and the SDKs document against them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SnapshotStatus = Literal["writing", "ready", "failed"]
BranchModeName = Literal["full", "diff", "live"]


class ErrorBody(BaseModel):
    error: str


class SnapshotInfo(BaseModel):
    """A template children can fork from."""

    tag: str
    dir: str
    created_at_unix: int
    branched_from: str | None = None
    pause_ms: float | None = None
    diff_ms: float | None = None
    diff_physical_bytes: int | None = None
    diff_logical_bytes: int | None = None
    warning: str | None = None
    status: SnapshotStatus = "ready"
    bootable: bool = True
    # forkd extras
    mode: BranchModeName | None = None
    parent_tag: str | None = None
    image: str | None = None
    mem_mib: int | None = None
    cpus: int | None = None
    total_ms: float | None = None
    bytes_written: int | None = None
    # memory and device state this snapshot owns (a delta branch: only its pages)
    stored_bytes: int | None = None
    error: str | None = None


class SnapshotDetail(SnapshotInfo):
    """``GET /v1/snapshots/{tag}/info``: lineage and sizes."""

    chain_depth: int = 0
    ancestors: list[str] = Field(default_factory=list, description="lineage, root -> parent")
    dependents: list[str] = Field(default_factory=list)
    memory_logical_bytes: int | None = None
    memory_physical_bytes: int | None = Field(
        default=None, description="memory this snapshot owns (a delta branch: its pages)"
    )
    vmstate_bytes: int | None = None
    parent_content_hash: str | None = Field(
        default=None, description="sha256 of the memory file this snapshot's pages apply over"
    )
    # forkd extras
    memory_bytes: int | None = None
    devstate_bytes: int | None = None
    memory_path: str | None = None
    # "disk": a complete on-disk copy of the memory exists and tmpfs is a cache; "tmpfs": not yet
    memory_authoritative: str | None = None
    memory_disk_path: str | None = None
    delta_path: str | None = None
    root_tag: str | None = None


class NetworkRequest(BaseModel):
    """A sandbox's egress policy: ``none`` (default), ``internet`` or ``allowlist``."""

    model_config = ConfigDict(extra="forbid")

    egress: Literal["none", "internet", "allowlist"] | None = None
    allow: list[str] = Field(
        default_factory=list,
        description="domains (example.com, *.example.com), IPv4 CIDRs, host:PORT (host loopback)",
    )
    host_ca: bool = Field(
        default=False,
        description="give the guest the host's CA bundle (hosts behind a TLS-inspecting proxy)",
    )


class SandboxNetwork(BaseModel):
    egress: Literal["none", "internet", "allowlist"]
    allow: list[str] = Field(default_factory=list)
    guest_ip: str
    host_alias: str = Field(description="where the guest reaches allow-listed host:PORT services")


class PortRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    port: int = Field(ge=1, le=65535, description="TCP port inside the guest")


class PortInfo(BaseModel):
    port: int
    host: str
    host_port: int
    url: str


class SandboxInfo(BaseModel):
    """A running child VM."""

    id: str
    snapshot_tag: str
    netns: str | None = None
    guest_addr: str | None = None
    created_at_unix: int
    pid: int
    memory_limit_mib: int | None = None
    has_branched: bool = False
    last_branch_memory_path: str | None = None
    branch_count: int = 0
    # forkd extras
    state: Literal["running", "dead"] = "running"
    dead_reason: str | None = None
    run_dir: str | None = None  # QMP and agent sockets, qemu.log
    network: SandboxNetwork | None = None


class CreateSnapshotRequest(BaseModel):
    """forkd v0.5 form ``{tag, kernel, rootfs, ...}`` or ours ``{tag, image, mem_mib, warmup}``."""

    model_config = ConfigDict(extra="ignore")

    tag: str
    kernel: str | None = None
    rootfs: str | None = None
    rw: bool = False
    tap: str | None = None
    boot_wait_secs: int = 10
    image: str | None = None
    mem_mib: int | None = None
    cpus: int | None = Field(
        default=None, description="vCPUs (children have the same); default 2 on KVM, 1 on TCG"
    )
    warmup: str | None = None
    network: NetworkRequest | None = Field(default=None, description="egress of the warm-up")


class SpawnRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    snapshot_tag: str
    n: int = 1
    per_child_netns: bool = False
    memory_limit_mib: int | None = None
    prewarm: bool = False
    live_fork: bool = False
    hugepages: bool = False
    network: NetworkRequest | None = None
    allow_internet_access: bool | None = Field(
        default=None, description="E2B-style shorthand: true is egress internet, false none"
    )


class ExecRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    args: list[str]
    timeout_secs: float = 30
    env: dict[str, str] | None = None
    cwd: str | None = None
    stdin: str | None = None
    user: str | None = Field(
        default=None,
        description="run as this guest user (default root); an unknown one answers 400",
        max_length=64,
    )


class ExecResponse(BaseModel):
    stdout: str
    stderr: str
    exit_code: int
    timed_out: bool = False
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration_ms: float | None = None


class EvalRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    code: str


class EvalResponse(BaseModel):
    result: str | None
    error: str | None
    exit_code: int
    stdout: str = ""
    traceback: str | None = None


class BranchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    tag: str | None = None
    mode: BranchModeName | None = None
    diff: bool = False
    measure_diff: bool = False
    wait: bool = True
    parent_tag: str | None = None


class CompactRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    to: str


class FileEntry(BaseModel):
    name: str
    path: str
    type: Literal["file", "dir", "symlink", "other"]
    size: int
    mode: int
    mtime: float


class FileWriteResponse(BaseModel):
    path: str
    size: int


# --- workspaces (forkd v0.5 #116) ------------------------------------------------------------

WorkspaceStatus = Literal["running", "suspended", "stale"]


class CreateWorkspaceRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    snapshot_tag: str
    per_child_netns: bool = False
    memory_limit_mib: int | None = None


class SuspendWorkspaceRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    diff: bool = False


class WorkspaceInfo(BaseModel):
    """A named, durable sandbox: ``running`` (``live_sandbox_id`` set), ``suspended`` (its state
    is template ``current_state_tag``) or ``stale`` (its sandbox died while running; resume
    starts again from the latest suspend, or from the source if it was never suspended)."""

    id: str
    name: str
    source_snapshot_tag: str
    current_state_tag: str | None = None
    status: WorkspaceStatus
    live_sandbox_id: str | None = None
    created_at_unix: int
    last_active_unix: int
    last_branch_memory_path: str | None = None
    # forkd extras
    per_child_netns: bool = False
    memory_limit_mib: int | None = None
    warning: str | None = None


class ImportImageRequest(BaseModel):
    """``POST /v1/images``: what ``forkd image import SRC`` takes."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        description="registry/repo:tag, a skopeo transport (oci:DIR:REF, "
        "docker-archive:FILE, ...), or a file or directory on the daemon's host"
    )
    name: str | None = Field(default=None, description="image name (default: from source)")
    pip: list[str] = Field(default_factory=list, description="pip specs installed at build time")
    tls_verify: bool = True


class ImageInfo(BaseModel):
    """A guest image: built from Debian (``source`` null) or imported."""

    name: str
    digest: str
    source: str | None = None
    oci_config_digest: str | None = None
    python: str | None = None
    python_version: str | None = None
    exec_only: str | None = Field(default=None, description="eval's refusal: no usable Python")
    packages: list[str] = Field(default_factory=list)
    pip: list[str] = Field(default_factory=list)
    rootfs_bytes: int = 0
    created_at_unix: int = 0
