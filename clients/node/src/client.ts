// TokenAgentClient: the public API. Each call takes a connection from the
// pool, sends one request and maps the answer to a typed result or error,
// all within the call's time limit.

import os from "node:os";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";

import { AgentConnection } from "./connection.js";
import { AgentConnectionError, AgentError } from "./errors.js";
import { ConnectionPool } from "./pool.js";
import {
  importToWire,
  MalformedResponse,
  MAX_RESPONSE_BYTES,
  readError,
  readMessage,
  readStatus,
  readToken,
  wholeSeconds,
} from "./protocol.js";
import type { AgentToken, ImportSessionRequest, SessionStatus, WireRequest, WireResponse } from "./protocol.js";

/** How a {@link TokenAgentClient} connects. */
export interface TokenAgentClientOptions {
  /** The agent's socket. Default: {@link defaultSocketPath}. */
  socketPath?: string;
  /**
   * Time limit of each call in milliseconds, covering the wait for a free
   * connection, connecting, and the answer (including any refresh the agent
   * does first). Default 5000.
   */
  timeoutMs?: number;
  /** Most connections open at once; more concurrent calls wait for one. Default 4. */
  maxConnections?: number;
  /** Largest answer accepted, in bytes. Default 64 MiB, the protocol's limit. */
  maxResponseBytes?: number;
}

/** Per-call options. */
export interface CallOptions {
  /** Overrides the client's `timeoutMs` for this call. */
  timeoutMs?: number;
}

/** Options of {@link TokenAgentClient.get}. */
export interface GetOptions extends CallOptions {
  /** The token must stay valid this many more seconds; the agent refreshes first if needed. Default 0. */
  minValidSecs?: number;
}

/** Options of {@link TokenAgentClient.watch}. */
export interface WatchOptions extends CallOptions {
  /** How often to ask the agent, in milliseconds. Default 1000. */
  intervalMs?: number;
  /** Ends the watch. */
  signal?: AbortSignal;
}

/** What {@link TokenAgentClient.watch} yields, each time it differs from the last. */
export type WatchEvent =
  { type: "status"; status: SessionStatus } | { type: "removed" } | { type: "error"; error: AgentConnectionError };

/** Requests that may be sent again when a reused connection turns out to be dead. */
const RETRYABLE_OPS = new Set(["get", "status", "list", "ping"]);

/**
 * The agent's socket when nothing else is said: `$TOKEN_AGENT_SOCK`, else
 * `$XDG_RUNTIME_DIR/token-agent/agent.sock`, else
 * `$TMPDIR/token-agent-$UID/agent.sock` (as the agent itself decides).
 */
export function defaultSocketPath(env: NodeJS.ProcessEnv = process.env): string {
  if (env.TOKEN_AGENT_SOCK) return env.TOKEN_AGENT_SOCK;
  if (env.XDG_RUNTIME_DIR) return path.join(env.XDG_RUNTIME_DIR, "token-agent", "agent.sock");
  return path.join(os.tmpdir(), `token-agent-${process.getuid?.() ?? 0}`, "agent.sock");
}

/**
 * A client of token-agent. Make one per process and share it: it keeps its
 * connections open between calls (without keeping the process alive) and
 * runs concurrent calls on separate connections.
 *
 * Every method rejects with an {@link AgentError} when the agent refuses
 * (`err.code` is the protocol's code, e.g. `reauth_required`) or an
 * {@link AgentConnectionError} when no answer came in time.
 */
export class TokenAgentClient {
  /** The socket this client talks to. */
  readonly socketPath: string;
  private readonly timeoutMs: number;
  private readonly pool: ConnectionPool;

  constructor(options: TokenAgentClientOptions = {}) {
    this.socketPath = options.socketPath ?? defaultSocketPath();
    this.timeoutMs = positive(options.timeoutMs ?? 5000, "timeoutMs");
    const maxResponseBytes = positive(options.maxResponseBytes ?? MAX_RESPONSE_BYTES, "maxResponseBytes");
    this.pool = new ConnectionPool(
      (timeoutMs) => AgentConnection.open(this.socketPath, maxResponseBytes, timeoutMs),
      positive(options.maxConnections ?? 4, "maxConnections"),
    );
  }

  /** Resolves when the agent answers; a cheap liveness check. */
  async ping(options?: CallOptions): Promise<void> {
    await this.call({ op: "ping" }, "pong", () => undefined, options);
  }

  /**
   * A current access token for session `name`, valid for at least
   * `minValidSecs` more seconds. When the stored token is too close to
   * expiry the agent refreshes first, joining a refresh already in flight,
   * so any number of concurrent callers cause at most one refresh.
   *
   * @throws {AgentError} `reauth_required` when the user must sign in again,
   *   `no_such_session`, `temporarily_unavailable` (see `retryAt`), ...
   */
  async get(name: string, options: GetOptions = {}): Promise<AgentToken> {
    const minValidSecs = wholeSeconds(options.minValidSecs, "minValidSecs") ?? 0;
    return this.call({ op: "get", name, min_valid_secs: minValidSecs }, "token", readToken, options);
  }

