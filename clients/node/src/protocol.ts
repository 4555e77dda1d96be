// The wire protocol, version 1 (proto/PROTOCOL.md): the JSON shapes on the
// socket, and their translation to and from the client's camelCase types.
// Nothing here does I/O.

/** The protocol version this client speaks. */
export const PROTOCOL_VERSION = 1;

/** Largest request body the agent accepts, in bytes. */
export const MAX_REQUEST_BYTES = 64 * 1024;

/** Largest response body the protocol allows, in bytes. */
export const MAX_RESPONSE_BYTES = 64 * 1024 * 1024;

/** The agent's error codes. A code this client does not know reads as `internal`. */
export const AGENT_ERROR_CODES = [
  "bad_request",
  "unsupported_version",
  "no_such_session",
  "session_exists",
  "reauth_required",
  "client_misconfigured",
  "provider_rejected",
  "temporarily_unavailable",
  "insufficient_validity",
  "store_failed",
  "shutting_down",
  "permission_denied",
  "locked",
  "internal",
] as const;

/** An error code from the agent; see the table in PROTOCOL.md. */
export type AgentErrorCode = (typeof AGENT_ERROR_CODES)[number];

/** How the client authenticates at the token endpoint. */
export type ClientAuth = "basic" | "post" | "none";

/** Where a session stands. */
export type SessionState = "fresh" | "refreshing" | "retrying" | "needs_sign_in" | "client_misconfigured";

/** Where a session's access-token expiry came from. */
export type ExpirySource = "provider" | "previous_lifetime" | "jwt" | "default";

/** An access token ready to use. */
export interface AgentToken {
  accessToken: string;
  /** Always `Bearer`: the agent serves no other type. */
  tokenType: "Bearer";
  /** When the token stops being valid, in seconds since the Unix epoch (agent's clock). */
  expiresAt: number;
}

/** A session as `status` and `list` show it. Holds no secret. Times are Unix seconds. */
export interface SessionStatus {
  name: string;
  issuer: string;
  clientId: string;
  tokenEndpoint: string;
  scopes: string[];
  state: SessionState;
  /** When the session entered its state. */
  stateSince: number;
  /** Why, for every state but `fresh`. */
  reason?: string;
  accessExpiresAt?: number;
  expirySource?: ExpirySource;
  /** The refresh token's own deadline, when the provider gives one. */
  refreshExpiresAt?: number;
  lastRefreshAt?: number;
  /** Failed attempts since the last success. */
  consecutiveFailures: number;
  /** The next planned refresh; absent when nothing is scheduled. */
  nextRefreshAt?: number;
  idleTimeoutSecs?: number;
  /** When the agent removes the session, for one imported with a lifetime. */
  removeAt?: number;
  /** False once the provider refused the refresh token. */
  hasRefreshToken: boolean;
}

/** The OAuth error a provider answered with. */
export interface ProviderError {
  /** The OAuth `error` code, e.g. `invalid_grant`. */
  error: string;
  description?: string;
  /** Provider-specific codes beside the OAuth code, e.g. Microsoft's `700082`. */
  codes?: string[];
}

/** A session to hand to the agent, as `importSession` takes it. */
export interface ImportSessionRequest {
  /** 1-128 bytes of ASCII letters, digits and `. _ - @ + :`, not starting with `.` or `-`; see `sessionNameForUser`. */
  name: string;
  issuer: string;
  /** Skips the issuer's discovery document when given. */
  tokenEndpoint?: string;
  clientId: string;
  clientSecret?: string;
  /** Default: `basic` with a secret, `none` without. */
  clientAuth?: ClientAuth;
  scopes?: string[];
  refreshToken: string;
  /**
   * The access token issued with `refreshToken` at sign-in. With it (and
   * `expiresIn`) the agent stores the tokens as they are instead of
   * refreshing at once.
   */
  accessToken?: string;
  /** The provider's `expires_in` for `accessToken`, in seconds. */
  expiresIn?: number;
  /** The provider's `refresh_expires_in` (Keycloak), in seconds. */
  refreshExpiresIn?: number;
  /** Refresh ahead only while the session was asked for within this many seconds. */
  idleTimeoutSecs?: number;
  /** Remove the session this many seconds after the import, revoking its refresh token where the provider allows. */
  lifetimeSecs?: number;
  /** Replace a session of the same name instead of failing with `session_exists`. */
  replace?: boolean;
}

/** A request frame's JSON. */
export type WireRequest =
  | { op: "hello"; version: number }
  | { op: "ping" }
  | { op: "get"; name: string; min_valid_secs: number }
  | ({ op: "import" } & WireImport)
  | { op: "remove"; name: string }
  | { op: "list" }
  | { op: "status"; name: string }
  | { op: "refresh"; name: string };

interface WireImport {
  name: string;
  issuer: string;
  token_endpoint?: string;
  client_id: string;
  client_secret?: string;
  client_auth: ClientAuth;
  scopes: string[];
  refresh_token: string;
  access_token?: string;
  expires_in?: number;
  refresh_expires_in?: number;
  idle_timeout_secs?: number;
  lifetime_secs?: number;
  replace: boolean;
}

