// playground.js - chat and raw completion against the base model or any adapter, streamed over
// SSE, with stop (aborting the fetch closes the connection: the server frees the sequence), sampling
// parameters, response_format, per-answer TTFT and tokens/s, the conversation in localStorage, and
// the router view: each generated token coloured by its dominant HydraLoRA head. Model text is put
// in the page only as text nodes.
import { sse, ApiError } from './api.js';
import { $, el, headColor, handleAuth, copyText } from './ui.js';

const STORE = 'hydrad.conversation';
const enc = new TextEncoder();

let models = [];       // /v1/models data
let conv = { messages: [] };
let running = null;    // {ctrl} while an answer streams

function loadConv() {
  try {
    const c = JSON.parse(localStorage.getItem(STORE) || 'null');
    if (c && Array.isArray(c.messages)) conv = c;
  } catch (e) { conv = { messages: [] }; }
}

function saveConv() {
  try { localStorage.setItem(STORE, JSON.stringify(conv)); } catch (e) { /* full or disabled */ }
}

export function setModels(list) {
  models = list;
  const sel = $('model');
  const keep = sel.value;
  sel.replaceChildren();
  for (const m of list) {
    sel.append(el('option', { value: m.id, text: m.parent ? `${m.id}  (adapter)` : `${m.id}  (base)` }));
  }
  if (list.some((m) => m.id === keep)) sel.value = keep;
  sel.dataset.count = String(list.length);
}

function isAdapter(id) {
  const m = models.find((x) => x.id === id);
  return !!(m && m.parent);
}

// ---- rendering ----

// The router view of one answer: spans per token coloured by head, then the legend.
class RouterView {
  constructor(m) {
    this.m = m;
    m.router = m.router || { heads: [], K: 0, segs: [], meanGate: null };
    this.r = m.router;
    this.tokBytes = [];  // byte length of each generated token (chat logprobs' bytes)
    this.tok = 0;        // token holding the next text byte
    this.used = 0;       // bytes of that token already matched to text
  }

  // One chunk: its text, its tokens' byte lengths (may be empty) and their dominant heads.
  add(text, tokLens, heads, K) {
    if (K) this.r.K = K;
    this.r.heads.push(...heads);
    this.tokBytes.push(...tokLens);
    const out = [];
    for (const ch of text) {
      let h, t;
      if (this.tok < this.tokBytes.length) {
        t = this.tok;
        h = this.r.heads[t];
        this.used += enc.encode(ch).length;
        while (this.tok < this.tokBytes.length && this.used >= this.tokBytes[this.tok]) {
          this.used -= this.tokBytes[this.tok];
          this.tok++;
        }
      } else {
        // no token bytes (raw completions): the chunk's text goes to its last head
        t = this.r.heads.length - 1;
        h = this.r.heads.length ? this.r.heads[this.r.heads.length - 1] : -1;
      }
      const last = out[out.length - 1];
      if (last && last[2] === t) last[0] += ch;
      else out.push([ch, h, t]);
    }
    const segs = this.r.segs;
    for (const s of out) {
      const prev = segs[segs.length - 1];
      if (prev && prev[2] === s[2]) prev[0] += s[0];
      else segs.push(s);
    }
    return out;
  }
}

function tokSpan(seg) {
  const [text, h, t] = seg;
  const s = el('span', { class: 'tok', text, title: h >= 0 ? `token ${t}: head ${h}` : '' });
  if (h >= 0) {
    s.dataset.head = String(h);
    s.dataset.tok = String(t);
    s.style.borderBottomColor = headColor(h);
    s.style.backgroundColor = `color-mix(in srgb, ${headColor(h)} 22%, transparent)`;
  }
  return s;
}

function legend(router) {
  const box = el('div', { class: 'router-legend' });
  const n = router.heads.length;
  const K = Math.max(router.K || 0, ...router.heads.map((h) => h + 1), 0);
  if (!n || !K) return box;
  box.append(el('span', { class: 'muted', text: `router, ${n} tokens:` }));
  for (let k = 0; k < K; k++) {
    const c = router.heads.filter((h) => h === k).length;
    const pct = (100 * c) / n;
    const item = el('span', { class: 'head', data: { head: String(k), share: pct.toFixed(1) } });
    const sw = el('span', { class: 'sw' });
    sw.style.backgroundColor = headColor(k);
    item.append(sw, `head ${k}: ${pct.toFixed(0)}%`);
    const bar = el('span', { class: 'share' });
    bar.style.width = `${Math.round(pct * 0.4)}px`;
    bar.style.color = headColor(k);
    item.append(bar);
    if (router.meanGate && router.meanGate[k] !== undefined) item.title = `mean gate ${router.meanGate[k].toFixed(3)}`;
    box.append(item);
  }
  return box;
}

