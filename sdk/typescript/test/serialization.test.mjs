// Unit tests against the compiled package (dist/): a fake fetch records every request.
import { test, describe, afterEach } from "node:test";
import assert from "node:assert/strict";

import {
  BranchMode,
  Controller,
  ControllerError,
  DEFAULT_BASE_URL,
  EvalError,
  ForkdError,
  Sandbox,
} from "../dist/index.js";

const BASE = "http://forkd.test:8889";
const TOKEN = "t0ken-t0ken-t0ken-t0ken";

/** A fake fetch: answers from `replies` (in order, the last one repeats) and records calls. */
function fakeFetch(...replies) {
  const calls = [];
  let i = 0;
  const fn = async (url, init = {}) => {
    const headers = Object.fromEntries(
      Object.entries(init.headers ?? {}).map(([k, v]) => [k.toLowerCase(), v]),
    );
    let json;
    if (typeof init.body === "string" && headers["content-type"] === "application/json") {
      json = JSON.parse(init.body);
    }
    calls.push({ url: String(url), method: init.method ?? "GET", headers, body: init.body, json, init });
    const reply = replies[Math.min(i++, replies.length - 1)] ?? { status: 200, json: {} };
    if (typeof reply === "function") return reply(url, init);
    const status = reply.status ?? 200;
    if (reply.bytes !== undefined) return new Response(reply.bytes, { status });
    if (reply.text !== undefined) return new Response(reply.text, { status });
    if (status === 204) return new Response(null, { status });
    return new Response(JSON.stringify(reply.json ?? {}), {
      status,
      headers: { "content-type": "application/json" },
    });
  };
  fn.calls = calls;
  return fn;
}

function ctrlWith(...replies) {
  const fetch = fakeFetch(...replies);
  return { ctrl: new Controller({ baseUrl: BASE + "/", token: TOKEN, fetch }), fetch };
}

const SNAP = {
  tag: "b1",
  dir: "/var/lib/forkd/snapshots/b1",
  created_at_unix: 1700000000,
  status: "ready",
  bootable: true,
};
const SB = {
  id: "sb-1",
  snapshot_tag: "py",
  created_at_unix: 1700000000,
  pid: 42,
  has_branched: false,
  branch_count: 0,
};

describe("Controller construction", () => {
  const saved = { url: process.env.FORKD_URL, token: process.env.FORKD_TOKEN };
  afterEach(() => {
    if (saved.url === undefined) delete process.env.FORKD_URL;
    else process.env.FORKD_URL = saved.url;
    if (saved.token === undefined) delete process.env.FORKD_TOKEN;
    else process.env.FORKD_TOKEN = saved.token;
  });

  test("defaults to 127.0.0.1:8889 and no auth header", async () => {
    delete process.env.FORKD_URL;
    delete process.env.FORKD_TOKEN;
    const fetch = fakeFetch({ json: [] });
    const c = new Controller({ fetch });
    assert.equal(c.baseUrl, DEFAULT_BASE_URL);
    assert.equal(c.baseUrl, "http://127.0.0.1:8889");
    assert.equal(c.timeoutMs, 60_000);
    await c.listSnapshots();
    assert.equal(fetch.calls[0].url, "http://127.0.0.1:8889/v1/snapshots");
    assert.equal(fetch.calls[0].headers.authorization, undefined);
  });

  test("reads FORKD_URL and FORKD_TOKEN; options win over env", async () => {
    process.env.FORKD_URL = "http://env.test:1/";
    process.env.FORKD_TOKEN = "env-token-env-token";
    const fetch = fakeFetch({ json: [] });
    const c = new Controller({ fetch });
    assert.equal(c.baseUrl, "http://env.test:1");
    await c.listSandboxes();
    assert.equal(fetch.calls[0].url, "http://env.test:1/v1/sandboxes");
    assert.equal(fetch.calls[0].headers.authorization, "Bearer env-token-env-token");

    const c2 = new Controller({ baseUrl: "http://opt.test:2", token: "opt-token-opt-token", fetch });
    await c2.listSandboxes();
    assert.equal(fetch.calls[1].url, "http://opt.test:2/v1/sandboxes");
    assert.equal(fetch.calls[1].headers.authorization, "Bearer opt-token-opt-token");
  });
});