/** A response frame's JSON, checked only as far as `kind`. */
export type WireResponse = { kind: string } & Record<string, unknown>;

/** The error reply's fields, read leniently. */
export interface WireErrorReply {
  code: AgentErrorCode;
  message: string;
  providerError?: ProviderError;
  retryAt?: number;
}

/** Thrown by the readers below when the agent's JSON is not the documented shape. */
export class MalformedResponse extends Error {}

export function importToWire(session: ImportSessionRequest): WireRequest {
  return {
    op: "import",
    name: session.name,
    issuer: session.issuer,
    token_endpoint: session.tokenEndpoint,
    client_id: session.clientId,
    client_secret: session.clientSecret,
    client_auth: session.clientAuth ?? (session.clientSecret === undefined ? "none" : "basic"),
    scopes: session.scopes ?? [],
    refresh_token: session.refreshToken,
    access_token: session.accessToken,
    expires_in: wholeSeconds(session.expiresIn, "expiresIn"),
    refresh_expires_in: wholeSeconds(session.refreshExpiresIn, "refreshExpiresIn"),
    idle_timeout_secs: wholeSeconds(session.idleTimeoutSecs, "idleTimeoutSecs"),
    lifetime_secs: wholeSeconds(session.lifetimeSecs, "lifetimeSecs"),
    replace: session.replace ?? false,
  };
}

/** A duration for the wire: a non-negative whole number of seconds (fractions are dropped). */
export function wholeSeconds(value: number | undefined, field: string): number | undefined {
  if (value === undefined) return undefined;
  if (!Number.isFinite(value) || value < 0) {
    throw new RangeError(`${field} must be a non-negative number of seconds`);
  }
  return Math.floor(value);
}

/** Parses one response frame; the body must be a JSON object with a string `kind`. */
export function parseResponse(body: Buffer): WireResponse {
  let value: unknown;
  try {
    value = JSON.parse(body.toString("utf8"));
  } catch {
    // JSON.parse's message may quote the text, which could hold a token.
    throw new MalformedResponse("a response is not valid JSON");
  }
  if (!isObject(value) || typeof value.kind !== "string") {
    throw new MalformedResponse("a response has no kind");
  }
  return value as WireResponse;
}

export function readError(reply: WireResponse): WireErrorReply {
  const code = AGENT_ERROR_CODES.find((known) => known === reply.code) ?? "internal";
  const provider = isObject(reply.provider_error) ? reply.provider_error : undefined;
  return {
    code,
    message: typeof reply.message === "string" ? reply.message : `the agent answered ${code}`,
    providerError:
      provider && typeof provider.error === "string"
        ? {
            error: provider.error,
            description: optional(provider.description, "string"),
            codes: Array.isArray(provider.codes) ? provider.codes.map(String) : undefined,
          }
        : undefined,
    retryAt: optional(reply.retry_at, "number"),
  };
}

export function readToken(reply: WireResponse): AgentToken {
  if (typeof reply.access_token !== "string" || typeof reply.expires_at !== "number") {
    throw new MalformedResponse("a token answer lacks access_token or expires_at");
  }
  if (reply.token_type !== "Bearer") {
    throw new MalformedResponse("a token answer is not of type Bearer");
  }
  return { accessToken: reply.access_token, tokenType: "Bearer", expiresAt: reply.expires_at };
}

export function readMessage(reply: WireResponse): string {
  return typeof reply.message === "string" ? reply.message : "";
}

export function readStatus(value: unknown): SessionStatus {
  if (!isObject(value) || typeof value.name !== "string" || typeof value.state !== "string") {
    throw new MalformedResponse("a session status lacks name or state");
  }
  return {
    name: value.name,
    issuer: String(value.issuer ?? ""),
    clientId: String(value.client_id ?? ""),
    tokenEndpoint: String(value.token_endpoint ?? ""),
    scopes: Array.isArray(value.scopes) ? value.scopes.map(String) : [],
    state: value.state as SessionState,
    stateSince: Number(value.state_since ?? 0),
    reason: optional(value.reason, "string"),
    accessExpiresAt: optional(value.access_expires_at, "number"),
    expirySource: optional(value.expiry_source, "string") as ExpirySource | undefined,
    refreshExpiresAt: optional(value.refresh_expires_at, "number"),
    lastRefreshAt: optional(value.last_refresh_at, "number"),
    consecutiveFailures: Number(value.consecutive_failures ?? 0),
    nextRefreshAt: optional(value.next_refresh_at, "number"),
    idleTimeoutSecs: optional(value.idle_timeout_secs, "number"),
    removeAt: optional(value.remove_at, "number"),
    hasRefreshToken: value.has_refresh_token === true,
  };
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function optional(value: unknown, type: "string"): string | undefined;
function optional(value: unknown, type: "number"): number | undefined;
function optional(value: unknown, type: "string" | "number"): string | number | undefined {
  return typeof value === type ? (value as string | number) : undefined;
}
