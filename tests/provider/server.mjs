// Local OpenID provider for end-to-end tests (oidc-provider 8.8.1).
// stdout carries exactly one JSON line ({"issuer","port"}) once listening; everything else goes to stderr.
import http from 'node:http';
import { createHash, generateKeyPairSync, randomBytes } from 'node:crypto';

// oidc-provider prints NOTICE lines with console.info (stdout) and WARNINGs with console.warn.
// Route all console output to stderr so stdout stays machine-readable, and drop the library's
// dev-mode chatter unless PROVIDER_VERBOSE=1.
const verbose = process.env.PROVIDER_VERBOSE === '1';
const toStderr = (...args) => {
  if (!verbose && typeof args[0] === 'string' && args[0].includes('oidc-provider ')) return;
  process.stderr.write(`${args.map(String).join(' ')}\n`);
};
console.log = console.info = console.warn = console.debug = toStderr;

const { default: Provider } = await import('oidc-provider');

const ACCESS_TOKEN_TTL = Number(process.env.ACCESS_TOKEN_TTL ?? 5);
const LONG = 24 * 60 * 60; // refresh tokens, grants, sessions: 1 day
if (!Number.isInteger(ACCESS_TOKEN_TTL) || ACCESS_TOKEN_TTL <= 0) {
  process.stderr.write(`ACCESS_TOKEN_TTL must be a positive integer, got ${process.env.ACCESS_TOKEN_TTL}\n`);
  process.exit(2);
}

// ---- Unbounded Map-based adapter (the bundled one is an LRU capped at 1,000 entries) ----
const store = new Map(); // "Model:id" -> { payload, expiresAt (ms) | undefined }
const index = new Map(); // "grant:<id>" / "uid:<uid>" / "userCode:<code>" -> key(s)

function live(key) {
  const entry = store.get(key);
  if (!entry) return undefined;
  if (entry.expiresAt !== undefined && entry.expiresAt <= Date.now()) {
    store.delete(key);
    return undefined;
  }
  return entry.payload;
}

class MapAdapter {
  constructor(model) { this.model = model; }

  key(id) { return `${this.model}:${id}`; }

  async upsert(id, payload, expiresIn) {
    const key = this.key(id);
    const expiresAt = expiresIn ? Date.now() + expiresIn * 1000 : undefined;
    store.set(key, { payload, expiresAt });
    if (payload.grantId) {
      const g = `grant:${payload.grantId}`;
      if (!index.has(g)) index.set(g, new Set());
      index.get(g).add(key);
    }
    if (this.model === 'Session' && payload.uid) index.set(`uid:${payload.uid}`, id);
    if (payload.userCode) index.set(`userCode:${payload.userCode}`, id);
  }

  async find(id) { return live(this.key(id)); }

  async findByUid(uid) {
    const id = index.get(`uid:${uid}`);
    return id === undefined ? undefined : this.find(id);
  }

  async findByUserCode(userCode) {
    const id = index.get(`userCode:${userCode}`);
    return id === undefined ? undefined : this.find(id);
  }

  async consume(id) {
    const payload = live(this.key(id));
    if (payload) payload.consumed = Math.floor(Date.now() / 1000);
  }

  async destroy(id) { store.delete(this.key(id)); }

  // Called once per token model when a grant is revoked (e.g. refresh-token reuse):
  // drop this model's entries that belong to the grant.
  async revokeByGrantId(grantId) {
    const keys = index.get(`grant:${grantId}`);
    if (!keys) return;
    for (const key of keys) {
      if (key.startsWith(`${this.model}:`)) {
        store.delete(key);
        keys.delete(key);
      }
    }
    if (keys.size === 0) index.delete(`grant:${grantId}`);
  }
}

// Sweep expired entries now and then so long test runs don't grow without bound.
setInterval(() => {
  for (const key of store.keys()) live(key);
}, 60_000).unref();

// ---- Refresh-token presentation counter (stores sha256 digests only, never the tokens) ----
const stats = { refresh_requests: 0, replays: 0 };
let seen = new Set();