describe("requests: method, URL, headers", () => {
  test("Bearer auth on every request, JSON content type only with a JSON body", async () => {
    const { ctrl, fetch } = ctrlWith({ json: [] });
    await ctrl.listSnapshots();
    const [c] = fetch.calls;
    assert.equal(c.method, "GET");
    assert.equal(c.url, `${BASE}/v1/snapshots`);
    assert.equal(c.headers.authorization, `Bearer ${TOKEN}`);
    assert.equal(c.headers["content-type"], undefined);
    assert.equal(c.body, undefined);
  });

  test("endpoint table", async () => {
    const cases = [
      [(c) => c.healthz(), "GET", "/healthz", { json: { ok: true } }],
      [(c) => c.version(), "GET", "/version", { json: { version: "0.1", api: "v1" } }],
      [(c) => c.listSnapshots(), "GET", "/v1/snapshots", { json: [] }],
      [(c) => c.snapshotInfo("b1"), "GET", "/v1/snapshots/b1/info", { json: SNAP }],
      [(c) => c.deleteSnapshot("b1"), "DELETE", "/v1/snapshots/b1", { status: 204 }],
      [(c) => c.deleteSnapshot("b1", { cascade: true }), "DELETE", "/v1/snapshots/b1?cascade=true", { status: 204 }],
      [(c) => c.deleteSnapshot("b1", { force: true }), "DELETE", "/v1/snapshots/b1?force=true", { status: 204 }],
      [(c) => c.listSandboxes(), "GET", "/v1/sandboxes", { json: [] }],
      [(c) => c.getSandbox("sb-1"), "GET", "/v1/sandboxes/sb-1", { json: SB }],
      [(c) => c.killSandbox("sb-1"), "DELETE", "/v1/sandboxes/sb-1", { status: 204 }],
      [(c) => c.pingSandbox("sb-1"), "POST", "/v1/sandboxes/sb-1/ping", { json: { pong: true } }],
      [(c) => c.listFiles("sb-1", "/tmp"), "GET", "/v1/sandboxes/sb-1/files?path=%2Ftmp", { json: [] }],
      [(c) => c.removeFile("sb-1", "/tmp/a"), "DELETE", "/v1/sandboxes/sb-1/files?path=%2Ftmp%2Fa", { status: 204 }],
      [
        (c) => c.removeFile("sb-1", "/tmp/d", { recursive: true }),
        "DELETE",
        "/v1/sandboxes/sb-1/files?path=%2Ftmp%2Fd&recursive=true",
        { status: 204 },
      ],
      [
        (c) => c.removeFile("sb-1", "/tmp/d", { recursive: false }),
        "DELETE",
        "/v1/sandboxes/sb-1/files?path=%2Ftmp%2Fd",
        { status: 204 },
      ],
    ];
    for (const [call, method, path, reply] of cases) {
      const { ctrl, fetch } = ctrlWith(reply);
      await call(ctrl);
      assert.equal(fetch.calls.length, 1, path);
      assert.equal(fetch.calls[0].method, method, path);
      assert.equal(fetch.calls[0].url, BASE + path);
      assert.equal(fetch.calls[0].headers.authorization, `Bearer ${TOKEN}`, path);
      if (method !== "POST") assert.equal(fetch.calls[0].body, undefined, path);
    }
  });

  test("ids and tags are escaped in the path", async () => {
    const { ctrl, fetch } = ctrlWith({ status: 204 });
    await ctrl.killSandbox("a/b c");
    assert.equal(fetch.calls[0].url, `${BASE}/v1/sandboxes/a%2Fb%20c`);
  });

  test("deleteSnapshot refuses cascade together with force without a request", async () => {
    const { ctrl, fetch } = ctrlWith({ status: 204 });
    await assert.rejects(ctrl.deleteSnapshot("b1", { cascade: true, force: true }), TypeError);
    assert.equal(fetch.calls.length, 0);
  });

  test("empty 2xx body resolves to undefined; JSON bodies are parsed", async () => {
    const { ctrl } = ctrlWith({ status: 204 }, { json: SB });
    assert.equal(await ctrl.killSandbox("sb-1"), undefined);
    assert.deepEqual(await ctrl.getSandbox("sb-1"), SB);
  });
});

