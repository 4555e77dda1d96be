// token-agent-client: the package's public surface. See README.md in this
// folder and proto/PROTOCOL.md for the wire protocol underneath.

export { defaultSocketPath, TokenAgentClient } from "./client.js";
export type { CallOptions, GetOptions, TokenAgentClientOptions, WatchEvent, WatchOptions } from "./client.js";
export { AgentConnectionError, AgentError, isAgentUnreachable, isNeedsSignIn, TokenAgentError } from "./errors.js";
export type { ConnectionErrorCode } from "./errors.js";
export { isValidSessionName, sessionNameForUser } from "./names.js";
export type { UserSessionNameOptions } from "./names.js";
export { AGENT_ERROR_CODES, PROTOCOL_VERSION } from "./protocol.js";
export type {
  AgentErrorCode,
  AgentToken,
  ClientAuth,
  ExpirySource,
  ImportSessionRequest,
  ProviderError,
  SessionState,
  SessionStatus,
} from "./protocol.js";
