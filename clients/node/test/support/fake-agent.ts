// A scripted stand-in for token-agent on a temporary Unix socket, for the
// client's behaviour the real agent cannot be made to show: answers cut
// into single bytes, oversized or unreadable answers, silence.

import { mkdtempSync, rmSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";

import { encodeFrame, FrameDecoder } from "../../src/frames.js";

/**
 * Decides the answer to one request: an object to send as a frame, raw
 * bytes, a function that writes to the socket itself, or nothing (silence).
 */
export type Answer = object | Buffer | ((socket: net.Socket) => Promise<void>) | undefined;
export type Script = (request: Record<string, unknown>, connection: number) => Answer | Promise<Answer>;

export interface FakeAgent {
  socketPath: string;
  /** Every request received after hello, in arrival order. */
  requests: Array<Record<string, unknown>>;
  /** How many connections were accepted, and how many are open now. */
  connections: { accepted: number; open: number; mostOpen: number };
  /** Closes every open connection, and keeps listening. */
  dropConnections(): void;
  stop(): Promise<void>;
}

/** Starts a fake agent that greets every connection and answers requests with `script`, one at a time per connection. */
export async function startFakeAgent(script: Script): Promise<FakeAgent> {
  const dir = mkdtempSync(path.join(os.tmpdir(), "fake-agent-"));
  const socketPath = path.join(dir, "agent.sock");
  const requests: Array<Record<string, unknown>> = [];
  const connections = { accepted: 0, open: 0, mostOpen: 0 };
  const sockets = new Set<net.Socket>();

  const server = net.createServer((socket) => {
    const id = ++connections.accepted;
    connections.open += 1;
    connections.mostOpen = Math.max(connections.mostOpen, connections.open);
    sockets.add(socket);
    socket.on("close", () => {
      connections.open -= 1;
      sockets.delete(socket);
    });
    socket.on("error", () => {});

    const decoder = new FrameDecoder(64 * 1024);
    let queue = Promise.resolve();
    socket.on("data", (chunk: Buffer) => {
      for (const body of decoder.push(chunk)) {
        const request = JSON.parse(body.toString()) as Record<string, unknown>;
        queue = queue.then(async () => {
          if (request.op === "hello") {
            socket.write(encodeFrame({ kind: "hello", version: 1, agent: "fake-agent" }));
            return;
          }
          requests.push(request);
          const answer = await script(request, id);
          if (answer === undefined || socket.destroyed) return;
          if (typeof answer === "function") await answer(socket);
          else socket.write(Buffer.isBuffer(answer) ? answer : encodeFrame(answer, Infinity));
        });
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(socketPath, resolve));

  return {
    socketPath,
    requests,
    connections,
    dropConnections() {
      for (const socket of sockets) socket.destroy();
    },
    async stop() {
      for (const socket of sockets) socket.destroy();
      await new Promise((resolve) => server.close(resolve));
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