describe("spawnSandboxes body", () => {
  test("minimal: snapshot_tag, n=1, per_child_netns=false, nothing else", async () => {
    const { ctrl, fetch } = ctrlWith({ status: 201, json: [SB] });
    const out = await ctrl.spawnSandboxes({ snapshotTag: "py" });
    assert.deepEqual(out, [SB]);
    const [c] = fetch.calls;
    assert.equal(c.method, "POST");
    assert.equal(c.url, `${BASE}/v1/sandboxes`);
    assert.equal(c.headers["content-type"], "application/json");
    assert.deepEqual(c.json, { snapshot_tag: "py", n: 1, per_child_netns: false });
  });

  test("live_fork / prewarm / hugepages only when true", async () => {
    const { ctrl, fetch } = ctrlWith({ status: 201, json: [] });
    await ctrl.spawnSandboxes({ snapshotTag: "py", prewarm: false, liveFork: false, hugepages: false });
    assert.deepEqual(fetch.calls[0].json, { snapshot_tag: "py", n: 1, per_child_netns: false });
    await ctrl.spawnSandboxes({ snapshotTag: "py", prewarm: true, liveFork: true, hugepages: true });
    assert.deepEqual(fetch.calls[1].json, {
      snapshot_tag: "py",
      n: 1,
      per_child_netns: false,
      prewarm: true,
      live_fork: true,
      hugepages: true,
    });
    await ctrl.spawnSandboxes({ snapshotTag: "py", liveFork: true });
    assert.deepEqual(fetch.calls[2].json, { snapshot_tag: "py", n: 1, per_child_netns: false, live_fork: true });
  });

  test("network and allow_internet_access only when set", async () => {
    const { ctrl, fetch } = ctrlWith({ status: 201, json: [] });
    await ctrl.spawnSandboxes({
      snapshotTag: "py",
      network: { egress: "allowlist", allow: ["host:8000"] },
    });
    assert.deepEqual(fetch.calls[0].json.network, { egress: "allowlist", allow: ["host:8000"] });
    assert.ok(!("allow_internet_access" in fetch.calls[0].json));
    await ctrl.spawnSandboxes({ snapshotTag: "py", allowInternetAccess: false });
    assert.equal(fetch.calls[1].json.allow_internet_access, false);
    assert.ok(!("network" in fetch.calls[1].json));
  });

  test("ports: expose, list, remove", async () => {
    const fwd = { port: 8000, host: "127.0.0.1", host_port: 4000, url: "http://127.0.0.1:4000" };
    const { ctrl, fetch } = ctrlWith({ status: 201, json: fwd }, { json: [fwd] }, { status: 204 });
    assert.deepEqual(await ctrl.exposePort("sb-1", 8000), fwd);
    assert.deepEqual(fetch.calls[0].json, { port: 8000 });
    assert.deepEqual(await ctrl.listPorts("sb-1"), [fwd]);
    await ctrl.removePort("sb-1", 8000);
    assert.deepEqual(
      fetch.calls.map((c) => [c.method, c.url]),
      [
        ["POST", `${BASE}/v1/sandboxes/sb-1/ports`],
        ["GET", `${BASE}/v1/sandboxes/sb-1/ports`],
        ["DELETE", `${BASE}/v1/sandboxes/sb-1/ports/8000`],
      ],
    );
  });

  test("memory_limit_mib only when set; n and per_child_netns passed through", async () => {
    const { ctrl, fetch } = ctrlWith({ status: 201, json: [] });
    await ctrl.spawnSandboxes({ snapshotTag: "py", n: 4, perChildNetns: true, memoryLimitMib: 256 });
    assert.deepEqual(fetch.calls[0].json, {
      snapshot_tag: "py",
      n: 4,
      per_child_netns: true,
      memory_limit_mib: 256,
    });
    await ctrl.spawnSandboxes({ snapshotTag: "py", memoryLimitMib: undefined });
    assert.ok(!("memory_limit_mib" in fetch.calls[1].json));
  });
});

