import type {
  BranchMode,
  EvalResult,
  ExecResult,
  FileEntry,
  FileWriteResult,
  HealthzResult,
  NetworkPolicy,
  PingResult,
  PortForward,
  SandboxInfo,
  SnapshotDetail,
  SnapshotInfo,
  VersionInfo,
} from "./types.js";

/** Daemon address used when neither the `baseUrl` option nor `FORKD_URL` is set. */
export const DEFAULT_BASE_URL = "http://127.0.0.1:8889";
/** Per-request timeout used when `timeoutMs` is not given. */
export const DEFAULT_TIMEOUT_MS = 60_000;

/** Base of every error this SDK throws on purpose ({@link ControllerError}, `EvalError`). */
export class ForkdError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ForkdError";
  }
}

/**
 * A non-2xx answer from the daemon.
 *
 * `status` is the HTTP status, `body` the parsed JSON body (usually `{"error": "..."}`) or the raw
 * text when it was not JSON, `url` the request URL. The message includes the daemon's `error`.
 */
export class ControllerError extends ForkdError {
  readonly status: number;
  readonly body: unknown;
  readonly url: string;

  constructor(status: number, body: unknown, url: string, method?: string) {
    super(`${method ? `${method} ` : ""}${url}: HTTP ${status}: ${describeBody(body)}`);
    this.name = "ControllerError";
    this.status = status;
    this.body = body;
    this.url = url;
  }

  /** The daemon's `error` message, when the body carried one. */
  get daemonError(): string | undefined {
    const b = this.body;
    if (b && typeof b === "object" && typeof (b as { error?: unknown }).error === "string") {
      return (b as { error: string }).error;
    }
    return undefined;
  }
}

function describeBody(body: unknown): string {
  if (body && typeof body === "object" && typeof (body as { error?: unknown }).error === "string") {
    return (body as { error: string }).error;
  }
  if (typeof body === "string") return body || "(empty body)";
  if (body === undefined || body === null) return "(empty body)";
  return JSON.stringify(body);
}

export interface ControllerOptions {
  /** Daemon URL. Default: `$FORKD_URL`, else `http://127.0.0.1:8889`. */
  baseUrl?: string;
  /** Bearer token. Default: `$FORKD_TOKEN`; none when unset. */
  token?: string;
  /** Per-request timeout in milliseconds (default 60 000). */
  timeoutMs?: number;
  /** `fetch` implementation to use instead of the global one (handy for tests). */
  fetch?: typeof fetch;
}

export interface CreateSnapshotOptions {
  tag: string;
  /** Image name known to the daemon (forkd extra); alternative to `kernel` + `rootfs`. */
  image?: string;
  /** Guest memory of the template in MiB (forkd extra). */
  memMib?: number;
  /** Code run once in the guest before the snapshot is taken (forkd extra). */
  warmup?: string;
  /** Kernel path on the daemon host (forkd v0.5 form). */
  kernel?: string;
  /** Root filesystem path on the daemon host (forkd v0.5 form). */
  rootfs?: string;
  /** Writable root filesystem (forkd v0.5 form); sent only when true. */
  rw?: boolean;
  /** TAP device (forkd v0.5 form). */
  tap?: string;
  /** Seconds to let the guest boot before snapshotting (forkd v0.5 form). */
  bootWaitSecs?: number;
}

export interface DeleteSnapshotOptions {
  /** Also delete every snapshot that depends on this one. */
  cascade?: boolean;
  /** Delete even though dependents exist. */
  force?: boolean;
}

export interface SpawnOptions {
  snapshotTag: string;
  /** How many children (default 1). */
  n?: number;
  /** Give every child its own network namespace (default false). */
  perChildNetns?: boolean;
  /** Memory cap per child in MiB; sent only when set. */
  memoryLimitMib?: number;
  /** Fault the template's memory in at spawn time; sent only when true. */
  prewarm?: boolean;
  /** Fork from the live template process; sent only when true. */
  liveFork?: boolean;
  /** Back guest memory with huge pages; sent only when true. */
  hugepages?: boolean;
  /** Egress policy of the children; sent only when set. */
  network?: NetworkPolicy;
  /** E2B's shorthand: true is egress internet, false none; sent only when set. */
  allowInternetAccess?: boolean;
}

