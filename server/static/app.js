/*
 * sessionq browser client (loaded by index.html as /static/app.js; no build step,
 * no dependencies, no inline handlers, so it runs under `default-src 'self'`).
 *
 * - Opens a WebSocket to <same origin>/ws, logs in / registers, or re-authenticates
 *   with the token kept in sessionStorage (`auth` frame), then `resume`s the tab's
 *   session with `after` = highest seq up to which every request already shows its final.
 * - Submits requests (op + JSON args, optionally N at once) and shows one table row per
 *   client id: seq, state, ahead, latest progress, exactly one final frame, timings.
 * - Stays signed in while the tab is open: `token_expiring` is answered with `refresh`,
 *   and the `token` it brings replaces the stored one. "log out" sends `logout`: the
 *   server revokes the token everywhere and closes with 1000.
 * - Reconnects with jittered exponential backoff (0.5 s doubling to 5 s), except after
 *   4401 (logged out), 4409 (taken over) and 4429 (too many connections). Finals are
 *   de-duplicated by seq; requests sent but not accepted before a drop are resubmitted
 *   with the same client id (the server answers duplicates with the same `accepted`).
 * Wire protocol: PROTOCOL.md, version 1.
 */
(function () {
  'use strict';

  // ---------------------------------------------------------------- constants
  const EXAMPLES = {
    echo: { hello: 'world' },
    sleep: { seconds: 1 },
    count: { to: 5, interval: 0.2 },
    'kv.put': { key: 'greeting', value: 'hello' },
    'kv.get': { key: 'greeting' },
    'kv.delete': { key: 'greeting' },
    'kv.list': { prefix: '' },
    hash: { data: 'hello', rounds: 100000 },
  };
  const KEYS = {
    token: 'sessionq.token', session: 'sessionq.session', expires: 'sessionq.expires_at',
    user: 'sessionq.user', rows: 'sessionq.requests',
  };
  const LOG_MAX = 500;
  const ROWS_MAX = 1000;
  const BURST_MAX = 1000;
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 5000;
  const ROW_FIELDS = ['id', 'op', 'args', 'seq', 'ahead', 'state', 'progress', 'nprog', 'final',
    't0', 'tAcc', 'tProg', 'tFin', 'note', 'wantCancel', 'transmitted', 'lost', 'sess', 'stale'];

  // ---------------------------------------------------------------- pure helpers
  function wsUrl(loc) {
    const u = new URL('/ws', loc.href);
    u.protocol = u.protocol === 'https:' ? 'wss:' : 'ws:';
    return u.href;
  }

  /** Delay before reconnect attempt `attempt` (0-based): 0.5 s doubling, max 5 s, ±20 % jitter. */
  function backoffDelay(attempt, rand = Math.random) {
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** Math.min(attempt, 10));
    return Math.min(BACKOFF_MAX_MS, Math.round(base * (0.8 + 0.4 * rand())));
  }

  function randomSuffix() {
    const a = new Uint32Array(1);
    crypto.getRandomValues(a);
    return a[0].toString(36).padStart(7, '0');
  }

  /** Parse the args textarea: empty means {}; anything but a JSON object is an error. */
  function parseArgs(text) {
    const t = text.trim();
    if (!t) return { ok: true, value: {} };
    let v;
    try { v = JSON.parse(t); } catch (e) { return { ok: false, error: e.message }; }
    if (v === null || typeof v !== 'object' || Array.isArray(v)) {
      return { ok: false, error: 'args must be a JSON object, e.g. {}' };
    }
    return { ok: true, value: v };
  }

  /** Highest N such that every seq in (base, N] is known and final: the `after` of resume. */
  function resumeAfter(base, bySeq) {
    let n = base;
    for (;;) {
      const r = bySeq.get(n + 1);
      if (!r || !r.final) return n;
      n += 1;
    }
  }

  /** Text of the `.final` cell: JSON of a result value, or `error:<code>`. */
  function finalText(final) {
    if (!final) return '';
    if ('value' in final) return JSON.stringify(final.value === undefined ? null : final.value);
    return 'error:' + final.code;
  }

  function stateOfFinal(frame) {
    if (frame.type === 'result') return 'result';
    return frame.code === 'cancelled' ? 'cancelled' : 'error';
  }

  /** Copy of a frame fit for the on-screen log: no passwords, shortened tokens. */
  function redact(frame) {
    if (!frame || typeof frame !== 'object') return frame;
    const copy = { ...frame };
    if (typeof copy.password === 'string') copy.password = '********';
    if (typeof copy.token === 'string') copy.token = copy.token.slice(0, 12) + '…';
    return copy;
  }

  function utf8Length(s) { return new TextEncoder().encode(s).length; }

  const helpers = { wsUrl, backoffDelay, parseArgs, resumeAfter, finalText, stateOfFinal, redact,
    utf8Length, randomSuffix, EXAMPLES };
  if (typeof document === 'undefined') { globalThis.sessionqHelpers = helpers; return; }

  // ---------------------------------------------------------------- DOM & storage
  const $ = (id) => document.getElementById(id);
  const el = {
    connState: $('conn-state'), connDetail: $('conn-detail'), reconnect: $('reconnect'),
    disconnect: $('disconnect'), user: $('user'), session: $('session'), pending: $('pending'),
    maxPending: $('max-pending'), statusBtn: $('status-btn'), statusReply: $('status-reply'),
    account: $('account'), expires: $('expires'), logout: $('logout'), notice: $('notice'),
    auth: $('auth'), authForm: $('auth-form'), username: $('username'), password: $('password'),
    authError: $('auth-error'), submitForm: $('submit-form'), op: $('op'), args: $('args'),
    argsError: $('args-error'), count: $('count'), submit: $('submit'), clearDone: $('clear-done'),
    rows: $('rows'), log: $('log'),
  };
  const store = {
    get(k) { try { return sessionStorage.getItem(k); } catch (e) { return null; } },
    set(k, v) {
      try {
        if (v == null) sessionStorage.removeItem(k); else sessionStorage.setItem(k, String(v));
      } catch (e) { /* storage full or disabled: the page still works for this tab's life */ }
    },
  };

  // ---------------------------------------------------------------- state
  const S = {
    ws: null, connId: 0, authed: false, ready: false, resuming: false, welcomeSession: null,
    pendingAuth: null, closeIntent: null, attempt: 0, timer: null, ticker: null, reconnectAt: 0,
    lastClose: '', connState: 'connecting',
    token: null, user: null, session: null, expiresAt: null, limits: null,
    rows: new Map(), bySeq: new Map(), base: 0, counter: 0, saveTimer: null,
    lastExampleOp: 'echo',
  };

  function blankRow() {
    return { id: '', op: '?', args: null, seq: null, ahead: null, state: 'sent', progress: undefined,
      nprog: 0, final: null, t0: null, tAcc: null, tProg: null, tFin: null, note: '',
      wantCancel: false, transmitted: false, lost: false, sess: null, stale: false,
      sentConn: null, cancelConn: null, el: null, cells: null };
  }

  function saveAuth() {
    store.set(KEYS.token, S.token);
    store.set(KEYS.session, S.session);
    store.set(KEYS.expires, S.expiresAt);
    store.set(KEYS.user, S.user);
  }

  function scheduleSave() {
    if (S.saveTimer == null) S.saveTimer = setTimeout(saveRows, 300);
  }

  function saveRows() {
    clearTimeout(S.saveTimer);
    S.saveTimer = null;
    if (!S.user) return;
    const rows = [...S.rows.values()].map((r) => {
      const o = {};
      for (const k of ROW_FIELDS) o[k] = r[k];
      return o;
    });
    store.set(KEYS.rows, JSON.stringify({ v: 1, counter: S.counter, base: S.base, rows }));
  }

  function loadState() {
    S.token = store.get(KEYS.token);
    S.session = store.get(KEYS.session);
    S.user = store.get(KEYS.user);
    S.expiresAt = Number(store.get(KEYS.expires)) || null;
    if (S.token && S.expiresAt && S.expiresAt * 1000 <= Date.now()) {
      clearToken();
      el.authError.textContent = 'stored token has expired: please log in again';
    }
    let saved = null;
    try { saved = JSON.parse(store.get(KEYS.rows) || 'null'); } catch (e) { saved = null; }
    if (saved && saved.v === 1 && Array.isArray(saved.rows)) {
      S.counter = saved.counter | 0;
      S.base = saved.base | 0;
      for (const o of saved.rows) {
        const r = Object.assign(blankRow(), o);
        if (r.state === 'sent' && r.transmitted) r.state = 'unknown'; // its socket is gone
        addRow(r);
      }
    }
  }

  function clearToken() {
    S.token = null;
    S.expiresAt = null;
    store.set(KEYS.token, null);
    store.set(KEYS.expires, null);
  }

  // ---------------------------------------------------------------- rendering
  const COLS = ['id', 'seq', 'op', 'state', 'ahead', 'progress', 'final', 'message', 'timings', 'actions'];

  function addRow(r) {
    S.rows.set(r.id, r);
    if (r.seq != null && !r.stale) S.bySeq.set(r.seq, r);
    render(r);
    return r;
  }

  function createRowEl(r) {
    const tr = document.createElement('tr');
    tr.dataset.id = r.id;
    r.cells = {};
    for (const c of COLS) {
      const td = document.createElement('td');
      td.className = c;
      tr.appendChild(td);
      r.cells[c] = td;
    }
    const btn = document.createElement('button');
    btn.type = 'button';
    btn.className = 'cancel';
    btn.dataset.action = 'cancel';
    btn.textContent = 'cancel';
    btn.setAttribute('aria-label', 'cancel ' + r.id);
    r.cells.actions.appendChild(btn);
    r.cells.id.textContent = r.id;
    r.el = tr;
    el.rows.appendChild(tr);
    return tr;
  }

  function stateLabel(r) {
    let s;
    switch (r.state) {
      case 'sent': s = r.transmitted ? 'sent' : 'sent (waiting for connection)'; break;
      case 'running': s = `running (${r.nprog} progress)`; break;
      case 'error': s = r.final && r.final.refused ? 'error (refused)' : 'error'; break;
      case 'unknown': s = 'unknown (not accepted before disconnect)'; break;
      default: s = r.state;
    }
    if (r.wantCancel && !r.final) s += ' · cancel requested';
    return s;
  }

  function timingText(r) {
    if (r.t0 == null) return '';
    const f = (t) => (t == null ? '–' : String(t - r.t0));
    return `${f(r.tAcc)} / ${f(r.tProg)} / ${f(r.tFin)}`;
  }

  function render(r) {
    const tr = r.el || createRowEl(r);
    const c = r.cells;
    tr.dataset.state = r.state;
    if (r.seq != null) tr.dataset.seq = String(r.seq); else delete tr.dataset.seq;
    tr.classList.toggle('stale', !!r.stale);
    c.seq.textContent = r.seq == null ? '' : String(r.seq);
    c.op.textContent = r.op;
    c.op.title = r.args == null ? '' : 'args: ' + JSON.stringify(r.args);
    c.state.textContent = stateLabel(r);
    c.ahead.textContent = r.ahead == null ? '' : String(r.ahead);
    c.progress.textContent = r.nprog > 0 ? JSON.stringify(r.progress === undefined ? null : r.progress) : '';
    c.final.textContent = finalText(r.final);
    const msg = r.final && r.final.message ? r.final.message : '';
    c.message.textContent = [msg, r.note].filter(Boolean).join(' — ');
    c.timings.textContent = timingText(r);
    const btn = c.actions.firstChild;
    btn.hidden = !!(r.final || r.lost || r.stale);
    btn.disabled = r.wantCancel;
  }

  function updatePending() {
    let n = 0;
    for (const r of S.rows.values()) if (r.seq != null && !r.final && !r.stale) n += 1;
    el.pending.textContent = String(n);
    el.maxPending.textContent = S.limits && S.limits.max_pending ? ` / ${S.limits.max_pending}` : '';
  }

  function updateControls() {
    const loggedIn = !!S.token;
    el.auth.hidden = loggedIn;
    el.account.hidden = !loggedIn;
    el.submit.disabled = !loggedIn;
    el.statusBtn.disabled = !S.ready;
    el.disconnect.disabled = !S.ws;
    el.reconnect.hidden = S.connState !== 'closed';
    el.user.textContent = S.user || '';
    el.session.textContent = S.session || '';
    el.expires.textContent = S.expiresAt ? new Date(S.expiresAt * 1000).toLocaleTimeString() : '';
    if (S.expiresAt) el.expires.dateTime = new Date(S.expiresAt * 1000).toISOString();
  }

  function setConn(state, detail) {
    S.connState = state;
    el.connState.textContent = state;
    el.connDetail.textContent = detail || '';
    if (state !== 'reconnecting' && S.ticker) { clearInterval(S.ticker); S.ticker = null; }
    updateControls();
  }

  function log(dir, payload) {
    const line = document.createElement('div');
    line.className = 'log-' + dir;
    const text = typeof payload === 'string' ? payload : JSON.stringify(payload);
    const arrow = dir === 'in' ? '←' : dir === 'out' ? '→' : '·';
    line.textContent = `${new Date().toISOString().slice(11, 23)} ${arrow} ${text}\n`;
    const box = el.log;
    const stick = box.scrollTop + box.clientHeight >= box.scrollHeight - 8;
    box.appendChild(line);
    while (box.childElementCount > LOG_MAX) box.firstElementChild.remove();
    if (stick) box.scrollTop = box.scrollHeight;
  }

  function notice(text) { el.notice.textContent = text; }

  // ---------------------------------------------------------------- connection
  function connect() {
    clearTimeout(S.timer);
    S.timer = null;
    if (S.ws && S.ws.readyState <= WebSocket.OPEN) return;
    if (S.ws) markUnaccepted(S.connId, 0); // replacing a socket that is still closing
    const id = ++S.connId;
    S.authed = S.ready = S.resuming = false;
    setConn('connecting', S.lastClose ? `(last close ${S.lastClose})` : '');
    let ws;
    try {
      ws = new WebSocket(wsUrl(location));
    } catch (e) {
      S.ws = null;
      log('info', 'cannot open socket: ' + e.message);
      scheduleReconnect();
      return;
    }
    S.ws = ws;
    ws.onopen = () => { if (S.ws === ws) onOpen(); };
    ws.onmessage = (ev) => { if (S.ws === ws) onMessage(ev.data); };
    ws.onclose = (ev) => { if (S.ws === ws) onClose(ev, id); };
    ws.onerror = () => { /* a close event follows */ };
    updateControls();
  }

  function scheduleReconnect() {
    const delay = backoffDelay(S.attempt);
    S.attempt += 1;
    S.reconnectAt = Date.now() + delay;
    clearTimeout(S.timer);
    S.timer = setTimeout(connect, delay);
    if (S.ticker) clearInterval(S.ticker);
    setConn('reconnecting', '');
    const tick = () => {
      const left = Math.max(0, S.reconnectAt - Date.now()) / 1000;
      el.connDetail.textContent = `in ${left.toFixed(1)} s` + (S.lastClose ? ` (last close ${S.lastClose})` : '');
    };
    tick();
    S.ticker = setInterval(tick, 200);
  }

  function sendFrame(frame) {
    if (!S.ws || S.ws.readyState !== WebSocket.OPEN) return false;
    S.ws.send(JSON.stringify(frame));
    log('out', redact(frame));
    return true;
  }

  function onOpen() {
    setConn('open', '');
    if (S.pendingAuth) {
      sendFrame(S.pendingAuth);
      S.pendingAuth = null;
    } else if (S.token) {
      sendFrame({ type: 'auth', token: S.token });
    } else {
      S.attempt = 0; // nothing to resume: no reason to keep backing off
    }
  }

  /** Rows sent on connection `connId` but never accepted become `unknown`. */
  function markUnaccepted(connId, code) {
    for (const r of S.rows.values()) {
      if (r.final || r.seq != null || r.sentConn !== connId || !r.transmitted) continue;
      r.state = 'unknown';
      r.sentConn = null;
      if (code === 1009) { r.lost = true; r.note = 'not resubmitted: connection closed 1009 (frame too large)'; }
      render(r);
    }
    scheduleSave();
  }

  function onClose(ev, connId) {
    const intent = S.closeIntent;
    S.closeIntent = null;
    S.ws = null;
    S.authed = S.ready = S.resuming = false;
    S.lastClose = `${ev.code}${ev.reason ? ' ' + ev.reason : ''}`;
    log('info', `socket closed: ${S.lastClose}`);
    markUnaccepted(connId, ev.code);
    updatePending();
    let closedWhy = null;
    if (intent === 'logout') closedWhy = 'logged out';
    else if (ev.code === 4401) {
      clearToken();
      closedWhy = 'logged out';
      el.authError.textContent = el.authError.textContent || 'logged out: please log in again';
    } else if (ev.code === 4409) {
      closedWhy = 'session taken over by another tab or connection';
      notice('This session was taken over elsewhere. Press "reconnect" to take it back.');
    } else if (ev.code === 4429) {
      closedWhy = 'too many connections for this user';
    } else if (ev.code === 4408 && !S.token) {
      closedWhy = 'auth timeout: will connect again when you log in';
    }
    if (closedWhy !== null) {
      setConn('closed', `${closedWhy} (close ${S.lastClose})`);
      if (S.pendingAuth) connect();
      return;
    }
    scheduleReconnect();
  }

  function onMessage(data) {
    let f;
    try { f = JSON.parse(data); } catch (e) { log('in', String(data)); return; }
    log('in', redact(f));
    if (!f || typeof f !== 'object') return;
    switch (f.type) {
      case 'welcome': onWelcome(f); break;
      case 'resumed': onResumed(f); break;
      case 'accepted': onAccepted(f); break;
      case 'progress': onProgress(f); break;
      case 'result': onFinal(f); break;
      case 'error': onError(f); break;
      case 'status': el.statusReply.textContent = describeStatus(f); break;
      case 'token_expiring': sendFrame({ type: 'refresh' }); break;
      case 'token': onToken(f); break;
      default: break;
    }
  }

  function describeStatus(f) {
    const parts = [];
    for (const [k, v] of Object.entries(f)) if (k !== 'type' && k !== 'session') parts.push(`${k} ${JSON.stringify(v)}`);
    return parts.join(' · ');
  }

  // ---------------------------------------------------------------- auth & sessions
  function doAuth(kind) {
    const frame = { type: kind, username: el.username.value.trim(), password: el.password.value };
    el.authError.textContent = '';
    if (S.ws && S.ws.readyState === WebSocket.OPEN && !S.authed) { sendFrame(frame); return; }
    S.pendingAuth = frame;
    if (!S.ws || S.ws.readyState > WebSocket.OPEN) { S.attempt = 0; connect(); }
  }

  function onWelcome(f) {
    const sameUser = !!S.user && typeof f.user === 'string' && S.user.toLowerCase() === f.user.toLowerCase();
    if (S.user && !sameUser) { resetRows(); S.session = null; }
    S.authed = true;
    S.attempt = 0;
    S.token = f.token || S.token;
    S.expiresAt = typeof f.expires_at === 'number' ? f.expires_at : null;
    S.user = f.user;
    S.limits = f.limits || null;
    S.welcomeSession = f.session;
    el.password.value = '';
    el.authError.textContent = '';
    if (S.session && S.session !== f.session) {
      S.resuming = true;
      saveAuth();
      sendFrame({ type: 'resume', session: S.session, after: resumeAfter(S.base, S.bySeq) });
    } else {
      switchSession(f.session, '');
      becomeReady();
    }
    updateControls();
    updatePending();
  }

  /** The answer to `refresh`: this connection (and the next one) runs on it. */
  function onToken(f) {
    if (typeof f.token !== 'string') return;
    S.token = f.token;
    S.expiresAt = typeof f.expires_at === 'number' ? f.expires_at : null;
    saveAuth();
    updateControls();
  }

  function onResumed(f) {
    S.resuming = false;
    switchSession(f.session || S.session, '');
    el.statusReply.textContent = `resumed: last_seq ${f.last_seq} · pending ${f.pending}`;
    becomeReady();
  }

  /** The connection now carries `sess`; rows of any other session become stale. */
  function switchSession(sess, reason) {
    if (S.session && sess !== S.session) {
      for (const r of S.rows.values()) {
        if (r.sess && r.sess !== sess) {
          r.stale = true;
          if (!r.final) { r.state = 'unknown'; r.note = `session lost${reason ? ' (' + reason + ')' : ''}`; }
          render(r);
        } else if (!r.sess && !r.final && r.transmitted) {
          r.lost = true;
          r.state = 'unknown';
          r.note = `not resubmitted: session lost${reason ? ' (' + reason + ')' : ''}`;
          render(r);
        }
      }
      S.bySeq.clear();
      S.base = 0;
    }
    S.session = sess;
    saveAuth();
    scheduleSave();
    updateControls();
    updatePending();
  }

  function becomeReady() {
    S.ready = true;
    for (const r of S.rows.values()) {
      if (r.final || r.lost || r.stale) continue;
      if (r.seq == null && r.sentConn !== S.connId) sendSubmit(r);
      else if (r.seq != null && r.wantCancel && r.cancelConn !== S.connId) sendCancel(r);
    }
    updateControls();
  }

  function resetRows() {
    for (const r of S.rows.values()) if (r.el) r.el.remove();
    S.rows.clear();
    S.bySeq.clear();
    S.base = 0;
    store.set(KEYS.rows, null);
    updatePending();
  }

  function logout() {
    try { sessionStorage.clear(); } catch (e) { /* ignore */ }
    clearTimeout(S.saveTimer);
    S.saveTimer = null;
    resetRows();
    S.token = S.user = S.session = S.expiresAt = S.limits = null;
    S.pendingAuth = null;
    clearTimeout(S.timer);
    S.timer = null;
    notice('');
    el.statusReply.textContent = '';
    if (S.ws) {
      const ws = S.ws;
      const signedIn = S.authed;
      S.closeIntent = 'logout';
      S.ready = S.authed = false;
      // Signed in: the server revokes the token everywhere, then closes with 1000.
      if (signedIn && sendFrame({ type: 'logout' })) {
        setTimeout(() => { if (ws.readyState < WebSocket.CLOSING) ws.close(1000, 'logout'); }, 2000);
      } else {
        ws.close(1000, 'logout');
      }
    }
    setConn('closed', 'logged out');
  }

  // ---------------------------------------------------------------- requests
  function newRow(op, args) {
    S.counter += 1;
    const r = Object.assign(blankRow(), {
      id: `r-${S.counter}-${randomSuffix()}`, op, args, t0: Date.now(),
    });
    return addRow(r);
  }

  function finish(r, final, state) {
    r.final = final;
    r.state = state;
    r.tFin = Date.now();
    r.wantCancel = false;
    render(r);
    updatePending();
    scheduleSave();
    if (S.rows.size > ROWS_MAX + 50) trimRows(ROWS_MAX);
  }

  function sendSubmit(r) {
    const frame = { type: 'submit', id: r.id, op: r.op, args: r.args };
    const limit = S.limits && S.limits.max_message_bytes;
    const size = utf8Length(JSON.stringify(frame));
    if (limit && size > limit) {
      finish(r, { code: 'too_large', message: `not sent: ${size} bytes > max_message_bytes ${limit}`, refused: true }, 'error');
      return;
    }
    if (!sendFrame(frame)) return;
    if (r.transmitted) r.note = 'resubmitted after reconnect';
    r.transmitted = true;
    r.sentConn = S.connId;
    r.state = 'sent';
    render(r);
    scheduleSave();
  }

  function sendCancel(r) {
    if (sendFrame({ type: 'cancel', id: r.id })) r.cancelConn = S.connId;
  }

  function requestCancel(r) {
    if (r.final || r.lost || r.stale) return;
    if (!r.transmitted && r.seq == null) { // never left the page
      finish(r, { code: 'cancelled', message: 'cancelled before it was sent' }, 'cancelled');
      return;
    }
    r.wantCancel = true;
    if (r.seq != null && S.ready) sendCancel(r); // otherwise sent once accepted / resumed
    render(r);
    scheduleSave();
  }

  /** Row for a frame: by id, else by seq, else a placeholder for a request this page never saw. */
  function rowFor(f) {
    let r = typeof f.id === 'string' ? S.rows.get(f.id) : undefined;
    if (!r && typeof f.seq === 'number') r = S.bySeq.get(f.seq);
    if (!r) r = addRow(Object.assign(blankRow(), { id: typeof f.id === 'string' ? f.id : `seq-${f.seq}`, transmitted: true }));
    return r;
  }

  function attachSeq(r, seq) {
    if (r.seq != null || typeof seq !== 'number') return;
    r.seq = seq;
    r.sess = S.session;
    S.bySeq.set(seq, r);
  }

  function onAccepted(f) {
    const r = rowFor(f);
    if (r.seq == null) { r.ahead = f.ahead; r.tAcc = Date.now(); }
    attachSeq(r, f.seq);
    if (!r.final && (r.state === 'sent' || r.state === 'unknown')) r.state = 'accepted';
    if (!r.final && r.wantCancel && r.cancelConn !== S.connId && S.ready) sendCancel(r);
    render(r);
    updatePending();
    scheduleSave();
  }

  function onProgress(f) {
    const r = rowFor(f);
    if (r.final) return;
    attachSeq(r, f.seq);
    r.progress = f.data;
    r.nprog += 1;
    if (r.tProg == null) r.tProg = Date.now();
    r.state = 'running';
    render(r);
    updatePending();
    scheduleSave();
  }

  function onFinal(f) {
    const seq = f.seq;
    const known = S.bySeq.get(seq);
    if ((known && known.final) || (seq <= S.base && !known)) {
      log('info', `duplicate final for seq ${seq} ignored`);
      return;
    }
    const r = rowFor(f);
    if (r.final) { log('info', `second final for ${r.id} ignored`); return; }
    attachSeq(r, seq);
    const final = f.type === 'result' ? { value: f.value } : { code: f.code, message: f.message || '' };
    finish(r, final, stateOfFinal(f));
  }

  function onError(f) {
    if (typeof f.seq === 'number') { onFinal(f); return; }
    const what = `${f.code}: ${f.message || ''}` +
      (f.retry_after != null ? ` (retry after ${f.retry_after} s)` : '');
    if (typeof f.id === 'string' && S.rows.has(f.id)) {
      const r = S.rows.get(f.id);
      if (r.final) return;
      if (r.seq != null) { // refusal of a cancel (or of a duplicate submit): not a final
        r.note = `cancel refused: ${f.code}`;
        r.wantCancel = false;
        render(r);
        return;
      }
      finish(r, { code: f.code, message: f.message || '', refused: true }, 'error');
      return;
    }
    if (!S.authed) {
      el.authError.textContent = what;
      if (f.code === 'invalid_token' || f.code === 'token_expired') { clearToken(); updateControls(); }
      return;
    }
    if (S.resuming && f.code !== 'token_expired') { // the only frame in flight is `resume`
      S.resuming = false;
      notice(`resume failed (${what}); continuing in a new session`);
      switchSession(S.welcomeSession, f.code);
      becomeReady();
      return;
    }
    notice(what);
  }

  function trimRows(target) {
    S.base = resumeAfter(S.base, S.bySeq);
    for (const r of [...S.rows.values()]) {
      if (S.rows.size <= target) break;
      const done = r.final || r.lost || r.stale;
      if (!done || (r.seq != null && !r.stale && r.seq > S.base)) continue;
      S.rows.delete(r.id);
      if (S.bySeq.get(r.seq) === r) S.bySeq.delete(r.seq);
      if (r.el) r.el.remove();
    }
    scheduleSave();
  }

  function submitFromForm() {
    const op = el.op.value.trim();
    const parsed = parseArgs(el.args.value);
    if (!op) { el.argsError.textContent = 'operation name is required'; return; }
    if (!parsed.ok) {
      el.argsError.textContent = 'invalid JSON: ' + parsed.error;
      el.args.setAttribute('aria-invalid', 'true');
      return;
    }
    let n = parseInt(el.count.value, 10);
    if (!Number.isFinite(n) || n < 1) n = 1;
    n = Math.min(n, BURST_MAX);
    for (let i = 0; i < n; i += 1) {
      const r = newRow(op, parsed.value);
      if (S.ready) sendSubmit(r);
    }
    updatePending();
    scheduleSave();
  }

  // ---------------------------------------------------------------- wiring
  el.authForm.addEventListener('submit', (e) => {
    e.preventDefault();
    doAuth(e.submitter && e.submitter.id === 'register' ? 'register' : 'login');
  });
  el.submitForm.addEventListener('submit', (e) => { e.preventDefault(); submitFromForm(); });
  el.op.addEventListener('input', () => {
    const op = el.op.value.trim();
    if (Object.prototype.hasOwnProperty.call(EXAMPLES, op) && op !== S.lastExampleOp) {
      el.args.value = JSON.stringify(EXAMPLES[op]);
      el.args.dispatchEvent(new Event('input'));
    }
    S.lastExampleOp = op;
  });
  el.args.addEventListener('input', () => {
    const p = parseArgs(el.args.value);
    el.argsError.textContent = p.ok ? '' : 'invalid JSON: ' + p.error;
    if (p.ok) el.args.removeAttribute('aria-invalid'); else el.args.setAttribute('aria-invalid', 'true');
  });
  el.rows.addEventListener('click', (e) => {
    const btn = e.target.closest('button[data-action="cancel"]');
    const tr = btn && btn.closest('tr');
    const r = tr && S.rows.get(tr.dataset.id);
    if (r) requestCancel(r);
  });
  el.disconnect.addEventListener('click', () => {
    if (!S.ws) return;
    S.closeIntent = 'drop';
    S.ws.close(1000, 'dropped by user');
  });
  el.reconnect.addEventListener('click', () => { S.attempt = 0; notice(''); connect(); });
  el.statusBtn.addEventListener('click', () => { if (S.ready) sendFrame({ type: 'status' }); });
  el.logout.addEventListener('click', logout);
  el.clearDone.addEventListener('click', () => trimRows(0));
  window.addEventListener('pagehide', saveRows);
  window.addEventListener('online', () => { if (S.connState === 'reconnecting') connect(); });

  loadState();
  updateControls();
  updatePending();
  connect();
})();