function recordTokenRequest(params) {
  if (params.get('grant_type') !== 'refresh_token') return;
  stats.refresh_requests += 1;
  const token = params.get('refresh_token');
  if (!token) return;
  const digest = createHash('sha256').update(token).digest('hex');
  if (seen.has(digest)) stats.replays += 1;
  else seen.add(digest);
}

// ---- Strict client authentication ----
// oidc-provider accepts client_secret_basic and client_secret_post interchangeably for any
// secret client. Tests want to catch a client using the wrong one, so (unless
// STRICT_CLIENT_AUTH=0) the other mechanism is refused for these two clients.
const STRICT = process.env.STRICT_CLIENT_AUTH !== '0';
const SECRET_METHOD = { 'agent-basic': 'client_secret_basic', 'agent-post': 'client_secret_post' };

function wrongAuthMethod(req, params) {
  const auth = req.headers.authorization ?? '';
  const basic = /^basic /i.test(auth);
  let clientId = params.get('client_id');
  if (basic) {
    const user = Buffer.from(auth.slice(6).trim(), 'base64').toString('utf8').split(':')[0];
    try { clientId = decodeURIComponent(user.replace(/\+/g, '%20')); } catch { return null; }
  }
  const want = SECRET_METHOD[clientId];
  if (want === 'client_secret_basic' && !basic && params.has('client_secret')) return want;
  if (want === 'client_secret_post' && basic) return want;
  return null;
}

function sendJson(res, status, obj) {
  res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store' });
  res.end(JSON.stringify(obj));
}

// ---- HTTP front: test endpoints, recording and auth checks, then hand on to the provider ----
const TOKEN_PATH = '/token'; // oidc-provider default routes
const CLIENT_AUTH_PATHS = new Set([TOKEN_PATH, '/token/introspection', '/token/revocation']);
let callback; // provider.callback(), set once the issuer (which needs the port) is known
let tokenDelayMs = 0; // set by POST /test/token-delay?ms=N

const server = http.createServer((req, res) => {
  if (!callback) return sendJson(res, 503, { error: 'starting' });
  const { pathname } = new URL(req.url, 'http://x');

  if (pathname === '/test/stats' && req.method === 'GET') {
    return sendJson(res, 200, { ...stats, distinct_refresh_tokens: seen.size });
  }
  if (pathname === '/test/token-delay' && req.method === 'POST') {
    // Holds every token answer back this long after the provider has made it, so a test can
    // stop the agent while a refresh that already rotated the token is still on its way.
    tokenDelayMs = Number(new URL(req.url, 'http://x').searchParams.get('ms') ?? 0);
    return sendJson(res, 200, { ok: true, ms: tokenDelayMs });
  }
  if (pathname === '/test/reset-stats' && req.method === 'POST') {
    stats.refresh_requests = 0;
    stats.replays = 0;
    seen = new Set();
    return sendJson(res, 200, { ok: true });
  }

  if (CLIENT_AUTH_PATHS.has(pathname) && req.method === 'POST') {
    // Buffer the body to inspect it. oidc-provider's body parser then sees a stream that is no
    // longer readable and uses req.body instead (its supported "upstream parser" path), so the
    // endpoints work unchanged for form-body and Basic-auth clients alike.
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      req.body = Buffer.concat(chunks);
      const params = new URLSearchParams(req.body.toString('utf8'));
      // Counted before any authentication check: every presentation counts, even refused ones.
      if (pathname === TOKEN_PATH) recordTokenRequest(params);
      if (pathname === TOKEN_PATH && tokenDelayMs > 0) {
        const end = res.end.bind(res);
        res.end = (...args) => setTimeout(() => end(...args), tokenDelayMs);
      }
      const want = STRICT && wrongAuthMethod(req, params);
      if (want) {
        return sendJson(res, 401, {
          error: 'invalid_client',
          error_description: `client must authenticate with ${want} (STRICT_CLIENT_AUTH)`,
        });
      }
      return callback(req, res);
    });
    req.on('error', () => res.destroy());
    return undefined;
  }

  return callback(req, res);
});

