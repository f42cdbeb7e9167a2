import { Controller, ForkdError, type ControllerOptions, type ExecOptions } from "./controller.js";
import type {
  BranchMode,
  EvalResult,
  ExecResult,
  FileEntry,
  FileWriteResult,
  NetworkPolicy,
  PingResult,
  SandboxInfo,
  SnapshotInfo,
} from "./types.js";

/** How to reach the daemon: an existing {@link Controller}, or options to build one. */
export interface SandboxConnectionOptions extends ControllerOptions {
  /** Reuse this controller; the other connection options are then ignored. */
  controller?: Controller;
}

export interface SandboxCreateOptions extends SandboxConnectionOptions {
  /** Snapshot tag to fork the sandbox from (or `snapshotTag`; default `$FORKD_TAG`). */
  template?: string;
  /** forkd v0.5's name for `template`; either one works. */
  snapshotTag?: string;
  perChildNetns?: boolean;
  memoryLimitMib?: number;
  prewarm?: boolean;
  liveFork?: boolean;
  hugepages?: boolean;
  /** Egress policy (`{ egress, allow, host_ca }`); default none. */
  network?: NetworkPolicy;
  /** E2B's shorthand: true is egress internet. */
  allowInternetAccess?: boolean;
}

export interface RunOptions {
  /** Command timeout inside the guest in seconds (default 30). */
  timeoutSecs?: number;
  /** Extra environment variables. */
  envs?: Record<string, string>;
  cwd?: string;
  /** Text fed to standard input. */
  stdin?: string;
}

export interface SandboxBranchOptions {
  tag?: string;
  mode?: BranchMode;
  /** Legacy flag of forkd v0.5, same as `mode: "diff"` (ignored when `mode` is given). */
  diff?: boolean;
  /** Default true; `false` only with `mode: "live"`. */
  wait?: boolean;
  measureDiff?: boolean;
  /** forkd v0.5's spelling of `measureDiff`; either one works. */
  measure_diff?: boolean;
}

/**
 * `sandbox.eval`: the code raised (or exited) in the guest. `result` is the whole
 * {@link EvalResult}; `error` and `traceback` are its fields. A {@link ForkdError}, like
 * `ControllerError`.
 */
export class EvalError extends ForkdError {
  readonly result: EvalResult;
  readonly error: string;
  readonly traceback: string | null;

  constructor(result: EvalResult) {
    const error = result.error ?? `exit code ${result.exit_code}`;
    super(`eval error: ${error}`);
    this.name = "EvalError";
    this.result = result;
    this.error = error;
    this.traceback = result.traceback ?? null;
  }
}

export interface SandboxForkOptions {
  /** Tag of the intermediate snapshot; the daemon picks one when omitted. */
  tag?: string;
  mode?: BranchMode;
  perChildNetns?: boolean;
  memoryLimitMib?: number;
  prewarm?: boolean;
  liveFork?: boolean;
  hugepages?: boolean;
}

function controllerFrom(options: SandboxConnectionOptions): Controller {
  if (options.controller) return options.controller;
  const { controller: _ignored, ...rest } = options;
  return new Controller(rest);
}

function pickControllerOptions(options: SandboxConnectionOptions): SandboxConnectionOptions {
  const { controller, baseUrl, token, timeoutMs, fetch } = options;
  return { controller, baseUrl, token, timeoutMs, fetch };
}

const textDecoder = new TextDecoder();

function templateOf(options: SandboxCreateOptions): string {
  const { template, snapshotTag } = options;
  if (template && snapshotTag && template !== snapshotTag) {
    throw new TypeError(
      `Sandbox.create: template ${JSON.stringify(template)} and snapshotTag ` +
        `${JSON.stringify(snapshotTag)} disagree; pass one of them`,
    );
  }
  const env = typeof process !== "undefined" && process.env ? process.env : {};
  const tag = template || snapshotTag || env.FORKD_TAG;
  if (!tag) {
    throw new TypeError(
      "Sandbox.create: `template` (or `snapshotTag`), a snapshot tag, is required " +
        "(or set FORKD_TAG)",
    );
  }
  return tag;
}