describe("branchSandbox body", () => {
  const cases = [
    ["no options: empty body", undefined, {}],
    ["tag only when given", { tag: "b1" }, { tag: "b1" }],
    ["mode when given", { mode: "live" }, { mode: "live" }],
    ["mode wins over legacy diff", { mode: BranchMode.FULL, diff: true }, { mode: "full" }],
    ["diff: true only when diff and no mode", { diff: true }, { diff: true }],
    ["diff: false is not sent", { diff: false }, {}],
    ["wait: true (default) is omitted", { wait: true }, {}],
    ["only wait: false is sent", { mode: "live", wait: false }, { mode: "live", wait: false }],
    ["measure_diff only when true", { measureDiff: true }, { measure_diff: true }],
    ["measure_diff: false is not sent", { measureDiff: false }, {}],
    ["forkd v0.5's snake-case measure_diff is honoured", { measure_diff: true }, { measure_diff: true }],
    [
      "everything",
      { tag: "b2", mode: BranchMode.DIFF, diff: true, measureDiff: true, wait: true },
      { tag: "b2", mode: "diff", measure_diff: true },
    ],
    ["parent_tag when given", { parentTag: "py" }, { parent_tag: "py" }],
  ];
  for (const [name, opts, expected] of cases) {
    test(name, async () => {
      const { ctrl, fetch } = ctrlWith({ status: 201, json: SNAP });
      const out = opts === undefined ? await ctrl.branchSandbox("sb-1") : await ctrl.branchSandbox("sb-1", opts);
      assert.deepEqual(out, SNAP);
      const [c] = fetch.calls;
      assert.equal(c.method, "POST");
      assert.equal(c.url, `${BASE}/v1/sandboxes/sb-1/branch`);
      assert.equal(c.headers["content-type"], "application/json");
      assert.deepEqual(c.json, expected);
    });
  }

  test("202 writing answer is returned as is", async () => {
    const writing = { ...SNAP, status: "writing", bootable: false };
    const { ctrl } = ctrlWith({ status: 202, json: writing });
    assert.deepEqual(await ctrl.branchSandbox("sb-1", { mode: "live", wait: false }), writing);
  });

  test("BranchMode constants", () => {
    assert.deepEqual({ ...BranchMode }, { FULL: "full", DIFF: "diff", LIVE: "live" });
  });
});

describe("createSnapshot body", () => {
  test("only the given fields, snake_case", async () => {
    const { ctrl, fetch } = ctrlWith({ status: 201, json: SNAP });
    await ctrl.createSnapshot({ tag: "py", image: "python", memMib: 512, warmup: "import json" });
    assert.equal(fetch.calls[0].method, "POST");
    assert.equal(fetch.calls[0].url, `${BASE}/v1/snapshots`);
    assert.deepEqual(fetch.calls[0].json, { tag: "py", image: "python", mem_mib: 512, warmup: "import json" });
    await ctrl.createSnapshot({ tag: "k", kernel: "/k/vmlinux", rootfs: "/k/root.ext4" });
    assert.deepEqual(fetch.calls[1].json, { tag: "k", kernel: "/k/vmlinux", rootfs: "/k/root.ext4" });
    await ctrl.createSnapshot({ tag: "t" });
    assert.deepEqual(fetch.calls[2].json, { tag: "t" });
  });
});

describe("exec / eval bodies", () => {
  test("exec: args + timeout_secs default 30, nothing else", async () => {
    const res = { stdout: "hi\n", stderr: "", exit_code: 0, timed_out: false, duration_ms: 3 };
    const { ctrl, fetch } = ctrlWith({ json: res });
    assert.deepEqual(await ctrl.execCommand("sb-1", ["echo", "hi"]), res);
    const [c] = fetch.calls;
    assert.equal(c.method, "POST");
    assert.equal(c.url, `${BASE}/v1/sandboxes/sb-1/exec`);
    assert.deepEqual(c.json, { args: ["echo", "hi"], timeout_secs: 30 });
  });

  test("exec: env, cwd, stdin, timeout_secs when given", async () => {
    const { ctrl, fetch } = ctrlWith({ json: { stdout: "", stderr: "", exit_code: 0 } });
    await ctrl.execCommand("sb-1", ["cat"], { timeoutSecs: 5, env: { A: "1" }, cwd: "/tmp", stdin: "x" });
    assert.deepEqual(fetch.calls[0].json, {
      args: ["cat"],
      timeout_secs: 5,
      env: { A: "1" },
      cwd: "/tmp",
      stdin: "x",
    });
  });

  test("eval: {code}", async () => {
    const res = { result: "2", error: null, exit_code: 0, stdout: "", traceback: null };
    const { ctrl, fetch } = ctrlWith({ json: res });
    assert.deepEqual(await ctrl.evalCode("sb-1", "1+1"), res);
    assert.equal(fetch.calls[0].url, `${BASE}/v1/sandboxes/sb-1/eval`);
    assert.deepEqual(fetch.calls[0].json, { code: "1+1" });
  });
});