function statsText(m) {
  const s = m.stats;
  if (!s) return '';
  const parts = [];
  if (s.ttft !== undefined) parts.push(`TTFT ${Math.round(s.ttft)} ms`);
  if (s.tps !== undefined) parts.push(`${s.tps.toFixed(1)} tok/s`);
  if (s.tokens !== undefined) parts.push(`${s.tokens} tokens`);
  if (s.finish) parts.push(`finish: ${s.finish}`);
  if (m.stopped) parts.push('stopped');
  return parts.join(' · ');
}

function renderMsg(m) {
  const who = { user: 'you', assistant: m.model || 'assistant', prompt: 'prompt', completion: m.model || 'completion' }[m.role] || m.role;
  const node = el('div', { class: `msg ${m.role}${m.error ? ' failed' : ''}` });
  const copy = el('button', { type: 'button', class: 'small copy', text: 'copy' });
  copy.addEventListener('click', () => copyText(m.content, copy));
  const content = el('div', { class: 'content' });
  if (m.router && m.router.segs.length) content.append(...m.router.segs.map(tokSpan));
  else content.textContent = m.content;
  if (m.error) content.append(el('div', { class: 'error', text: m.error }));
  node.append(el('div', { class: 'who' }, el('span', { text: who }), copy), content);
  node.append(el('div', { class: 'stats', text: statsText(m) }));
  if (m.router && m.router.heads.length) node.append(legend(m.router));
  node.dataset.state = m.pending ? 'streaming' : m.error ? 'error' : m.stopped ? 'stopped' : 'done';
  return node;
}

function renderAll() {
  $('conversation').replaceChildren(...conv.messages.map(renderMsg));
  scrollDown();
}

function scrollDown() {
  const c = $('conversation');
  c.scrollTop = c.scrollHeight;
}

// ---- requests ----

function num(id) {
  const v = $(id).value.trim();
  return v === '' ? undefined : Number(v);
}

// The request body from the settings; throws Error on a bad schema.
function buildBody(chat, prompt) {
  const model = $('model').value;
  const b = { model, stream: true, stream_options: { include_usage: true } };
  const t = num('temperature'), p = num('top-p'), mt = num('max-tokens'), seed = num('seed');
  if (t !== undefined) b.temperature = t;
  if (p !== undefined) b.top_p = p;
  if (mt !== undefined) b.max_tokens = mt;
  if (seed !== undefined) b.seed = seed;
  if ($('ignore-eos').checked) b.ignore_eos = true;
  const fmt = $('format').value;
  if (fmt === 'json_object') b.response_format = { type: 'json_object' };
  if (fmt === 'json_schema') {
    let schema;
    try { schema = JSON.parse($('schema').value); } catch (e) { throw new Error(`JSON schema: ${e.message}`); }
    b.response_format = { type: 'json_schema', json_schema: { name: 'console', schema, strict: true } };
  }
  const router = isAdapter(model) && $('router').checked;
  if (router) {
    b.hydra = { return_router: true };
    b.logprobs = chat ? true : 0; // the tokens' bytes line the text up with the router's heads
  }
  if (chat) {
    const msgs = [];
    const sys = $('system').value;
    if (sys.trim()) msgs.push({ role: 'system', content: sys });
    for (const m of conv.messages) {
      if ((m.role === 'user' || m.role === 'assistant') && !m.error && !m.pending) msgs.push({ role: m.role, content: m.content });
    }
    msgs.push({ role: 'user', content: prompt });
    b.messages = msgs;
  } else {
    b.prompt = prompt;
  }
  return { body: b, router };
}

