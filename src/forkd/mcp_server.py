"""MCP server exposing a forkd daemon as tools (``forkd mcp``, or ``forkd-mcp`` as forkd v0.5's
separate package called it).

Any MCP client (Claude Desktop, Claude Code, an agent framework) can then boot sandboxes, run
code in them, move files, and branch/fork running VMs. The server holds no sandbox state: every
tool call is one or a few REST calls to the daemon through :class:`AsyncController`.

Configuration: ``FORKD_URL`` (default ``http://127.0.0.1:8889``), ``FORKD_TOKEN`` and
``FORKD_HTTP_TIMEOUT`` (seconds per daemon request, default 60).
Transports: ``stdio`` (default, what MCP clients launch) and ``streamable-http``
(``http://HOST:PORT/mcp``). The HTTP transport has no authentication of its own while it holds
the daemon's token, so :func:`run` refuses a non-loopback host unless ``allow_remote=True``.

Daemon errors (404 unknown sandbox, 409 conflict, unreachable daemon...) come back as MCP tool
errors (``isError``) carrying the daemon's message, so the model can read and correct them.
"""

import base64
import ipaddress
import json
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Annotated, Any, Literal

import anyio
import httpx
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field

from forkd import __version__
from forkd.client.controller import (
    AsyncController,
    ControllerConnectionError,
    ControllerError,
    SnapshotFailedError,
)

__all__ = ["TOOL_NAMES", "create_server", "run"]

DEFAULT_HTTP_TIMEOUT_S = 60.0

TOOL_NAMES = (
    "list_snapshots",
    "create_snapshot",
    "snapshot_info",
    "wait_for_snapshot",
    "delete_snapshot",
    "spawn_sandboxes",
    "list_sandboxes",
    "get_sandbox",
    "expose_port",
    "kill_sandbox",
    "exec_command",
    "eval_code",
    "ping_sandbox",
    "branch_sandbox",
    "read_file",
    "write_file",
    "list_files",
    "wait_for_text",
    "create_workspace",
    "list_workspaces",
    "get_workspace",
    "suspend_workspace",
    "resume_workspace",
    "delete_workspace",
)

INSTRUCTIONS = """\
forkd runs Linux microVM sandboxes that are forked copy-on-write from warm snapshots
("templates"), so a new sandbox starts in milliseconds with its runtime already loaded.

Typical flow:
1. list_snapshots to see the templates (a snapshot is usable when status is "ready").
2. spawn_sandboxes(snapshot_tag=...) to start sandboxes; keep the returned "id".
3. exec_command / eval_code / read_file / write_file / list_files to work inside a sandbox.
4. branch_sandbox(sandbox_id) to save a running sandbox's exact state (memory, processes,
   files) as a new snapshot, then spawn_sandboxes from that tag to fan out copies, e.g. to try
   several approaches from the same point.
5. kill_sandbox when done: sandboxes keep running (and using memory) until killed.
6. For work that must outlive a session, create_workspace(name, snapshot_tag): suspend_workspace
   saves it and stops the VM, resume_workspace brings it back (with a new live_sandbox_id).
"""

SandboxId = Annotated[
    str, Field(description="Id of a running sandbox, as returned by spawn_sandboxes.")
]
SnapshotTag = Annotated[
    str,
    Field(description="Snapshot tag: 1-64 characters from A-Z a-z 0-9 _ -."),
]
WorkspaceName = Annotated[
    str, Field(description="Workspace name: 1-48 characters from A-Z a-z 0-9 _ -.")
]
GuestPath = Annotated[str, Field(description="Absolute path inside the sandbox, e.g. /tmp/x.txt.")]

_READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)
_ADDITIVE = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)
_DESTRUCTIVE = ToolAnnotations(read_only_hint=False, destructive_hint=True, open_world_hint=False)
_RUNS_CODE = ToolAnnotations(read_only_hint=False, destructive_hint=True, open_world_hint=True)


