// Framing: a 4-byte big-endian length, then that many bytes of UTF-8 JSON.
// The decoder takes socket chunks as they come: a frame split across many
// chunks, or many frames in one chunk.

import { MAX_REQUEST_BYTES } from "./protocol.js";

const HEADER_BYTES = 4;

/** Encodes one message as a frame. Throws a RangeError past the agent's request limit. */
export function encodeFrame(message: object, maxBytes = MAX_REQUEST_BYTES): Buffer {
  const body = Buffer.from(JSON.stringify(message), "utf8");
  if (body.length > maxBytes) {
    throw new RangeError(`a request of ${body.length} bytes is over the agent's limit of ${maxBytes}`);
  }
  const frame = Buffer.allocUnsafe(HEADER_BYTES + body.length);
  frame.writeUInt32BE(body.length, 0);
  body.copy(frame, HEADER_BYTES);
  return frame;
}

/** Thrown when the peer announces a frame over the limit; the stream cannot be resynchronised. */
export class FrameTooLarge extends Error {}

/** Splits a byte stream into frame bodies. */
export class FrameDecoder {
  private chunks: Buffer[] = [];
  private buffered = 0;
  /** The body length announced by the last header read, until that body is complete. */
  private bodyLength: number | undefined;

  constructor(private readonly maxFrameBytes: number) {}

  /** Adds received bytes; returns the frame bodies completed by them, in order. */
  push(chunk: Buffer): Buffer[] {
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    const bodies: Buffer[] = [];
    for (;;) {
      if (this.bodyLength === undefined) {
        if (this.buffered < HEADER_BYTES) break;
        const length = this.take(HEADER_BYTES).readUInt32BE(0);
        if (length > this.maxFrameBytes) {
          throw new FrameTooLarge(`a frame of ${length} bytes is over the limit of ${this.maxFrameBytes}`);
        }
        this.bodyLength = length;
      }
      if (this.buffered < this.bodyLength) break;
      bodies.push(this.take(this.bodyLength));
      this.bodyLength = undefined;
    }
    return bodies;
  }

  /** Removes and returns the first `count` buffered bytes; joins chunks only when a frame is complete. */
  private take(count: number): Buffer {
    const joined = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks, this.buffered);
    const rest = joined.subarray(count);
    this.chunks = rest.length > 0 ? [rest] : [];
    this.buffered = rest.length;
    // Copy so a small body does not pin a large chunk in memory.
    return Buffer.from(joined.subarray(0, count));
  }
}
