// Frame encoding and decoding, without sockets: frames split anywhere,
// several frames per chunk, and the size limits.

import assert from "node:assert/strict";
import { test } from "node:test";

import { encodeFrame, FrameDecoder, FrameTooLarge } from "../src/frames.js";
import { isValidSessionName, sessionNameForUser } from "../src/names.js";

test("a frame is a big-endian length and the JSON body", () => {
  const frame = encodeFrame({ op: "ping" });
  assert.equal(frame.readUInt32BE(0), frame.length - 4);
  assert.deepEqual(JSON.parse(frame.subarray(4).toString()), { op: "ping" });
});

test("a request over the agent's limit is refused before sending", () => {
  assert.throws(() => encodeFrame({ op: "get", name: "x".repeat(70_000) }), RangeError);
});

test("the decoder reassembles frames split at every byte", () => {
  const stream = Buffer.concat([encodeFrame({ n: 1 }), encodeFrame({ n: 2, text: "é✓" }), encodeFrame({})]);
  const decoder = new FrameDecoder(1024);
  const bodies: Buffer[] = [];
  for (const byte of stream) bodies.push(...decoder.push(Buffer.from([byte])));
  assert.deepEqual(
    bodies.map((body) => JSON.parse(body.toString())),
    [{ n: 1 }, { n: 2, text: "é✓" }, {}],
  );
});

test("the decoder returns every frame in one chunk, and keeps a partial tail", () => {
  const stream = Buffer.concat([encodeFrame({ n: 1 }), encodeFrame({ n: 2 }), encodeFrame({ n: 3 })]);
  const decoder = new FrameDecoder(1024);
  const cut = stream.length - 3;
  assert.deepEqual(
    decoder.push(stream.subarray(0, cut)).map((b) => JSON.parse(b.toString()).n),
    [1, 2],
  );
  assert.deepEqual(
    decoder.push(stream.subarray(cut)).map((b) => JSON.parse(b.toString()).n),
    [3],
  );
});

test("the decoder refuses a frame announced over its limit, before reading the body", () => {
  const decoder = new FrameDecoder(10);
  const header = Buffer.alloc(4);
  header.writeUInt32BE(11);
  assert.throws(() => decoder.push(header), FrameTooLarge);
});

test("session names follow the agent's rule, and user names are stable, valid and opaque", () => {
  assert.ok(isValidSessionName("alice@example.org"));
  assert.ok(isValidSessionName("web:" + "a".repeat(124)));
  for (const bad of ["", ".hidden", "-rf", "a/b", "sp ace", "x".repeat(129), "ü"]) {
    assert.ok(!isValidSessionName(bad), bad);
  }

  const issuer = "https://sso.example.com/realms/acme";
  const name = sessionNameForUser("f:1234/Ünïcode user", { issuer });
  assert.match(name, /^web:[0-9a-f]{32}$/);
  assert.equal(sessionNameForUser("f:1234/Ünïcode user", { issuer }), name);
  assert.notEqual(sessionNameForUser("f:1234/Ünïcode user", { issuer: "https://other" }), name);
  assert.match(sessionNameForUser("alice", { prefix: "shop:" }), /^shop:[0-9a-f]{32}$/);
  assert.throws(() => sessionNameForUser("alice", { prefix: "-bad" }), RangeError);
  assert.throws(() => sessionNameForUser(""), RangeError);
});
