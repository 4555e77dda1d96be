// Stand-ins for the Nuxt, nuxt-auth and next-auth types the example route
// uses, so it type-checks without installing them. The shapes follow
// @sidebase/nuxt-auth (authjs provider) over next-auth v4, cut down to what
// the example touches; in a Nuxt app the real ones take their place.

declare module "#auth" {
  type Awaitable<T> = T | Promise<T>;

  /** next-auth's JWT: any claims, a few of them known. */
  interface JWT extends Record<string, unknown> {
    name?: string | null;
    email?: string | null;
    picture?: string | null;
    sub?: string;
  }

  /** next-auth's Account: the provider's token answer and next-auth's own fields. */
  interface Account extends Record<string, unknown> {
    providerAccountId: string;
    provider: string;
    type: "oauth" | "oidc" | "email" | "credentials";
    access_token?: string;
    refresh_token?: string;
    expires_at?: number;
    scope?: string;
  }

  interface Session {
    user?: { name?: string | null; email?: string | null; image?: string | null };
    expires: string;
  }

  export interface AuthOptions {
    secret?: string;
    providers: unknown[];
    callbacks?: {
      jwt?: (params: {
        token: JWT;
        user: unknown;
        account: Account | null;
        profile?: unknown;
        trigger?: "signIn" | "signUp" | "update";
      }) => Awaitable<JWT>;
      session?: (params: { session: Session; token: JWT; user: unknown }) => Awaitable<Session>;
    };
    events?: {
      signOut?: (message: { session: unknown; token: JWT | null }) => Awaitable<void>;
    };
  }

  export function NuxtAuthHandler(options: AuthOptions): unknown;
}

declare module "#imports" {
  export function useRuntimeConfig(): {
    authSecret: string;
    keycloak: { issuer: string; clientId: string; clientSecret: string };
  };
}

declare module "next-auth/providers/keycloak" {
  export default function KeycloakProvider(options: {
    issuer: string;
    clientId: string;
    clientSecret: string;
  }): unknown;
}