/** Commands of one sandbox (`sandbox.commands`). */
export class Commands {
  constructor(
    private readonly controller: Controller,
    private readonly sandboxId: string,
  ) {}

  /**
   * Run a command. A string runs through `/bin/sh -c`; an array runs as is (no shell).
   * A non-zero exit code is reported in the result, not thrown.
   */
  run(cmd: string | string[], options: RunOptions = {}): Promise<ExecResult> {
    const args = typeof cmd === "string" ? ["/bin/sh", "-c", cmd] : cmd;
    return this.controller.execCommand(this.sandboxId, args, {
      timeoutSecs: options.timeoutSecs,
      env: options.envs,
      cwd: options.cwd,
      stdin: options.stdin,
    });
  }
}

/** Files of one sandbox (`sandbox.files`). */
export class Files {
  constructor(
    private readonly controller: Controller,
    private readonly sandboxId: string,
  ) {}

  /** Read a file, as UTF-8 text (default) or as bytes. */
  read(path: string, options?: { format?: "text" }): Promise<string>;
  read(path: string, options: { format: "bytes" }): Promise<Uint8Array>;
  read(path: string, options: { format?: "text" | "bytes" }): Promise<string | Uint8Array>;
  async read(path: string, options: { format?: "text" | "bytes" } = {}): Promise<string | Uint8Array> {
    const data = await this.controller.readFile(this.sandboxId, path);
    return options.format === "bytes" ? data : textDecoder.decode(data);
  }

  /** Write a file (strings as UTF-8); parent directories are created by the guest. */
  write(path: string, data: string | Uint8Array): Promise<FileWriteResult> {
    return this.controller.writeFile(this.sandboxId, path, data);
  }

  /** List a directory. */
  list(path: string): Promise<FileEntry[]> {
    return this.controller.listFiles(this.sandboxId, path);
  }

  /** Remove a file, or a directory with `recursive: true`. */
  remove(path: string, options: { recursive?: boolean } = {}): Promise<void> {
    return this.controller.removeFile(this.sandboxId, path, options);
  }
}

/**
 * One sandbox, E2B style.
 *
 * @example
 * ```ts
 * const sb = await Sandbox.create({ template: "py" }); // or { snapshotTag: "py" }
 * const r = await sb.commands.run("echo hi");
 * const kids = await sb.fork(3);
 * const n = await Sandbox.with({ snapshotTag: "py" }, (s) => s.eval("6 * 7")); // "42", killed after
 * ```
 */
export class Sandbox {
  readonly id: string;
  readonly controller: Controller;
  readonly commands: Commands;
  readonly files: Files;
  /** The daemon's record of this sandbox when it was created or connected. */
  info: SandboxInfo | undefined;
  private killed = false;

  constructor(controller: Controller, idOrInfo: string | SandboxInfo) {
    this.controller = controller;
    if (typeof idOrInfo === "string") {
      this.id = idOrInfo;
    } else {
      this.id = idOrInfo.id;
      this.info = idOrInfo;
    }
    this.commands = new Commands(controller, this.id);
    this.files = new Files(controller, this.id);
  }

  /**
   * Fork one new sandbox from the snapshot `template` (forkd v0.5's `snapshotTag` works too;
   * default `$FORKD_TAG`).
   */
  static async create(options: SandboxCreateOptions): Promise<Sandbox> {
    const template = templateOf(options ?? {});
    const controller = controllerFrom(pickControllerOptions(options));
    const [info] = await controller.spawnSandboxes({
      snapshotTag: template,
      n: 1,
      perChildNetns: options.perChildNetns,
      memoryLimitMib: options.memoryLimitMib,
      prewarm: options.prewarm,
      liveFork: options.liveFork,
      hugepages: options.hugepages,
      network: options.network,
      allowInternetAccess: options.allowInternetAccess,
    });
    if (!info) throw new Error(`Sandbox.create: the daemon spawned no sandbox from ${template}`);
    return new Sandbox(controller, info);
  }

