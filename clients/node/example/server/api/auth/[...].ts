// Example: a Nuxt app's auth route (server/api/auth/[...].ts) with
// @sidebase/nuxt-auth and Keycloak, where token-agent keeps each user's
// tokens fresh. Copy it with nuxt-auth-handler.ts; in the app, '#auth',
// '#imports' and next-auth bring their own types (nuxt-env.d.ts stands in
// for them here).

import { NuxtAuthHandler } from "#auth";
import { useRuntimeConfig } from "#imports";
import KeycloakProvider from "next-auth/providers/keycloak";
import { TokenAgentClient } from "token-agent-client";

import { agentAuth } from "../../../nuxt-auth-handler.js";

const config = useRuntimeConfig();
const keycloak = {
  issuer: config.keycloak.issuer,
  clientId: config.keycloak.clientId,
  clientSecret: config.keycloak.clientSecret,
};

// One client for the server process; it finds the agent at $TOKEN_AGENT_SOCK
// or the default socket, and gives up on a call after 3 s.
const tokenAgent = new TokenAgentClient({ timeoutMs: 3000 });

export default NuxtAuthHandler({
  secret: config.authSecret,
  providers: [KeycloakProvider(keycloak)],
  ...agentAuth({ client: tokenAgent, ...keycloak, sessionPrefix: "shop:" }),
});
