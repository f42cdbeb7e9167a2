// Drives forkd through the unmodified npm `e2b` and `@e2b/code-interpreter` SDKs.
// Usage: node sdk_js.cjs TEMPLATE NODE_PROJECT_DIR (where both packages are installed).
// Prints one JSON object: what each step observed (or the error it raised).
"use strict";
const path = require("path");
const { createRequire } = require("module");

const req = createRequire(path.join(process.argv[3], "package.json"));
const { Sandbox, CommandExitError } = req("e2b");
const CI = req("@e2b/code-interpreter");

const out = {};

async function step(name, fn) {
  try {
    out[name] = await fn();
  } catch (e) {
    out[name] = { raised: e && e.name, message: String(e && e.message).slice(0, 500) };
  }
}

async function main(template) {
  const t0 = Date.now();
  const sbx = await Sandbox.create(template, { envs: { FOO: "bar" }, timeoutMs: 120000 });
  out.sandbox_id = sbx.sandboxId;
  await step("echo", async () => {
    const r = await sbx.commands.run("echo hi");
    return { stdout: r.stdout, exit_code: r.exitCode };
  });
  out.first_result_s = (Date.now() - t0) / 1000;
  await step("failing", async () => {
    try {
      await sbx.commands.run("exit 3");
      return { exception: null };
    } catch (e) {
      return { exception: e instanceof CommandExitError ? "CommandExitError" : e.name,
               exit_code: e.exitCode };
    }
  });
  await step("env", async () => (await sbx.commands.run("echo $FOO")).stdout);
  await step("streaming", async () => {
    const seen = [];
    await sbx.commands.run("echo one; sleep 2; echo two", {
      onStdout: (s) => seen.push([Date.now(), s]),
    });
    const end = Date.now();
    return { chunks: seen.map((x) => x[1]), first_before_end_s: (end - seen[0][0]) / 1000 };
  });
  await step("background", async () => {
    const h = await sbx.commands.run("sleep 120", { background: true });
    const listed = (await sbx.commands.list()).map((p) => p.pid).includes(h.pid);
    const killed = await h.kill();
    let waited = "returned";
    try {
      await h.wait();
    } catch (e) {
      waited = `exit ${e.exitCode}`;
    }
    return { listed, killed, waited };
  });
  await step("files", async () => {
    await sbx.files.write("notes/js.txt", "from js");
    const content = await sbx.files.read("notes/js.txt");
    const names = (await sbx.files.list("notes")).map((e) => e.name);
    await sbx.files.remove("notes/js.txt");
    const exists = await sbx.files.exists("notes/js.txt");
    return { content, names, exists };
  });
  await step("connect", async () => {
    const other = await Sandbox.connect(sbx.sandboxId);
    return (await other.commands.run("echo second")).stdout;
  });
  await step("kill", async () => ({ first: await sbx.kill(), second: await Sandbox.kill(sbx.sandboxId) }));

  await step("interpreter", async () => {
    const c = await CI.Sandbox.create(template);
    await c.runCode("x = 1");
    const text = (await c.runCode("x + 1")).text;
    const err = (await c.runCode("1 / 0")).error;
    const logs = (await c.runCode("print('hello')")).logs;
    await c.kill();
    return { text, error: err && err.name, traceback: !!(err && err.traceback.includes("ZeroDivisionError")),
             stdout: logs.stdout };
  });
}

main(process.argv[2])
  .catch((e) => {
    out.fatal = { raised: e && e.name, message: String(e && e.message).slice(0, 1000), stack: String(e && e.stack).slice(0, 2000) };
  })
  .finally(() => console.log(JSON.stringify(out)));
