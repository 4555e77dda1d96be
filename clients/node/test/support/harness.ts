// End-to-end test harness: the real OpenID provider (tests/provider, Node)
// and the real token-agent binary (target/debug) as child processes, each
// stopped when its test ends, pass or fail.

import { execFile, spawn } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, openSync, readFileSync, rmSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";
import type { TestContext } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

/** The repository's root: the first folder up from here holding tests/provider/server.mjs. */
export const repoRoot = findRoot(path.dirname(fileURLToPath(import.meta.url)));
const providerDir = path.join(repoRoot, "tests", "provider");

/** The token endpoint's answer at sign-in. */
export interface SignInAnswer {
  access_token: string;
  refresh_token: string;
  expires_in: number;
  id_token?: string;
  scope?: string;
}

export interface ProviderStats {
  refresh_requests: number;
  distinct_refresh_tokens: number;
  replays: number;
}

/** Client agent-basic's credentials at the test provider. */
export const CLIENT_ID = "agent-basic";
export const CLIENT_SECRET = "basic-secret";
const BASIC_AUTH = "Basic " + Buffer.from(`${CLIENT_ID}:${CLIENT_SECRET}`).toString("base64");

/** Every child started by this test file, killed at exit as a last resort. */
const children = new Set<ChildProcess>();
process.on("exit", () => {
  for (const child of children) child.kill("SIGKILL");
});

/** A running oidc-provider with rotating refresh tokens. */
export class Provider {
  private constructor(readonly issuer: string) {}

