// adapters.js - the adapter table from GET /v1/adapters (K, r, targets, state, refcount, requests,
// tokens, residency, router mean gates as bars) and load/unload through the admin endpoints; a
// refusal shows the server's message verbatim, a 401 asks for the admin key and tries again.
import { getJSON, keys, postJSON } from './api.js';
import { $, el, headColor, handleAuth } from './ui.js';

let timer = null;

function gateBars(router) {
  const box = el('div', { class: 'gates' });
  const g = router && Array.isArray(router.mean_gate) ? router.mean_gate : null;
  if (!g) {
    box.append(el('span', { class: 'muted', text: 'not run yet' }));
    return box;
  }
  const max = Math.max(...g, 1e-9);
  g.forEach((v, k) => {
    const b = el('div', { class: 'bar', title: `head ${k}: ${v.toFixed(3)}`, data: { head: String(k), gate: String(v) } });
    b.style.height = `${Math.max(1, Math.round((24 * v) / max))}px`;
    b.style.backgroundColor = headColor(k);
    box.append(b);
  });
  return box;
}

function row(a) {
  const unload = el('button', { type: 'button', class: 'small unload', text: 'unload', data: { name: a.name } });
  unload.addEventListener('click', () => unloadAdapter(a.name));
  const tr = el('tr', { data: { name: a.name } },
    el('td', { class: 'name', text: a.name }),
    el('td', { class: 'state', text: a.state }),
    el('td', { class: 'K', text: String(a.K) }),
    el('td', { class: 'r', text: String(a.r) }),
    el('td', { class: 'targets', text: (a.targets || []).join(', ') }),
    el('td', { class: 'refcount', text: String(a.refcount) }),
    el('td', { class: 'requests', text: String(a.requests ?? '') }),
    el('td', { class: 'tokens', text: String(a.tokens ?? '') }),
    el('td', { class: 'resident', text: a.resident ? 'yes' : 'no' }),
    el('td', { class: 'router' }, gateBars(a.router)),
    el('td', { class: 'path', text: a.path || '' }),
    el('td', {}, unload));
  return tr;
}

let seq = 0;
export async function refresh() {
  const my = ++seq;
  try {
    let j;
    try {
      j = await getJSON('/v1/adapters', { admin: true }); // with the admin key: server paths too
    } catch (e) {
      if (!(e.status === 401 && keys.admin)) throw e;
      j = await getJSON('/v1/adapters'); // a stale admin key: the API key still lists them
    }
    if (my !== seq) return;  // a newer refresh is on its way
    const list = j.data || [];
    $('adapters-body').replaceChildren(...list.map(row));
    $('adapters-empty').hidden = list.length > 0;
    $('adapters-table').dataset.loaded = '1';
  } catch (e) {
    if (my !== seq) return;
    $('adapters-body').replaceChildren();
    if (!handleAuth(e, false, refresh)) $('adapter-error').textContent = e.message;
  }
}

function say(err, notice) {
  $('adapter-error').textContent = err || '';
  $('adapter-notice').textContent = notice || '';
}

async function loadAdapter() {
  const name = $('load-name').value.trim(), path = $('load-path').value.trim(), sha = $('load-sha').value.trim();
  const body = { lora_name: name, lora_path: path };
  if (sha) body.sha256 = sha;
  say('', `loading ${name}…`);
  $('load-btn').disabled = true;
  try {
    await postJSON('/v1/load_lora_adapter', body, { admin: true });
    say('', `loaded ${name}`);
    document.dispatchEvent(new CustomEvent('hydrad:adapters-changed'));
  } catch (e) {
    say(e.message, '');
    handleAuth(e, true, loadAdapter);
  } finally {
    $('load-btn').disabled = false;
  }
}

async function unloadAdapter(name) {
  say('', `unloading ${name}…`);
  try {
    await postJSON('/v1/unload_lora_adapter', { lora_name: name }, { admin: true });
    say('', `unloaded ${name}`);
    document.dispatchEvent(new CustomEvent('hydrad:adapters-changed'));
  } catch (e) {
    say(e.message, '');
    handleAuth(e, true, () => unloadAdapter(name));
  }
}

export function init() {
  $('load-form').addEventListener('submit', (ev) => { ev.preventDefault(); loadAdapter(); });
  // the table's counters move while requests run: refresh it while it is on screen
  timer = setInterval(() => { if (!$('view-adapters').hidden) refresh(); }, 3000);
}