  /** Create a sandbox, run `fn` with it, and kill it afterwards, whatever `fn` did. */
  static async with<T>(options: SandboxCreateOptions, fn: (sb: Sandbox) => Promise<T>): Promise<T> {
    const sb = await Sandbox.create(options);
    try {
      return await fn(sb);
    } finally {
      await sb.kill();
    }
  }

  /** Attach to an existing sandbox (checks that the daemon knows it). */
  static async connect(id: string, options: SandboxConnectionOptions = {}): Promise<Sandbox> {
    const controller = controllerFrom(pickControllerOptions(options));
    const info = await controller.getSandbox(id);
    return new Sandbox(controller, info);
  }

  /** Fetch the daemon's current record of this sandbox. */
  async getInfo(): Promise<SandboxInfo> {
    this.info = await this.controller.getSandbox(this.id);
    return this.info;
  }

  /**
   * Evaluate code in the guest's persistent namespace and return the value's repr (`null` for
   * statements), as forkd v0.5's `eval` did. Throws {@link EvalError} when the code raises or
   * exits in the guest; {@link Sandbox.evalResult} reports that in the result instead.
   */
  async eval(code: string): Promise<string | null> {
    const r = await this.evalResult(code);
    if (r.error !== null && r.error !== undefined) throw new EvalError(r);
    if (r.exit_code !== undefined && r.exit_code !== 0) throw new EvalError(r);
    return r.result;
  }

  /** Like {@link Sandbox.eval}, but the whole answer (error, traceback, stdout); never throws on
   * a guest error. */
  evalResult(code: string): Promise<EvalResult> {
    return this.controller.evalCode(this.id, code);
  }

  /** Run `args` as is (no shell), forkd v0.5's `sb.exec`; see also `commands.run`. */
  exec(args: string[], options: ExecOptions = {}): Promise<ExecResult> {
    return this.controller.execCommand(this.id, args, options);
  }

  /** Round trip to the guest agent. */
  ping(): Promise<PingResult> {
    return this.controller.pingSandbox(this.id);
  }

  /** Snapshot this sandbox; the answer's `tag` can be spawned from. */
  branch(options: SandboxBranchOptions = {}): Promise<SnapshotInfo> {
    return this.controller.branchSandbox(this.id, {
      tag: options.tag,
      mode: options.mode,
      diff: options.diff,
      wait: options.wait,
      measureDiff: options.measureDiff || options.measure_diff,
    });
  }

  /**
   * Branch this sandbox, then spawn `n` children from the new snapshot. The snapshot stays
   * registered (its tag is in each child's `info.snapshot_tag`); delete it when done.
   */
  async fork(n = 1, options: SandboxForkOptions = {}): Promise<Sandbox[]> {
    let snap = await this.controller.branchSandbox(this.id, { tag: options.tag, mode: options.mode });
    if (snap.status === "writing") snap = await this.controller.waitForSnapshot(snap.tag);
    const infos = await this.controller.spawnSandboxes({
      snapshotTag: snap.tag,
      n,
      perChildNetns: options.perChildNetns,
      memoryLimitMib: options.memoryLimitMib,
      prewarm: options.prewarm,
      liveFork: options.liveFork,
      hugepages: options.hugepages,
    });
    return infos.map((info) => new Sandbox(this.controller, info));
  }

  /** Terminate this sandbox. Idempotent: a second call sends nothing. */
  /** `host:port` on this machine where guest TCP `port` answers (E2B's name). */
  async getHost(port: number): Promise<string> {
    const fwd = await this.controller.exposePort(this.id, port);
    return `${fwd.host}:${fwd.host_port}`;
  }

  async kill(): Promise<void> {
    if (this.killed) return;
    await this.controller.killSandbox(this.id);
    this.killed = true;
  }
}
