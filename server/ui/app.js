// app.js - the console's entry: tabs (#playground, #adapters, #live), the model list every view
// shares, the server status line, and refreshes after keys change or adapters come and go.
import { getJSON } from './api.js';
import { $, handleAuth, initKeys } from './ui.js';
import * as playground from './playground.js';
import * as adapters from './adapters.js';
import * as live from './live.js';

const TABS = ['playground', 'adapters', 'live'];

function showTab() {
  const want = location.hash.slice(1);
  const tab = TABS.includes(want) ? want : 'playground';
  for (const t of TABS) {
    $('view-' + t).hidden = t !== tab;
    $('tab-' + t).classList.toggle('active', t === tab);
  }
  if (tab === 'adapters') adapters.refresh();
  if (tab === 'live') live.draw();
}

async function refreshModels() {
  try {
    const m = await getJSON('/v1/models');
    playground.setModels(m.data || []);
    const base = (m.data || []).find((x) => !x.parent);
    $('server-status').textContent = `model ${base ? base.id : '?'} · ${(m.data || []).length - 1} adapter(s) ready`;
  } catch (e) {
    playground.setModels([]);
    $('server-status').textContent = e.status === 401 ? 'API key needed' : `error: ${e.message}`;
    handleAuth(e, false, refreshAll);
  }
}

export function refreshAll() {
  refreshModels();
  adapters.refresh();
}

async function health() {
  try {
    const r = await fetch('/health', { cache: 'no-store' });
    const j = await r.json();
    document.body.dataset.health = j.status || '';
    if (j.status !== 'ok') $('server-status').textContent = `server ${j.status}`;
  } catch (e) {
    document.body.dataset.health = 'down';
    $('server-status').textContent = 'server unreachable';
  }
}

function init() {
  initKeys();
  playground.init();
  adapters.init();
  live.init();
  for (const b of document.querySelectorAll('#tabs button')) {
    b.addEventListener('click', () => { location.hash = b.dataset.tab; });
  }
  window.addEventListener('hashchange', showTab);
  document.addEventListener('hydrad:keys', refreshAll);
  document.addEventListener('hydrad:adapters-changed', refreshAll);
  showTab();
  refreshAll();
  health();
  setInterval(health, 5000);
  document.body.dataset.ready = '1';
}

init();
