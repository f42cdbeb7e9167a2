// Integration test against a running forkd daemon.
//
//   FORKD_URL=http://127.0.0.1:8889 FORKD_TEST_TAG=<ready snapshot tag> [FORKD_TOKEN=...] \
//     npm run test:integration
//
// Skipped (with the reason printed) unless FORKD_URL and FORKD_TEST_TAG are both set.
import { test } from "node:test";
import assert from "node:assert/strict";

import { Controller, EvalError, Sandbox } from "../dist/index.js";

const url = process.env.FORKD_URL;
const tag = process.env.FORKD_TEST_TAG;
const missing = [!url && "FORKD_URL", !tag && "FORKD_TEST_TAG"].filter(Boolean);
const skip = missing.length ? `${missing.join(" and ")} not set; set both to run against a daemon` : false;
if (skip) console.log(`integration test skipped: ${skip}`);

test("spawn, exec, eval, files, branch, fork from the branch, clean up", { skip, timeout: 600_000 }, async (t) => {
  // baseUrl and token come from FORKD_URL / FORKD_TOKEN.
  const ctrl = new Controller({ timeoutMs: 120_000 });
  const health = await ctrl.healthz();
  assert.equal(health.ok, true);

  const spawned = [];
  const branchTag = `ts-it-${Date.now().toString(36)}-${process.pid}`;
  let branched = false;
  try {
    const sb = await Sandbox.create({ template: tag, controller: ctrl });
    spawned.push(sb.id);
    assert.equal(sb.info?.snapshot_tag, tag);

    await t.test("exec echo hi", async () => {
      const r = await sb.commands.run(["echo", "hi"]);
      assert.equal(r.exit_code, 0, r.stderr);
      assert.equal(r.stdout, "hi\n");
    });

    await t.test("eval 1+1", async () => {
      assert.equal(await sb.eval("1+1"), "2");
      const r = await sb.evalResult("print('out'); 1/0");
      assert.match(r.error ?? "", /ZeroDivisionError/);
      assert.equal(r.stdout, "out\n");
      await assert.rejects(sb.eval("1/0"), (err) => err instanceof EvalError && /ZeroDivision/.test(err.message));
    });

    await t.test("forkd v0.5 spellings: exec, Sandbox.with({snapshotTag})", async () => {
      const r = await sb.exec(["sh", "-c", "echo v05"], { timeoutSecs: 10 });
      assert.equal(r.stdout, "v05\n");
      let inside;
      const out = await Sandbox.with({ snapshotTag: tag, controller: ctrl }, async (s) => {
        inside = s.id;
        return s.eval("6 * 7");
      });
      assert.equal(out, "42");
      const live = await ctrl.listSandboxes();
      assert.ok(!live.some((s) => s.id === inside), "Sandbox.with killed its sandbox");
    });

    await t.test("write + read a file", async () => {
      const path = `/tmp/forkd-ts-${process.pid}.txt`;
      const text = "hello from the TypeScript SDK\n";
      const w = await sb.files.write(path, text);
      assert.equal(w.size, Buffer.byteLength(text));
      assert.equal(await sb.files.read(path), text);
      const bytes = await sb.files.read(path, { format: "bytes" });
      assert.equal(Buffer.from(bytes).toString("utf8"), text);
    });

    let snap;
    await t.test("branch (default mode, wait)", async () => {
      snap = await sb.branch({ tag: branchTag });
      branched = true;
      assert.equal(snap.tag, branchTag);
      assert.equal(snap.status, "ready");
      assert.equal(snap.bootable, true);
    });

    await t.test("spawn one child from the branch and eval in it", async () => {
      const [child] = await ctrl.spawnSandboxes({ snapshotTag: snap.tag, n: 1 });
      spawned.push(child.id);
      assert.equal(child.snapshot_tag, branchTag);
      const r = await ctrl.evalCode(child.id, "1+1");
      assert.equal(r.error, null, r.traceback ?? undefined);
      assert.equal(String(r.result).trim(), "2");
    });
  } finally {
    const errors = [];
    for (const id of spawned) {
      try {
        await ctrl.killSandbox(id);
      } catch (err) {
        errors.push(err);
      }
    }
    if (branched) {
      try {
        await ctrl.deleteSnapshot(branchTag);
      } catch (err) {
        errors.push(err);
      }
    }
    if (errors.length) throw new AggregateError(errors, `cleanup failed: ${errors.map(String).join("; ")}`);
  }
});