@contextmanager
def _daemon_errors() -> Iterator[None]:
    """Turn everything a daemon call can raise on purpose into a tool error with its message."""
    try:
        yield
    except (SnapshotFailedError, ControllerConnectionError) as exc:
        raise ToolError(str(exc)) from exc
    except ControllerError as exc:
        raise ToolError(f"forkd daemon answered HTTP {exc.status}: {exc.error}") from exc
    except httpx.HTTPError as exc:
        raise ToolError(f"request to the forkd daemon failed: {exc}") from exc
    except (TimeoutError, ValueError, TypeError) as exc:
        raise ToolError(str(exc) or type(exc).__name__) from exc


def _list_result(items: list[dict[str, Any]]) -> CallToolResult:
    """A list as one JSON text block (readable even when empty) plus structured content."""
    return CallToolResult(
        content=[TextContent(type="text", text=json.dumps(items, indent=2))],
        structured_content={"result": items},
    )


def _utf8(chunk: bytes, truncated: bool) -> str | None:
    """``chunk`` as text, or None when it is not UTF-8 (a character cut by truncation is fine)."""
    try:
        return chunk.decode()
    except UnicodeDecodeError as exc:
        if truncated and exc.start >= len(chunk) - 3:
            try:
                return chunk[: exc.start].decode()
            except UnicodeDecodeError:
                return None
        return None