export interface BranchOptions {
  /** Tag of the new snapshot; the daemon picks one when omitted. */
  tag?: string;
  /** Branch mode. When given, the legacy `diff` flag is not sent. */
  mode?: BranchMode;
  /** Legacy flag, same as `mode: "diff"`; sent only when true and no `mode` is given. */
  diff?: boolean;
  /** Measure the diff size even for a full branch; sent only when true. */
  measureDiff?: boolean;
  /** forkd v0.5's spelling of `measureDiff` (its SDK took the wire name); either one works. */
  measure_diff?: boolean;
  /**
   * Wait for the snapshot to be written (default true). Only `wait: false` is sent, and the daemon
   * accepts it only with `mode: "live"`; the answer then has `status: "writing"` (see
   * {@link Controller.waitForSnapshot}).
   */
  wait?: boolean;
  /** Parent snapshot to diff against (forkd extra). */
  parentTag?: string;
}

export interface ExecOptions {
  /** Command timeout inside the guest in seconds (default 30). */
  timeoutSecs?: number;
  /** Extra environment variables (forkd extra). */
  env?: Record<string, string>;
  /** Working directory (forkd extra). */
  cwd?: string;
  /** Text fed to the command's standard input (forkd extra). */
  stdin?: string;
}

export interface RemoveFileOptions {
  /** Remove a directory with its contents. */
  recursive?: boolean;
}

export interface WaitForSnapshotOptions {
  /** Give up after this many milliseconds (default 300 000). */
  timeoutMs?: number;
  /** Delay between polls in milliseconds (default 500). */
  pollIntervalMs?: number;
}

type Query = Record<string, string | undefined>;

interface RequestOptions {
  json?: unknown;
  raw?: Uint8Array;
  query?: Query;
  /** Return the body bytes instead of parsed JSON. */
  bytes?: boolean;
  timeoutMs?: number;
}

const textEncoder = new TextEncoder();

