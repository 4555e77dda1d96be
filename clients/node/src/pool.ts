// A small pool of agent connections. Each connection carries one request at
// a time, so answers can never be matched to the wrong caller; concurrent
// calls use up to `max` connections and the rest wait their turn.

import type { AgentConnection } from "./connection.js";
import { AgentConnectionError } from "./errors.js";

export interface Lease {
  connection: AgentConnection;
  /** True when the connection had served an earlier request. */
  reused: boolean;
}

export class ConnectionPool {
  private readonly idle: AgentConnection[] = [];
  private readonly waiters = new Set<() => void>();
  /** Connections open, idle or being opened. */
  private count = 0;
  private closed = false;

  constructor(
    private readonly openConnection: (timeoutMs: number) => Promise<AgentConnection>,
    private readonly max: number,
  ) {}

  /** A connection for one request, opened or waited for until `deadline` (ms since the epoch). */
  async acquire(deadline: number): Promise<Lease> {
    for (;;) {
      if (this.closed) throw new AgentConnectionError("connection_lost", "the client was closed");
      const idle = this.takeIdle();
      if (idle) return { connection: idle, reused: true };
      if (this.count < this.max) {
        this.count += 1;
        try {
          return { connection: await this.openConnection(deadline - Date.now()), reused: false };
        } catch (error) {
          this.count -= 1;
          this.wakeOne();
          throw error;
        }
      }
      await this.waitForTurn(deadline);
    }
  }

  /** Gives a connection back after its request; a failed one is dropped. */
  release(connection: AgentConnection): void {
    if (connection.isOpen && !this.closed) {
      this.idle.push(connection);
    } else {
      connection.close();
      this.count -= 1;
    }
    this.wakeOne();
  }

  /** Closes the idle connections now and the busy ones when they are released. */
  close(): void {
    this.closed = true;
    for (const connection of this.idle.splice(0)) {
      connection.close();
      this.count -= 1;
    }
    for (const wake of [...this.waiters]) wake();
  }

  private takeIdle(): AgentConnection | undefined {
    for (let connection = this.idle.pop(); connection; connection = this.idle.pop()) {
      if (connection.isOpen) return connection;
      this.count -= 1; // closed by the agent while idle
    }
    return undefined;
  }

  private waitForTurn(deadline: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const wake = () => {
        clearTimeout(timer);
        this.waiters.delete(wake);
        resolve();
      };
      const timer = setTimeout(
        () => {
          this.waiters.delete(wake);
          reject(
            new AgentConnectionError(
              "timeout",
              `all ${this.max} connections to token-agent stayed busy until the time limit`,
            ),
          );
        },
        Math.max(1, deadline - Date.now()),
      );
      this.waiters.add(wake);
    });
  }

  private wakeOne(): void {
    const [first] = this.waiters;
    first?.();
  }
}
