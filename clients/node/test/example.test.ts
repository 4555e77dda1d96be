// The Nuxt example's callbacks, called as next-auth calls them, against the
// real agent and provider: sign-in imports, the session callback serves the
// agent's token, a revoked grant becomes the refresh error flag, sign-out
// removes the session, and a missing agent becomes a passing error flag.

import assert from "node:assert/strict";
import { test } from "node:test";

import { agentAuth } from "../example/nuxt-auth-handler.js";
import type { Account, JWT, Session } from "../example/nuxt-auth-handler.js";
import { sessionNameForUser, TokenAgentClient } from "../src/index.js";
import { Agent, CLIENT_ID, CLIENT_SECRET, Provider } from "./support/harness.js";

const emptySession = (): Session => ({ user: { name: "Alice" }, expires: "2099-01-01T00:00:00.000Z" });

test("the Nuxt callbacks hand the sign-in to the agent and serve its tokens", { timeout: 30_000 }, async (t) => {
  const provider = await Provider.start(t, 5);
  const agent = await Agent.start(t);
  const client = new TokenAgentClient({ socketPath: agent.socketPath });
  t.after(() => client.close());
  const auth = agentAuth({
    client,
    issuer: provider.issuer,
    clientId: CLIENT_ID,
    clientSecret: CLIENT_SECRET,
    minValidSecs: 0,
  });

  // Sign-in: next-auth passes the provider's answer as `account`.
  const answer = await provider.signIn("alice");
  const account: Account = {
    provider: "keycloak",
    type: "oauth",
    providerAccountId: "alice",
    access_token: answer.access_token,
    refresh_token: answer.refresh_token,
    expires_at: Math.floor(Date.now() / 1000) + answer.expires_in,
    scope: answer.scope,
    token_type: "bearer",
  };
  const signedIn = await auth.callbacks.jwt({ token: { sub: "alice", name: "Alice" }, account });
  assert.equal(signedIn.agentSession, sessionNameForUser("alice", { issuer: provider.issuer }));
  const cookie = JSON.stringify(signedIn);
  assert.ok(!cookie.includes(answer.refresh_token) && !cookie.includes(answer.access_token), "tokens in the JWT");

  // Later requests: the jwt callback changes nothing, the session callback asks the agent.
  const token: JWT = await auth.callbacks.jwt({ token: signedIn, account: null });
  assert.deepEqual(token, signedIn);
  const session = await auth.callbacks.session({ session: emptySession(), token });
  assert.equal(session.accessToken, answer.access_token);
  assert.equal(session.error, undefined);
  assert.equal((await provider.stats()).refresh_requests, 0);

  // The grant is revoked elsewhere; the agent's next refresh is refused.
  await provider.refreshDirectly(answer.refresh_token);
  await assert.rejects(client.refresh(token.agentSession!), { code: "reauth_required" });
  const revoked = await auth.callbacks.session({ session: emptySession(), token });
  assert.equal(revoked.error, "RefreshAccessTokenError");
  assert.equal(revoked.accessToken, undefined);

  // Signing in again replaces the dead session.
  const again = await provider.signIn("alice");
  const renewed = await auth.callbacks.jwt({
    token: { ...token, error: "RefreshAccessTokenError" },
    account: { ...account, access_token: again.access_token, refresh_token: again.refresh_token },
  });
  assert.equal(renewed.error, undefined);
  assert.equal(
    (await auth.callbacks.session({ session: emptySession(), token: renewed })).accessToken,
    again.access_token,
  );

  // Sign-out forgets it.
  await auth.events.signOut({ token: renewed });
  await assert.rejects(client.status(renewed.agentSession!), { code: "no_such_session" });
  assert.equal(
    (await auth.callbacks.session({ session: emptySession(), token: renewed })).error,
    "RefreshAccessTokenError",
  );
});

test("without an agent the session callback answers at once with a passing error flag", async (t) => {
  const client = new TokenAgentClient({ socketPath: "/nonexistent/agent.sock", timeoutMs: 1000 });
  t.after(() => client.close());
  const auth = agentAuth({ client, issuer: "https://sso.example.com/realms/acme", clientId: "app", clientSecret: "s" });

  const warn = t.mock.method(console, "warn", () => undefined);
  const session = await auth.callbacks.session({
    session: emptySession(),
    token: { sub: "alice", agentSession: "web:0" },
  });
  assert.equal(session.error, "AccessTokenUnavailable");
  assert.equal(warn.mock.callCount(), 1);
});
