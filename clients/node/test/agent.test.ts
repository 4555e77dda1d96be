// The client against the real token-agent and a real OpenID provider with
// rotating refresh tokens and 5-second access tokens: import, gets across
// rotations, one refresh for many concurrent gets, a revoked grant, and an
// agent that is not running or not answering.

import assert from "node:assert/strict";
import { test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";

import { AgentError, isAgentUnreachable, isNeedsSignIn, sessionNameForUser, TokenAgentClient } from "../src/index.js";
import type { ImportSessionRequest, SessionStatus } from "../src/index.js";
import { Agent, CLIENT_ID, CLIENT_SECRET, Provider, waitUntil } from "./support/harness.js";
import type { SignInAnswer } from "./support/harness.js";

const ACCESS_TTL = 5;

function signInImport(provider: Provider, name: string, answer: SignInAnswer): ImportSessionRequest {
  return {
    name,
    issuer: provider.issuer,
    clientId: CLIENT_ID,
    clientSecret: CLIENT_SECRET,
    scopes: ["openid", "offline_access"],
    refreshToken: answer.refresh_token,
    accessToken: answer.access_token,
    expiresIn: answer.expires_in,
  };
}

function clientFor(t: { after: (fn: () => void) => void }, agent: Agent, timeoutMs = 10_000): TokenAgentClient {
  const client = new TokenAgentClient({ socketPath: agent.socketPath, timeoutMs });
  t.after(() => client.close());
  return client;
}

test("an imported sign-in is served as is, then kept fresh across rotations", { timeout: 60_000 }, async (t) => {
  const provider = await Provider.start(t, ACCESS_TTL);
  const agent = await Agent.start(t);
  const client = clientFor(t, agent);

  const answer = await provider.signIn("alice");
  const name = sessionNameForUser("alice", { issuer: provider.issuer });
  await client.importSession(signInImport(provider, name, answer));

  // The sign-in's own access token, without a refresh.
  const first = await client.get(name);
  assert.equal(first.accessToken, answer.access_token);
  assert.equal((await provider.stats()).refresh_requests, 0);

  const controller = new AbortController();
  const watched: SessionStatus[] = [];
  const watching = (async () => {
    for await (const event of client.watch(name, { intervalMs: 200, signal: controller.signal })) {
      if (event.type === "status") watched.push(event.status);
    }
  })();

  // Keep asking, through three rotations; every token served must work.
  const seen = new Set([first.accessToken]);
  await waitUntil(40_000, "three rotations", async () => {
    const token = await client.get(name);
    assert.ok(token.expiresAt * 1000 > Date.now() - 1000, "an expired token was served");
    if (!seen.has(token.accessToken)) {
      seen.add(token.accessToken);
      assert.ok(await provider.isActive(token.accessToken), "the agent served a token the provider refuses");
    }
    await sleep(250);
    return (await provider.stats()).refresh_requests >= 3;
  });
  assert.ok(seen.size >= 3, `only ${seen.size} distinct tokens served`);
  assert.equal((await provider.stats()).replays, 0);

  controller.abort();
  await watching;
  const refreshTimes = new Set(watched.map((status) => status.lastRefreshAt).filter((at) => at !== undefined));
  assert.ok(refreshTimes.size >= 2, `watch saw ${refreshTimes.size} refreshes`);
  assert.ok(watched.every((status) => status.name === name && status.issuer === provider.issuer));

  const status = await client.status(name);
  assert.ok(["fresh", "refreshing"].includes(status.state), status.state);
  assert.equal(status.hasRefreshToken, true);
  assert.deepEqual(
    (await client.list()).map((session) => session.name),
    [name],
  );

  // Longer than the provider's tokens live: the agent says so.
  await assert.rejects(client.get(name, { minValidSecs: 60 }), { name: "AgentError", code: "insufficient_validity" });

  assert.match(await client.remove(name), /removed/);
  await assert.rejects(client.get(name), { code: "no_such_session" });
});

test(
  "fifty concurrent gets of an expired token cause one refresh and get one token",
  { timeout: 40_000 },
  async (t) => {
    const provider = await Provider.start(t, ACCESS_TTL);
    const agent = await Agent.start(t);
    const setup = clientFor(t, agent);

    // Idle sessions are not refreshed ahead, so this token lapses.
    const answer = await provider.signIn("busy");
    await setup.importSession({ ...signInImport(provider, "busy", answer), idleTimeoutSecs: 1 });
    await sleep((ACCESS_TTL + 1) * 1000);
    const status = await setup.status("busy");
    assert.ok(status.accessExpiresAt! * 1000 <= Date.now(), "the token has not expired yet");
    await provider.resetStats();

    // 40 separate clients (connections, as from 40 request handlers) and
    // one shared client running 10 calls at once over its pool.
    const separate = Array.from({ length: 40 }, () => clientFor(t, agent));
    await Promise.all(separate.map((client) => client.ping()));
    const shared = clientFor(t, agent);
    const tokens = await Promise.all([
      ...separate.map((client) => client.get("busy")),
      ...Array.from({ length: 10 }, () => shared.get("busy")),
    ]);

    const stats = await provider.stats();
    assert.equal(stats.refresh_requests, 1, JSON.stringify(stats));
    const distinct = new Set(tokens.map((token) => token.accessToken));
    assert.equal(distinct.size, 1, "the waiting clients got different tokens");
    assert.ok(await provider.isActive(tokens[0]!.accessToken));
  },
);

test("a revoked grant surfaces as needs sign-in", { timeout: 30_000 }, async (t) => {
  const provider = await Provider.start(t, ACCESS_TTL);
  const agent = await Agent.start(t);
  const client = clientFor(t, agent);

  // Without the access token the agent refreshes at once, so the sign-in's
  // refresh token is used up...
  const answer = await provider.signIn("stolen");
  await client.importSession({
    ...signInImport(provider, "stolen", answer),
    accessToken: undefined,
    expiresIn: undefined,
  });
  assert.equal((await provider.stats()).refresh_requests, 1);
  // ...and someone presenting it again makes the provider revoke the grant.
  const replayed = await provider.refreshDirectly(answer.refresh_token);
  assert.equal(replayed.error, "invalid_grant");

  await assert.rejects(client.refresh("stolen"), (error: unknown) => {
    assert.ok(isNeedsSignIn(error), String(error));
    assert.equal(error.providerError?.error, "invalid_grant");
    assert.ok(!error.message.includes(answer.refresh_token));
    return true;
  });
  const started = Date.now();
  await assert.rejects(
    client.get("stolen"),
    (error: unknown) => error instanceof AgentError && error.code === "reauth_required",
  );
  assert.ok(Date.now() - started < 2000);

  const status = await client.status("stolen");
  assert.equal(status.state, "needs_sign_in");
  assert.equal(status.hasRefreshToken, false);

  // A new sign-in imported over it is served again.
  const again = await provider.signIn("stolen");
  await client.importSession({ ...signInImport(provider, "stolen", again), replace: true });
  assert.equal((await client.get("stolen")).accessToken, again.access_token);
});

test(
  "an agent that is not running, stopped or killed is unreachable within the time limit",
  { timeout: 30_000 },
  async (t) => {
    // No agent ever started on this socket.
    const nowhere = new TokenAgentClient({ socketPath: "/nonexistent/token-agent/agent.sock", timeoutMs: 1000 });
    let started = Date.now();
    await assert.rejects(nowhere.get("work"), (error: unknown) => {
      assert.ok(isAgentUnreachable(error));
      assert.equal(error.code, "unreachable");
      assert.match(error.message, /not reachable .*ENOENT/);
      return true;
    });
    assert.ok(Date.now() - started < 1000);

    const agent = await Agent.start(t);
    const client = clientFor(t, agent, 1500);
    await client.ping(); // a pooled connection from now on

    // Stopped (SIGSTOP): the kernel still accepts connections, nobody answers.
    await agent.freeze();
    const fresh = clientFor(t, agent, 1500);
    for (const which of [client, fresh]) {
      started = Date.now();
      await assert.rejects(which.get("work"), { name: "AgentConnectionError", code: "timeout" });
      const elapsed = Date.now() - started;
      assert.ok(elapsed >= 1400 && elapsed < 3000, `gave up after ${elapsed} ms`);
    }

    // Killed: its socket file is left behind, and refuses connections.
    await agent.killHard();
    started = Date.now();
    await assert.rejects(client.get("work"), { name: "AgentConnectionError", code: "unreachable" });
    assert.ok(Date.now() - started < 1500);
  },
);