describe("files", () => {
  test("readFile returns the raw bytes", async () => {
    const bytes = new Uint8Array([0, 1, 2, 255]);
    const { ctrl, fetch } = ctrlWith({ bytes });
    const out = await ctrl.readFile("sb-1", "/tmp/a b");
    assert.ok(out instanceof Uint8Array);
    assert.deepEqual([...out], [0, 1, 2, 255]);
    assert.equal(fetch.calls[0].method, "GET");
    assert.equal(fetch.calls[0].url, `${BASE}/v1/sandboxes/sb-1/files/content?path=%2Ftmp%2Fa+b`);
    assert.equal(fetch.calls[0].headers.authorization, `Bearer ${TOKEN}`);
  });

  test("writeFile PUTs raw bytes (strings as UTF-8)", async () => {
    const { ctrl, fetch } = ctrlWith({ json: { path: "/tmp/x", size: 3 } });
    assert.deepEqual(await ctrl.writeFile("sb-1", "/tmp/x", "hé"), { path: "/tmp/x", size: 3 });
    let c = fetch.calls[0];
    assert.equal(c.method, "PUT");
    assert.equal(c.url, `${BASE}/v1/sandboxes/sb-1/files/content?path=%2Ftmp%2Fx`);
    assert.equal(c.headers["content-type"], "application/octet-stream");
    assert.deepEqual([...c.body], [0x68, 0xc3, 0xa9]);
    await ctrl.writeFile("sb-1", "/tmp/y", new Uint8Array([9, 8]));
    c = fetch.calls[1];
    assert.deepEqual([...c.body], [9, 8]);
  });
});

describe("errors", () => {
  test("non-2xx maps to ControllerError with status, body, url and the daemon's error", async () => {
    const { ctrl } = ctrlWith({ status: 404, json: { error: "no such sandbox: sb-9" } });
    await assert.rejects(ctrl.getSandbox("sb-9"), (err) => {
      assert.ok(err instanceof ControllerError);
      assert.ok(err instanceof Error);
      assert.equal(err.name, "ControllerError");
      assert.equal(err.status, 404);
      assert.deepEqual(err.body, { error: "no such sandbox: sb-9" });
      assert.equal(err.url, `${BASE}/v1/sandboxes/sb-9`);
      assert.match(err.message, /no such sandbox: sb-9/);
      assert.match(err.message, /404/);
      assert.equal(err.daemonError, "no such sandbox: sb-9");
      return true;
    });
  });

  test("401 and 409 keep their status", async () => {
    for (const [status, msg] of [[401, "invalid bearer token"], [409, "tag exists: b1"]]) {
      const { ctrl } = ctrlWith({ status, json: { error: msg } });
      await assert.rejects(ctrl.branchSandbox("sb-1", { tag: "b1" }), (err) => {
        assert.equal(err.status, status);
        assert.match(err.message, new RegExp(msg));
        return true;
      });
    }
  });

  test("non-JSON error body is kept as text", async () => {
    const { ctrl } = ctrlWith({ status: 502, text: "bad gateway" });
    await assert.rejects(ctrl.listSnapshots(), (err) => {
      assert.ok(err instanceof ControllerError);
      assert.equal(err.status, 502);
      assert.equal(err.body, "bad gateway");
      assert.match(err.message, /bad gateway/);
      return true;
    });
  });

  test("timeout aborts the request", async () => {
    const hang = (_url, init) =>
      new Promise((_resolve, reject) => {
        init.signal.addEventListener("abort", () => reject(init.signal.reason));
      });
    const c = new Controller({ baseUrl: BASE, timeoutMs: 20, fetch: fakeFetch(hang) });
    await assert.rejects(c.listSnapshots(), /no answer within 20 ms/);
  });
});

