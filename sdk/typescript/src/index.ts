/**
 * TypeScript SDK of forkd: fork microVM sandboxes copy-on-write from warm templates.
 *
 * `Controller` maps the daemon's REST API one method per endpoint; `Sandbox` is an E2B-style
 * handle on one sandbox built on top of it.
 */
export {
  Controller,
  ControllerError,
  ForkdError,
  DEFAULT_BASE_URL,
  DEFAULT_TIMEOUT_MS,
  type BranchOptions,
  type ControllerOptions,
  type CreateSnapshotOptions,
  type DeleteSnapshotOptions,
  type ExecOptions,
  type RemoveFileOptions,
  type SpawnOptions,
  type WaitForSnapshotOptions,
} from "./controller.js";
export {
  Commands,
  EvalError,
  Files,
  Sandbox,
  type RunOptions,
  type SandboxBranchOptions,
  type SandboxConnectionOptions,
  type SandboxCreateOptions,
  type SandboxForkOptions,
} from "./sandbox.js";
export {
  BranchMode,
  type ErrorBody,
  type EvalResult,
  type ExecResult,
  type FileEntry,
  type FileWriteResult,
  type HealthzResult,
  type NetworkPolicy,
  type PingResult,
  type PortForward,
  type SandboxInfo,
  type SandboxNetwork,
  type SnapshotDetail,
  type SnapshotInfo,
  type SnapshotStatus,
  type VersionInfo,
} from "./types.js";