const clientDefaults = {
  grant_types: ['authorization_code', 'refresh_token'],
  response_types: ['code'],
  redirect_uris: ['http://127.0.0.1/cb'],
};

server.listen(Number(process.env.PORT ?? 0), '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;

  const provider = new Provider(issuer, {
    adapter: MapAdapter,
    clients: [
      { ...clientDefaults, client_id: 'agent-basic', client_secret: 'basic-secret', token_endpoint_auth_method: 'client_secret_basic' },
      { ...clientDefaults, client_id: 'agent-post', client_secret: 'post-secret', token_endpoint_auth_method: 'client_secret_post' },
      { ...clientDefaults, client_id: 'agent-public', token_endpoint_auth_method: 'none' },
      // tokenctl login: a native public client for the device flow and the browser flow
      // (loopback redirect on any port, RFC 8252 7.3), and a service account.
      {
        client_id: 'agent-device',
        application_type: 'native',
        token_endpoint_auth_method: 'none',
        grant_types: ['urn:ietf:params:oauth:grant-type:device_code', 'authorization_code', 'refresh_token'],
        response_types: ['code'],
        redirect_uris: ['http://127.0.0.1/callback'],
      },
      {
        client_id: 'agent-service',
        client_secret: 'service-secret',
        token_endpoint_auth_method: 'client_secret_basic',
        grant_types: ['client_credentials'],
        response_types: [],
        redirect_uris: [],
      },
    ],
    // Fresh per-process keys: avoids the library's shared dev keys (and their warning).
    jwks: { keys: [generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' })] },
    cookies: {
      keys: [randomBytes(32).toString('hex')],
      // Default 'none' needs Secure in browsers; plain-http issuer, so use lax.
      long: { httpOnly: true, sameSite: 'lax' },
    },
    scopes: ['openid', 'offline_access', 'profile', 'email'],
    claims: { openid: ['sub'], email: ['email', 'email_verified'], profile: ['name'] },
    // Any login name is a valid account whose sub is that name.
    async findAccount(ctx, id) {
      return {
        accountId: id,
        async claims() { return { sub: id, name: id, email: `${id}@example.test`, email_verified: true }; },
      };
    },
    features: {
      devInteractions: { enabled: true }, // built-in login/consent pages driven by sign-in.mjs
      introspection: {
        enabled: true,
        // Test provider: every registered client (public ones too) may introspect any token.
        async allowedPolicy() { return true; },
      },
      revocation: { enabled: true },
      deviceFlow: { enabled: true }, // RFC 8628; pages at /device, driven by act-as-user.mjs
      clientCredentials: { enabled: true },
    },
    async issueRefreshToken(ctx, client, code) {
      return client.grantTypeAllowed('refresh_token') && code.scopes.has('offline_access');
    },
    rotateRefreshToken: true, // every refresh consumes the presented token; reuse revokes the grant
    clockTolerance: 0, // expiry is exact, so tests can wait ACCESS_TOKEN_TTL+1 s and see it dead
    ttl: {
      AccessToken: ACCESS_TOKEN_TTL,
      AuthorizationCode: 60,
      DeviceCode: 600,
      ClientCredentials: ACCESS_TOKEN_TTL,
      IdToken: 3600,
      Interaction: 3600,
      RefreshToken: LONG,
      Grant: LONG,
      Session: LONG,
    },
  });

  // Real failures always go to stderr; grant errors (e.g. "refresh token already used", which the
  // HTTP answer hides behind "grant request is invalid") only with PROVIDER_VERBOSE=1.
  provider.on('server_error', (ctx, err) => process.stderr.write(`server_error: ${err.stack}\n`));
  provider.on('grant.error', (ctx, err) => {
    if (verbose) process.stderr.write(`grant.error: ${err.error}: ${err.error_detail ?? err.message}\n`);
  });

  callback = provider.callback();
  process.stdout.write(`${JSON.stringify({ issuer, port })}\n`);
});

server.on('error', (err) => {
  process.stderr.write(`server error: ${err.message}\n`);
  process.exit(1);
});

function shutdown() {
  server.close(() => process.exit(0));
  server.closeAllConnections(); // don't wait on keep-alive sockets
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
