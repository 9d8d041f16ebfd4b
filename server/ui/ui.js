// ui.js - small DOM helpers shared by the views, and the key banner: a refused request (401) shows
// it, the typed key goes to sessionStorage, and what was refused runs again. Every string that
// came from the server or the model reaches the page through textContent, never as HTML.
import { keys } from './api.js';

export const $ = (id) => document.getElementById(id);

// el('div', {class: 'x', text: 'y', title: 'z'}, child...) - text is set as textContent.
export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null) continue;
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else if (k === 'data') Object.assign(e.dataset, v);
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

export function headColor(k) {
  return `var(--h${k % 16})`;
}

// ---- keys ----
let mode = 'api';
let retries = [];

export function askKey(kind, message, retry) {
  mode = kind;
  if (retry) retries.push(retry);
  $('key-label').textContent = message ||
    (kind === 'admin' ? 'This action needs the admin key.' : 'This server needs an API key.');
  $('key-input').value = '';
  $('auth').hidden = false;
  $('auth').dataset.mode = kind;
  $('key-input').focus();
}

// An error from the API: a 401 asks for the key (retry runs once a key is given). Returns true
// when it was a 401.
export function handleAuth(err, admin, retry) {
  if (!err || err.status !== 401) return false;
  const msg = admin
    ? `Refused (${err.message}). Enter the admin key (or the API key when the server has no admin key).`
    : `This server needs an API key (${err.message}).`;
  askKey(admin ? 'admin' : 'api', msg, retry);
  return true;
}

export function initKeys() {
  $('key-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const v = $('key-input').value.trim();
    if (mode === 'admin') keys.admin = v;
    else keys.api = v;
    $('auth').hidden = true;
    const todo = retries;
    retries = [];
    document.dispatchEvent(new CustomEvent('hydrad:keys'));
    for (const f of todo) f();
  });
  $('key-cancel').addEventListener('click', () => {
    $('auth').hidden = true;
    retries = [];
  });
  $('key-change').addEventListener('click', () => askKey('api', 'API key for this tab (empty: none).'));
}

// Copy text to the clipboard; the button says how it went.
export async function copyText(text, button) {
  let ok = false;
  try {
    await navigator.clipboard.writeText(text);
    ok = true;
  } catch (e) {
    const t = el('textarea', { class: 'offscreen' });
    t.value = text;
    document.body.append(t);
    t.select();
    try { ok = document.execCommand('copy'); } catch (e2) { ok = false; }
    t.remove();
  }
  const old = button.textContent;
  button.textContent = ok ? 'copied' : 'copy failed';
  setTimeout(() => { button.textContent = old; }, 1200);
}