def create_server(
    controller: AsyncController | None = None,
    *,
    base_url: str | None = None,
    token: str | None = None,
) -> MCPServer:
    """Build the forkd MCP server.

    It talks to the daemon through ``controller``, or a new :class:`AsyncController` on
    ``base_url``/``token`` (default ``$FORKD_URL``/``$FORKD_TOKEN``).
    """
    ctl = controller if controller is not None else AsyncController(base_url, token, http_timeout())
    server: MCPServer = MCPServer(
        name="forkd",
        title="forkd microVM sandboxes",
        instructions=INSTRUCTIONS,
        version=__version__,
    )

    # --- snapshots -------------------------------------------------------------------------

    @server.tool(annotations=_READ_ONLY)
    async def list_snapshots() -> CallToolResult:
        """List the snapshots (templates) sandboxes can be spawned from.

        Returns a list of objects with "tag" (use it as snapshot_tag), "status"
        ("ready" = usable, "writing" = still being saved, "failed"), "bootable",
        "branched_from" (the sandbox it was branched from, if any) and sizes/timings.
        """
        with _daemon_errors():
            return _list_result(await ctl.list_snapshots())

    @server.tool(annotations=_ADDITIVE)
    async def create_snapshot(
        tag: SnapshotTag,
        image: Annotated[
            str | None,
            Field(description="Guest image name known to the daemon (e.g. 'python')."),
        ] = None,
        mem_mib: Annotated[int | None, Field(description="Guest memory in MiB.", ge=64)] = None,
        warmup: Annotated[
            str | None,
            Field(
                description="Python code run in the guest agent before the snapshot is taken, "
                "e.g. 'import numpy, pandas' so every sandbox starts with them loaded."
            ),
        ] = None,
        kernel: Annotated[
            str | None, Field(description="Host path of a kernel (instead of image).")
        ] = None,
        rootfs: Annotated[
            str | None, Field(description="Host path of a root filesystem (with kernel).")
        ] = None,
        rw: Annotated[
            bool | None, Field(description="forkd v0.5 form; templates here boot read-only.")
        ] = None,
        tap: Annotated[
            str | None, Field(description="forkd v0.5 form; ignored (the answer says so).")
        ] = None,
        boot_wait_secs: Annotated[
            int | None,
            Field(
                description="forkd v0.5 form; ignored: the template is saved once its agent "
                "answers and warmup has run (the answer's warning says so).",
                ge=0,
            ),
        ] = None,
        wait: Annotated[
            bool, Field(description="Wait until the snapshot is ready before returning.")
        ] = True,
    ) -> dict[str, Any]:
        """Create a new template snapshot by booting a fresh VM, warming it up and saving it.

        Give an image name (preferred) or a kernel + rootfs pair. This is slow (seconds to
        minutes); to copy the state of an already running sandbox use branch_sandbox instead.
        Returns the snapshot info; spawn sandboxes from its "tag" once status is "ready".
        """
        with _daemon_errors():
            info = await ctl.create_snapshot(
                tag, image=image, mem_mib=mem_mib, warmup=warmup, kernel=kernel, rootfs=rootfs,
                rw=rw, tap=tap, boot_wait_secs=boot_wait_secs,
            )  # fmt: skip
            if wait and info.get("status", "ready") == "writing":
                info = await ctl.wait_for_snapshot(tag, timeout=900)
            return info

    @server.tool(annotations=_READ_ONLY)
    async def snapshot_info(tag: SnapshotTag) -> dict[str, Any]:
        """Details of one snapshot: status, error (when failed), lineage and sizes.

        Lineage: "ancestors" (snapshots it builds on), "dependents" (snapshots built on it),
        "chain_depth".
        """
        with _daemon_errors():
            return await ctl.snapshot_info(tag)

    @server.tool(annotations=_READ_ONLY)
    async def wait_for_snapshot(
        tag: SnapshotTag,
        timeout_secs: Annotated[
            float, Field(description="Maximum seconds to wait.", gt=0, le=3600)
        ] = 300,
    ) -> dict[str, Any]:
        """Wait until a snapshot being written (status "writing") becomes "ready".

        Use after branch_sandbox(mode="live", wait=false) or a create_snapshot that returned
        status "writing". Returns the snapshot info once ready. Fails with the daemon's error
        message if the snapshot failed, or after timeout_secs if it is still writing (you may
        call it again to keep waiting).
        """
        with _daemon_errors():
            return await ctl.wait_for_snapshot(tag, timeout=timeout_secs)

    @server.tool(annotations=_DESTRUCTIVE)
    async def delete_snapshot(
        tag: SnapshotTag,
        cascade: Annotated[
            bool, Field(description="Also delete every snapshot branched from this one.")
        ] = False,
        force: Annotated[
            bool, Field(description="Delete even though other snapshots depend on it.")
        ] = False,
    ) -> dict[str, Any]:
        """Delete a snapshot and its files. Running sandboxes are not affected.

        Without cascade/force the daemon refuses (and lists them) when other snapshots were
        branched from it. Do not set both cascade and force.
        """
        with _daemon_errors():
            await ctl.delete_snapshot(tag, cascade=cascade, force=force)
            return {"tag": tag, "deleted": True}

    # --- sandboxes -------------------------------------------------------------------------

    @server.tool(annotations=_ADDITIVE)
    async def spawn_sandboxes(
        snapshot_tag: Annotated[
            str, Field(description="Tag of a ready snapshot to fork from (see list_snapshots).")
        ],
        n: Annotated[int, Field(description="How many sandboxes to start.", ge=1, le=1000)] = 1,
        live_fork: Annotated[
            bool,
            Field(
                description="Accepted for compatibility with older forkd; no effect here: "
                "every sandbox can be branched with mode='live'."
            ),
        ] = False,
        memory_limit_mib: Annotated[
            int | None,
            Field(
                description="Memory cap per sandbox in MiB, enforced by a cgroup where the "
                "host offers a writable one; elsewhere accepted and not enforced (each "
                "answer's 'warning' says so).",
                ge=1,
            ),
        ] = None,
        prewarm: Annotated[
            bool,
            Field(description="Accepted for compatibility with older forkd; no effect here."),
        ] = False,
        per_child_netns: Annotated[
            bool,
            Field(
                description="Accepted for compatibility with older forkd; no effect here: a "
                "sandbox never shares a network stack with its siblings."
            ),
        ] = False,
        egress: Annotated[
            Literal["none", "internet", "allowlist"] | None,
            Field(
                description="What the sandboxes may reach: none (default), internet (public "
                "addresses), or allowlist (only the 'allow' entries)."
            ),
        ] = None,
        allow: Annotated[
            list[str] | None,
            Field(
                description="For egress allowlist: domains (example.com, *.example.com), IPv4 "
                "CIDRs, or host:PORT for a service on the host's loopback (reached at 10.0.2.2)."
            ),
        ] = None,
    ) -> CallToolResult:
        """Start n new sandboxes, each an exact copy-on-write fork of a snapshot.

        Each starts in milliseconds with the snapshot's memory (loaded libraries, running
        processes) and files. Returns one object per sandbox; its "id" is the sandbox_id for
        every other tool. Sandboxes run until kill_sandbox.
        """
        with _daemon_errors():
            return _list_result(
                await ctl.spawn_sandboxes(
                    snapshot_tag,
                    n=n,
                    per_child_netns=per_child_netns,
                    memory_limit_mib=memory_limit_mib,
                    prewarm=prewarm,
                    live_fork=live_fork,
                    network=_network(egress, allow),
                )
            )

    @server.tool(annotations=_READ_ONLY)
    async def list_sandboxes() -> CallToolResult:
        """List the sandboxes the daemon runs: id, snapshot_tag, state, pid, branch_count..."""
        with _daemon_errors():
            return _list_result(await ctl.list_sandboxes())

    @server.tool(annotations=_READ_ONLY)
    async def get_sandbox(sandbox_id: SandboxId) -> dict[str, Any]:
        """Details of one sandbox: snapshot_tag, state ("running"/"dead"), pid, branches."""
        with _daemon_errors():
            return await ctl.get_sandbox(sandbox_id)

    @server.tool(annotations=_ADDITIVE)
    async def expose_port(
        sandbox_id: SandboxId,
        port: Annotated[
            int, Field(description="TCP port a server in the sandbox listens on.", ge=1, le=65535)
        ],
    ) -> dict[str, Any]:
        """Make a server inside the sandbox reachable from this host: returns its "url" on the
        host's 127.0.0.1. The server must listen on 0.0.0.0 in the sandbox."""
        with _daemon_errors():
            return await ctl.expose_port(sandbox_id, port)

    @server.tool(annotations=_DESTRUCTIVE)
    async def kill_sandbox(sandbox_id: SandboxId) -> dict[str, Any]:
        """Stop a sandbox and discard its state (snapshots branched from it are kept)."""
        with _daemon_errors():
            await ctl.kill_sandbox(sandbox_id)
            return {"id": sandbox_id, "killed": True}

    @server.tool(annotations=_RUNS_CODE)
    async def exec_command(
        sandbox_id: SandboxId,
        args: Annotated[
            list[str] | str,
            Field(
                description='Command as an argv list, e.g. ["python3", "-c", "print(1)"]; '
                "a single string is run by /bin/sh -c (pipes, &&, redirections work)."
            ),
        ],
        timeout_secs: Annotated[
            float, Field(description="Kill the command after this many seconds.", gt=0)
        ] = 30,
        env: Annotated[
            dict[str, str] | None, Field(description="Extra environment variables.")
        ] = None,
        cwd: Annotated[str | None, Field(description="Working directory in the sandbox.")] = None,
        stdin: Annotated[str | None, Field(description="Text fed to the command's stdin.")] = None,
    ) -> dict[str, Any]:
        """Run a command inside a sandbox and wait for it to finish.

        Returns stdout, stderr, exit_code (non-zero is reported, not an error), timed_out,
        stdout_truncated/stderr_truncated and duration_ms. For a Python snippet in an already
        warm interpreter, eval_code is faster.
        """
        argv = ["/bin/sh", "-c", args] if isinstance(args, str) else args
        with _daemon_errors():
            return await ctl.exec_command(
                sandbox_id, argv, timeout_secs, env=env, cwd=cwd, stdin=stdin
            )

    @server.tool(annotations=_RUNS_CODE)
    async def eval_code(
        sandbox_id: SandboxId,
        code: Annotated[
            str,
            Field(
                description="Python source. The value of a final expression is returned "
                "as its repr in 'result'; print() output is in 'stdout'."
            ),
        ],
    ) -> dict[str, Any]:
        """Run Python inside the sandbox's already-running, warmed-up agent interpreter.

        Much faster than exec_command("python3 ...") because modules imported when the
        snapshot was made are already loaded. Returns result, error (exception text or null),
        exit_code, stdout and traceback; a Python exception is reported, not raised.
        """
        with _daemon_errors():
            return await ctl.eval_code(sandbox_id, code)

    @server.tool(annotations=_READ_ONLY)
    async def ping_sandbox(sandbox_id: SandboxId) -> dict[str, Any]:
        """Check that a sandbox's guest agent answers; returns its health information."""
        with _daemon_errors():
            return await ctl.ping_sandbox(sandbox_id)

    @server.tool(annotations=_ADDITIVE)
    async def branch_sandbox(
        sandbox_id: SandboxId,
        tag: Annotated[
            str | None,
            Field(description="Name for the new snapshot; generated when omitted."),
        ] = None,
        mode: Annotated[
            Literal["full", "diff", "live"] | None,
            Field(
                description="'full' writes all memory; 'diff' writes only pages changed "
                "since the sandbox's snapshot (shorter pause); 'live' copies memory while the "
                "sandbox keeps running (any sandbox can). Omit for the daemon's default."
            ),
        ] = None,
        wait: Annotated[
            bool,
            Field(
                description="Only with mode='live': false returns as soon as the sandbox "
                "resumes, with status 'writing'; then call wait_for_snapshot."
            ),
        ] = True,
        diff: Annotated[
            bool, Field(description="Legacy spelling of mode='diff'; ignored when mode is set.")
        ] = False,
        measure_diff: Annotated[
            bool, Field(description="Benchmarking only: also report what a diff would cost.")
        ] = False,
    ) -> dict[str, Any]:
        """Save a running sandbox's complete state as a new snapshot (the sandbox keeps running).

        The sandbox is paused briefly, its memory and device state are saved, and it resumes.
        Spawn sandboxes from the returned "tag" to get copies that continue from exactly this
        point: same files, same processes, same variables in memory. Returns the snapshot
        info (tag, status, pause_ms...).
        """
        with _daemon_errors():
            return await ctl.branch_sandbox(
                sandbox_id, tag=tag, diff=diff, measure_diff=measure_diff, mode=mode, wait=wait
            )

    # --- files -----------------------------------------------------------------------------

    @server.tool(annotations=_READ_ONLY)
    async def read_file(
        sandbox_id: SandboxId,
        path: GuestPath,
        encoding: Annotated[
            Literal["text", "base64"],
            Field(description="'text' decodes UTF-8; 'base64' for binary files."),
        ] = "text",
        max_bytes: Annotated[
            int, Field(description="Return at most this many bytes (from the start).", ge=1)
        ] = 200_000,
    ) -> dict[str, Any]:
        """Read a file from a sandbox.

        Returns path, size (bytes in the file), content, encoding and truncated. A file that is
        not valid UTF-8 comes back base64-encoded even when text was asked for. For part of a
        large file (e.g. its end), use exec_command with tail/head.
        """
        with _daemon_errors():
            data = await ctl.read_file(sandbox_id, path)
        chunk = data[:max_bytes]
        truncated = len(chunk) < len(data)
        text = _utf8(chunk, truncated) if encoding == "text" else None
        used = "text" if text is not None else "base64"
        content = text if text is not None else base64.b64encode(chunk).decode()
        return {
            "path": path,
            "size": len(data),
            "encoding": used,
            "content": content,
            "truncated": truncated,
        }

    @server.tool(annotations=_DESTRUCTIVE)
    async def write_file(
        sandbox_id: SandboxId,
        path: GuestPath,
        content: Annotated[str, Field(description="The file's new content.")],
        encoding: Annotated[
            Literal["text", "base64"],
            Field(description="'text' writes content as UTF-8; 'base64' decodes it first."),
        ] = "text",
    ) -> dict[str, Any]:
        """Create or overwrite a file in a sandbox. Returns path and size written."""
        if encoding == "base64":
            try:
                data = base64.b64decode(content, validate=True)
            except ValueError as exc:
                raise ToolError(f"content is not valid base64: {exc}") from exc
        else:
            data = content.encode()
        with _daemon_errors():
            return await ctl.write_file(sandbox_id, path, data)

    @server.tool(annotations=_READ_ONLY)
    async def list_files(
        sandbox_id: SandboxId,
        path: Annotated[str, Field(description="Absolute directory path in the sandbox.")] = "/",
    ) -> CallToolResult:
        """List a directory in a sandbox: name, path, type (file/dir/symlink), size, mode."""
        with _daemon_errors():
            return _list_result(await ctl.list_files(sandbox_id, path))

    @server.tool(annotations=_READ_ONLY)
    async def wait_for_text(
        sandbox_id: SandboxId,
        path: GuestPath,
        marker: Annotated[str, Field(description="Text to wait for.", min_length=1)],
        timeout_secs: Annotated[
            float, Field(description="Give up after this many seconds.", gt=0, le=3600)
        ] = 60,
        poll_interval_ms: Annotated[
            int, Field(description="How often to re-read the file.", ge=10)
        ] = 200,
    ) -> dict[str, Any]:
        """Wait until a file in a sandbox contains a marker text (e.g. a log line "READY").

        Useful to wait for a background process before acting, e.g. before branch_sandbox.
        A missing file counts as not containing the marker yet. Returns found (false on
        timeout, which is not an error), elapsed_ms and last_excerpt (the file's last 256
        characters, to see what was written).
        """
        started = time.monotonic()
        deadline = started + timeout_secs
        excerpt = ""
        with _daemon_errors():
            while True:
                try:
                    text = (await ctl.read_file(sandbox_id, path)).decode(errors="replace")
                except ControllerError as exc:
                    if exc.status != 404:
                        raise
                    await ctl.get_sandbox(sandbox_id)  # a missing sandbox is an error
                    text = ""
                excerpt = text[-256:]
                if marker in text:
                    found = True
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    found = False
                    break
                await anyio.sleep(min(poll_interval_ms / 1000, remaining))
        return {
            "found": found,
            "elapsed_ms": int((time.monotonic() - started) * 1000),
            "last_excerpt": excerpt,
        }

    # --- workspaces ------------------------------------------------------------------------

    @server.tool(annotations=_ADDITIVE)
    async def create_workspace(
        name: WorkspaceName,
        snapshot_tag: Annotated[
            str, Field(description="Tag of a ready snapshot to start from (see list_snapshots).")
        ],
        memory_limit_mib: Annotated[
            int | None, Field(description="Memory cap of its sandbox in MiB, kept on resume.")
        ] = None,
        per_child_netns: Annotated[
            bool, Field(description="Give its sandbox its own network namespace (host-prepared).")
        ] = False,
    ) -> dict[str, Any]:
        """Create a workspace: a named sandbox that can be suspended (VM stopped, state kept as a
        snapshot) and resumed later, also after a daemon restart.

        Returns the workspace; its "live_sandbox_id" is the sandbox_id to use with exec_command,
        write_file and the other sandbox tools while it is running.
        """
        with _daemon_errors():
            return await ctl.create_workspace(
                name, snapshot_tag, per_child_netns=per_child_netns,
                memory_limit_mib=memory_limit_mib,
            )  # fmt: skip

    @server.tool(annotations=_READ_ONLY)
    async def list_workspaces() -> CallToolResult:
        """List the workspaces: name, status ("running", "suspended", or "stale" = its sandbox
        died), live_sandbox_id, current_state_tag (the latest suspend snapshot)."""
        with _daemon_errors():
            return _list_result(await ctl.list_workspaces())

    @server.tool(annotations=_READ_ONLY)
    async def get_workspace(name: WorkspaceName) -> dict[str, Any]:
        """One workspace: status, live_sandbox_id (when running), current_state_tag."""
        with _daemon_errors():
            return await ctl.get_workspace(name)

    @server.tool(annotations=_ADDITIVE)
    async def suspend_workspace(
        name: WorkspaceName,
        diff: Annotated[
            bool, Field(description="Write only memory changed since the fork (shorter pause).")
        ] = False,
    ) -> dict[str, Any]:
        """Save a running workspace's exact state (memory, processes, files) and stop its VM.

        If the suspend fails the workspace keeps running unchanged. Bring it back with
        resume_workspace; its sandbox id changes then.
        """
        with _daemon_errors():
            return await ctl.suspend_workspace(name, diff=diff)

    @server.tool(annotations=_ADDITIVE)
    async def resume_workspace(name: WorkspaceName) -> dict[str, Any]:
        """Start a suspended (or stale) workspace again from its latest saved state.

        Returns the workspace; use its new "live_sandbox_id" as the sandbox_id. A "warning"
        says what was lost when a stale workspace had to fall back to an older state.
        """
        with _daemon_errors():
            return await ctl.resume_workspace(name)

    @server.tool(annotations=_DESTRUCTIVE)
    async def delete_workspace(name: WorkspaceName) -> dict[str, Any]:
        """Delete a workspace: stop its sandbox and delete its saved states (the snapshot it
        was created from is kept)."""
        with _daemon_errors():
            await ctl.delete_workspace(name)
            return {"name": name, "deleted": True}

    return server