  /**
   * Hands a session to the agent; resolves with the agent's message. Pass
   * the `accessToken` and `expiresIn` from sign-in so the agent does not
   * refresh at once; without them it refreshes now, so a bad refresh token
   * or client is reported here.
   */
  async importSession(session: ImportSessionRequest, options?: CallOptions): Promise<string> {
    return this.call(importToWire(session), "done", readMessage, options);
  }

  /** Session `name`'s state, expiry times and refresh plan. Does not count as a use for the idle timeout. */
  async status(name: string, options?: CallOptions): Promise<SessionStatus> {
    return this.call({ op: "status", name }, "status", (reply) => readStatus(reply.session), options);
  }

  /** Every session's status. */
  async list(options?: CallOptions): Promise<SessionStatus[]> {
    return this.call({ op: "list" }, "sessions", readSessions, options);
  }

  /** Forgets session `name` and its tokens (on sign-out). */
  async remove(name: string, options?: CallOptions): Promise<string> {
    return this.call({ op: "remove", name }, "done", readMessage, options);
  }

  /** Refreshes session `name` now, whatever the schedule says. */
  async refresh(name: string, options?: CallOptions): Promise<string> {
    return this.call({ op: "refresh", name }, "done", readMessage, options);
  }

  /**
   * Yields session `name`'s status whenever it changes: a refresh (new
   * `accessExpiresAt` and `lastRefreshAt`), a state change such as
   * `needs_sign_in`, its removal, or the agent becoming unreachable (then
   * again once it answers). Runs until `signal` aborts or the loop breaks.
   *
   * The protocol has no push yet, so this polls `status` every `intervalMs`;
   * polling does not keep an idle session alive.
   *
   * @throws {AgentError} for answers other than `no_such_session`, e.g. `bad_request` for an invalid name.
   */
  async *watch(name: string, options: WatchOptions = {}): AsyncGenerator<WatchEvent, void, undefined> {
    const intervalMs = positive(options.intervalMs ?? 1000, "intervalMs");
    let last: string | undefined;
    while (!options.signal?.aborted) {
      const event = await this.poll(name, options);
      const key =
        event.type === "status" ? JSON.stringify(event.status) : event.type === "error" ? event.error.code : "removed";
      if (key !== last) {
        last = key;
        yield event;
      }
      try {
        await sleep(intervalMs, undefined, { signal: options.signal });
      } catch {
        return; // aborted
      }
    }
  }

  /** Closes the pooled connections; calls still running finish first. */
  close(): void {
    this.pool.close();
  }

  private async poll(name: string, options: CallOptions): Promise<WatchEvent> {
    try {
      return { type: "status", status: await this.status(name, options) };
    } catch (error) {
      if (error instanceof AgentError && error.code === "no_such_session") return { type: "removed" };
      if (error instanceof AgentConnectionError) return { type: "error", error };
      throw error;
    }
  }

  /** One request, its answer of kind `expected` read by `read`, within the call's time limit. */
  private async call<T>(
    request: WireRequest,
    expected: string,
    read: (reply: WireResponse) => T,
    options?: CallOptions,
  ): Promise<T> {
    const deadline = Date.now() + positive(options?.timeoutMs ?? this.timeoutMs, "timeoutMs");
    for (let attempt = 1; ; attempt += 1) {
      const { connection, reused } = await this.pool.acquire(deadline);
      let reply: WireResponse;
      try {
        reply = await connection.request(request, deadline - Date.now());
      } catch (error) {
        // An idle connection may have died with an agent restart unnoticed.
        const retry =
          reused &&
          attempt === 1 &&
          error instanceof AgentConnectionError &&
          error.code === "connection_lost" &&
          RETRYABLE_OPS.has(request.op);
        if (retry) continue;
        throw error;
      } finally {
        this.pool.release(connection);
      }

      if (reply.kind === "error") throw new AgentError(readError(reply));
      if (reply.kind !== expected) throw malformed(request.op, `it is ${reply.kind}, not ${expected}`);
      try {
        return read(reply);
      } catch (error) {
        if (error instanceof MalformedResponse) throw malformed(request.op, error.message);
        throw error;
      }
    }
  }
}

function readSessions(reply: WireResponse): SessionStatus[] {
  if (!Array.isArray(reply.sessions)) throw new MalformedResponse("it has no sessions array");
  return reply.sessions.map(readStatus);
}

function malformed(op: string, why: string): AgentConnectionError {
  return new AgentConnectionError("protocol_violation", `unexpected answer to ${op}: ${why}`);
}

function positive(value: number, option: string): number {
  if (!(value > 0) || !Number.isFinite(value)) throw new RangeError(`${option} must be a positive number`);
  return value;
}
