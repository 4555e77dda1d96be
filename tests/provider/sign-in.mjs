// Obtain a first refresh token without a person: drive the provider's own dev sign-in and
// consent pages over HTTP, then exchange the code. Prints the token endpoint's JSON as one line.
//
//   node sign-in.mjs --issuer URL --client-id ID [--client-secret S] [--login NAME]
//                    [--scope "openid offline_access"] [--redirect-uri URI] [--auth-method M]
import { createHash, randomBytes } from 'node:crypto';
import { parseArgs } from 'node:util';

function fail(msg) {
  process.stderr.write(`sign-in: ${msg}\n`);
  process.exit(1);
}

let args;
try {
  ({ values: args } = parseArgs({
    options: {
      issuer: { type: 'string' },
      'client-id': { type: 'string' },
      'client-secret': { type: 'string' },
      login: { type: 'string', default: 'agent-user' },
      scope: { type: 'string', default: 'openid offline_access' },
      'redirect-uri': { type: 'string', default: 'http://127.0.0.1/cb' },
      'auth-method': { type: 'string' }, // client_secret_basic | client_secret_post | none
    },
  }));
} catch (e) {
  fail(e.message);
}
if (!args.issuer || !args['client-id']) fail('--issuer and --client-id are required');
if (args['auth-method'] && !['client_secret_basic', 'client_secret_post', 'none'].includes(args['auth-method'])) {
  fail('--auth-method must be client_secret_basic, client_secret_post or none');
}

const b64url = (buf) => buf.toString('base64url');

// Minimal cookie jar: name+path -> value, sent when the request path is under the cookie path.
const jar = new Map();
function storeCookies(res) {
  for (const line of res.headers.getSetCookie()) {
    const [pair, ...attrs] = line.split(';').map((s) => s.trim());
    const eq = pair.indexOf('=');
    const name = pair.slice(0, eq);
    const value = pair.slice(eq + 1);
    let path = '/';
    let expired = value === '';
    for (const a of attrs) {
      const [k, v = ''] = a.split('=');
      if (k.toLowerCase() === 'path') path = v;
      if (k.toLowerCase() === 'max-age' && Number(v) <= 0) expired = true;
      if (k.toLowerCase() === 'expires' && Date.parse(v) <= Date.now()) expired = true;
    }
    const key = `${name}\0${path}`;
    if (expired) jar.delete(key);
    else jar.set(key, { name, value, path });
  }
}
function cookieHeader(url) {
  const { pathname } = new URL(url);
  return [...jar.values()]
    .filter((c) => pathname === c.path || pathname.startsWith(c.path.endsWith('/') ? c.path : `${c.path}/`))
    .map((c) => `${c.name}=${c.value}`)
    .join('; ');
}

// One HTTP hop, never auto-following redirects (we need each Set-Cookie and the final Location).
async function hop(url, { method = 'GET', form } = {}) {
  const headers = { cookie: cookieHeader(url) };
  let body;
  if (form) {
    headers['content-type'] = 'application/x-www-form-urlencoded';
    body = new URLSearchParams(form).toString();
  }
  let res;
  try {
    res = await fetch(url, { method, headers, body, redirect: 'manual' });
  } catch (e) {
    fail(`${method} ${url}: ${e.cause?.message ?? e.message}`);
  }
  storeCookies(res);
  return res;
}

const redirectUri = args['redirect-uri'];
const isCallback = (u) => u.startsWith(redirectUri);

// Follow redirects until we land on an HTML page (interaction) or on the client's redirect URI.
async function follow(res, url) {
  for (let i = 0; i < 20; i += 1) {
    if (res.status < 300 || res.status >= 400) return { res, url };
    const loc = res.headers.get('location');
    if (!loc) fail(`${res.status} from ${url} without Location`);
    url = new URL(loc, url).href; // Locations are often relative (/interaction/<uid>)
    if (isCallback(url)) return { res: null, url };
    res = await hop(url);
  }
  return fail('too many redirects');
}

const unescapeHtml = (s) => s.replace(/&amp;/g, '&').replace(/&quot;/g, '"').replace(/&#39;/g, "'")
  .replace(/&lt;/g, '<').replace(/&gt;/g, '>');

// oidc-provider's HTML error page lists <pre><strong>error</strong>: x</pre> lines.
function pageError(html) {
  const lines = [...html.matchAll(/<pre><strong>(\w+)<\/strong>: ([^<]*)<\/pre>/g)].map((m) => `${m[1]}=${unescapeHtml(m[2])}`);
  return lines.length ? lines.join(' ') : html.replace(/<[^>]*>/g, ' ').replace(/\s+/g, ' ').slice(0, 300);
}

// Read the page's POST form: its action and hidden inputs.
function parseForm(html, pageUrl) {
  const form = html.match(/<form\b[^>]*\baction="([^"]*)"[^>]*>([\s\S]*?)<\/form>/i);
  if (!form) return null;
  const fields = {};
  for (const input of form[2].matchAll(/<input\b[^>]*>/gi)) {
    const name = input[0].match(/\bname="([^"]*)"/i)?.[1];
    const value = input[0].match(/\bvalue="([^"]*)"/i)?.[1] ?? '';
    if (name) fields[name] = unescapeHtml(value);
  }
  return { action: new URL(unescapeHtml(form[1]), pageUrl).href, fields };
}

