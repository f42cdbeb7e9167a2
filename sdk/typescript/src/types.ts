/**
 * Wire types of the forkd REST API (forkd v0.5 compatible, plus our extra fields).
 *
 * Field names are the snake_case names the daemon sends; they mirror the pydantic models in
 * `src/forkd/wire.py`. Optional fields may be absent or `null`.
 */

/** How a running sandbox is turned into a snapshot by `branch`. */
export const BranchMode = {
  /** Pause, write the full memory image, resume. */
  FULL: "full",
  /** Pause only while the pages dirtied since the parent are written. */
  DIFF: "diff",
  /** Keep the source running while the snapshot is written (may answer `status: "writing"`). */
  LIVE: "live",
} as const;
export type BranchMode = (typeof BranchMode)[keyof typeof BranchMode];

/** Lifecycle of a snapshot: children can only be spawned from a `"ready"`, bootable one. */
export type SnapshotStatus = "writing" | "ready" | "failed";

/** A template children can fork from (`GET /v1/snapshots`, branch and create answers). */
export interface SnapshotInfo {
  tag: string;
  dir: string;
  created_at_unix: number;
  branched_from?: string | null;
  pause_ms?: number | null;
  diff_ms?: number | null;
  diff_physical_bytes?: number | null;
  diff_logical_bytes?: number | null;
  warning?: string | null;
  /** Always present on the wire. */
  status: SnapshotStatus;
  /** Always present on the wire. */
  bootable: boolean;
  // forkd extras
  mode?: BranchMode | null;
  parent_tag?: string | null;
  image?: string | null;
  mem_mib?: number | null;
  total_ms?: number | null;
  bytes_written?: number | null;
  error?: string | null;
}

/** `GET /v1/snapshots/{tag}/info`: a snapshot with its lineage and sizes. */
export interface SnapshotDetail extends SnapshotInfo {
  chain_depth: number;
  ancestors: string[];
  dependents: string[];
  memory_bytes?: number | null;
  devstate_bytes?: number | null;
  memory_path?: string | null;
}

/** A running child VM. */
export interface SandboxInfo {
  id: string;
  snapshot_tag: string;
  netns?: string | null;
  guest_addr?: string | null;
  created_at_unix: number;
  pid: number;
  memory_limit_mib?: number | null;
  has_branched: boolean;
  last_branch_memory_path?: string | null;
  branch_count: number;
  // forkd extras
  state?: "running" | "dead";
  dead_reason?: string | null;
  network?: SandboxNetwork | null;
}

/** A sandbox's egress policy: `none` (default), `internet` or `allowlist`. */
export interface NetworkPolicy {
  egress?: "none" | "internet" | "allowlist";
  /** Domains (`example.com`, `*.example.com`), IPv4 CIDRs, or `host:PORT` (host loopback). */
  allow?: string[];
  /** Give the guest the host's CA bundle (hosts behind a TLS-inspecting proxy). */
  host_ca?: boolean;
}

/** `SandboxInfo.network`. */
export interface SandboxNetwork {
  egress: "none" | "internet" | "allowlist";
  allow: string[];
  guest_ip: string;
  /** Where the guest reaches allow-listed `host:PORT` services. */
  host_alias: string;
}

/** `POST /v1/sandboxes/{id}/ports` answer: guest `port` answers at `url` on this host. */
export interface PortForward {
  port: number;
  host: string;
  host_port: number;
  url: string;
}

/** `POST /v1/sandboxes/{id}/exec` answer. The last four fields are forkd extras. */
export interface ExecResult {
  stdout: string;
  stderr: string;
  exit_code: number;
  timed_out?: boolean;
  stdout_truncated?: boolean;
  stderr_truncated?: boolean;
  duration_ms?: number | null;
}

/** `POST /v1/sandboxes/{id}/eval` answer. `result` is the repr of the value, or null. */
export interface EvalResult {
  result: string | null;
  error: string | null;
  exit_code: number;
  stdout?: string;
  traceback?: string | null;
}

/** One entry of `GET /v1/sandboxes/{id}/files?path=DIR`. */
export interface FileEntry {
  name: string;
  path: string;
  type: "file" | "dir" | "symlink" | "other";
  size: number;
  mode: number;
  mtime: number;
}

/** `PUT /v1/sandboxes/{id}/files/content` answer. */
export interface FileWriteResult {
  path: string;
  size: number;
}

/** The guest agent's pong; its exact fields depend on the agent version. */
export type PingResult = Record<string, unknown>;

/** `GET /healthz` answer. */
export interface HealthzResult {
  ok: boolean;
}

/** `GET /version` answer. */
export interface VersionInfo {
  version: string;
  api: string;
  [key: string]: unknown;
}

/** The daemon's error body: `{"error": "<message>"}`. */
export interface ErrorBody {
  error: string;
}
