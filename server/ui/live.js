// live.js - polls /metrics every 2 s and draws small time charts on canvases (no chart library):
// requests running/waiting, KV blocks used/cached/free, generated tokens/s over all requests, and
// requests per adapter. Keeps the last 5 minutes in memory only.
import { getText, parseMetrics } from './api.js';
import { $, el, handleAuth } from './ui.js';

const PERIOD_MS = 2000;
const KEEP = 150;
const COLORS = ['#4363d8', '#e6194b', '#3cb44b', '#f58231', '#911eb4', '#42d4f4', '#f032e6', '#9a6324'];

const hist = [];   // {t, running, waiting, kvUsed, kvCached, kvFree, kvTotal, tps, adapters: {name: n}}
let prev = null;   // {t, gen}
let failing = false;

function sum(ms, name) {
  let v = 0, seen = false;
  for (const m of ms) if (m.name === name) { v += m.value; seen = true; }
  return seen ? v : undefined;
}

async function poll() {
  let text;
  try {
    text = await getText('/metrics');
  } catch (e) {
    $('live-error').textContent = e.message;
    if (!failing) handleAuth(e, false);
    failing = true;
    return;
  }
  failing = false;
  $('live-error').textContent = '';
  const ms = parseMetrics(text);
  const t = Date.now() / 1000;
  const gen = sum(ms, 'hydrad_generation_tokens_total') || 0;
  const kvTotal = sum(ms, 'hydrad_kv_blocks_total') || 0;
  const kvUsed = sum(ms, 'hydrad_kv_blocks_used') || 0;
  const kvCached = sum(ms, 'hydrad_kv_blocks_cached') || 0;
  const adapters = {};
  for (const m of ms) if (m.name === 'hydrad_adapter_requests_total' && m.labels.adapter !== undefined) adapters[m.labels.adapter] = m.value;
  const p = {
    t,
    running: sum(ms, 'vllm:num_requests_running') ?? sum(ms, 'hydrad_running_sequences') ?? 0,
    waiting: sum(ms, 'vllm:num_requests_waiting') ?? sum(ms, 'hydrad_queue_depth') ?? 0,
    kvUsed, kvCached, kvTotal, kvFree: Math.max(0, kvTotal - kvUsed - kvCached),
    tps: prev && t > prev.t ? Math.max(0, (gen - prev.gen) / (t - prev.t)) : 0,
    gen, adapters,
  };
  prev = { t, gen };
  hist.push(p);
  while (hist.length > KEEP) hist.shift();
  $('live-running').textContent = String(p.running);
  $('live-waiting').textContent = String(p.waiting);
  $('live-kv-used').textContent = String(p.kvUsed);
  $('live-kv-cached').textContent = String(p.kvCached);
  $('live-kv-free').textContent = String(p.kvFree);
  $('live-kv-total').textContent = String(p.kvTotal);
  $('live-tps').textContent = p.tps.toFixed(1);
  $('view-live').dataset.samples = String(hist.length);
  $('view-live').dataset.generated = String(gen);
  if (!$('view-live').hidden) draw();
}

// series: [{label, color, values}] over hist's times.
function chart(canvas, legendBox, series, unit) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 460, h = canvas.clientHeight || 140;
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(h * dpr);
  const g = canvas.getContext('2d');
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  const left = 34, bottom = h - 14, top = 6, right = w - 4;
  let max = 0;
  for (const s of series) for (const v of s.values) max = Math.max(max, v);
  max = max > 0 ? max * 1.1 : 1;
  g.strokeStyle = '#d8dde5';
  g.fillStyle = '#667085';
  g.font = '10px system-ui, sans-serif';
  g.lineWidth = 1;
  for (const f of [0, 0.5, 1]) {
    const y = bottom - f * (bottom - top);
    g.beginPath(); g.moveTo(left, y); g.lineTo(right, y); g.stroke();
    const v = f * max;
    g.fillText(v >= 100 ? v.toFixed(0) : v.toFixed(v >= 10 ? 1 : 2), 2, y + 3);
  }
  g.fillText(`-${Math.round((KEEP * PERIOD_MS) / 60000)} min`, left, h - 2);
  g.fillText('now', right - 18, h - 2);
  const n = KEEP;
  const x = (i, len) => right - ((len - 1 - i) * (right - left)) / (n - 1);
  for (const s of series) {
    const len = s.values.length;
    if (!len) continue;
    g.strokeStyle = s.color;
    g.lineWidth = 1.6;
    g.beginPath();
    s.values.forEach((v, i) => {
      const y = bottom - (v / max) * (bottom - top);
      if (i === 0) g.moveTo(x(i, len), y); else g.lineTo(x(i, len), y);
    });
    g.stroke();
  }
  legendBox.replaceChildren(...series.map((s) => {
    const sw = el('span', { class: 'sw' });
    sw.style.backgroundColor = s.color;
    const last = s.values.length ? s.values[s.values.length - 1] : 0;
    return el('span', { class: 'series', data: { label: s.label, value: String(last) } }, sw,
      `${s.label} ${Number.isInteger(last) ? last : last.toFixed(1)}${unit || ''}`);
  }));
}

export function draw() {
  const col = (k) => hist.map((p) => p[k]);
  chart($('chart-requests'), $('legend-requests'), [
    { label: 'running', color: COLORS[0], values: col('running') },
    { label: 'waiting', color: COLORS[1], values: col('waiting') },
  ]);
  chart($('chart-kv'), $('legend-kv'), [
    { label: 'used', color: COLORS[0], values: col('kvUsed') },
    { label: 'cached', color: COLORS[2], values: col('kvCached') },
    { label: 'free', color: COLORS[3], values: col('kvFree') },
  ]);
  chart($('chart-tps'), $('legend-tps'), [{ label: 'tokens/s', color: COLORS[0], values: col('tps') }]);
  const names = [...new Set(hist.flatMap((p) => Object.keys(p.adapters)))].sort();
  chart($('chart-adapters'), $('legend-adapters'),
    names.map((nm, i) => ({ label: nm, color: COLORS[i % COLORS.length], values: hist.map((p) => p.adapters[nm] || 0) })));
}

export function init() {
  poll();
  setInterval(poll, PERIOD_MS);
}