async function send() {
  if (running) return;
  const prompt = $('prompt').value;
  const chat = $('mode').value === 'chat';
  $('chat-error').textContent = '';
  if (!$('model').value) {
    $('chat-error').textContent = 'No model to talk to (is the API key set?).';
    return;
  }
  let req;
  try { req = buildBody(chat, prompt); } catch (e) {
    $('chat-error').textContent = e.message;
    return;
  }
  const { body, router } = req;
  conv.messages.push({ role: chat ? 'user' : 'prompt', content: prompt });
  const m = { role: chat ? 'assistant' : 'completion', content: '', model: body.model, pending: true };
  if (router) m.router = { heads: [], K: 0, segs: [], meanGate: null };
  conv.messages.push(m);
  $('prompt').value = '';
  renderAll();
  const node = $('conversation').lastElementChild;
  const content = node.querySelector('.content');
  const statsEl = node.querySelector('.stats');
  node.dataset.state = 'streaming';
  node.dataset.chunks = '0';
  const rv = router ? new RouterView(m) : null;
  const ctrl = new AbortController();
  running = { ctrl };
  $('send').disabled = true;
  $('stop').disabled = false;
  const t0 = performance.now();
  let tFirst, usage = null, finish = null, chunks = 0, nTok = 0;
  try {
    const path = chat ? '/v1/chat/completions' : '/v1/completions';
    for await (const ev of sse(path, body, ctrl.signal)) {
      if (ev.usage) usage = ev.usage;
      const c = ev.choices && ev.choices[0];
      if (!c) continue;
      const text = (chat ? c.delta && c.delta.content : c.text) || '';
      if (text && tFirst === undefined) tFirst = performance.now();
      const rt = c.hydra && c.hydra.router;
      let lens = [];
      if (chat && c.logprobs && Array.isArray(c.logprobs.content)) {
        lens = c.logprobs.content.map((x) => (Array.isArray(x.bytes) ? x.bytes.length : enc.encode(x.token || '').length));
      } else if (!chat && c.logprobs && Array.isArray(c.logprobs.tokens)) {
        lens = c.logprobs.tokens.map((x) => enc.encode(x || '').length);
      }
      nTok += rt ? rt.token_heads.length : lens.length;
      m.content += text;
      if (rv && rt) {
        const segs = rv.add(text, lens, rt.token_heads || [], rt.heads);
        for (const s of segs) {
          const last = content.lastElementChild;
          if (last && last.dataset.tok === String(s[2]) && s[1] >= 0) last.textContent += s[0];
          else content.append(tokSpan(s));
        }
        if (rt.mean_gate) m.router.meanGate = rt.mean_gate;
      } else if (text) {
        content.append(document.createTextNode(text));
      }
      if (c.finish_reason) finish = c.finish_reason;
      chunks++;
      node.dataset.chunks = String(chunks);
      const secs = (performance.now() - (tFirst || t0)) / 1000;
      statsEl.textContent = tFirst === undefined ? 'waiting for the first token…'
        : `TTFT ${Math.round(tFirst - t0)} ms · ${secs > 0 && (nTok || chunks) > 1 ? (((nTok || chunks) - 1) / secs).toFixed(1) : '–'} tok/s`;
      scrollDown();
    }
  } catch (e) {
    if (e.name === 'AbortError') m.stopped = true;
    else {
      m.error = e.message;
      if (e instanceof ApiError) handleAuth(e, false);
    }
  } finally {
    const tEnd = performance.now();
    const tokens = usage ? usage.completion_tokens : nTok || undefined;
    m.stats = { finish: finish || undefined, tokens };
    if (tFirst !== undefined) {
      m.stats.ttft = tFirst - t0;
      if (tokens > 1 && tEnd > tFirst) m.stats.tps = (tokens - 1) / ((tEnd - tFirst) / 1000);
    }
    delete m.pending;
    running = null;
    $('send').disabled = false;
    $('stop').disabled = true;
    saveConv();
    node.replaceWith(renderMsg(m));
    const fresh = $('conversation').lastElementChild;
    fresh.dataset.chunks = String(chunks);
    scrollDown();
  }
}

function stop() {
  if (running) running.ctrl.abort();
}

export function init() {
  loadConv();
  // an answer cut by a reload is kept as it was, marked stopped
  for (const m of conv.messages) if (m.pending) { delete m.pending; m.stopped = true; }
  renderAll();
  $('prompt-form').addEventListener('submit', (ev) => { ev.preventDefault(); send(); });
  $('prompt').addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); send(); }
  });
  $('stop').addEventListener('click', stop);
  $('clear').addEventListener('click', () => {
    if (running) return;
    conv = { messages: [] };
    saveConv();
    renderAll();
  });
  const fmt = () => { $('schema').hidden = $('format').value !== 'json_schema'; };
  $('format').addEventListener('change', fmt);
  fmt();
}
