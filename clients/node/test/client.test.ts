// The client against a scripted fake agent: connection reuse, concurrent
// calls, answers cut into bytes, oversized and unknown answers, silence,
// and the exact JSON it sends.

import assert from "node:assert/strict";
import net from "node:net";
import { test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";

import {
  AgentConnectionError,
  AgentError,
  defaultSocketPath,
  isAgentUnreachable,
  isNeedsSignIn,
  TokenAgentClient,
} from "../src/index.js";
import type { WatchEvent } from "../src/index.js";
import { encodeFrame } from "../src/frames.js";
import { startFakeAgent } from "./support/fake-agent.js";

const token = (name: unknown) => ({
  kind: "token",
  access_token: `token-for-${String(name)}`,
  token_type: "Bearer",
  expires_at: 2_000_000_000,
});

test("sequential calls reuse one connection", async (t) => {
  const agent = await startFakeAgent((request) => token(request.name));
  const client = new TokenAgentClient({ socketPath: agent.socketPath });
  t.after(async () => {
    client.close();
    await agent.stop();
  });

  for (let i = 0; i < 5; i++) {
    const answer = await client.get(`s${i}`, { minValidSecs: 30 });
    assert.deepEqual(answer, { accessToken: `token-for-s${i}`, tokenType: "Bearer", expiresAt: 2_000_000_000 });
  }
  assert.equal(agent.connections.accepted, 1);
  assert.deepEqual(agent.requests[0], { op: "get", name: "s0", min_valid_secs: 30 });
});

test("concurrent calls each get their own answer, on at most maxConnections connections", async (t) => {
  // Answers come back after random delays, so a mix-up would show.
  const agent = await startFakeAgent(async (request) => {
    await sleep(Math.random() * 20);
    return token(request.name);
  });
  const client = new TokenAgentClient({ socketPath: agent.socketPath, maxConnections: 3 });
  t.after(async () => {
    client.close();
    await agent.stop();
  });

  const names = Array.from({ length: 40 }, (_, i) => `session-${i}`);
  const answers = await Promise.all(names.map((name) => client.get(name)));
  assert.deepEqual(
    answers.map((answer) => answer.accessToken),
    names.map((name) => `token-for-${name}`),
  );
  assert.equal(agent.connections.mostOpen, 3);
});

test("an answer written one byte at a time is read whole", async (t) => {
  const agent = await startFakeAgent((request) => async (socket: net.Socket) => {
    for (const byte of encodeFrame(token(request.name))) {
      socket.write(Buffer.from([byte]));
      await sleep(0);
    }
  });
  const client = new TokenAgentClient({ socketPath: agent.socketPath });
  t.after(async () => {
    client.close();
    await agent.stop();
  });

  assert.equal((await client.get("dribbled")).accessToken, "token-for-dribbled");
  assert.equal((await client.get("again")).accessToken, "token-for-again");
});

test("a silent agent times out within the limit, and the socket is closed", async (t) => {
  const agent = await startFakeAgent(() => undefined);
  const client = new TokenAgentClient({ socketPath: agent.socketPath, timeoutMs: 300 });
  t.after(async () => {
    client.close();
    await agent.stop();
  });

  const started = Date.now();
  await assert.rejects(client.get("work"), (error: unknown) => {
    assert.ok(error instanceof AgentConnectionError);
    assert.equal(error.code, "timeout");
    assert.ok(isAgentUnreachable(error));
    return true;
  });
  const elapsed = Date.now() - started;
  assert.ok(elapsed >= 290 && elapsed < 1000, `timed out after ${elapsed} ms`);
  await sleep(50);
  assert.equal(agent.connections.open, 0, "the timed-out connection is still open");
});

test("agent errors carry the protocol's code, the provider's error and retry_at", async (t) => {
  const answers: Record<string, object> = {
    gone: {
      kind: "error",
      code: "reauth_required",
      message: "sign in again",
      provider_error: { error: "invalid_grant", codes: ["700082"] },
    },
    later: { kind: "error", code: "temporarily_unavailable", message: "provider down", retry_at: 1_900_000_000 },
    future: { kind: "error", code: "from_the_future", message: "new code" },
  };
  const agent = await startFakeAgent((request) => answers[String(request.name)]);
  const client = new TokenAgentClient({ socketPath: agent.socketPath });
  t.after(async () => {
    client.close();
    await agent.stop();
  });

  await assert.rejects(client.get("gone"), (error: unknown) => {
    assert.ok(isNeedsSignIn(error));
    assert.equal(error.code, "reauth_required");
    assert.equal(error.providerError?.error, "invalid_grant");
    assert.deepEqual(error.providerError?.codes, ["700082"]);
    assert.ok(!isAgentUnreachable(error));
    return true;
  });
  await assert.rejects(client.get("later"), {
    name: "AgentError",
    code: "temporarily_unavailable",
    retryAt: 1_900_000_000,
  });
  await assert.rejects(
    client.get("future"),
    (error: unknown) => error instanceof AgentError && error.code === "internal",
  );
  // An error answer leaves the connection usable.
  assert.equal(agent.connections.accepted, 1);
});

test("an oversized or unreadable answer is a protocol violation, and the next call reconnects", async (t) => {
  let calls = 0;
  const agent = await startFakeAgent((request) => {
    calls += 1;
    if (request.name === "huge")
      return { kind: "token", access_token: "x".repeat(2000), token_type: "Bearer", expires_at: 1 };
    if (request.name === "garbage") return Buffer.from([0, 0, 0, 3, 0x7b, 0x7b, 0x7b]);
    return token(request.name);
  });
  const client = new TokenAgentClient({ socketPath: agent.socketPath, maxResponseBytes: 1000 });
  t.after(async () => {
    client.close();
    await agent.stop();
  });

  await assert.rejects(client.get("huge"), { name: "AgentConnectionError", code: "protocol_violation" });
  await assert.rejects(client.get("garbage"), { name: "AgentConnectionError", code: "protocol_violation" });
  await assert.rejects(client.status("fine"), { code: "protocol_violation" }); // a token answer to status
  assert.equal((await client.get("fine")).accessToken, "token-for-fine");
  assert.equal(calls, 4);
  assert.equal(agent.connections.accepted, 3);
});

test("import sends the documented fields, with defaults for what is left out", async (t) => {
  const agent = await startFakeAgent(() => ({ kind: "done", message: "imported" }));
  const client = new TokenAgentClient({ socketPath: agent.socketPath });
  t.after(async () => {
    client.close();
    await agent.stop();
  });

  const message = await client.importSession({
    name: "web:1",
    issuer: "https://id.example",
    clientId: "app",
    clientSecret: "s3cret",
    refreshToken: "rt",
    accessToken: "at",
    expiresIn: 299.7,
    idleTimeoutSecs: 1800,
    lifetimeSecs: 86_400,
  });
  assert.equal(message, "imported");
  await client.importSession({
    name: "cli",
    issuer: "https://id.example",
    clientId: "public",
    refreshToken: "rt2",
    replace: true,
  });
  assert.deepEqual(agent.requests, [
    {
      op: "import",
      name: "web:1",
      issuer: "https://id.example",
      client_id: "app",
      client_secret: "s3cret",
      client_auth: "basic",
      scopes: [],
      refresh_token: "rt",
      access_token: "at",
      expires_in: 299,
      idle_timeout_secs: 1800,
      lifetime_secs: 86_400,
      replace: false,
    },
    {
      op: "import",
      name: "cli",
      issuer: "https://id.example",
      client_id: "public",
      client_auth: "none",
      scopes: [],
      refresh_token: "rt2",
      replace: true,
    },
  ]);
});

test("a connection that died while idle is replaced for get, not for import", async (t) => {
  const agent = await startFakeAgent((request) =>
    request.op === "get" ? token(request.name) : { kind: "done", message: "ok" },
  );
  const client = new TokenAgentClient({ socketPath: agent.socketPath });
  t.after(async () => {
    client.close();
    await agent.stop();
  });

  await client.get("one");
  // As a restarted agent would: the client learns of it only when it uses the connection.
  agent.dropConnections();
  assert.equal((await client.get("two")).accessToken, "token-for-two");
  assert.equal(agent.connections.accepted, 2);

  agent.dropConnections();
  const importing = client.importSession({ name: "n", issuer: "i", clientId: "c", refreshToken: "r" });
  await assert.rejects(importing, { name: "AgentConnectionError", code: "connection_lost" });
});

test("watch yields each change once, reports removal and agent trouble, and stops on abort", async (t) => {
  const states = ["fresh", "fresh", "refreshing", "fresh", "gone", "silent", "needs_sign_in"];
  let step = 0;
  const agent = await startFakeAgent(() => {
    const state = states[Math.min(step++, states.length - 1)];
    if (state === "gone") return { kind: "error", code: "no_such_session", message: "none" };
    if (state === "silent") return undefined;
    return {
      kind: "status",
      session: {
        name: "w",
        issuer: "i",
        client_id: "c",
        token_endpoint: "e",
        scopes: [],
        state,
        state_since: step,
        consecutive_failures: 0,
        has_refresh_token: state !== "needs_sign_in",
      },
    };
  });
  const client = new TokenAgentClient({ socketPath: agent.socketPath, timeoutMs: 200 });
  const controller = new AbortController();
  t.after(async () => {
    controller.abort();
    client.close();
    await agent.stop();
  });

  const seen: string[] = [];
  for await (const event of client.watch("w", { intervalMs: 10, signal: controller.signal })) {
    seen.push(describe(event));
    if (event.type === "status" && event.status.state === "needs_sign_in") break;
  }
  // The second "fresh" differs in state_since, so it is a change too.
  assert.deepEqual(seen, ["fresh", "fresh", "refreshing", "fresh", "removed", "error:timeout", "needs_sign_in"]);

  const aborted = new AbortController();
  aborted.abort();
  const none: WatchEvent[] = [];
  for await (const event of client.watch("w", { signal: aborted.signal })) none.push(event);
  assert.deepEqual(none, []);
});

test("the default socket is found as the agent finds it", () => {
  assert.equal(defaultSocketPath({ TOKEN_AGENT_SOCK: "/s/a.sock", XDG_RUNTIME_DIR: "/run/user/1" }), "/s/a.sock");
  assert.equal(
    defaultSocketPath({ TOKEN_AGENT_SOCK: "", XDG_RUNTIME_DIR: "/run/user/1" }),
    "/run/user/1/token-agent/agent.sock",
  );
  assert.match(defaultSocketPath({}), /\/token-agent-\d+\/agent\.sock$/);
});

function describe(event: WatchEvent): string {
  if (event.type === "status") return event.status.state;
  if (event.type === "error") return `error:${event.error.code}`;
  return event.type;
}