function seg(value: string): string {
  return encodeURIComponent(value);
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * Client for the forkd daemon's REST API.
 *
 * Every method maps to one endpoint; wire bodies use the API's snake_case names.
 *
 * @example
 * ```ts
 * const ctrl = new Controller();
 * const [sb] = await ctrl.spawnSandboxes({ snapshotTag: "py" });
 * const out = await ctrl.execCommand(sb.id, ["echo", "hi"]);
 * await ctrl.killSandbox(sb.id);
 * ```
 */
export class Controller {
  readonly baseUrl: string;
  readonly token: string | undefined;
  readonly timeoutMs: number;
  private readonly fetchImpl: typeof fetch;

  constructor(options: ControllerOptions = {}) {
    const env = typeof process !== "undefined" && process.env ? process.env : {};
    const base = options.baseUrl || env.FORKD_URL || DEFAULT_BASE_URL;
    this.baseUrl = base.replace(/\/+$/, "");
    const token = options.token !== undefined ? options.token : env.FORKD_TOKEN;
    this.token = token ? token : undefined;
    this.timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    const f = options.fetch ?? globalThis.fetch;
    if (typeof f !== "function") {
      throw new TypeError("forkd: no global fetch (Node >= 18 required) and no `fetch` option given");
    }
    this.fetchImpl = f;
  }

  // --- daemon ---------------------------------------------------------------------------------

  /** `GET /healthz` (no auth needed). */
  healthz(): Promise<HealthzResult> {
    return this.request("GET", "/healthz");
  }

  /** `GET /version`. */
  version(): Promise<VersionInfo> {
    return this.request("GET", "/version");
  }

  // --- snapshots ------------------------------------------------------------------------------

  /** `GET /v1/snapshots`. */
  listSnapshots(): Promise<SnapshotInfo[]> {
    return this.request("GET", "/v1/snapshots");
  }

  /** `POST /v1/snapshots`: boot a template and snapshot it. Only the given fields are sent. */
  createSnapshot(options: CreateSnapshotOptions): Promise<SnapshotInfo> {
    const body: Record<string, unknown> = { tag: options.tag };
    if (options.image !== undefined) body.image = options.image;
    if (options.memMib !== undefined) body.mem_mib = options.memMib;
    if (options.warmup !== undefined) body.warmup = options.warmup;
    if (options.kernel !== undefined) body.kernel = options.kernel;
    if (options.rootfs !== undefined) body.rootfs = options.rootfs;
    if (options.rw) body.rw = true;
    if (options.tap !== undefined) body.tap = options.tap;
    if (options.bootWaitSecs !== undefined) body.boot_wait_secs = options.bootWaitSecs;
    return this.request("POST", "/v1/snapshots", { json: body });
  }

  /** `DELETE /v1/snapshots/{tag}[?cascade=true | ?force=true]`. */
  async deleteSnapshot(tag: string, options: DeleteSnapshotOptions = {}): Promise<void> {
    if (options.cascade && options.force) {
      throw new TypeError("deleteSnapshot: `cascade` and `force` are mutually exclusive");
    }
    const query: Query = {
      cascade: options.cascade ? "true" : undefined,
      force: options.force ? "true" : undefined,
    };
    await this.request("DELETE", `/v1/snapshots/${seg(tag)}`, { query });
  }

  /** `GET /v1/snapshots/{tag}/info`: lineage and sizes. */
  snapshotInfo(tag: string): Promise<SnapshotDetail> {
    return this.request("GET", `/v1/snapshots/${seg(tag)}/info`);
  }

  /**
   * Poll `GET /v1/snapshots/{tag}/info` until the snapshot is `"ready"` and return it.
   * Throws when it ends `"failed"` or when `timeoutMs` (default 300 000) runs out.
   */
  async waitForSnapshot(tag: string, options: WaitForSnapshotOptions = {}): Promise<SnapshotDetail> {
    const timeoutMs = options.timeoutMs ?? 300_000;
    const interval = Math.max(0, options.pollIntervalMs ?? 500);
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const info = await this.snapshotInfo(tag);
      if (info.status === "ready") return info;
      if (info.status === "failed") {
        throw new Error(`snapshot ${tag} failed${info.error ? `: ${info.error}` : ""}`);
      }
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new Error(`snapshot ${tag} still "${info.status}" after ${timeoutMs} ms`);
      }
      await sleep(Math.min(interval, left));
    }
  }

  // --- sandboxes ------------------------------------------------------------------------------

  /**
   * `POST /v1/sandboxes`: fork `n` children from a snapshot. `n` and `per_child_netns` are always
   * sent; `memory_limit_mib` only when set; `prewarm`, `live_fork`, `hugepages` only when true.
   */
  spawnSandboxes(options: SpawnOptions): Promise<SandboxInfo[]> {
    const body: Record<string, unknown> = {
      snapshot_tag: options.snapshotTag,
      n: options.n ?? 1,
      per_child_netns: options.perChildNetns ?? false,
    };
    if (options.memoryLimitMib !== undefined && options.memoryLimitMib !== null) {
      body.memory_limit_mib = options.memoryLimitMib;
    }
    if (options.prewarm) body.prewarm = true;
    if (options.liveFork) body.live_fork = true;
    if (options.hugepages) body.hugepages = true;
    if (options.network !== undefined) body.network = options.network;
    if (options.allowInternetAccess !== undefined) {
      body.allow_internet_access = options.allowInternetAccess;
    }
    return this.request("POST", "/v1/sandboxes", { json: body });
  }

  /** `POST /v1/sandboxes/{id}/ports`: forward guest TCP `port` to this host's loopback. */
  exposePort(id: string, port: number): Promise<PortForward> {
    return this.request("POST", `/v1/sandboxes/${seg(id)}/ports`, { json: { port } });
  }

  /** `GET /v1/sandboxes/{id}/ports`. */
  listPorts(id: string): Promise<PortForward[]> {
    return this.request("GET", `/v1/sandboxes/${seg(id)}/ports`);
  }

  /** `DELETE /v1/sandboxes/{id}/ports/{port}`. */
  async removePort(id: string, port: number): Promise<void> {
    await this.request("DELETE", `/v1/sandboxes/${seg(id)}/ports/${Math.trunc(port)}`);
  }

  /** `GET /v1/sandboxes`. */
  listSandboxes(): Promise<SandboxInfo[]> {
    return this.request("GET", "/v1/sandboxes");
  }

  /** `GET /v1/sandboxes/{id}`. */
  getSandbox(id: string): Promise<SandboxInfo> {
    return this.request("GET", `/v1/sandboxes/${seg(id)}`);
  }

  /** `DELETE /v1/sandboxes/{id}`. */
  async killSandbox(id: string): Promise<void> {
    await this.request("DELETE", `/v1/sandboxes/${seg(id)}`);
  }

  /**
   * `POST /v1/sandboxes/{id}/branch`: snapshot a running sandbox.
   *
   * Body rules: `tag` only when given; `mode` when given (then the legacy `diff` is never sent);
   * `diff: true` only when `diff` and no `mode`; `measure_diff` only when true; `wait` only when
   * false.
   */
  branchSandbox(id: string, options: BranchOptions = {}): Promise<SnapshotInfo> {
    const body: Record<string, unknown> = {};
    if (options.tag !== undefined) body.tag = options.tag;
    if (options.mode !== undefined && options.mode !== null) body.mode = options.mode;
    else if (options.diff) body.diff = true;
    if (options.measureDiff || options.measure_diff) body.measure_diff = true;
    if (options.wait === false) body.wait = false;
    if (options.parentTag !== undefined) body.parent_tag = options.parentTag;
    return this.request("POST", `/v1/sandboxes/${seg(id)}/branch`, { json: body });
  }

  /**
   * `POST /v1/sandboxes/{id}/exec`: run `args` (no shell) in the guest. `timeout_secs` is always
   * sent (default 30); `env`, `cwd`, `stdin` only when given. The HTTP timeout is stretched to
   * cover the command timeout.
   */
  execCommand(id: string, args: string[], options: ExecOptions = {}): Promise<ExecResult> {
    const timeoutSecs = options.timeoutSecs ?? 30;
    const body: Record<string, unknown> = { args, timeout_secs: timeoutSecs };
    if (options.env !== undefined) body.env = options.env;
    if (options.cwd !== undefined) body.cwd = options.cwd;
    if (options.stdin !== undefined) body.stdin = options.stdin;
    return this.request("POST", `/v1/sandboxes/${seg(id)}/exec`, {
      json: body,
      timeoutMs: Math.max(this.timeoutMs, timeoutSecs * 1000 + 10_000),
    });
  }

  /** `POST /v1/sandboxes/{id}/eval`: evaluate code in the guest's persistent namespace. */
  evalCode(id: string, code: string): Promise<EvalResult> {
    return this.request("POST", `/v1/sandboxes/${seg(id)}/eval`, { json: { code } });
  }

  /** `POST /v1/sandboxes/{id}/ping`: round trip to the guest agent. */
  pingSandbox(id: string): Promise<PingResult> {
    return this.request("POST", `/v1/sandboxes/${seg(id)}/ping`);
  }

  // --- files (forkd extras) -------------------------------------------------------------------

  /** `GET /v1/sandboxes/{id}/files/content?path=P`: the file's bytes. */
  readFile(id: string, path: string): Promise<Uint8Array> {
    return this.request("GET", `/v1/sandboxes/${seg(id)}/files/content`, {
      query: { path },
      bytes: true,
    });
  }

  /** `PUT /v1/sandboxes/{id}/files/content?path=P` with the raw bytes (strings as UTF-8). */
  writeFile(id: string, path: string, data: string | Uint8Array): Promise<FileWriteResult> {
    const raw = typeof data === "string" ? textEncoder.encode(data) : data;
    return this.request("PUT", `/v1/sandboxes/${seg(id)}/files/content`, {
      query: { path },
      raw,
    });
  }

  /** `GET /v1/sandboxes/{id}/files?path=DIR`: the entries of a directory. */
  listFiles(id: string, path: string): Promise<FileEntry[]> {
    return this.request("GET", `/v1/sandboxes/${seg(id)}/files`, { query: { path } });
  }

  /** `DELETE /v1/sandboxes/{id}/files?path=P[&recursive=true]`. */
  async removeFile(id: string, path: string, options: RemoveFileOptions = {}): Promise<void> {
    await this.request("DELETE", `/v1/sandboxes/${seg(id)}/files`, {
      query: { path, recursive: options.recursive ? "true" : undefined },
    });
  }

  // --- internals ------------------------------------------------------------------------------

  private buildUrl(path: string, query?: Query): string {
    let url = `${this.baseUrl}${path}`;
    if (query) {
      const params = new URLSearchParams();
      for (const [k, v] of Object.entries(query)) if (v !== undefined) params.append(k, v);
      const qs = params.toString();
      if (qs) url += `?${qs}`;
    }
    return url;
  }

  private async request<T>(method: string, path: string, opts: RequestOptions = {}): Promise<T> {
    const url = this.buildUrl(path, opts.query);
    const headers: Record<string, string> = {};
    let body: string | Uint8Array | undefined;
    if (opts.raw !== undefined) {
      headers["content-type"] = "application/octet-stream";
      body = opts.raw;
    } else if (opts.json !== undefined) {
      headers["content-type"] = "application/json";
      body = JSON.stringify(opts.json);
    }
    if (this.token) headers["authorization"] = `Bearer ${this.token}`;

    const timeoutMs = opts.timeoutMs ?? this.timeoutMs;
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), timeoutMs);
    let resp: Response;
    try {
      resp = await this.fetchImpl(url, { method, headers, body, signal: abort.signal });
      if (!resp.ok) {
        const text = await resp.text();
        let parsed: unknown = text;
        if (text) {
          try {
            parsed = JSON.parse(text);
          } catch {
            parsed = text;
          }
        }
        throw new ControllerError(resp.status, parsed, url, method);
      }
      if (opts.bytes) {
        return new Uint8Array(await resp.arrayBuffer()) as T;
      }
      const text = await resp.text();
      return (text ? JSON.parse(text) : undefined) as T;
    } catch (err) {
      if (abort.signal.aborted && !(err instanceof ControllerError)) {
        throw new Error(`${method} ${url}: no answer within ${timeoutMs} ms`, { cause: err });
      }
      throw err;
    } finally {
      clearTimeout(timer);
    }
  }
}
