// The server the tests talk to: a real `probeserve serve` on the tiny test model, started here
// through the repository's Python helper (tests/support/serve_tiny.py), or one already running
// when PROBESERVE_TARGET names it.
//
// The helper runs on PROBESERVE_PYTHON, else the repository's .venv/bin/python (what `make setup`
// makes), else python3; it needs the server package importable (an editable install, or
// PYTHONPATH). It prints the target once the server is SERVING and stops it when its stdin
// closes, so the server never outlives this process.

import { type ChildProcess, spawn } from "node:child_process";
import { once } from "node:events";
import { existsSync } from "node:fs";
import path from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

// dist/test/server.js -> the repository root, four directories up.
export const REPO_ROOT = fileURLToPath(new URL("../../../../", import.meta.url));
const STOP_TIMEOUT_MS = 90_000;

export interface TestServer {
  target: string;
  /** The served bundle's directory on the server's machine (empty for PROBESERVE_TARGET). */
  bundle: string;
  stop(): Promise<void>;
}

function python(): string {
  const venv = path.join(REPO_ROOT, ".venv", "bin", "python");
  return process.env.PROBESERVE_PYTHON ?? (existsSync(venv) ? venv : "python3");
}

async function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) {
    return;
  }
  const exited = once(child, "exit");
  child.stdin?.end(); // the helper stops the server and exits
  const timer = setTimeout(() => child.kill("SIGTERM"), STOP_TIMEOUT_MS);
  await exited;
  clearTimeout(timer);
}

/** Start the tiny-model server (or use PROBESERVE_TARGET); `args` go to `probeserve serve`. */
export async function startServer(args: string[] = []): Promise<TestServer> {
  const given = process.env.PROBESERVE_TARGET;
  if (given) {
    return { target: given, bundle: "", stop: async () => {} };
  }
  const child = spawn(python(), ["-m", "tests.support.serve_tiny", ...args], {
    cwd: REPO_ROOT,
    stdio: ["pipe", "pipe", "pipe"],
  });
  let log = "";
  child.stderr?.setEncoding("utf8");
  child.stderr?.on("data", (chunk: string) => {
    log = (log + chunk).slice(-8000);
  });
  const lines = createInterface({ input: child.stdout! });
  const exited = once(child, "exit").then(([code]) => {
    throw new Error(`the test server helper exited (${code}) before serving:\n${log}`);
  });
  const first = new Promise<string>((resolve) => lines.once("line", resolve));
  try {
    const line = await Promise.race([first, exited]);
    const { target, bundle } = JSON.parse(line) as { target: string; bundle: string };
    exited.catch(() => {}); // from now on, its exit is expected (stop())
    return { target, bundle, stop: () => stopChild(child) };
  } catch (error) {
    child.kill("SIGTERM");
    throw error;
  }
}