// ---- 1. discovery ----
const issuer = args.issuer.replace(/\/$/, '');
let meta;
try {
  const r = await fetch(`${issuer}/.well-known/openid-configuration`);
  if (!r.ok) fail(`discovery returned HTTP ${r.status}`);
  meta = await r.json();
} catch (e) {
  fail(`discovery at ${issuer}: ${e.cause?.message ?? e.message}`);
}

// ---- 2. authorization request (PKCE S256; prompt=consent so offline_access is kept) ----
const verifier = b64url(randomBytes(32));
const state = b64url(randomBytes(16));
const authUrl = new URL(meta.authorization_endpoint);
authUrl.search = new URLSearchParams({
  client_id: args['client-id'],
  response_type: 'code',
  redirect_uri: redirectUri,
  scope: args.scope,
  prompt: 'consent',
  state,
  nonce: b64url(randomBytes(16)),
  code_challenge: b64url(createHash('sha256').update(verifier).digest()),
  code_challenge_method: 'S256',
}).toString();

let { res, url } = await follow(await hop(authUrl.href), authUrl.href);

// ---- 3. submit login and consent pages until we are sent to the redirect URI ----
for (let step = 0; res && step < 5; step += 1) {
  const html = await res.text();
  if (res.status !== 200) fail(`HTTP ${res.status} at ${url.split('?')[0]}: ${pageError(html)}`);
  const form = parseForm(html, url);
  if (!form) fail(`no form on ${url}: ${pageError(html)}`);
  if ('login' in form.fields) { // login page; the consent page has only hidden fields
    form.fields.login = args.login;
    form.fields.password = 'any'; // dev login ignores the password
  }
  const posted = await hop(form.action, { method: 'POST', form: form.fields });
  ({ res, url } = await follow(posted, form.action));
}
if (res) fail(`did not reach ${redirectUri}; stuck at ${url}`);

const cb = new URL(url).searchParams;
if (cb.get('error')) fail(`authorization error: ${cb.get('error')}: ${cb.get('error_description') ?? ''}`);
if (cb.get('state') !== state) fail('state mismatch in callback');
const code = cb.get('code');
if (!code) fail(`no code in callback ${url}`);

// ---- 4. code exchange with the client's authentication method ----
// The registered method isn't in discovery, so by default: no secret -> "none" (client_id in
// body); with a secret try client_secret_basic and, if the provider answers invalid_client, retry
// with client_secret_post (a failed client authentication does not consume the code).
async function exchange(method) {
  const form = {
    grant_type: 'authorization_code', code, redirect_uri: redirectUri, code_verifier: verifier,
  };
  const headers = { 'content-type': 'application/x-www-form-urlencoded' };
  const id = args['client-id'];
  const secret = args['client-secret'] ?? '';
  if (method === 'client_secret_basic') {
    // RFC 6749 2.3.1: form-urlencode id and secret before base64.
    const enc = (s) => encodeURIComponent(s).replace(/%20/g, '+');
    headers.authorization = `Basic ${Buffer.from(`${enc(id)}:${enc(secret)}`).toString('base64')}`;
  } else {
    form.client_id = id;
    if (method === 'client_secret_post') form.client_secret = secret;
  }
  let r;
  try {
    r = await fetch(meta.token_endpoint, { method: 'POST', headers, body: new URLSearchParams(form) });
  } catch (e) {
    fail(`token endpoint: ${e.cause?.message ?? e.message}`);
  }
  const text = await r.text();
  let json;
  try { json = JSON.parse(text); } catch { fail(`token endpoint returned non-JSON (HTTP ${r.status}): ${text.slice(0, 300)}`); }
  return { r, json };
}

let methods = [args['auth-method']];
if (!args['auth-method']) methods = args['client-secret'] ? ['client_secret_basic', 'client_secret_post'] : ['none'];
let out;
for (const m of methods) {
  const attempt = await exchange(m);
  // If every method fails, report an error that is not just the server's strict-method refusal.
  if (!out || /STRICT_CLIENT_AUTH/.test(out.json.error_description)) out = attempt;
  if (attempt.json.error !== 'invalid_client') { out = attempt; break; }
}
const { r: tokenRes, json: tokens } = out;
if (!tokenRes.ok) fail(`token endpoint HTTP ${tokenRes.status}: ${tokens.error}: ${tokens.error_description ?? ''}`);
if (!tokens.refresh_token) fail(`no refresh_token in token response (scope: ${tokens.scope ?? '?'}); is offline_access requested and allowed?`);

process.stdout.write(`${JSON.stringify(tokens)}\n`);
