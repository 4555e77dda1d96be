// The client's errors: what the agent refused (with the protocol's error
// code) and what went wrong on the way to it (not running, no answer in
// time, connection broken). Messages never contain a token or secret.

import type { AgentErrorCode, ProviderError, WireErrorReply } from "./protocol.js";

/**
 * Why no answer came from the agent:
 * - `unreachable`: no connection could be made (not running, stale socket, no permission);
 * - `timeout`: connected, but no answer within the call's time limit;
 * - `connection_lost`: the agent closed the connection before answering;
 * - `protocol_violation`: the agent's answer was unreadable or too large.
 */
export type ConnectionErrorCode = "unreachable" | "timeout" | "connection_lost" | "protocol_violation";

/** Base class of every error this client raises about the agent. */
export abstract class TokenAgentError extends Error {
  abstract readonly code: AgentErrorCode | ConnectionErrorCode;
}

/** The agent answered, with an error. `code` is the protocol's error code. */
export class AgentError extends TokenAgentError {
  override readonly name = "AgentError";
  readonly code: AgentErrorCode;
  /** The provider's own OAuth error, when the provider caused this. */
  readonly providerError: ProviderError | undefined;
  /** For `temporarily_unavailable`: when a retry may succeed (Unix seconds). */
  readonly retryAt: number | undefined;

  constructor(reply: WireErrorReply) {
    super(reply.message);
    this.code = reply.code;
    this.providerError = reply.providerError;
    this.retryAt = reply.retryAt;
  }

  /** True when only a new sign-in helps (`reauth_required`). */
  get needsSignIn(): boolean {
    return this.code === "reauth_required";
  }
}

/** No usable answer came from the agent; see {@link ConnectionErrorCode}. */
export class AgentConnectionError extends TokenAgentError {
  override readonly name = "AgentConnectionError";
  readonly code: ConnectionErrorCode;

  constructor(code: ConnectionErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
  }
}

/** True when the agent says the session needs a new sign-in (`reauth_required`). */
export function isNeedsSignIn(error: unknown): error is AgentError {
  return error instanceof AgentError && error.needsSignIn;
}

/**
 * True when the agent gave no usable answer: not running, not answering in
 * time, or the connection broke. The session itself may be fine.
 */
export function isAgentUnreachable(error: unknown): error is AgentConnectionError {
  return error instanceof AgentConnectionError;
}
