// One connection to the agent: connect, say hello, then one request at a
// time, each with a time limit that destroys the socket when it runs out.
// A connection that fails once is finished; the pool opens another.

import { once } from "node:events";
import net from "node:net";

import { AgentConnectionError, AgentError } from "./errors.js";
import { encodeFrame, FrameDecoder } from "./frames.js";
import { parseResponse, PROTOCOL_VERSION, readError } from "./protocol.js";
import type { WireRequest, WireResponse } from "./protocol.js";

interface PendingRequest {
  op: string;
  resolve: (response: WireResponse) => void;
  reject: (error: Error) => void;
  timer: NodeJS.Timeout;
}

/** One hello'd connection to the agent, carrying one request at a time. */
export class AgentConnection {
  private readonly decoder: FrameDecoder;
  private pending: PendingRequest | undefined;
  private failure: AgentConnectionError | undefined;

  private constructor(
    private readonly socket: net.Socket,
    maxResponseBytes: number,
  ) {
    this.decoder = new FrameDecoder(maxResponseBytes);
    socket.on("data", (chunk: Buffer) => this.receive(chunk));
    socket.on("error", (error: NodeJS.ErrnoException) =>
      this.fail(
        new AgentConnectionError(
          "connection_lost",
          `the connection to token-agent failed (${error.code ?? error.message})`,
          { cause: error },
        ),
      ),
    );
    socket.on("close", () =>
      this.fail(new AgentConnectionError("connection_lost", "token-agent closed the connection")),
    );
  }

  /**
   * Connects to the agent at `socketPath` and exchanges hellos, all within
   * `timeoutMs`. Fails with `unreachable` when nothing accepts the
   * connection, `timeout` when the agent accepts but does not answer.
   */
  static async open(socketPath: string, maxResponseBytes: number, timeoutMs: number): Promise<AgentConnection> {
    const deadline = Date.now() + timeoutMs;
    const socket = net.createConnection({ path: socketPath });
    const connection = new AgentConnection(socket, maxResponseBytes);
    try {
      await once(socket, "connect", { signal: AbortSignal.timeout(timeoutMs) });
    } catch (error) {
      socket.destroy();
      const why =
        (error as Error).name === "AbortError"
          ? `no connection within ${timeoutMs} ms`
          : ((error as NodeJS.ErrnoException).code ?? (error as Error).message);
      throw new AgentConnectionError(
        "unreachable",
        `token-agent is not reachable at ${socketPath} (${why}); is it running?`,
        { cause: error },
      );
    }

    const reply = await connection.request({ op: "hello", version: PROTOCOL_VERSION }, deadline - Date.now());
    if (reply.kind === "hello") return connection;
    connection.close();
    if (reply.kind === "error") throw new AgentError(readError(reply));
    throw new AgentConnectionError("protocol_violation", `token-agent answered hello with ${reply.kind}`);
  }

  /** False once the connection failed or was closed. */
  get isOpen(): boolean {
    return this.failure === undefined;
  }

  /**
   * Sends one request and resolves with its response. On timeout the socket
   * is destroyed and the promise rejects with a `timeout` error.
   */
  request(request: WireRequest, timeoutMs: number): Promise<WireResponse> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.pending) return Promise.reject(new Error("AgentConnection: one request at a time"));
    let frame: Buffer;
    try {
      frame = encodeFrame(request);
    } catch (error) {
      return Promise.reject(error);
    }

    return new Promise((resolve, reject) => {
      const limit = Math.max(1, Math.ceil(timeoutMs));
      const timer = setTimeout(
        () =>
          this.fail(new AgentConnectionError("timeout", `token-agent did not answer ${request.op} within ${limit} ms`)),
        limit,
      );
      this.pending = { op: request.op, resolve, reject, timer };
      this.socket.ref();
      this.socket.write(frame);
    });
  }

  /** Closes the connection; a request in flight fails with `connection_lost`. */
  close(): void {
    this.fail(new AgentConnectionError("connection_lost", "the connection was closed by the client"));
  }

  private receive(chunk: Buffer): void {
    let bodies: Buffer[];
    try {
      bodies = this.decoder.push(chunk);
    } catch (error) {
      this.fail(new AgentConnectionError("protocol_violation", (error as Error).message));
      return;
    }
    for (const body of bodies) {
      const pending = this.pending;
      if (!pending) {
        this.fail(new AgentConnectionError("protocol_violation", "token-agent sent an answer nobody asked for"));
        return;
      }
      let response: WireResponse;
      try {
        response = parseResponse(body);
      } catch (error) {
        this.fail(
          new AgentConnectionError(
            "protocol_violation",
            `unreadable answer to ${pending.op}: ${(error as Error).message}`,
          ),
        );
        return;
      }
      this.pending = undefined;
      clearTimeout(pending.timer);
      // An idle connection must not keep the process alive.
      this.socket.unref();
      pending.resolve(response);
    }
  }

  /** Ends the connection for good; the first failure is the one reported. */
  private fail(error: AgentConnectionError): void {
    this.failure ??= error;
    this.socket.destroy();
    const pending = this.pending;
    this.pending = undefined;
    if (pending) {
      clearTimeout(pending.timer);
      pending.reject(error);
    }
  }
}
