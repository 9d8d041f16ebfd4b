// api.js - the console's one way to the server: fetch() with the keys the user typed, kept in
// sessionStorage (this tab only, gone when it closes); OpenAI-shaped errors turned into ApiError
// with the server's message verbatim; SSE streams read from fetch bodies.

const API_KEY = 'hydrad.apiKey';
const ADMIN_KEY = 'hydrad.adminKey';

function stored(name) {
  try { return sessionStorage.getItem(name) || ''; } catch (e) { return ''; }
}
function store(name, v) {
  try { if (v) sessionStorage.setItem(name, v); else sessionStorage.removeItem(name); } catch (e) { /* private mode */ }
}

export const keys = {
  get api() { return stored(API_KEY); },
  set api(v) { store(API_KEY, v); },
  get admin() { return stored(ADMIN_KEY); },
  set admin(v) { store(ADMIN_KEY, v); },
};

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

function headers(admin, json) {
  const h = {};
  const k = admin ? (keys.admin || keys.api) : keys.api;
  if (k) h.Authorization = 'Bearer ' + k;
  if (json) h['Content-Type'] = 'application/json';
  return h;
}

async function toError(r) {
  let msg = `${r.status} ${r.statusText}`;
  let body = null;
  try {
    body = await r.json();
    if (body && body.error && typeof body.error.message === 'string') msg = body.error.message;
  } catch (e) { /* not JSON: keep the status line */ }
  return new ApiError(r.status, msg, body);
}

// One request; throws ApiError on a non-2xx answer. opts: {admin, signal}.
export async function request(method, path, body, opts = {}) {
  const r = await fetch(path, {
    method,
    headers: headers(!!opts.admin, body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: opts.signal,
    cache: 'no-store',
  });
  if (!r.ok) throw await toError(r);
  return r;
}

export async function getJSON(path, opts) {
  return (await request('GET', path, undefined, opts)).json();
}

export async function getText(path) {
  return (await request('GET', path)).text();
}

export async function postJSON(path, body, opts) {
  const r = await request('POST', path, body, opts);
  const t = await r.text();
  try { return JSON.parse(t); } catch (e) { return t; }
}

// Server-sent events of a streamed completion: yields each `data:` payload parsed as JSON, ends at
// [DONE]; an error event mid-stream throws ApiError with its message.
export async function* sse(path, body, signal) {
  const r = await request('POST', path, body, { signal });
  const reader = r.body.getReader();
  const dec = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf('\n\n')) >= 0) {
      const ev = buf.slice(0, i);
      buf = buf.slice(i + 2);
      for (const line of ev.split('\n')) {
        if (!line.startsWith('data:')) continue;
        const data = line.slice(5).trim();
        if (data === '[DONE]') return;
        const obj = JSON.parse(data);
        if (obj.error) throw new ApiError(obj.error.code || 500, obj.error.message || 'stream error', obj);
        yield obj;
      }
    }
  }
}

// Prometheus text -> [{name, labels: {k: v}, value}] (comments skipped).
export function parseMetrics(text) {
  const out = [];
  for (const line of text.split('\n')) {
    if (!line || line[0] === '#') continue;
    const m = /^([A-Za-z_:][A-Za-z0-9_:]*)(\{(.*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    if (m[3]) {
      const re = /([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
      let l;
      while ((l = re.exec(m[3]))) labels[l[1]] = l[2].replace(/\\(.)/g, (_, c) => (c === 'n' ? '\n' : c));
    }
    out.push({ name: m[1], labels, value: Number(m[4]) });
  }
  return out;
}