describe("waitForSnapshot", () => {
  test("polls /info until ready", async () => {
    const { ctrl, fetch } = ctrlWith(
      { json: { ...SNAP, status: "writing" } },
      { json: { ...SNAP, status: "writing" } },
      { json: { ...SNAP, status: "ready", chain_depth: 1 } },
    );
    const info = await ctrl.waitForSnapshot("b1", { pollIntervalMs: 1 });
    assert.equal(info.status, "ready");
    assert.equal(fetch.calls.length, 3);
    for (const c of fetch.calls) assert.equal(c.url, `${BASE}/v1/snapshots/b1/info`);
  });

  test("throws on failed, with the snapshot's error", async () => {
    const { ctrl } = ctrlWith({ json: { ...SNAP, status: "failed", error: "disk full" } });
    await assert.rejects(ctrl.waitForSnapshot("b1", { pollIntervalMs: 1 }), /disk full/);
  });

  test("throws after timeoutMs", async () => {
    const { ctrl } = ctrlWith({ json: { ...SNAP, status: "writing" } });
    await assert.rejects(ctrl.waitForSnapshot("b1", { timeoutMs: 30, pollIntervalMs: 5 }), /still "writing"/);
  });
});

describe("Sandbox", () => {
  test("create spawns one child from the template", async () => {
    const fetch = fakeFetch({ status: 201, json: [SB] });
    const sb = await Sandbox.create({ template: "py", baseUrl: BASE, token: TOKEN, fetch });
    assert.equal(sb.id, "sb-1");
    assert.deepEqual(sb.info, SB);
    assert.equal(fetch.calls[0].url, `${BASE}/v1/sandboxes`);
    assert.equal(fetch.calls[0].headers.authorization, `Bearer ${TOKEN}`);
    assert.deepEqual(fetch.calls[0].json, { snapshot_tag: "py", n: 1, per_child_netns: false });
  });

  test("create reuses a given controller", async () => {
    const { ctrl, fetch } = ctrlWith({ status: 201, json: [SB] });
    const sb = await Sandbox.create({ template: "py", controller: ctrl });
    assert.equal(sb.controller, ctrl);
    assert.equal(fetch.calls.length, 1);
  });

  test("create without template throws", async () => {
    const saved = process.env.FORKD_TAG;
    delete process.env.FORKD_TAG;
    try {
      await assert.rejects(Sandbox.create({}), TypeError);
    } finally {
      if (saved !== undefined) process.env.FORKD_TAG = saved;
    }
  });

  test("forkd v0.5's create({snapshotTag}), and $FORKD_TAG as the default", async () => {
    const { ctrl, fetch } = ctrlWith({ status: 201, json: [SB] });
    await Sandbox.create({ snapshotTag: "py-slim", memoryLimitMib: 256, prewarm: true, controller: ctrl });
    assert.deepEqual(fetch.calls[0].json, {
      snapshot_tag: "py-slim", n: 1, per_child_netns: false, memory_limit_mib: 256, prewarm: true,
    });
    const saved = process.env.FORKD_TAG;
    process.env.FORKD_TAG = "from-env";
    try {
      await Sandbox.create({ controller: ctrl });
      assert.equal(fetch.calls[1].json.snapshot_tag, "from-env");
    } finally {
      if (saved === undefined) delete process.env.FORKD_TAG;
      else process.env.FORKD_TAG = saved;
    }
    await assert.rejects(Sandbox.create({ template: "a", snapshotTag: "b", controller: ctrl }), /disagree/);
    assert.equal(fetch.calls.length, 2);
  });

  test("Sandbox.with kills the sandbox after the callback, also when it throws", async () => {
    const { ctrl, fetch } = ctrlWith(
      { status: 201, json: [SB] },
      { json: { result: "42", error: null, exit_code: 0 } },
      { status: 204 },
      { status: 201, json: [SB] },
      { status: 204 },
    );
    const out = await Sandbox.with({ snapshotTag: "py", controller: ctrl }, (sb) => sb.eval("6*7"));
    assert.equal(out, "42");
    await assert.rejects(
      Sandbox.with({ snapshotTag: "py", controller: ctrl }, async () => {
        throw new Error("boom");
      }),
      /boom/,
    );
    assert.deepEqual(
      fetch.calls.map((c) => `${c.method} ${c.url.slice(BASE.length)}`),
      ["POST /v1/sandboxes", "POST /v1/sandboxes/sb-1/eval", "DELETE /v1/sandboxes/sb-1",
       "POST /v1/sandboxes", "DELETE /v1/sandboxes/sb-1"],
    );
  });

  test("exec(args, {timeoutSecs}) runs argv as is; kill is idempotent", async () => {
    const { ctrl, fetch } = ctrlWith({ json: { stdout: "x\n", stderr: "", exit_code: 0 } }, { status: 204 });
    const sb = new Sandbox(ctrl, SB);
    assert.equal((await sb.exec(["echo", "x"], { timeoutSecs: 5 })).stdout, "x\n");
    assert.deepEqual(fetch.calls[0].json, { args: ["echo", "x"], timeout_secs: 5 });
    await sb.kill();
    await sb.kill();
    assert.equal(fetch.calls.length, 2);
  });

  test("eval returns the result and throws EvalError on a guest error; evalResult never throws", async () => {
    const failed = { result: null, error: "NameError: name 'y' is not defined", exit_code: 1, traceback: "Traceback..." };
    const { ctrl } = ctrlWith(
      { json: failed },
      { json: failed },
      { json: { result: null, error: null, exit_code: 3 } },
      { json: { result: null, error: null, exit_code: 0 } },
    );
    const sb = new Sandbox(ctrl, "sb-1");
    await assert.rejects(sb.eval("y"), (err) => {
      assert.ok(err instanceof EvalError && err instanceof ForkdError && err instanceof Error);
      assert.equal(err.message, "eval error: NameError: name 'y' is not defined");
      assert.equal(err.traceback, "Traceback...");
      assert.deepEqual(err.result, failed);
      return true;
    });
    assert.deepEqual(await sb.evalResult("y"), failed);
    await assert.rejects(sb.eval("import sys; sys.exit(3)"), /exit code 3/);
    assert.equal(await sb.eval("x = 1"), null);
  });

  test("ControllerError is a ForkdError", async () => {
    const { ctrl } = ctrlWith({ status: 404, json: { error: "no such sandbox" } });
    await assert.rejects(ctrl.getSandbox("sb-9"), (err) => err instanceof ForkdError && err instanceof ControllerError);
  });

  test("connect checks the sandbox exists", async () => {
    const { ctrl, fetch } = ctrlWith({ json: SB });
    const sb = await Sandbox.connect("sb-1", { controller: ctrl });
    assert.equal(sb.id, "sb-1");
    assert.equal(fetch.calls[0].method, "GET");
    assert.equal(fetch.calls[0].url, `${BASE}/v1/sandboxes/sb-1`);
  });

  test("commands.run: a string runs through /bin/sh -c, an array as is", async () => {
    const { ctrl, fetch } = ctrlWith({ json: { stdout: "hi\n", stderr: "", exit_code: 0 } });
    const sb = new Sandbox(ctrl, SB);
    const r = await sb.commands.run("echo hi | tr a-z A-Z");
    assert.equal(r.stdout, "hi\n");
    assert.deepEqual(fetch.calls[0].json, {
      args: ["/bin/sh", "-c", "echo hi | tr a-z A-Z"],
      timeout_secs: 30,
    });
    await sb.commands.run(["ls", "-l"], { timeoutSecs: 3, envs: { X: "y" }, cwd: "/", stdin: "in" });
    assert.deepEqual(fetch.calls[1].json, {
      args: ["ls", "-l"],
      timeout_secs: 3,
      env: { X: "y" },
      cwd: "/",
      stdin: "in",
    });
  });

  test("files.read text and bytes; write; list; remove", async () => {
    const entry = { name: "a", path: "/tmp/a", type: "file", size: 2, mode: 0o644, mtime: 1.5 };
    const { ctrl, fetch } = ctrlWith(
      { bytes: new TextEncoder().encode("héllo") },
      { bytes: new Uint8Array([1, 2]) },
      { json: { path: "/tmp/a", size: 2 } },
      { json: [entry] },
      { status: 204 },
    );
    const sb = new Sandbox(ctrl, "sb-1");
    assert.equal(await sb.files.read("/tmp/a"), "héllo");
    assert.deepEqual([...(await sb.files.read("/tmp/a", { format: "bytes" }))], [1, 2]);
    assert.deepEqual(await sb.files.write("/tmp/a", "hi"), { path: "/tmp/a", size: 2 });
    assert.deepEqual(await sb.files.list("/tmp"), [entry]);
    await sb.files.remove("/tmp/d", { recursive: true });
    assert.deepEqual(
      fetch.calls.map((c) => `${c.method} ${c.url.slice(BASE.length)}`),
      [
        "GET /v1/sandboxes/sb-1/files/content?path=%2Ftmp%2Fa",
        "GET /v1/sandboxes/sb-1/files/content?path=%2Ftmp%2Fa",
        "PUT /v1/sandboxes/sb-1/files/content?path=%2Ftmp%2Fa",
        "GET /v1/sandboxes/sb-1/files?path=%2Ftmp",
        "DELETE /v1/sandboxes/sb-1/files?path=%2Ftmp%2Fd&recursive=true",
      ],
    );
  });

  test("eval, branch, kill", async () => {
    const { ctrl, fetch } = ctrlWith(
      { json: { result: "2", error: null, exit_code: 0 } },
      { status: 201, json: SNAP },
      { status: 204 },
    );
    const sb = new Sandbox(ctrl, "sb-1");
    assert.equal(await sb.eval("1+1"), "2");
    assert.equal((await sb.branch({ tag: "b1", mode: "diff", wait: true })).tag, "b1");
    await sb.kill();
    assert.deepEqual(fetch.calls[0].json, { code: "1+1" });
    assert.deepEqual(fetch.calls[1].json, { tag: "b1", mode: "diff" });
    assert.equal(fetch.calls[2].method, "DELETE");
    assert.equal(fetch.calls[2].url, `${BASE}/v1/sandboxes/sb-1`);
  });

  test("branch takes forkd v0.5's {tag, diff, measure_diff}", async () => {
    const { ctrl, fetch } = ctrlWith({ status: 201, json: SNAP });
    await new Sandbox(ctrl, "sb-1").branch({ tag: "b1", measure_diff: true });
    await new Sandbox(ctrl, "sb-1").branch({ diff: true });
    assert.deepEqual(fetch.calls[0].json, { tag: "b1", measure_diff: true });
    assert.deepEqual(fetch.calls[1].json, { diff: true });
  });

  test("fork(n) branches then spawns n children from the branch", async () => {
    const kids = [
      { ...SB, id: "sb-2", snapshot_tag: "b1" },
      { ...SB, id: "sb-3", snapshot_tag: "b1" },
    ];
    const { ctrl, fetch } = ctrlWith({ status: 201, json: SNAP }, { status: 201, json: kids });
    const sb = new Sandbox(ctrl, "sb-1");
    const out = await sb.fork(2);
    assert.deepEqual(out.map((s) => s.id), ["sb-2", "sb-3"]);
    assert.ok(out.every((s) => s instanceof Sandbox && s.controller === ctrl));
    assert.equal(fetch.calls[0].url, `${BASE}/v1/sandboxes/sb-1/branch`);
    assert.deepEqual(fetch.calls[0].json, {});
    assert.equal(fetch.calls[1].url, `${BASE}/v1/sandboxes`);
    assert.deepEqual(fetch.calls[1].json, { snapshot_tag: "b1", n: 2, per_child_netns: false });
  });

  test("fork waits for a snapshot still being written", async () => {
    const { ctrl, fetch } = ctrlWith(
      { status: 202, json: { ...SNAP, status: "writing" } },
      { json: { ...SNAP, status: "ready" } },
      { status: 201, json: [{ ...SB, id: "sb-2" }] },
    );
    const out = await new Sandbox(ctrl, "sb-1").fork(1, { mode: "live" });
    assert.equal(out[0].id, "sb-2");
    assert.deepEqual(
      fetch.calls.map((c) => `${c.method} ${c.url.slice(BASE.length)}`),
      ["POST /v1/sandboxes/sb-1/branch", "GET /v1/snapshots/b1/info", "POST /v1/sandboxes"],
    );
  });
});
