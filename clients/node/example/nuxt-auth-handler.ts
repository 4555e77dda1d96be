// Example: the NuxtAuthHandler callbacks (@sidebase/nuxt-auth, authjs
// provider, next-auth v4 underneath) that hand each user's tokens to
// token-agent at sign-in and ask it for a current access token afterwards,
// instead of refreshing in the `jwt` callback. server/api/auth/[...].ts
// shows where they go; the types below are the parts of next-auth's types
// these callbacks use, declared here so the example needs no Nuxt install.

import { AgentError, isNeedsSignIn, sessionNameForUser, TokenAgentClient } from "token-agent-client";

/**
 * What the app's pages check on the session, as with a hand-rolled refresh:
 * - `RefreshAccessTokenError`: the user must sign in again;
 * - `AccessTokenUnavailable`: the agent or the provider cannot give a token
 *   right now; signing in again would not help, a later request may.
 */
export type SessionError = "RefreshAccessTokenError" | "AccessTokenUnavailable";

/** next-auth's JWT (the cookie's content). It carries the agent's session name, no tokens. */
export interface JWT {
  sub?: string;
  name?: string | null;
  email?: string | null;
  picture?: string | null;
  agentSession?: string;
  error?: SessionError;
  [claim: string]: unknown;
}

/** next-auth's Account at sign-in: the provider's token answer plus next-auth's fields. */
export interface Account {
  provider: string;
  type: string;
  providerAccountId: string;
  access_token?: string;
  refresh_token?: string;
  /** Unix seconds; next-auth computes it from `expires_in`. */
  expires_at?: number;
  expires_in?: number;
  /** Keycloak's SSO-session idle limit for the refresh token, in seconds. */
  refresh_expires_in?: number;
  scope?: string;
  [field: string]: unknown;
}

/** next-auth's Session as the browser and `getServerSession` see it. */
export interface Session {
  user?: { name?: string | null; email?: string | null; image?: string | null };
  expires: string;
  accessToken?: string;
  error?: SessionError;
}

export interface JwtCallbackParams {
  token: JWT;
  /** Present only on sign-in. */
  account: Account | null;
}

export interface SessionCallbackParams {
  session: Session;
  token: JWT;
}

export interface AgentAuthOptions {
  /** One client per server process. */
  client: TokenAgentClient;
  /** The Keycloak realm's issuer URL, e.g. https://sso.example.com/realms/acme. */
  issuer: string;
  clientId: string;
  clientSecret: string;
  /** Prefix of the agent's session names; name the app if several share an agent. Default `web:`. */
  sessionPrefix?: string;
  /** Stop refreshing a user's tokens after this long without requests. Default 1800 s. */
  idleTimeoutSecs?: number;
  /** Remove a user's session this long after sign-in. Default 30 days, next-auth's session maxAge. */
  lifetimeSecs?: number;
  /** The token handed out stays valid this long. Default 30 s. */
  minValidSecs?: number;
}

/** The `callbacks` and `events` to pass to `NuxtAuthHandler`. */
export function agentAuth(options: AgentAuthOptions) {
  const { client, issuer } = options;

  return {
    callbacks: {
      /** On sign-in, imports the user's tokens into the agent; afterwards leaves the token alone. */
      async jwt({ token, account }: JwtCallbackParams): Promise<JWT> {
        if (!account) return token;
        if (!account.refresh_token || !account.access_token) {
          throw new Error("the provider gave no access and refresh token at sign-in");
        }
        const agentSession = sessionNameForUser(token.sub ?? account.providerAccountId, {
          issuer,
          prefix: options.sessionPrefix,
        });
        // replace: a new sign-in supersedes the session a revoked grant left.
        await client.importSession({
          name: agentSession,
          issuer,
          clientId: options.clientId,
          clientSecret: options.clientSecret,
          scopes: account.scope?.split(" ").filter(Boolean),
          refreshToken: account.refresh_token,
          accessToken: account.access_token,
          expiresIn: account.expires_in ?? secondsUntil(account.expires_at),
          refreshExpiresIn: account.refresh_expires_in,
          idleTimeoutSecs: options.idleTimeoutSecs ?? 1800,
          lifetimeSecs: options.lifetimeSecs ?? 30 * 24 * 3600,
          replace: true,
        });
        const { error: _previous, ...rest } = token;
        return { ...rest, agentSession };
      },

      /** Puts a current access token on the session, or the error flag the pages check. */
      async session({ session, token }: SessionCallbackParams): Promise<Session> {
        if (!token.agentSession) return { ...session, error: "RefreshAccessTokenError" };
        try {
          const current = await client.get(token.agentSession, { minValidSecs: options.minValidSecs ?? 30 });
          return { ...session, accessToken: current.accessToken };
        } catch (error) {
          if (isNeedsSignIn(error) || (error instanceof AgentError && error.code === "no_such_session")) {
            return { ...session, error: "RefreshAccessTokenError" };
          }
          // Agent unreachable, provider failing: the error names a code, never a token.
          console.warn(`token-agent gave no token for ${token.agentSession}: ${String(error)}`);
          return { ...session, error: "AccessTokenUnavailable" };
        }
      },
    },

    events: {
      /** Forgets the user's tokens at sign-out. */
      async signOut({ token }: { token: JWT | null }): Promise<void> {
        if (token?.agentSession) await client.remove(token.agentSession).catch(() => undefined);
      },
    },
  };
}

function secondsUntil(unixSeconds: number | undefined): number | undefined {
  return unixSeconds === undefined ? undefined : Math.max(0, unixSeconds - Math.floor(Date.now() / 1000));
}
