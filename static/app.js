/* sseproxy chat page: POST /v1/streams, then EventSource on its events_url.
 *
 * Model output is untrusted: marked turns it into HTML with raw HTML shown as text, and
 * DOMPurify keeps only a short list of tags; links keep only http(s) targets and open in a
 * new tab with rel="noopener noreferrer". No request leaves the page's origin.
 * "/" is the chat; "/?compare" sends one prompt twice, unpaced and paced, side by side.
 * With auth.mode = keys the page first asks GET /v1/session; logged out, it shows a login
 * form that exchanges a key for an HttpOnly session cookie (POST /v1/login), which then
 * authenticates every fetch and EventSource of the page. "Log out" ends the session and
 * forgets the conversation kept in this browser.
 */
'use strict';
(() => {
  const HISTORY_KEY = 'sseproxy.chat.v1';
  const PERSONA_KEY = 'sseproxy.persona';
  const COMPARE_MODEL = 'mock?tokens=400&rate=50&burst=1536';
  const STEP_MS = 50;               // what arrives within this window is one step
  const BURST_CHARS = 512;          // a step larger than this is a burst
  const $ = (sel, root = document) => root.querySelector(sel);

  // --- markdown, sanitized -------------------------------------------------------------
  const escapeHtml = (s) => s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
  window.marked.use({
    gfm: true,
    renderer: {
      html: (token) => escapeHtml(token.text),                 // raw HTML is shown, not run
      image: (token) => escapeHtml(token.text ? `[image: ${token.text}]` : '[image]'),
    },
  });
  const purify = window.DOMPurify;
  purify.addHook('afterSanitizeAttributes', (node) => {
    if (node.tagName !== 'A') return;
    if (/^https?:\/\//i.test(node.getAttribute('href') || '')) {
      node.setAttribute('target', '_blank');
      node.setAttribute('rel', 'noopener noreferrer');
    } else {
      node.removeAttribute('href');
    }
  });
  const PURIFY = {
    ALLOWED_TAGS: ['a', 'p', 'br', 'hr', 'h1', 'h2', 'h3', 'h4', 'h5', 'h6', 'ul', 'ol',
      'li', 'strong', 'em', 'del', 'code', 'pre', 'blockquote', 'table', 'thead', 'tbody',
      'tr', 'th', 'td'],
    ALLOWED_ATTR: ['href', 'title', 'start', 'class', 'align'],
  };

  // While an answer streams, a last line that is only a list marker or a run of - = * _
  // is held back until more text comes: under a paragraph it would turn that paragraph
  // into a heading for a moment ("Steps:\n-" is a setext heading), or show an empty bullet.
  const UNFINISHED_LINE = /\n[ \t]{0,3}(?:[-+*=_]+|\d{1,9}[.)])[ \t]*$/;

  function renderMarkdown(el, text, streaming = false) {
    if (streaming) text = text.replace(UNFINISHED_LINE, '\n');
    el.innerHTML = purify.sanitize(window.marked.parse(text), PURIFY);
    for (const pre of el.querySelectorAll('pre')) {
      const button = document.createElement('button');
      button.type = 'button';
      button.className = 'copy-code';
      button.textContent = 'Copy';
      button.setAttribute('aria-label', 'Copy code');
      button.addEventListener('click', () => copy(pre.querySelector('code') || pre, button));
      pre.append(button);
    }
  }

  async function copy(source, button) {
    const text = typeof source === 'string' ? source : source.textContent;
    try {
      await navigator.clipboard.writeText(text);
    } catch {
      const area = Object.assign(document.createElement('textarea'), { value: text });
      document.body.append(area);
      area.select();
      document.execCommand('copy');
      area.remove();
    }
    const label = button.textContent;
    button.textContent = 'Copied';
    setTimeout(() => { button.textContent = label; }, 1200);
  }

  // --- one stream: POST /v1/streams, then EventSource ----------------------------------
  class Run {
    /** view: {text(raw), state(name, detail), end(kind, figures)} */
    constructor(body, view) {
      Object.assign(this, { body, view, text: '', last: 0, events: 0, maxStep: 0,
        maxGap: 0, arrivals: [], ended: false, stopped: false, es: null, url: null });
    }

    async start() {
      this.t0 = performance.now();
      let res, data;
      try {
        res = await fetch('/v1/streams', {
          method: 'POST', headers: { 'Content-Type': 'application/json' },
          body: JSON.stringify(this.body),
        });
        data = await res.json().catch(() => null);
      } catch {
        return this.fail({ message: 'sseproxy could not be reached.', retryable: true });
      }
      if (res.status === 401) showLogin(true);      // the session ended
      if (!res.ok || !data) {
        return this.fail((data && data.error) || { message: `HTTP ${res.status}` });
      }
      this.url = data.events_url;
      if (this.stopped) return this.cancel();
      this.follow();
    }

    follow() {
      const es = this.es = new EventSource(this.url);
      es.onopen = () => {
        if (this.ended) return;
        this.view.state('streaming');
      };
      es.onmessage = (e) => {
        if (!this.fresh(e)) return;
        const piece = JSON.parse(e.data).content || '';
        const now = performance.now();
        if (this.tFirst === undefined) this.tFirst = now;
        else this.maxGap = Math.max(this.maxGap, now - this.tLast);
        this.tLast = now;
        this.arrivals.push([now - this.t0, piece.length]);
        this.events += 1;
        if (this.stepStart === undefined || now - this.stepStart > STEP_MS) {
          this.stepStart = now;
          this.step = 0;
        }
        this.step += piece.length;
        this.maxStep = Math.max(this.maxStep, this.step);
        this.text += piece;
        this.view.text(this.text);
      };
      es.addEventListener('done', (e) => {
        if (!this.fresh(e)) return;
        this.end('done', JSON.parse(e.data));
      });
      es.addEventListener('error', (e) => {
        if (this.ended) return;
        if (e instanceof MessageEvent) {             // `event: error` from sseproxy
          if (!this.fresh(e)) return;
          const err = (JSON.parse(e.data) || {}).error || {};
          return this.fail(err);
        }
        if (es.readyState === EventSource.CONNECTING) {
          this.view.state('reconnecting');           // the browser retries by itself
        } else {
          this.fail({ message: 'The connection to sseproxy was lost.', retryable: true });
        }
      });
    }

    /** An event after the last one seen (a resume never repeats one; this makes sure). */
    fresh(e) {
      const n = Number((e.lastEventId || '').split('.').pop());
      if (!Number.isFinite(n) || n <= this.last) return false;
      this.last = n;
      return true;
    }

    /** detail: the done event's data (usage, and what the server's pacing did). */
    figures(detail) {
      const usage = detail && detail.usage;
      const f = { ttft: this.tFirst === undefined ? null : this.tFirst - this.t0,
        events: this.events, maxStep: this.maxStep, maxGap: this.maxGap, tps: null,
        pacing: (detail && detail.pacing) || null };
      const span = (this.tLast - this.tFirst) / 1000;
      const tokens = usage && usage.completion_tokens ? usage.completion_tokens : this.events;
      if (span > 0.05) f.tps = tokens / span;
      return f;
    }

    end(kind, detail) {
      if (this.ended) return;
      this.ended = true;
      if (this.es) this.es.close();
      this.view.end(kind, this.figures(kind === 'done' ? detail : null), detail);
    }

    fail(error) { this.end('error', error); }

    stop() {
      if (this.ended) return;
      this.stopped = true;
      if (this.url) this.cancel();
      this.end('stopped', null);
    }

    cancel() {
      if (this.es) this.es.close();
      fetch(this.url, { method: 'DELETE' }).catch(() => {});
    }
  }

  /** What sseproxy's pacer did to the stream: only the server knows whether the upstream
   * sent a burst that it then smoothed (the done event's `pacing`). */
  function pacingNote(p) {
    if (p.mode === 'off') return 'unpaced';
    if (!p.smoothed_chars) return 'no burst to smooth';
    return `pacing smoothed ${p.smoothed_chars.toLocaleString()} burst characters`
      + ` (up to ${Number(p.max_lag_s).toFixed(2)} s later)`;
  }

  /** The small print. measured: also what reached the page (the comparison view); the
   * chat shows it only when the server did not say what pacing did. */
  function describe(f, measured = false) {
    const parts = [];
    if (f.ttft !== null) parts.push(`first token ${(f.ttft / 1000).toFixed(2)} s`);
    if (f.tps !== null) parts.push(`${f.tps.toFixed(0)} tokens/s`);
    if (f.events && (measured || !f.pacing)) {
      parts.push(f.maxStep > BURST_CHARS
        ? `burst: ${f.maxStep.toLocaleString()} characters within ${STEP_MS} ms`
        : `smooth: at most ${f.maxStep} characters per ${STEP_MS} ms`);
    }
    if (f.pacing) parts.push(pacingNote(f.pacing));
    if (f.maxGap >= 1000) parts.push(`longest silence ${(f.maxGap / 1000).toFixed(1)} s`);
    return parts.join(' · ');
  }

  /** Bars of characters received per 100 ms since the request, on one shared scale. */
  function drawTimelines(runs, panes) {
    const bin = 100;
    const end = Math.max(...runs.map((r) => (r.ended ? r.tLast || 0 : performance.now()) - r.t0));
    const count = Math.max(1, Math.ceil(end / bin));
    const sums = runs.map((r) => {
      const bins = new Array(count).fill(0);
      for (const [t, n] of r.arrivals) bins[Math.min(count - 1, Math.floor(t / bin))] += n;
      return bins;
    });
    const top = Math.max(1, ...sums.flat());
    sums.forEach((bins, i) => {
      const strip = $('.timeline', panes[i]);
      while (strip.children.length < count) strip.append(document.createElement('i'));
      while (strip.children.length > count) strip.lastChild.remove();
      bins.forEach((n, j) => { strip.children[j].style.height = `${(100 * n) / top}%`; });
    });
  }

  function autosize(area) {
    area.style.height = 'auto';
    area.style.height = `${area.scrollHeight + 2}px`;
  }

  // CSP (style-src 'self') forbids inline style attributes; CSSOM changes are fine.
  const prompt = $('#prompt');
  const composer = $('#composer');
  const sendButton = $('#send');
  const stopButton = $('#stop');
  const status = $('#status');
  let current = null;

  function busy(run) {
    current = run;
    stopButton.hidden = !run;
    sendButton.hidden = !!run;
  }

  prompt.addEventListener('input', () => autosize(prompt));
  prompt.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      composer.requestSubmit();
    }
  });
  stopButton.addEventListener('click', () => { if (current) current.stop(); });

  // --- the chat ------------------------------------------------------------------------
  function chat() {
    const list = $('#messages');
    const personaSelect = $('#persona');
    let history = [];
    try { history = JSON.parse(localStorage.getItem(HISTORY_KEY)) || []; } catch { history = []; }
    const save = () => localStorage.setItem(HISTORY_KEY, JSON.stringify(history));
    const nearBottom = () => innerHeight + scrollY >= document.body.scrollHeight - 80;
    const follow = (wasNear) => { if (wasNear) scrollTo(0, document.body.scrollHeight); };

    function showUser(text) {
      const li = document.createElement('li');
      li.className = 'msg user';
      const body = document.createElement('div');
      body.className = 'body';
      body.textContent = text;
      li.append(body);
      list.append(li);
    }

    function answerItem() {
      const li = $('#answer-template').content.firstElementChild.cloneNode(true);
      li.querySelector('.copy').addEventListener('click', (e) =>
        copy(li.dataset.raw || '', e.currentTarget));
      li.querySelector('.copy').setAttribute('aria-label', 'Copy answer');
      list.append(li);
      return li;
    }

    function showAnswer(message) {
      const li = answerItem();
      li.dataset.state = message.stopped ? 'stopped' : 'done';
      li.dataset.raw = message.content;
      renderMarkdown($('.body', li), message.content);
      $('.meta', li).textContent = message.meta || '';
      if (message.stopped) $('.state', li).textContent = 'Stopped';
    }

    function refresh() {
      $('#empty').hidden = history.length > 0;
    }

    for (const m of history) (m.role === 'user' ? showUser(m.content) : showAnswer(m));
    refresh();

    // upstream.kind = "local": /readyz says "loading_model" until the model answers.
    const loading = $('#loading');
    const checkModel = () => fetch('/readyz', { cache: 'no-store' })
      .then((r) => r.json())
      .then((ready) => {
        loading.hidden = ready.status !== 'loading_model';
        if (!loading.hidden) setTimeout(checkModel, 1000);
      })
      .catch(() => {});
    checkModel();

    fetch('/v1/personas').then((r) => (r.ok ? r.json() : { data: [] })).then((list) => {
      for (const p of list.data || []) {
        personaSelect.append(new Option(p.title || p.id, p.id));
      }
      personaSelect.value = localStorage.getItem(PERSONA_KEY) || '';
      if (personaSelect.selectedIndex < 0) personaSelect.value = '';
    }).catch(() => {});
    personaSelect.addEventListener('change', () =>
      localStorage.setItem(PERSONA_KEY, personaSelect.value));

    function ask() {
      const li = answerItem();
      const body = $('.body', li);
      const stateText = $('.state', li);
      let pending = false;
      let raw = '';
      const draw = (streaming) => {
        pending = false;
        const wasNear = nearBottom();
        renderMarkdown(body, raw, streaming);
        follow(wasNear);
      };
      const messages = history.map(({ role, content }) => ({ role, content }));
      const request = { messages };
      if (personaSelect.value) request.persona = personaSelect.value;
      const run = new Run(request, {
        text(text) {
          raw = text;
          li.dataset.raw = text;
          if (!pending) { pending = true; requestAnimationFrame(() => draw(!run.ended)); }
        },
        state(name) {
          li.dataset.state = name;
          stateText.textContent = name === 'reconnecting' ? 'Reconnecting…' : '';
        },
        end(kind, figures, detail) {
          busy(null);
          raw = run.text;
          draw(false);
          li.dataset.state = kind;
          const meta = describe(figures);
          $('.meta', li).textContent = meta;
          if (kind === 'error') {
            const message = (detail && detail.message) || 'Something went wrong.';
            stateText.textContent = `Error: ${message}`;
            status.textContent = `Error: ${message}`;
            const retry = $('.retry', li);
            retry.hidden = false;
            retry.addEventListener('click', () => { li.remove(); start(); }, { once: true });
            return;
          }
          stateText.textContent = kind === 'stopped' ? 'Stopped' : '';
          status.textContent = kind === 'stopped' ? 'Stopped' : 'Answer complete';
          if (run.text) {
            history.push({ role: 'assistant', content: run.text, meta,
              ...(kind === 'stopped' ? { stopped: true } : {}) });
            save();
          }
        },
      });
      const start = () => ask();
      busy(run);
      follow(true);
      run.start();
    }

    composer.addEventListener('submit', (e) => {
      e.preventDefault();
      const text = prompt.value.trim();
      if (!text || current) return;
      prompt.value = '';
      autosize(prompt);
      history.push({ role: 'user', content: text });
      save();
      showUser(text);
      refresh();
      ask();
    });

    $('#new-chat').addEventListener('click', () => {
      if (current) current.stop();
      history = [];
      save();
      list.replaceChildren();
      refresh();
      prompt.focus();
    });
  }

  // --- the comparison view -------------------------------------------------------------
  function compare() {
    document.body.classList.add('compare');
    document.title = 'sseproxy: paced and unpaced';
    const link = $('#view-link');
    link.textContent = 'Back to the chat';
    link.href = '/';
    const model = new URLSearchParams(location.search).get('model') || COMPARE_MODEL;
    $('#scenario').textContent = model;
    prompt.placeholder = 'A prompt to send to both (Enter runs)';
    let runs = [];
    const panes = [...document.querySelectorAll('.pane')];
    let timelinePending = false;
    const timelines = () => {
      if (timelinePending) return;
      timelinePending = true;
      requestAnimationFrame(() => { timelinePending = false; drawTimelines(runs, panes); });
    };

    composer.addEventListener('submit', (e) => {
      e.preventDefault();
      const text = prompt.value.trim() || 'Tell me a story.';
      if (current) return;
      runs = [];
      for (const pane of panes) {
        const body = $('.body', pane);
        const meta = $('.meta', pane);
        body.replaceChildren();
        meta.textContent = '';
        pane.dataset.state = 'streaming';
        const request = { messages: [{ role: 'user', content: text }], model };
        if (pane.dataset.pacing === 'off') request.pacing = 'off';
        let pending = false;
        const run = new Run(request, {
          text() {
            timelines();
            if (pending) return;
            pending = true;
            requestAnimationFrame(() => {
              pending = false;
              if (!run.ended) renderMarkdown(body, run.text, true);
              body.scrollTop = body.scrollHeight;
            });
          },
          state(name) { pane.dataset.state = name; },
          end(kind, figures, detail) {
            renderMarkdown(body, run.text);
            pane.dataset.state = kind;
            meta.textContent = kind === 'error'
              ? `Error: ${(detail && detail.message) || 'failed'}`
              : describe(figures, true) + (kind === 'stopped' ? ' · stopped' : '');
            timelines();
            if (runs.every((r) => r.ended)) busy(null);
          },
        });
        runs.push(run);
      }
      busy({ stop: () => runs.forEach((r) => r.stop()) });
      runs.forEach((r) => r.start());
    });
  }

  // --- login (auth.mode = keys) ------------------------------------------------------
  const loginForm = $('#login-form');
  const loginKey = $('#login-key');
  const loginError = $('#login-error');
  const logoutButton = $('#logout');
  let started = false;
  let pendingSubmit = false;
  // A prompt sent before GET /v1/session answered is sent once the view has started.
  composer.addEventListener('submit', (e) => {
    if (started) return;
    e.preventDefault();
    pendingSubmit = true;
  });

  function showLogin(show) {
    document.body.classList.toggle('logged-out', show);
    $('#login').hidden = !show;
    if (show) loginKey.focus();
  }

  function enter(session) {
    logoutButton.hidden = !(session && session.mode === 'keys');
    showLogin(false);
    if (started) return;
    started = true;
    if (new URLSearchParams(location.search).has('compare')) compare(); else chat();
    if (pendingSubmit) composer.requestSubmit();
    pendingSubmit = false;
  }

  loginForm.addEventListener('submit', async (e) => {
    e.preventDefault();
    loginError.textContent = '';
    let res, data;
    try {
      res = await fetch('/v1/login', {
        method: 'POST', headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ key: loginKey.value }),
      });
      data = await res.json().catch(() => null);
    } catch {
      loginError.textContent = 'sseproxy could not be reached.';
      return;
    }
    if (!res.ok || !data) {
      loginError.textContent = (data && data.error && data.error.message) || `HTTP ${res.status}`;
      return;
    }
    loginKey.value = '';
    enter(data);
  });

  logoutButton.addEventListener('click', async () => {
    if (current) current.stop();
    await fetch('/v1/logout', { method: 'POST' }).catch(() => {});
    localStorage.removeItem(HISTORY_KEY);
    location.reload();
  });

  fetch('/v1/session', { cache: 'no-store' })
    .then((r) => (r.ok ? r.json() : null)).catch(() => null)
    .then((session) => {
      if (session && session.mode === 'keys' && !session.authenticated) showLogin(true);
      else enter(session);
    });
})();