  /** Starts a provider whose access tokens live `accessTtl` seconds; stopped when `t` ends. */
  static async start(t: TestContext, accessTtl = 5): Promise<Provider> {
    if (!existsSync(path.join(providerDir, "node_modules", "oidc-provider"))) {
      throw new Error("oidc-provider is not installed: run `npm ci --prefix tests/provider` (scripts/test.sh does)");
    }
    const child = spawn(process.execPath, ["server.mjs"], {
      cwd: providerDir,
      env: { ...process.env, ACCESS_TOKEN_TTL: String(accessTtl), PORT: "0" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    track(t, child);
    let errors = "";
    child.stderr!.on("data", (chunk: Buffer) => {
      errors = (errors + chunk.toString()).slice(-4000);
    });
    const lines = createInterface({ input: child.stdout! });
    const first = await Promise.race([
      new Promise<string>((resolve) => lines.once("line", resolve)),
      sleep(20_000, "", { ref: false }),
      new Promise<string>((resolve) => child.once("exit", () => resolve(""))),
    ]);
    if (!first) throw new Error(`the test provider did not start:\n${errors}`);
    return new Provider(JSON.parse(first).issuer as string);
  }

  /** Signs `login` in through the provider's pages; the token endpoint's answer. */
  async signIn(login: string): Promise<SignInAnswer> {
    const { stdout } = await promisify(execFile)(
      process.execPath,
      [
        "sign-in.mjs",
        "--issuer",
        this.issuer,
        "--client-id",
        CLIENT_ID,
        "--client-secret",
        CLIENT_SECRET,
        "--login",
        login,
      ],
      { cwd: providerDir, timeout: 20_000 },
    );
    return JSON.parse(stdout) as SignInAnswer;
  }

  async stats(): Promise<ProviderStats> {
    return (await (await fetch(`${this.issuer}/test/stats`)).json()) as ProviderStats;
  }

  async resetStats(): Promise<void> {
    await fetch(`${this.issuer}/test/reset-stats`, { method: "POST" });
  }

  /** Whether the provider takes `token` as an active access token. */
  async isActive(token: string): Promise<boolean> {
    const answer = await this.form("/token/introspection", { token });
    return answer.active === true;
  }

  /** Presents a refresh token directly, as a stray second holder would. */
  async refreshDirectly(refreshToken: string): Promise<Record<string, unknown>> {
    return this.form("/token", { grant_type: "refresh_token", refresh_token: refreshToken });
  }

  private async form(endpoint: string, fields: Record<string, string>): Promise<Record<string, unknown>> {
    const response = await fetch(this.issuer + endpoint, {
      method: "POST",
      headers: { authorization: BASIC_AUTH, accept: "application/json" },
      body: new URLSearchParams(fields),
    });
    return (await response.json()) as Record<string, unknown>;
  }
}

/** A running token-agent on a private socket and store. */
export class Agent {
  private constructor(
    readonly socketPath: string,
    readonly logPath: string,
    private readonly child: ChildProcess,
  ) {}

  /** Starts token-agent in a fresh temporary folder and waits until it listens; stopped when `t` ends. */
  static async start(t: TestContext, extraArgs: string[] = []): Promise<Agent> {
    const binary = process.env.TOKEN_AGENT_BIN ?? path.join(repoRoot, "target", "debug", "token-agent");
    if (!existsSync(binary)) {
      throw new Error(
        `${binary} is missing: build it first with \`cargo build --workspace --bins\` (scripts/test.sh does)`,
      );
    }
    const dir = mkdtempSync(path.join(os.tmpdir(), "token-agent-node-"));
    t.after(() => rmSync(dir, { recursive: true, force: true }));
    const socketPath = path.join(dir, "run", "agent.sock");
    const logPath = path.join(dir, "agent.log");
    const child = spawn(binary, ["--socket", socketPath, "--store-dir", path.join(dir, "store"), ...extraArgs], {
      env: { ...process.env, RUST_LOG: "token_agent=debug", NO_COLOR: "1" },
      stdio: ["ignore", "ignore", openSync(logPath, "w")],
    });
    track(t, child);

    const agent = new Agent(socketPath, logPath, child);
    const deadline = Date.now() + 20_000;
    while (!(await accepts(socketPath))) {
      if (child.exitCode !== null || Date.now() > deadline) {
        throw new Error(`token-agent did not start listening:\n${agent.log()}`);
      }
      await sleep(20);
    }
    return agent;
  }

  /** Stops the agent with SIGSTOP and waits until it is stopped (Linux: /proc/PID/stat). */
  async freeze(): Promise<void> {
    this.child.kill("SIGSTOP");
    const stat = `/proc/${this.child.pid}/stat`;
    // The state is the field after the parenthesised command name.
    await waitUntil(5000, "the agent is stopped", () => /\) T /.test(readFileSync(stat, "utf8")));
  }

  /** Kills the agent with SIGKILL and waits for it to exit; its socket file stays behind. */
  async killHard(): Promise<void> {
    const exited = new Promise((resolve) => this.child.once("exit", resolve));
    this.child.kill("SIGKILL");
    await exited;
  }

  log(): string {
    return existsSync(this.logPath) ? readFileSync(this.logPath, "utf8") : "";
  }
}

/** Polls `check` every 50 ms until it holds; fails after `limitMs`. */
export async function waitUntil(limitMs: number, what: string, check: () => Promise<boolean> | boolean): Promise<void> {
  const deadline = Date.now() + limitMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`);
    await sleep(50);
  }
}

function track(t: TestContext, child: ChildProcess): void {
  children.add(child);
  child.once("exit", () => children.delete(child));
  t.after(async () => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((resolve) => child.once("exit", resolve));
    child.kill("SIGKILL");
    await exited;
  });
}

function accepts(socketPath: string): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.createConnection({ path: socketPath });
    socket.once("connect", () => {
      socket.destroy();
      resolve(true);
    });
    socket.once("error", () => resolve(false));
  });
}

function findRoot(from: string): string {
  for (let dir = from; ; dir = path.dirname(dir)) {
    if (existsSync(path.join(dir, "tests", "provider", "server.mjs"))) return dir;
    if (path.dirname(dir) === dir) throw new Error(`no repository root above ${from}`);
  }
}