def _network(egress: str | None, allow: list[str] | None) -> dict[str, Any] | None:
    if egress is None and not allow:
        return None
    out: dict[str, Any] = {"allow": list(allow or [])}
    out["egress"] = egress or "allowlist"
    return out


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def http_timeout(environ: Mapping[str, str] | None = None) -> float:
    """Seconds per daemon request: ``$FORKD_HTTP_TIMEOUT`` (forkd-mcp's variable), else 60."""
    raw = (os.environ if environ is None else environ).get("FORKD_HTTP_TIMEOUT")
    if raw is None or not raw.strip():
        return DEFAULT_HTTP_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"FORKD_HTTP_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"FORKD_HTTP_TIMEOUT must be positive, got {raw!r}")
    return value


def main() -> None:
    """The ``forkd-mcp`` command (forkd v0.5's MCP server's name): serve MCP over stdio."""
    run("stdio")


def run(
    transport: str = "stdio",
    host: str = "127.0.0.1",
    port: int = 8890,
    *,
    allow_remote: bool = False,
) -> None:
    """Serve the forkd MCP server until interrupted.

    ``transport``: ``"stdio"`` (for MCP clients that launch ``forkd mcp``) or
    ``"streamable-http"`` (served at ``http://HOST:PORT/mcp``). The daemon is reached via
    ``$FORKD_URL``/``$FORKD_TOKEN``. The HTTP transport does not authenticate its callers,
    so a non-loopback ``host`` is refused unless ``allow_remote=True``.
    """
    if transport == "stdio":
        create_server().run("stdio")
    elif transport == "streamable-http":
        if not _is_loopback(host) and not allow_remote:
            raise ValueError(
                f"refusing to serve MCP over HTTP on non-loopback host {host!r}: it has no "
                "authentication and acts with the daemon's token (pass allow_remote=True to "
                "override)"
            )
        create_server().run("streamable-http", host=host, port=port)
    else:
        raise ValueError(f"unknown MCP transport {transport!r}; use 'stdio' or 'streamable-http'")
