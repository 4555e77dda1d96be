// Act as the person at the browser for `tokenctl login`, over HTTP, with no browser.
//
//   node act-as-user.mjs --url AUTHORIZATION_URL [--login NAME]
//       Follows the authorization URL tokenctl printed (browser flow), fills the dev login and
//       consent pages, then sends the final redirect to tokenctl's loopback listener and prints
//       its answer's status and body.
//   node act-as-user.mjs --device VERIFICATION_URI --user-code CODE [--login NAME] [--deny]
//       Enters the user code on the provider's device page, confirms (or aborts with --deny),
//       signs in and consents. Prints the final page's title.
import { parseArgs } from 'node:util';

function fail(msg) {
  process.stderr.write(`act-as-user: ${msg}\n`);
  process.exit(1);
}

let args;
try {
  ({ values: args } = parseArgs({
    options: {
      url: { type: 'string' },
      device: { type: 'string' },
      'user-code': { type: 'string' },
      login: { type: 'string', default: 'agent-user' },
      deny: { type: 'boolean', default: false },
    },
  }));
} catch (e) {
  fail(e.message);
}
if (!args.url && !(args.device && args['user-code'])) fail('--url, or --device with --user-code, is required');

// Minimal cookie jar: name+path -> value.
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

const start = new URL(args.url ?? args.device);
const isProvider = (u) => new URL(u).origin === start.origin;

// Follow redirects within the provider; stop at a page, or at a redirect leaving the provider.
async function follow(res, url) {
  for (let i = 0; i < 20; i += 1) {
    if (res.status < 300 || res.status >= 400) return { res, url };
    const loc = res.headers.get('location');
    if (!loc) fail(`${res.status} from ${url} without Location`);
    url = new URL(loc, url).href;
    if (!isProvider(url)) return { res: null, url };
    res = await hop(url);
  }
  return fail('too many redirects');
}

const unescapeHtml = (s) => s.replace(/&amp;/g, '&').replace(/&quot;/g, '"').replace(/&#39;/g, "'")
  .replace(/&lt;/g, '<').replace(/&gt;/g, '>');

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

let { res, url } = await follow(await hop(start.href), start.href);
let title = '';
for (let step = 0; res && step < 8; step += 1) {
  const html = await res.text();
  title = html.match(/<title>([^<]*)<\/title>/i)?.[1] ?? '';
  if (res.status !== 200) fail(`HTTP ${res.status} at ${url.split('?')[0]}: ${html.replace(/<[^>]*>/g, ' ').replace(/\s+/g, ' ').slice(0, 300)}`);
  const form = parseForm(html, url);
  if (!form) break; // a final page (device flow success or error)
  if ('login' in form.fields) {
    form.fields.login = args.login;
    form.fields.password = 'any';
  }
  if ('user_code' in form.fields && !form.fields.user_code) form.fields.user_code = args['user-code'];
  if (form.action.includes('/device') && 'user_code' in form.fields && form.fields.user_code && args.deny
      && /Confirm/i.test(title)) {
    form.fields.abort = 'yes';
  }
  const posted = await hop(form.action, { method: 'POST', form: form.fields });
  ({ res, url } = await follow(posted, form.action));
}

if (args.device) {
  if (res) {
    process.stdout.write(`${title}\n`);
    process.exit(0);
  }
  fail(`the device flow left the provider for ${url}`);
}
if (res) fail(`did not leave the provider; stuck at ${url} (${title})`);
// The browser flow: deliver the redirect to tokenctl's loopback listener.
let answer;
try {
  answer = await fetch(url, { redirect: 'manual' });
} catch (e) {
  fail(`the loopback redirect ${url.split('?')[0]}: ${e.cause?.message ?? e.message}`);
}
const body = await answer.text();
process.stdout.write(`${answer.status} ${body.replace(/\s+/g, ' ')}\n`);
if (answer.status !== 200) process.exit(1);
