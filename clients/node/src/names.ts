// Session names: the agent's rule for them, and a stable name per web user
// that reveals nothing about the user.

import { createHash } from "node:crypto";

const SESSION_NAME = /^[A-Za-z0-9_@+:][A-Za-z0-9._\-@+:]{0,127}$/;

/** True for a name the agent accepts: 1-128 ASCII letters, digits and `. _ - @ + :`, not starting with `.` or `-`. */
export function isValidSessionName(name: string): boolean {
  return SESSION_NAME.test(name);
}

/** How {@link sessionNameForUser} builds a name. */
export interface UserSessionNameOptions {
  /** The provider's issuer, so equal subjects at two providers get two names. */
  issuer?: string;
  /** Goes in front of the hash; name your app here if several apps share one agent. Default `web:`. */
  prefix?: string;
}

/**
 * The session name for one signed-in user: `prefix` + the first 32 hex
 * digits of SHA-256(issuer, subject). The same user always gets the same
 * name, any `sub` maps to a valid name, and names in the agent's logs and
 * `tokenctl list` do not reveal who the user is.
 *
 * @example sessionNameForUser(token.sub, { issuer, prefix: "shop:" }) // "shop:3f1c…"
 */
export function sessionNameForUser(subject: string, options: UserSessionNameOptions = {}): string {
  if (subject === "") throw new RangeError("a user's subject cannot be empty");
  const prefix = options.prefix ?? "web:";
  const digest = createHash("sha256")
    .update(options.issuer ?? "")
    .update("\0")
    .update(subject)
    .digest("hex")
    .slice(0, 32);
  const name = prefix + digest;
  if (!isValidSessionName(name)) {
    throw new RangeError("the prefix makes an invalid session name; use letters, digits and . _ - @ + : (at most 96)");
  }
  return name;
}
